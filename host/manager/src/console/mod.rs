//! The operator's console: server-rendered HTML on the manager's own port, under `/console/`.
//! Spec: `docs/console.md`.
//!
//! Every page is a plain GET and every action a plain POST form, so the console works without
//! JavaScript; one small script of our own ([`layout::JS`]) follows `/console/events` (the event
//! bus as Server-Sent Events) and refreshes a page's live sections when something changes.
//!
//! Authentication is the API's: the operator token (typed once into the login form, then a
//! session cookie — [`session`]) or, under mutual TLS, an operator certificate (which opens a
//! session by itself; tokens are not consulted over TLS, as on the API). No page, fragment or
//! stream answers without a session; the stylesheet and the script are the only things served
//! before login. Every POST carries the session's CSRF token. Pages are in [`pages`],
//! [`config`], [`checkpoints`] and [`plugins`], actions in [`actions`] (and [`checkpoints`]).

mod actions;
mod checkpoints;
mod config;
mod layout;
mod pages;
mod plugins;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{
    CACHE_CONTROL, CONTENT_TYPE, COOKIE, HeaderName, HeaderValue, LOCATION, SET_COOKIE,
};
use hyper::{Method, Request, Response, StatusCode};
use maud::Markup;

use cm_tree::http::{Body, PeerRole, Role, full};

use crate::server::Inner;
use session::{Session, Sessions};

/// The console's state in the manager: its sessions.
#[derive(Default)]
pub struct Console {
    pub sessions: Sessions,
}

/// Largest form body accepted (a content group of a few thousand server names).
const MAX_FORM: usize = 256 << 10;
/// A form body must arrive within this.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a path is the console's (`/` leads to it).
pub(crate) fn owns(path: &str) -> bool {
    path == "/" || path == "/console" || path.starts_with("/console/")
}

fn with_headers(mut r: Response<Body>, content_type: &'static str) -> Response<Body> {
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Only our own stylesheet and script; no frames, no inline script.
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(HeaderName::from_static("referrer-policy"), HeaderValue::from_static("no-referrer"));
    r
}

fn html(status: StatusCode, m: Markup) -> Response<Body> {
    let mut r = Response::new(full(m.into_string()));
    *r.status_mut() = status;
    with_headers(r, "text/html; charset=utf-8")
}

fn redirect(to: &str, cookie: Option<String>) -> Response<Body> {
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(SET_COOKIE, c);
    }
    with_headers(r, "text/plain")
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    with_headers(Response::new(full(text)), content_type)
}

