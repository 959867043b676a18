//! The operator commands: `cmover publish|commit|rollback`, `job`, `status`, `servers`,
//! `history`, `site create|list|show`, `group`. Each talks to the manager's API through
//! [`crate::client::Client`] and prints an aligned table, or the manager's JSON with `--json`.
//! One module per command group; this one holds what they share (tables, times, job waiting).

pub mod group;
pub mod history;
pub mod job;
pub mod publish;
pub mod site;
pub mod status;
mod wait;

use serde::Serialize;

/// Prints rows under headers, each column as wide as its widest cell (the last one unpadded).
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Prints a value as pretty JSON.
pub fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A time in ms since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC); `-` for 0.
pub fn utc(ms: u64) -> String {
    if ms == 0 { "-".into() } else { cm_manager::utc_time(ms) }
}

/// How long ago (or from now) `ms` is, e.g. `3s ago`, `in 2m`.
pub fn ago(ms: u64, now: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let (d, future) = if ms > now { (ms - now, true) } else { (now - ms, false) };
    let s = d / 1000;
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if future { format!("in {text}") } else { format!("{text} ago") }
}

pub fn now_ms() -> u64 {
    cm_manager::now_ms()
}

/// `cmover man DIR`: `cmover.1` and `cmover-<sub>[-<sub>].1` for every subcommand.
pub fn man_pages(cmd: clap::Command, dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages to {}", dir.display()))?;
    let n = std::fs::read_dir(dir)?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "1")))
        .count();
    println!("{n} man pages in {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "-");
        assert_eq!(super::utc(1_000), "1970-01-01 00:00:01");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_767_225_599_000), "2025-12-31 23:59:59");
    }
}
