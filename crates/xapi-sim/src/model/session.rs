//! Sessions: `session.login_with_password`, the session check every call
//! makes (which also ends sessions idle longer than
//! `Faults::session_idle_timeout_ms`), and logout. Sessions live in memory
//! only.

use chrono::Utc;

use super::*;
use xapi_wire::ApiError;

impl State {
    pub fn login(&mut self, user: &str, password: &str, originator: &str) -> Result<Ref, ApiError> {
        if user != self.config.username || password != self.config.password {
            return Err(ApiError::new(
                "SESSION_AUTHENTICATION_FAILED",
                Vec::<String>::new(),
            ));
        }
        let r = new_ref();
        self.sessions.insert(
            r.clone(),
            Session {
                uuid: new_uuid(),
                user: user.to_string(),
                originator: originator.to_string(),
                created: Utc::now(),
                last_active: Utc::now(),
            },
        );
        Ok(r)
    }

    /// `SESSION_INVALID [ref]` unless the session exists and was used
    /// within the idle timeout; a valid one counts as used now.
    // Assumption: xapi destroys sessions idle past its timeout (24 h); the
    // fault sets that timeout, and the next use answers SESSION_INVALID.
    pub fn check_session(&mut self, session: &str) -> Result<(), ApiError> {
        let timeout = self.faults.session_idle_timeout_ms;
        let Some(s) = self.sessions.get_mut(session) else {
            return Err(ApiError::session_invalid(session));
        };
        let now = Utc::now();
        let idle_ms = (now - s.last_active).num_milliseconds();
        if timeout.is_some_and(|t| idle_ms >= 0 && idle_ms as u64 > t) {
            self.sessions.remove(session);
            return Err(ApiError::session_invalid(session));
        }
        s.last_active = now;
        Ok(())
    }

    pub fn logout(&mut self, session: &str) {
        self.sessions.remove(session);
    }
}
