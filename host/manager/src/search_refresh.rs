//! After a commit: telling a search engine which URLs changed, per hosted site
//! (`refresh.search` in the site's settings). Called by the manager once a run that changed
//! what is live succeeded, with the URLs of its [`CacheOrder`] (the site's `base_url` + each
//! changed or removed path), bounded retries, the outcome in the history.
//!
//! Formats: `indexnow` — a JSON `POST` of `{host, key, keyLocation, urlList}` as IndexNow
//! specifies (at most 10 000 URLs per request; a larger change is sent in several); and
//! `sitemap_ping` — `GET <url>?sitemap=<the site's sitemap URL>`, which needs no URL list. A
//! run whose paths are unknown (the caches were told to purge the whole site) sends the
//! sitemap ping as usual and skips IndexNow, saying so in the history.

use std::time::Duration;

use cm_tree::cache::{CacheChange, CacheOrder};
use cm_tree::http::JsonClient;
use hyper::Method;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// IndexNow's limit of URLs per request.
const INDEXNOW_MAX_URLS: usize = 10_000;
/// Attempts per request before the refresh is reported failed.
const ATTEMPTS: u32 = 3;

/// What follows a commit of the site (`HostedSite::refresh`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSettings {
    /// More changed paths than this and the caches are told to purge the whole site
    /// (`live_change.rs`). At most 10 000 (it travels in every GL's notification).
    #[serde(default = "default_cache_max_paths")]
    pub cache_max_paths: u32,
    /// The search engine told about changed URLs; `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchRefresh>,
}

fn default_cache_max_paths() -> u32 {
    1000
}

/// Most `cache_max_paths` a site may set.
pub const MAX_CACHE_PATHS: u32 = 10_000;

impl Default for RefreshSettings {
    fn default() -> Self {
        RefreshSettings { cache_max_paths: default_cache_max_paths(), search: None }
    }
}

/// A search-engine endpoint and how to speak to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRefresh {
    /// The endpoint (`http://…`), e.g. an IndexNow endpoint or a sitemap ping URL.
    pub url: String,
    pub format: SearchFormat,
    /// The site's public base URL (`https://www.example.com`): a changed path `/a.html` is
    /// announced as `https://www.example.com/a.html`; its host is IndexNow's `host`.
    pub base_url: String,
    /// IndexNow's key (8 to 128 of `[a-zA-Z0-9-]`); required for `indexnow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// IndexNow's `keyLocation` (default: `base_url/<key>.txt`, which IndexNow assumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_location: Option<String>,
    /// The sitemap URL a `sitemap_ping` announces (default: `base_url/sitemap.xml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sitemap: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchFormat {
    Indexnow,
    SitemapPing,
}

/// Why a site's search refresh settings are refused: the field and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub field: &'static str,
    pub why: String,
}

fn http_url(field: &'static str, url: &str) -> Result<(), SettingError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| SettingError {
        field,
        why: format!("`{url}` is not an http:// URL (the manager's client speaks plain HTTP)"),
    })?;
    if rest.is_empty()
        || rest.starts_with('/')
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(SettingError { field, why: format!("`{url}` has no host or has spaces") });
    }
    Ok(())
}

impl RefreshSettings {
    /// Checks what an operator wrote, naming the field at fault.
    pub fn check(&self) -> Result<(), SettingError> {
        if self.cache_max_paths > MAX_CACHE_PATHS {
            return Err(SettingError {
                field: "refresh.cache_max_paths",
                why: format!("{} is more than {MAX_CACHE_PATHS}", self.cache_max_paths),
            });
        }
        let Some(s) = &self.search else { return Ok(()) };
        http_url("refresh.search.url", &s.url)?;
        host_of(&s.base_url).ok_or_else(|| SettingError {
            field: "refresh.search.base_url",
            why: format!("`{}` is not an http:// or https:// URL with a host", s.base_url),
        })?;
        if s.format == SearchFormat::Indexnow {
            let key = s.key.as_deref().unwrap_or_default();
            let plain = key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !(8..=128).contains(&key.len()) || !plain {
                return Err(SettingError {
                    field: "refresh.search.key",
                    why: "indexnow needs a key of 8 to 128 of [a-zA-Z0-9-]".into(),
                });
            }
        }
        Ok(())
    }
}

/// The host of an `http://` or `https://` URL.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty() && !host.contains(char::is_whitespace)).then_some(host)
}

/// The absolute URLs of an order's paths (`None`: the paths are unknown).
pub fn changed_urls(base_url: &str, order: &CacheOrder) -> Option<Vec<String>> {
    let base = base_url.trim_end_matches('/');
    match &order.change {
        CacheChange::Paths { changed, removed } => {
            Some(changed.iter().chain(removed).map(|p| format!("{base}{p}")).collect())
        }
        CacheChange::Site { .. } => None,
    }
}

