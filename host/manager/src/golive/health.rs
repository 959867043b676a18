//! The health check after a group switched: each configured URL path is fetched from the
//! server's configured address and must answer 200 with exactly the bytes of that file in the
//! release it switched to (BLAKE3 against the manager's snapshot of the release). The address
//! is the operator's (site settings), so a server cannot send the check elsewhere; the answer
//! is read up to the snapshot file's size plus one byte, so a server cannot make the manager
//! buffer more.

use std::path::Path;
use std::time::Duration;

use cm_tree::http::JsonClient;
use http_body_util::BodyExt;
use hyper::Method;

use super::settings::HealthCheck;

/// Checks `server` at `address` against release `release`'s snapshot; `Err` says why it failed.
pub async fn check(
    check: &HealthCheck,
    snapshot: &Path,
    server: &str,
    address: &str,
) -> Result<(), String> {
    let client = JsonClient::new("", Duration::from_millis(check.timeout_ms.max(1)));
    for path in &check.paths {
        let file = snapshot.join(path.trim_start_matches('/'));
        let want = tokio::fs::read(&file)
            .await
            .map_err(|e| format!("the release has no file {path} to compare with ({e})"))?;
        let url = format!("http://{address}{path}");
        let host = check.host.clone().unwrap_or_else(|| address.to_string());
        let resp = client
            .send(Method::GET, &url, None, &[("host", host)])
            .await
            .map_err(|e| format!("{server}: GET {path}: {e}"))?;
        let limit = want.len() + 1;
        let mut body = resp.into_body();
        let mut got = Vec::new();
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if let Some(data) = frame.data_ref() {
                    got.extend_from_slice(data);
                    if got.len() > limit {
                        break;
                    }
                }
            }
            Ok::<_, String>(())
        };
        tokio::time::timeout(Duration::from_millis(check.timeout_ms.max(1)), read)
            .await
            .map_err(|_| format!("{server}: GET {path}: the body did not arrive in time"))?
            .map_err(|e| format!("{server}: GET {path}: {e}"))?;
        if blake3::hash(&got) != blake3::hash(&want) {
            return Err(format!(
                "{server}: GET {path} answered {} bytes that are not the release's ({} bytes, blake3 {})",
                got.len(),
                want.len(),
                &blake3::hash(&want).to_hex()[..16]
            ));
        }
    }
    Ok(())
}
