//! The console's page shell (header, navigation, logout form, the live badge), the login page,
//! its embedded assets and the small formatting helpers every page shares. maud escapes every
//! value it interpolates, so names from the store render as text.

use maud::{DOCTYPE, Markup, html};

/// The stylesheet and the one script of our own, compiled into the binary.
pub const CSS: &str = include_str!("assets/console.css");
pub const JS: &str = include_str!("assets/console.js");

/// The pages of the navigation: path under `/console`, title.
pub const NAV: [(&str, &str); 7] = [
    ("/console/", "Overview"),
    ("/console/sites", "Sites and groups"),
    ("/console/jobs", "Jobs"),
    ("/console/runs", "Runs"),
    ("/console/checkpoints", "Checkpoints"),
    ("/console/plugins", "Plugins"),
    ("/console/history", "History"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Content Mover" }
            link rel="stylesheet" href="/console/assets/console.css";
        }
    }
}

/// A page of a logged-in operator: `here` is its navigation path; `flash` a message from the
/// action that led here.
pub fn page(here: &str, title: &str, csrf: &str, flash: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    span.brand { "Content Mover" }
                    @for (path, name) in NAV {
                        a href=(path) class=[(path == here).then_some("here")] { (name) }
                    }
                    span #live .live { "reload for news" }
                    form.inline method="post" action="/console/logout" {
                        input type="hidden" name="csrf" value=(csrf);
                        button type="submit" { "Log out" }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(f) = flash {
                        p.flash #flash { (f) }
                    }
                    (body)
                }
                script src="/console/assets/console.js" {}
            }
        }
    }
}

/// The login page: a token form, or under mutual TLS what certificate is needed.
pub fn login(message: Option<&str>, tls: bool) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body {
                main.login {
                    h1 { "Content Mover console" }
                    @if let Some(m) = message {
                        p.flash.error #login-error { (m) }
                    }
                    @if tls {
                        p.note {
                            "This manager uses mutual TLS: present an operator certificate of the \
                             cluster (cmover cert issue --role operator) and reload."
                        }
                    } @else {
                        form.box method="post" action="/console/login" {
                            label for="token" { "Operator token" }
                            input #token type="password" name="token" autocomplete="current-password" autofocus;
                            button type="submit" { "Log in" }
                        }
                        p.note { "The token is the content of the manager's --operator-token-file." }
                    }
                }
            }
        }
    }
}

/// A hidden CSRF field for a form.
pub fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// A one-button POST form.
pub fn button(action: &str, csrf: &str, label: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            (csrf_field(csrf))
            button type="submit" { (label) }
        }
    }
}

/// `2026-12-07 12:42:50 UTC` for milliseconds since the epoch (`—` for 0).
pub fn time(ms: u64) -> String {
    if ms == 0 { "—".into() } else { format!("{} UTC", crate::utc_time(ms)) }
}

/// `3.2 s`, `4 min`, `2 h` for a duration in milliseconds.
pub fn span(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..7_200_000 => format!("{} min", ms / 60_000),
        _ => format!("{} h", ms / 3_600_000),
    }
}

/// How long ago `ms` was, from `now`.
pub fn ago(ms: u64, now: u64) -> String {
    if ms == 0 { "never".into() } else { format!("{} ago", span(now.saturating_sub(ms))) }
}

/// Bytes in the largest unit that keeps a digit before the point.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// A progress bar of `done` out of `total`.
pub fn bar(done: usize, total: usize) -> Markup {
    html! { progress max=(total.max(1)) value=(done) title=(format!("{done} of {total}")) {} " " (done) "/" (total) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(time(0), "—");
        assert_eq!(time(1_796_647_370_000), "2026-12-07 12:42:50 UTC");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(span(1500), "1.5 s");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(bytes(12), "12 B");
    }

    #[test]
    fn values_from_the_store_render_as_text() {
        let p =
            page("/console/", "<script>alert(1)</script>", "c\"srf", Some("<b>x</b>"), html! {});
        let s = p.into_string();
        assert!(!s.contains("<script>alert(1)"));
        assert!(s.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(s.contains("c&quot;srf"));
        assert!(!s.contains("<b>x</b>"));
    }
}