/// Tells the site's search engine about the run's change; returns the history line.
pub async fn refresh(settings: &SearchRefresh, order: &CacheOrder) -> String {
    let client = JsonClient::new("", Duration::from_secs(10));
    match settings.format {
        SearchFormat::SitemapPing => {
            let base = settings.base_url.trim_end_matches('/');
            let sitemap = settings.sitemap.clone().unwrap_or_else(|| format!("{base}/sitemap.xml"));
            let sep = if settings.url.contains('?') { '&' } else { '?' };
            let url = format!(
                "{}{sep}sitemap={}",
                settings.url,
                utf8_percent_encode(&sitemap, NON_ALPHANUMERIC)
            );
            match send(&client, Method::GET, &url, None).await {
                Ok(attempts) => format!("search refresh: sitemap ping sent ({attempts} attempts)"),
                Err(e) => format!("search refresh failed: sitemap ping: {e}"),
            }
        }
        SearchFormat::Indexnow => {
            let Some(urls) = changed_urls(&settings.base_url, order) else {
                return format!(
                    "search refresh skipped: IndexNow needs the changed URLs, and this run's are unknown ({})",
                    order.describe()
                );
            };
            let host = host_of(&settings.base_url).unwrap_or_default().to_string();
            let key = settings.key.clone().unwrap_or_default();
            let base = settings.base_url.trim_end_matches('/');
            let key_location =
                settings.key_location.clone().unwrap_or_else(|| format!("{base}/{key}.txt"));
            let mut sent = 0;
            for chunk in urls.chunks(INDEXNOW_MAX_URLS) {
                let body = serde_json::json!({
                    "host": host, "key": key, "keyLocation": key_location, "urlList": chunk,
                });
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                if let Err(e) = send(&client, Method::POST, &settings.url, Some(bytes)).await {
                    return format!(
                        "search refresh failed: IndexNow: {sent} of {} URLs sent, then {e}",
                        urls.len()
                    );
                }
                sent += chunk.len();
            }
            format!("search refresh: IndexNow told of {sent} changed URLs")
        }
    }
}

/// One request, tried up to [`ATTEMPTS`] times (a second, then two, between them) while the
/// failure may pass (no answer, 429, 5xx). Ok: the attempts it took.
async fn send(
    client: &JsonClient,
    method: Method,
    url: &str,
    body: Option<Vec<u8>>,
) -> Result<u32, String> {
    let mut attempt = 1;
    loop {
        let failure = match client.send(method.clone(), url, body.clone(), &[]).await {
            Ok(_) => return Ok(attempt),
            Err(cm_tree::http::ClientError::Status { status, body, .. })
                if status.is_client_error() && status.as_u16() != 429 =>
            {
                // The endpoint refused the request itself: sending it again changes nothing.
                return Err(format!("HTTP {status}: {}", body.trim()));
            }
            Err(e) => e.to_string(),
        };
        if attempt >= ATTEMPTS {
            return Err(format!("{failure} (after {attempt} attempts)"));
        }
        tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
        attempt += 1;
    }
}

/// After run `run` ended: when it succeeded, changed what is live, and its site has a search
/// engine configured, tells the engine (in a task of its own) and writes the outcome into the
/// history. Called once per run, when the manager finishes it.
pub(crate) fn after_run(inner: std::sync::Arc<crate::server::Inner>, run: u64) {
    let Ok(Some(r)) = inner.db.run(run) else { return };
    let Some(order) = r.cache.clone() else { return };
    if r.phase != crate::model::RunPhase::Succeeded {
        return;
    }
    let Ok(Some(site)) = inner.db.site(&order.site) else { return };
    let Some(settings) = site.refresh.search.clone() else { return };
    tokio::spawn(async move {
        let line = refresh(&settings, &order).await;
        tracing::info!(run, site = %order.site, "{line}");
        if let Err(e) =
            inner.db.write(|t| t.log(crate::now_ms(), Some(r.job), Some(run), line.clone()))
        {
            tracing::error!(run, "recording the search refresh: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indexnow(key: Option<&str>) -> RefreshSettings {
        RefreshSettings {
            cache_max_paths: 10,
            search: Some(SearchRefresh {
                url: "http://127.0.0.1:9/indexnow".into(),
                format: SearchFormat::Indexnow,
                base_url: "https://www.example.com/".into(),
                key: key.map(str::to_string),
                key_location: None,
                sitemap: None,
            }),
        }
    }

    #[test]
    fn settings_are_checked_by_field() {
        assert_eq!(indexnow(Some("abcdef123456")).check(), Ok(()));
        assert_eq!(indexnow(None).check().unwrap_err().field, "refresh.search.key");
        assert_eq!(indexnow(Some("bad key!")).check().unwrap_err().field, "refresh.search.key");
        let mut s = indexnow(Some("abcdef123456"));
        s.search.as_mut().unwrap().url = "ftp://x".into();
        assert_eq!(s.check().unwrap_err().field, "refresh.search.url");
        let mut s = indexnow(Some("abcdef123456"));
        s.search.as_mut().unwrap().base_url = "www.example.com".into();
        assert_eq!(s.check().unwrap_err().field, "refresh.search.base_url");
        let s = RefreshSettings { cache_max_paths: MAX_CACHE_PATHS + 1, search: None };
        assert_eq!(s.check().unwrap_err().field, "refresh.cache_max_paths");
    }

    #[test]
    fn urls_are_the_base_and_each_path() {
        let order = CacheOrder {
            site: "www".into(),
            from: Some(1),
            to: 2,
            change: CacheChange::Paths {
                changed: vec!["/a.html".into()],
                removed: vec!["/b".into()],
            },
        };
        assert_eq!(
            changed_urls("https://www.example.com/", &order).unwrap(),
            ["https://www.example.com/a.html", "https://www.example.com/b"]
        );
        assert_eq!(host_of("https://www.example.com:8443/x"), Some("www.example.com:8443"));
    }
}
