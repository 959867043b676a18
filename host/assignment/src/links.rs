//! Symlink chains judged on the whole tree. Each link's target is checked lexically when it is
//! decoded ([`check_symlink_target`](crate::format::check_symlink_target)), but two links that
//! each pass can combine into one that leaves the site (`d/up -> ../..`, then
//! `x -> d/up/../etc/passwd`). [`resolve_chain`] follows a link the way the kernel would,
//! component by component, reading every link on the way (bounded, loops refused), and says
//! where it ends up: a link is accepted only if every step stays inside the root.
//!
//! The walk is generic over how a link is read, so the manager (staging) and the site (a
//! release, read beneath its root descriptor) judge links with the same code.

use std::io;

/// Most links followed while resolving one link (the kernel's own limit is 40).
pub const MAX_FOLLOWS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("resolves outside the site (through {via})")]
    Escapes { via: String },
    #[error("resolves through an absolute link {via}")]
    Absolute { via: String },
    #[error("more than {MAX_FOLLOWS} links in its chain (a loop?)")]
    TooMany,
    #[error("reading link {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Resolves the link at `link` (a checked path) whose target is `target`. `readlink(p)` gives
/// the target of `p` when `p` (a path with no link in its parents) is a symlink, `None` when it
/// is anything else or does not exist. Returns the path the chain ends at ("" is the root).
pub fn resolve_chain(
    link: &str,
    target: &str,
    mut readlink: impl FnMut(&str) -> io::Result<Option<String>>,
) -> Result<String, ChainError> {
    let mut at: Vec<String> = link.split('/').map(str::to_owned).collect();
    at.pop();
    // Components still to walk, next first (reversed, so a link's target is pushed in front).
    let mut todo: Vec<String> = Vec::new();
    push_target(&mut todo, target, link)?;
    let mut follows = 1;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return Err(ChainError::Escapes { via: link.to_owned() });
                }
            }
            _ => {
                at.push(c);
                let here = at.join("/");
                let read = readlink(&here)
                    .map_err(|source| ChainError::Io { path: here.clone(), source })?;
                if let Some(t) = read {
                    follows += 1;
                    if follows > MAX_FOLLOWS {
                        return Err(ChainError::TooMany);
                    }
                    at.pop();
                    push_target(&mut todo, &t, &here)?;
                }
            }
        }
    }
    Ok(at.join("/"))
}

fn push_target(todo: &mut Vec<String>, target: &str, via: &str) -> Result<(), ChainError> {
    if target.starts_with('/') {
        return Err(ChainError::Absolute { via: via.to_owned() });
    }
    todo.extend(target.split('/').rev().map(str::to_owned));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(links: &[(&str, &str)], link: &str) -> Result<String, ChainError> {
        let map: HashMap<String, String> =
            links.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        resolve_chain(link, &map[link], |p| Ok(map.get(p).cloned()))
    }

    #[test]
    fn two_links_that_each_pass_do_not_combine_into_an_escape() {
        let deep = (0..12).map(|i| format!("d{i}")).collect::<Vec<_>>().join("/");
        let up = format!("{deep}/up");
        let dots = [".."; 11].join("/");
        let passwd_target = format!("{up}/{dots}/etc/passwd");
        // Each passes the lexical check on its own.
        assert!(crate::format::check_symlink_target(&up, "../..").is_ok());
        assert!(crate::format::check_symlink_target("passwd.txt", &passwd_target).is_ok());
        let links = [(up.as_str(), "../.."), ("passwd.txt", passwd_target.as_str())];
        assert_eq!(
            resolve(&links, &up).unwrap(),
            (0..10).map(|i| format!("d{i}")).collect::<Vec<_>>().join("/")
        );
        assert!(matches!(resolve(&links, "passwd.txt"), Err(ChainError::Escapes { .. })));
    }

    #[test]
    fn chains_inside_resolve_and_loops_are_refused() {
        let links = [("a", "b"), ("b", "c/d"), ("x", "y"), ("y", "x"), ("c/up", "../b")];
        assert_eq!(resolve(&links, "a").unwrap(), "c/d");
        assert_eq!(resolve(&links, "c/up").unwrap(), "c/d");
        assert!(matches!(resolve(&links, "x"), Err(ChainError::TooMany)));
    }
}
