//! Load-balancer hooks over HAProxy's runtime API. The operator grants one stream endpoint
//! (usually the `stats socket`, a Unix socket) named `haproxy`; each call sends one command
//! and reads HAProxy's answer. Servers are named "backend/server".
//!
//! Request routing (`route-paths`) edits a map file with `add map`/`set map`/`del map`; the
//! configuration names it in a rule such as
//! `use_backend hot if { path,map(/etc/haproxy/hot.map) -m found }`, and the manifest's
//! `[config]` gives it as `hot-map`. Rates (`path-rates`) come from `show table <rate-table>`,
//! a stick table keyed by path storing `http_req_rate(<period>)`. A server's open sessions
//! (`sessions`, what a drain waits for) are the `scur` column of `show stat <backend> 4 -1`.

use cm_plugin_sdk::{LoadBalancer, PathRate, ServerState, config, endpoint, log};

struct Haproxy;

const ENDPOINT: &str = "haproxy";

/// Send one runtime-API command, return HAProxy's answer (trimmed).
fn command(line: &str) -> Result<String, String> {
    let answer =
        endpoint::exchange(ENDPOINT, format!("{line}\n").as_bytes()).map_err(|e| e.message)?;
    let answer = String::from_utf8_lossy(&answer).trim().to_string();
    log::write(log::Level::Debug, &format!("haproxy: `{line}` -> `{answer}`"));
    Ok(answer)
}

/// Run a command whose success answer is empty or one of `ok_answers`.
fn expect(line: &str, ok_answers: &[&str]) -> Result<(), String> {
    let answer = command(line)?;
    if answer.is_empty() || ok_answers.iter().any(|ok| answer.starts_with(ok)) {
        Ok(())
    } else {
        Err(format!("haproxy refused `{line}`: {answer}"))
    }
}

/// "backend/server" -> ("backend", "server").
fn split(server: &str) -> Result<(&str, &str), String> {
    match server.split_once('/') {
        Some((backend, name)) if !backend.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((backend, name))
        }
        _ => Err(format!("server `{server}` is not named backend/server")),
    }
}

/// A backend or server name safe to put in a runtime-API command: one plain word.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok { Ok(()) } else { Err(format!("`{name}` is not a plain backend or server name")) }
}

/// Parse `show stat` CSV ("# pxname,svname,qcur,qmax,scur,...", then one row per proxy or
/// server) for the `scur` of `backend`/`name`; `None` when no row names that server. The
/// column is found by its header name, as HAProxy versions add columns.
fn parse_scur(answer: &str, backend: &str, name: &str) -> Result<Option<u32>, String> {
    let mut lines = answer.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| format!("unexpected `show stat` answer: {}", first_line(answer)))?;
    let columns: Vec<&str> = header.split(',').collect();
    let at = |column: &str| {
        columns
            .iter()
            .position(|c| *c == column)
            .ok_or_else(|| format!("`show stat` has no `{column}` column"))
    };
    let (px, sv, scur) = (at("pxname")?, at("svname")?, at("scur")?);
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.get(px) != Some(&backend) || fields.get(sv) != Some(&name) {
            continue;
        }
        let value = fields.get(scur).copied().unwrap_or("");
        return value
            .parse()
            .map(Some)
            .map_err(|_| format!("`show stat` scur `{value}` of {backend}/{name} is not a count"));
    }
    Ok(None)
}

/// The first line of an answer, bounded, for an error message.
fn first_line(answer: &str) -> String {
    answer.lines().next().unwrap_or("").chars().take(200).collect()
}

/// Parse `show servers state <backend>` (format version 1) for `name`'s state.
fn parse_state(answer: &str, name: &str) -> Result<ServerState, String> {
    let mut lines = answer.lines();
    if lines.next().map(str::trim) != Some("1") {
        return Err(format!("unexpected `show servers state` answer: {answer}"));
    }
    for line in lines.filter(|l| !l.starts_with('#')) {
        // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 7 || fields[3] != name {
            continue;
        }
        let admin: u32 = fields[6].parse().map_err(|_| format!("bad admin state in `{line}`"))?;
        // SRV_ADMF_*: FMAINT 0x01, IMAINT 0x02, CMAINT 0x04, RMAINT 0x20, HMAINT 0x40; FDRAIN 0x08, IDRAIN 0x10.
        return Ok(if admin & 0x67 != 0 {
            ServerState::Maint
        } else if admin & 0x18 != 0 {
            ServerState::Drain
        } else {
            ServerState::Ready
        });
    }
    Ok(ServerState::Absent)
}

/// Most entries `path-rates` returns (the busiest).
const MAX_RATES: usize = 256;
/// Most paths `route-paths` takes, and the longest.
const MAX_ROUTES: usize = 1_000;
const MAX_PATH_LEN: usize = 1_024;

fn setting(key: &str) -> Result<String, String> {
    let v = config::get(key).ok_or_else(|| format!("config `{key}` is not set"))?;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b'\\') {
        return Err(format!("config `{key}` = `{v}` is not one word"));
    }
    Ok(v)
}

