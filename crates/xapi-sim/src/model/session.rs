//! Sessions: `session.login_with_password`, the session check every call
//! makes, and logout. Sessions live in memory only.

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
            },
        );
        Ok(r)
    }

    pub fn check_session(&self, session: &str) -> Result<(), ApiError> {
        if self.sessions.contains_key(session) {
            Ok(())
        } else {
            Err(ApiError::session_invalid(session))
        }
    }

    pub fn logout(&mut self, session: &str) {
        self.sessions.remove(session);
    }
}
