//! Browser logins. A browser cannot read the 0600 token file, so an authenticated
//! client (`harness ui`) asks for a one-time code, valid for two minutes, and opens the
//! dashboard with it in the URL's fragment. The page's hello exchanges the code for a
//! session that it may say hello with again (after a reload) until the daemon stops.
//! Codes and sessions live only in memory.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

/// How long a login code stays valid.
pub const CODE_TTL: Duration = Duration::from_secs(120);

/// What a presented secret turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Login {
    /// A session handed out earlier.
    Session,
    /// A valid code, now spent; here is the new session.
    NewSession(String),
    /// Neither.
    Refused,
}

/// Pending codes and live sessions.
#[derive(Default)]
pub struct Logins {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    codes: Vec<(String, Instant)>,
    sessions: Vec<String>,
}

/// Constant time, so timing tells nothing about how much of a secret matched.
fn same(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Logins {
    /// Registers `code` (random, from the caller) as a one-time login.
    pub fn add_code(&self, code: String) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.codes.retain(|(_, made)| made.elapsed() < CODE_TTL);
        inner.codes.push((code, Instant::now()));
    }

    /// Checks a presented secret; a code is spent and turned into `new_session`.
    pub fn check(&self, presented: &str, new_session: impl FnOnce() -> String) -> Login {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.sessions.iter().any(|s| same(s, presented)) {
            return Login::Session;
        }
        inner.codes.retain(|(_, made)| made.elapsed() < CODE_TTL);
        let Some(i) = inner.codes.iter().position(|(c, _)| same(c, presented)) else {
            return Login::Refused;
        };
        inner.codes.swap_remove(i);
        let session = new_session();
        inner.sessions.push(session.clone());
        Login::NewSession(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_works_once_and_its_session_stays() {
        let logins = Logins::default();
        logins.add_code("c0de".into());
        assert_eq!(logins.check("nope", || "s1".into()), Login::Refused);
        assert_eq!(
            logins.check("c0de", || "s1".into()),
            Login::NewSession("s1".into())
        );
        assert_eq!(logins.check("c0de", || "s2".into()), Login::Refused);
        assert_eq!(logins.check("s1", || "s3".into()), Login::Session);
    }
}