/// A URL path safe to put in a runtime-API command: absolute, bounded, and only characters
/// a URL path carries unescaped (no space, `;`, `\` or control byte that the CLI would
/// read as a separator or escape).
fn check_url_path(path: &str) -> Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() <= MAX_PATH_LEN
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-._~%!$&'()*+,=:@".contains(&b));
    if ok { Ok(()) } else { Err(format!("`{path}` is not a plain URL path")) }
}

/// `show map` lines ("0x55d4... <key> <value>") as (key, value).
fn parse_map(answer: &str) -> Vec<(String, String)> {
    answer
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_id, key, value) = (f.next()?, f.next()?, f.next()?);
            Some((key.to_string(), value.to_string()))
        })
        .collect()
}

/// `show table` lines ("0x..: key=/p use=0 exp=29993 http_req_rate(1000)=5") as rates.
fn parse_table(answer: &str) -> Vec<PathRate> {
    let mut out = Vec::new();
    for line in answer.lines().filter(|l| !l.starts_with('#')) {
        let mut path = None;
        let mut rate = None;
        for field in line.split_whitespace() {
            if let Some(k) = field.strip_prefix("key=") {
                path = Some(k.to_string());
            } else if let Some(r) = field.strip_prefix("http_req_rate(")
                && let Some((period, n)) = r.split_once(")=")
                && let (Ok(period), Ok(n)) = (period.parse::<u64>(), n.parse::<u64>())
            {
                rate = Some((n, period));
            }
        }
        if let (Some(path), Some((requests, period_ms))) = (path, rate) {
            out.push(PathRate { path, requests, period_ms });
        }
    }
    out.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.path.cmp(&b.path)));
    out.truncate(MAX_RATES);
    out
}

impl LoadBalancer for Haproxy {
    fn route_paths(pool: String, paths: Vec<String>) -> Result<(), String> {
        if pool.is_empty()
            || !pool.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(format!("`{pool}` is not a backend name"));
        }
        if paths.len() > MAX_ROUTES {
            return Err(format!("{} paths: at most {MAX_ROUTES} are routed", paths.len()));
        }
        for p in &paths {
            check_url_path(p)?;
        }
        let map = setting("hot-map")?;
        let answer = command(&format!("show map {map}"))?;
        if answer.starts_with("Unknown map") {
            return Err(format!("haproxy has no map `{map}`: {answer}"));
        }
        let now: std::collections::BTreeMap<String, String> =
            parse_map(&answer).into_iter().collect();
        // New routes first, then the ones that end: a path never routes nowhere in between.
        for p in &paths {
            match now.get(p) {
                Some(v) if *v == pool => {}
                Some(_) => expect(&format!("set map {map} {p} {pool}"), &[])?,
                None => expect(&format!("add map {map} {p} {pool}"), &[])?,
            }
        }
        for (key, value) in &now {
            if *value == pool && !paths.contains(key) {
                expect(&format!("del map {map} {key}"), &[])?;
            }
        }
        Ok(())
    }

    fn path_rates() -> Result<Vec<PathRate>, String> {
        let table = setting("rate-table")?;
        let answer = command(&format!("show table {table}"))?;
        if !answer.starts_with("# table:") {
            return Err(format!("haproxy refused `show table {table}`: {answer}"));
        }
        Ok(parse_table(&answer))
    }

    fn sessions(server: String) -> Result<u32, String> {
        let (backend, name) = split(&server)?;
        check_name(backend)?;
        check_name(name)?;
        // Type 4: servers only; -1: every server of the backend.
        let answer = command(&format!("show stat {backend} 4 -1"))?;
        match parse_scur(&answer, backend, name)? {
            Some(n) => Ok(n),
            None => Err(format!("haproxy knows no server {server}")),
        }
    }

    fn drain(server: String) -> Result<(), String> {
        split(&server)?;
        expect(&format!("set server {server} state drain"), &[])
    }

    fn undrain(server: String) -> Result<(), String> {
        split(&server)?;
        expect(&format!("set server {server} state ready"), &[])
    }

    fn add(server: String, address: String) -> Result<(), String> {
        split(&server)?;
        expect(&format!("add server {server} {address}"), &["New server registered"])?;
        // Dynamic servers start in maintenance.
        expect(&format!("enable server {server}"), &[])
    }

    fn remove(server: String) -> Result<(), String> {
        split(&server)?;
        expect(&format!("disable server {server}"), &[])?;
        expect(&format!("del server {server}"), &["Server deleted"])
    }

    fn state(server: String) -> Result<ServerState, String> {
        let (backend, name) = split(&server)?;
        let answer = command(&format!("show servers state {backend}"))?;
        if answer.starts_with("Can't find backend") {
            return Ok(ServerState::Absent);
        }
        parse_state(&answer, name)
    }

    fn self_check() -> Result<(), String> {
        if endpoint::granted().iter().any(|name| name == ENDPOINT) {
            Ok(())
        } else {
            Err(format!("endpoint `{ENDPOINT}` is not granted"))
        }
    }
}

cm_plugin_sdk::load_balancer!(Haproxy);