/// `application/x-www-form-urlencoded` (also a query string) → its fields; the last of a
/// repeated name wins.
pub(crate) fn parse_form(s: &str) -> HashMap<String, String> {
    let decode = |v: &str| {
        percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned()
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

async fn read_form(req: Request<Incoming>) -> Option<HashMap<String, String>> {
    let body = Limited::new(req.into_body(), MAX_FORM);
    let bytes = tokio::time::timeout(FORM_TIMEOUT, body.collect()).await.ok()?.ok()?.to_bytes();
    Some(parse_form(std::str::from_utf8(&bytes).ok()?))
}

/// Every request whose path [`owns`] says is the console's.
pub(crate) async fn handle(m: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/" | "/console") => return redirect("/console/", None),
        (&Method::GET, "/console/assets/console.css") => return asset(layout::CSS, "text/css"),
        (&Method::GET, "/console/assets/console.js") => {
            return asset(layout::JS, "text/javascript");
        }
        _ => {}
    }
    let tls = m.cfg.tls.is_some();
    let sessions = &m.console.sessions;
    // Over mutual TLS the certificate decides, as on the API: only an operator's opens the console.
    let peer = req.extensions().get::<PeerRole>().copied();
    if let Some(PeerRole(role)) = peer
        && role != Some(Role::Operator)
    {
        let why = "This client certificate does not name the operator role.";
        return html(StatusCode::FORBIDDEN, layout::login(Some(why), tls));
    }
    let cookie = req.headers().get(COOKIE).and_then(|v| v.to_str().ok());
    let mut current: Option<(String, Session)> =
        session::cookie_value(cookie).and_then(|id| sessions.get(id).map(|s| (id.to_string(), s)));
    if path == "/console/login" {
        return match (method, current, peer) {
            (_, Some(_), _) | (_, None, Some(_)) => redirect("/console/", None),
            (Method::POST, None, None) => login(&m, req).await,
            _ => html(StatusCode::OK, layout::login(None, tls)),
        };
    }
    let mut new_cookie = None;
    if current.is_none() && peer.is_some() && method == Method::GET {
        // An operator certificate logs in by itself.
        if let Some((id, s)) = sessions.create() {
            new_cookie = Some(session::set_cookie(&id, tls));
            current = Some((id, s));
        }
    }
    let Some((id, s)) = current else {
        return redirect("/console/login", None);
    };
    let mut r = if method == Method::POST {
        let Some(form) = read_form(req).await else {
            return html(
                StatusCode::BAD_REQUEST,
                layout::login(Some("The form could not be read."), tls),
            );
        };
        if !session::csrf_ok(&s, form.get("csrf").map(String::as_str)) {
            sessions.set_flash(
                &id,
                "That form had expired (or came from another page): nothing was done. Try again.",
            );
            return redirect("/console/", None);
        }
        if path == "/console/logout" {
            sessions.end(&id);
            return redirect("/console/login", Some(session::clear_cookie(tls)));
        }
        let (to, flash) = actions::handle(&m, &path, &form);
        sessions.set_flash(&id, &flash);
        redirect(&to, None)
    } else if path == "/console/events" {
        match crate::events::parse_filter(req.uri().query()) {
            Ok(f) => crate::events::stream(&m.db, f),
            Err(e) => html(StatusCode::BAD_REQUEST, maud::html! { (e) }),
        }
    } else {
        let query = parse_form(req.uri().query().unwrap_or(""));
        let flash = sessions.take_flash(&id);
        match pages::render(&m, &path, &query, &s.csrf) {
            Some((title, body)) => {
                html(StatusCode::OK, layout::page(&path, &title, &s.csrf, flash.as_deref(), body))
            }
            None => html(
                StatusCode::NOT_FOUND,
                layout::page(
                    &path,
                    "Not found",
                    &s.csrf,
                    None,
                    maud::html! { p { "No such page." } },
                ),
            ),
        }
    };
    if let Some(c) = new_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(SET_COOKIE, c);
    }
    r
}

/// `POST /console/login`: the operator token → a session. A wrong token gets the login page
/// again, after a delay, and nothing else.
async fn login(m: &Inner, req: Request<Incoming>) -> Response<Body> {
    let tls = m.cfg.tls.is_some();
    // Logins are checked a few at a time: a flood of guesses queues rather than racing.
    let Ok(_turn) = m.console.sessions.logins.acquire().await else {
        return html(StatusCode::SERVICE_UNAVAILABLE, layout::login(None, tls));
    };
    let token = read_form(req).await.and_then(|mut f| f.remove("token")).unwrap_or_default();
    let probe = Request::builder()
        .header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
        .body(())
        .ok();
    let role = probe.and_then(|p| m.tokens.role(&p));
    if role != Some(Role::Operator) {
        tokio::time::sleep(session::FAILED_LOGIN_DELAY).await;
        return html(
            StatusCode::UNAUTHORIZED,
            layout::login(Some("That is not the operator token."), tls),
        );
    }
    match m.console.sessions.create() {
        Some((id, _)) => redirect("/console/", Some(session::set_cookie(&id, tls))),
        None => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            layout::login(Some("The system's random number generator failed."), tls),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = parse_form("a=1&name=www+site&x=%3Cscript%3E&empty=&flag");
        assert_eq!(f["a"], "1");
        assert_eq!(f["name"], "www site");
        assert_eq!(f["x"], "<script>");
        assert_eq!(f["empty"], "");
        assert_eq!(f["flag"], "");
        assert!(owns("/") && owns("/console/jobs") && !owns("/api/v1/jobs") && !owns("/consolex"));
    }
}
