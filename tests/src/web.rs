//! Real web servers and caches for the tests: Debian's `nginx` and `varnishd`, each started
//! with a generated config on loopback ports, in a directory of its own, as a foreground
//! process killed (and reaped) when its guard drops. A test on a machine without the binary
//! skips through [`crate::missing_part`] (a failure under `CI=true`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback TCP port for a server started next (`cm_agent::launch::free_port`: never the
/// same one twice in this process).
pub fn free_port() -> u16 {
    cm_agent::launch::free_port().expect("a free loopback port")
}

fn find(candidates: &[&str], what: &str) -> Option<PathBuf> {
    let found = candidates.iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        crate::missing_part(&format!("{what} not installed"));
    }
    found
}

/// Waits (bounded) until something accepts connections at `address`.
fn wait_listening(address: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(address).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!("{what} exited at start: {status}");
        }
        if Instant::now() > end {
            anyhow::bail!("{what} did not listen on {address} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A child process killed and reaped when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running nginx: one process (no daemon, no master), its prefix in a temp dir.
pub struct Nginx {
    pub dir: PathBuf,
    _guard: Guard,
    _tmp: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `http` as the body of its `http {}` block (server blocks and their
    /// settings; `{dir}` in it is replaced by nginx's own directory), once `wait_for`
    /// (`host:port`) accepts connections. `None`: nginx is not installed.
    pub fn start(http: &str, wait_for: &str) -> anyhow::Result<Option<Nginx>> {
        let Some(binary) = find(&["/usr/sbin/nginx", "/usr/bin/nginx"], "nginx") else {
            return Ok(None);
        };
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        let d = dir.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{}\n}}\n",
            http.replace("{dir}", &d.to_string())
        );
        let config_file = dir.join("nginx.conf");
        std::fs::write(&config_file, config)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&config_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut guard = Guard(child);
        wait_listening(wait_for, &mut guard.0, "nginx")?;
        Ok(Some(Nginx { dir, _guard: guard, _tmp: tmp }))
    }

    /// The tail of its error log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// An nginx server block serving `root` (e.g. a server's `current`) on `port`: an origin.
pub fn nginx_origin(port: u16, root: &Path) -> String {
    format!("  server {{ listen 127.0.0.1:{port}; root {}; }}\n", root.display())
}

/// The nginx `proxy_cache` config `docs/plugins.md` gives operators for the nginx
/// invalidator plugin, on loopback: the cache on `port` in front of `origin` (`host:port`),
/// its generation stamps on `stamp_port`, cache files under `{dir}/cache`, refreshes trusted
/// from 127.0.0.1 only.
pub fn nginx_cache(port: u16, origin: &str, stamp_port: u16) -> String {
    format!(
        r#"  proxy_cache_path {{dir}}/cache keys_zone=cm:10m inactive=1h;
  # Who may refresh: the GLs' addresses.
  geo $cm_trusted {{ default 0; 127.0.0.1 1; }}
  map "$cm_trusted:$http_x_cm_refresh" $cm_refresh {{ default ""; "~^1:.+" 1; }}
  # A new generation stamp on every fetch.
  server {{ listen 127.0.0.1:{stamp_port}; location / {{ add_header X-CM-Generation $msec; return 204; }} }}
  server {{
    listen 127.0.0.1:{port};
    proxy_cache cm;
    proxy_cache_valid 200 301 302 404 1h;
    proxy_cache_bypass $cm_refresh;
    add_header X-CM-Cache $upstream_cache_status always;
    location / {{
      auth_request /.cm-generation;
      auth_request_set $cm_generation $upstream_http_x_cm_generation;
      proxy_cache_key "$host$request_uri@$cm_generation";
      proxy_pass http://{origin};
    }}
    location = /.cm-generation {{
      internal;
      # The subrequest sees the client's headers: a path's refresh must not renew the stamp.
      proxy_cache_bypass 0;
      proxy_cache_key "$host@generation";
      proxy_cache_valid 204 10y;
      proxy_pass http://127.0.0.1:{stamp_port};
    }}
    location = /.cm-purge-site {{
      if ($cm_refresh = "") {{ return 403; }}
      proxy_cache_key "$host@generation";
      proxy_cache_valid 204 10y;
      proxy_pass http://127.0.0.1:{stamp_port}/;
    }}
  }}
"#
    )
}

/// A running varnishd (foreground manager; its worker exits with it), its work dir in a temp dir.
pub struct Varnish {
    pub address: String,
    _guard: Guard,
    _tmp: tempfile::TempDir,
}

/// The usual VCL for the Varnish invalidator (`PURGE` a path, `BAN` a site, from loopback
/// only) in front of `origin` (`host:port`), one hour of TTL, `X-Cache: HIT|MISS` on answers.
pub fn varnish_vcl(origin: &str) -> String {
    vcl(origin, "", "")
}

/// [`varnish_vcl`] in front of a load balancer that pins a session to a server with cookie
/// `cookie` (HAProxy's `cookie SRV insert`): a session reads one server's release through the
/// cache too. A session's first request (no cookie yet) goes through uncached, so the
/// balancer picks its server; later ones are cached per pinned server (`Vary` on it), and a
/// `PURGE` of a path drops every server's copy.
pub fn varnish_vcl_pinned(origin: &str, cookie: &str) -> String {
    let recv = format!(
        r#"  if (req.method != "GET" && req.method != "HEAD") {{ return (pass); }}
  if (req.http.Cookie !~ "(^|;\s*){cookie}=") {{ return (pass); }}
  set req.http.X-CM-Server = regsub(req.http.Cookie, "^(.*;\s*)?{cookie}=([^;]*).*$", "\2");
  return (hash);
"#
    );
    vcl(origin, &recv, "  set beresp.http.Vary = \"X-CM-Server\";\n")
}

/// The VCL: purging, then `recv` (the end of `vcl_recv`), a one-hour TTL, then `response`.
fn vcl(origin: &str, recv: &str, response: &str) -> String {
    let (host, port) = origin.rsplit_once(':').unwrap_or((origin, "80"));
    format!(
        r#"vcl 4.1;
acl purgers {{ "127.0.0.1"; }}
backend origin {{ .host = "{host}"; .port = "{port}"; }}
sub vcl_recv {{
  if (req.method == "PURGE" || req.method == "BAN") {{
    if (client.ip !~ purgers) {{ return (synth(403, "Forbidden")); }}
    if (req.method == "PURGE") {{ return (purge); }}
    ban("req.http.host == " + req.http.host);
    return (synth(200, "Ban added"));
  }}
{recv}}}
sub vcl_backend_response {{
  set beresp.ttl = 1h;
{response}}}
sub vcl_deliver {{ if (obj.hits > 0) {{ set resp.http.X-Cache = "HIT"; }} else {{ set resp.http.X-Cache = "MISS"; }} }}
"#
    )
}

impl Varnish {
    /// Starts varnishd with `vcl` on a free loopback port. `None`: varnishd is not installed.
    pub fn start(vcl: &str) -> anyhow::Result<Option<Varnish>> {
        let Some(binary) = find(&["/usr/sbin/varnishd", "/usr/bin/varnishd"], "varnishd") else {
            return Ok(None);
        };
        let tmp = tempfile::tempdir()?;
        let vcl_file = tmp.path().join("cache.vcl");
        std::fs::write(&vcl_file, vcl)?;
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let child = Command::new(binary)
            .arg("-F")
            .args(["-j", "none"])
            .arg("-n")
            .arg(tmp.path().join("work"))
            .args(["-a", &address])
            .arg("-f")
            .arg(&vcl_file)
            .args(["-s", "malloc,32m", "-T", "none", "-p", "thread_pools=1"])
            .args(["-p", "thread_pool_min=5"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut guard = Guard(child);
        wait_listening(&address, &mut guard.0, "varnishd")?;
        Ok(Some(Varnish { address, _guard: guard, _tmp: tmp }))
    }
}

/// An HTTP answer: status, headers (names lower-cased), body.
pub type Answer = (u16, Vec<(String, String)>, String);

/// `method path` with `Host: host` and `headers` to `address` on a fresh connection.
pub fn http(
    address: &str,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Answer> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request += &format!("{k}: {v}\r\n");
    }
    request += "\r\n";
    stream.write_all(request.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let mut lines = head.lines();
    let status =
        lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status.unwrap_or(0), headers, body.to_string()))
}

/// `GET path` through a cache: (status, its `X-CM-Cache` or `X-Cache` header, body).
pub fn get(address: &str, host: &str, path: &str) -> (u16, String, String) {
    let (status, headers, body) = http(address, "GET", host, path, &[])
        .unwrap_or_else(|e| panic!("GET {path} from {address}: {e}"));
    let cache = headers
        .iter()
        .find(|(k, _)| k == "x-cm-cache" || k == "x-cache")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    (status, cache, body)
}
