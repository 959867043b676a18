//! Cache invalidator for Varnish. Every granted endpoint is a Varnish instance (HTTP):
//! changed paths are invalidated with `PURGE <path>` and a whole site with `BAN /`, both with
//! the site as `Host`. The VCL side is the usual one:
//!
//! ```vcl
//! sub vcl_recv {
//!     if (req.method == "PURGE") { return (purge); }
//!     if (req.method == "BAN") { ban("req.http.host == " + req.http.host); return (synth(200, "Ban added")); }
//! }
//! ```

use cm_plugin_sdk::endpoint::{self, HttpRequest};
use cm_plugin_sdk::{CacheInvalidator, log};

struct Varnish;

/// Send `method path` with `Host: site` to every granted Varnish; any non-2xx is an error.
fn send_all(method: &str, site: &str, path: &str) -> Result<(), String> {
    let caches = endpoint::granted();
    if caches.is_empty() {
        return Err("no Varnish endpoint granted".into());
    }
    for cache in caches {
        let request = HttpRequest {
            method: method.into(),
            path: path.into(),
            headers: vec![("Host".into(), site.into())],
            body: Vec::new(),
        };
        let response = endpoint::http(&cache, &request).map_err(|e| e.message)?;
        if !(200..300).contains(&response.status) {
            let body = String::from_utf8_lossy(&response.body);
            return Err(format!(
                "{cache}: {method} {path} for {site}: HTTP {} {}",
                response.status,
                body.trim()
            ));
        }
        log::write(
            log::Level::Debug,
            &format!("{cache}: {method} {path} for {site}: HTTP {}", response.status),
        );
    }
    Ok(())
}

impl CacheInvalidator for Varnish {
    fn invalidate(site: String, paths: Vec<String>) -> Result<(), String> {
        for path in &paths {
            let path = if path.starts_with('/') { path.clone() } else { format!("/{path}") };
            send_all("PURGE", &site, &path)?;
        }
        log::write(log::Level::Info, &format!("purged {} paths of {site}", paths.len()));
        Ok(())
    }

    fn purge_site(site: String) -> Result<(), String> {
        send_all("BAN", &site, "/")
    }

    fn self_check() -> Result<(), String> {
        if endpoint::granted().is_empty() {
            Err("no Varnish endpoint granted".into())
        } else {
            Ok(())
        }
    }
}

cm_plugin_sdk::cache_invalidator!(Varnish);
