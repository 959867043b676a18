//! Load-balancer hooks over HAProxy's runtime API. The operator grants one stream endpoint
//! (usually the `stats socket`, a Unix socket) named `haproxy`; each call sends one command
//! and reads HAProxy's answer. Servers are named "backend/server".

use cm_plugin_sdk::{LoadBalancer, ServerState, endpoint, log};

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

impl LoadBalancer for Haproxy {
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
