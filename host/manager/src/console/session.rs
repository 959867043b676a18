//! Console sessions: an operator logs in with the operator token (or, under mutual TLS, with an
//! operator certificate) and gets a session cookie; every form carries the session's CSRF token.
//!
//! Session ids and CSRF tokens are 32 bytes from the OS's CSPRNG (ring's `SystemRandom`). The
//! table keeps only the BLAKE3 hash of each session id, so a lookup's timing says nothing about
//! a valid id; tokens and CSRF tokens are compared as BLAKE3 hashes (constant-time equality).
//! A failed login is answered after [`FAILED_LOGIN_DELAY`], and at most [`LOGIN_ATTEMPTS`] logins
//! are checked at once, so the login form is a slower oracle for the token than the API.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Semaphore;

/// How long a session lasts from login.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Most sessions held at once; a login past it ends the oldest.
pub const MAX_SESSIONS: usize = 1024;
/// A wrong token is answered this late.
pub const FAILED_LOGIN_DELAY: Duration = Duration::from_secs(1);
/// Logins checked at the same time (the others wait their turn).
pub const LOGIN_ATTEMPTS: usize = 4;
/// The session cookie's name.
pub const COOKIE: &str = "cm_session";

/// A logged-in operator's session.
#[derive(Clone)]
pub struct Session {
    /// Put in every form; a POST without it (or with another) is refused.
    pub csrf: String,
    pub expires: Instant,
    created: Instant,
    /// What the last action said, shown once on the next page.
    flash: Option<String>,
}

/// Every session of the console, by the hash of its id.
pub struct Sessions {
    rng: SystemRandom,
    table: Mutex<HashMap<blake3::Hash, Session>>,
    pub(crate) logins: Semaphore,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            rng: SystemRandom::new(),
            table: Mutex::new(HashMap::new()),
            logins: Semaphore::new(LOGIN_ATTEMPTS),
        }
    }
}

/// 32 random bytes as hex, or `None` if the OS's generator failed (then nobody logs in).
fn random_hex(rng: &SystemRandom) -> Option<String> {
    let mut b = [0u8; 32];
    rng.fill(&mut b).ok()?;
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Sessions {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<blake3::Hash, Session>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session: its id (for the cookie) and its record.
    pub fn create(&self) -> Option<(String, Session)> {
        let id = random_hex(&self.rng)?;
        let now = Instant::now();
        let s = Session {
            csrf: random_hex(&self.rng)?,
            expires: now + SESSION_LIFETIME,
            created: now,
            flash: None,
        };
        let mut t = self.table();
        t.retain(|_, s| s.expires > now);
        if t.len() >= MAX_SESSIONS
            && let Some(oldest) = t.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k)
        {
            t.remove(&oldest);
        }
        t.insert(blake3::hash(id.as_bytes()), s.clone());
        Some((id, s))
    }

    /// The live session with this id.
    pub fn get(&self, id: &str) -> Option<Session> {
        let key = blake3::hash(id.as_bytes());
        let mut t = self.table();
        match t.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                t.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Keeps a message for the session's next page.
    pub fn set_flash(&self, id: &str, msg: &str) {
        if let Some(s) = self.table().get_mut(&blake3::hash(id.as_bytes())) {
            s.flash = Some(msg.to_string());
        }
    }

    /// The message kept for this page, once.
    pub fn take_flash(&self, id: &str) -> Option<String> {
        self.table().get_mut(&blake3::hash(id.as_bytes()))?.flash.take()
    }

    pub fn end(&self, id: &str) {
        self.table().remove(&blake3::hash(id.as_bytes()));
    }
}

/// Whether a presented CSRF token is the session's (constant time).
pub fn csrf_ok(session: &Session, presented: Option<&str>) -> bool {
    let presented = presented.unwrap_or("");
    blake3::hash(presented.as_bytes()) == blake3::hash(session.csrf.as_bytes())
}

/// The session id in a `Cookie` header.
pub fn cookie_value(header: Option<&str>) -> Option<&str> {
    header?.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The `Set-Cookie` value of a session (`Secure` under TLS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_LIFETIME.as_secs()
    )
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_random_and_end() {
        let s = Sessions::default();
        let (a, sa) = s.create().unwrap();
        let (b, _) = s.create().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(s.get(&a).is_some());
        assert!(s.get("0".repeat(64).as_str()).is_none());
        assert!(csrf_ok(&sa, Some(&sa.csrf)));
        assert!(!csrf_ok(&sa, Some("x")));
        assert!(!csrf_ok(&sa, None));
        s.end(&a);
        assert!(s.get(&a).is_none());
        assert!(s.get(&b).is_some());
    }

    #[test]
    fn cookies() {
        assert_eq!(cookie_value(Some("a=1; cm_session=abc; b=2")), Some("abc"));
        assert_eq!(cookie_value(Some("cm_sessionx=abc")), None);
        assert_eq!(cookie_value(None), None);
        let c = set_cookie("abc", true);
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/console", "Max-Age="] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_cookie("abc", false).contains("Secure"));
    }
}
