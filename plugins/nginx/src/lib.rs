//! Cache invalidator for stock nginx `proxy_cache` (no purge module). Every granted endpoint
//! is an nginx cache (HTTP). Two mechanisms, both with stock modules only:
//!
//! - **A path** is refreshed, not deleted: `HEAD <path>` with `Host: <site>` and
//!   `X-CM-Refresh: 1`. The operator's config makes that header bypass the cache lookup
//!   (`proxy_cache_bypass`) from trusted addresses only, so nginx fetches the path from the
//!   backend and stores the answer over the old entry — the new body, or for a removed path
//!   the backend's 404 (which the config caches too, `proxy_cache_valid 404`, else the old
//!   entry would stay).
//! - **A whole site** is purged by a generation bump: the cache key ends in a per-site
//!   generation that an `auth_request` subrequest reads from a cached stamp
//!   (`/.cm-generation`); `HEAD /.cm-purge-site` with the refresh header refetches that stamp
//!   (a new `$msec`), so every entry of the site is keyed under the old generation and is
//!   never served again (nginx evicts it after `inactive`). Other sites keep theirs.
//!
//! Each answer must say `X-CM-Cache: BYPASS` (`add_header X-CM-Cache $upstream_cache_status
//! always;`): otherwise the config does not honour the refresh header and the call fails,
//! instead of pretending the cache was refreshed. The nginx config is in `docs/plugins.md`.

use cm_plugin_sdk::endpoint::{self, HttpRequest};
use cm_plugin_sdk::{CacheInvalidator, log};

struct Nginx;

/// The request header that makes nginx refetch (the config's `proxy_cache_bypass`).
const REFRESH: &str = "X-CM-Refresh";
/// The response header carrying `$upstream_cache_status`.
const STATUS: &str = "x-cm-cache";

/// `HEAD path` with the refresh header and `Host: site` to every granted nginx. Any answer
/// below 500 that nginx says bypassed its cache is a refresh (a 404 replaces a removed path's
/// entry); `want_success` also requires a 2xx (the site's generation stamp).
fn refresh_all(site: &str, path: &str, want_success: bool) -> Result<(), String> {
    let caches = endpoint::granted();
    if caches.is_empty() {
        return Err("no nginx endpoint granted".into());
    }
    for cache in caches {
        let request = HttpRequest {
            method: "HEAD".into(),
            path: path.into(),
            headers: vec![("Host".into(), site.into()), (REFRESH.into(), "1".into())],
            body: Vec::new(),
        };
        let response = endpoint::http(&cache, &request).map_err(|e| e.message)?;
        let status = response.status;
        let cache_status = response
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(STATUS))
            .map(|(_, value)| value.as_str());
        if status >= 500 || (want_success && !(200..300).contains(&status)) {
            return Err(format!("{cache}: refreshing {path} of {site}: HTTP {status}"));
        }
        if cache_status != Some("BYPASS") {
            return Err(format!(
                "{cache}: refreshing {path} of {site}: nginx answered HTTP {status} with \
                 X-CM-Cache {cache_status:?}, not BYPASS: its config does not honour {REFRESH} \
                 (proxy_cache_bypass) for this address"
            ));
        }
        log::write(
            log::Level::Debug,
            &format!("{cache}: refreshed {path} of {site}: HTTP {status}"),
        );
    }
    Ok(())
}

impl CacheInvalidator for Nginx {
    fn invalidate(site: String, paths: Vec<String>) -> Result<(), String> {
        for path in &paths {
            let path = if path.starts_with('/') { path.clone() } else { format!("/{path}") };
            refresh_all(&site, &path, false)?;
        }
        log::write(log::Level::Info, &format!("refreshed {} paths of {site}", paths.len()));
        Ok(())
    }

    fn purge_site(site: String) -> Result<(), String> {
        refresh_all(&site, "/.cm-purge-site", true)?;
        log::write(log::Level::Info, &format!("new cache generation for {site}"));
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        if endpoint::granted().is_empty() {
            Err("no nginx endpoint granted".into())
        } else {
            Ok(())
        }
    }
}

cm_plugin_sdk::cache_invalidator!(Nginx);
