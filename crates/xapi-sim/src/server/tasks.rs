//! The bookkeeping every HTTP handler shares (xapi_http): authentication
//! by session or Basic credentials, the handler's task (given or created),
//! failing and finishing it, and ending a request-only session.

use base64::Engine;

use super::{html_error, reason, After, Conn, ConnError};
use crate::dispatch;
use crate::http::RequestHead;
use crate::model::Ref;
use xapi_wire::ApiError;

impl Conn {
    /// xapi_http's authentication: a valid `session_id` (cookie, then
    /// query), or HTTP Basic credentials (a session for this request only).
    /// `Ok((session, temporary))`; `Err` when nothing valid was given.
    pub(super) fn authenticate(&self, head: &RequestHead) -> Option<(Ref, bool)> {
        let mut st = self.core.lock();
        if let Some(s) = head.param("session_id") {
            return st.check_session(&s).is_ok().then_some((s, false));
        }
        let basic = head.header("authorization")?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        st.login(user, password, "http-basic")
            .ok()
            .map(|s| (s, true))
    }

    /// The task an HTTP handler runs under: the caller's `task_id`, or a new
    /// one (destroyed at the end, as xapi's `exec_with_new_task` does).
    pub(super) fn handler_task(&self, head: &RequestHead, label: &str) -> Result<(Ref, bool), Ref> {
        let mut st = self.core.lock();
        match head.param("task_id") {
            Some(t) if st.tasks.contains_key(&t) => Ok((t, false)),
            Some(t) => Err(t),
            None => Ok((st.task_create(label, ""), true)),
        }
    }

    /// Fails the handler's task, answers `status` and closes.
    pub(super) async fn fail_task(
        &mut self,
        task: &(Ref, bool),
        status: u16,
        error: ApiError,
    ) -> Result<After, ConnError> {
        self.finish_task(task, Err(error.clone()));
        let body = html_error(
            status,
            reason(status),
            &format!("{:?}", error.description()),
        );
        let headers = [
            ("content-type", "text/html".to_string()),
            ("task-id", task.0.clone()),
        ];
        self.respond(status, &headers, &body, false).await?;
        Ok(After::Close)
    }

    /// Completes a handler task after the configured delay (in the
    /// background); a task the handler created itself is then destroyed.
    pub(super) fn finish_task(&self, task: &(Ref, bool), result: Result<String, ApiError>) {
        let core = self.core.clone();
        let (task, own) = task.clone();
        let delay = core.lock().faults.task_delay_ms;
        let work = move || {
            dispatch::run_task(&core, &task, delay, || result);
            if own {
                core.lock().tasks.remove(&task);
            }
        };
        if delay == 0 {
            work();
        } else {
            std::thread::spawn(work);
        }
    }

    /// Common start of the handlers: authentication, then the task.
    pub(super) async fn begin(
        &mut self,
        head: &RequestHead,
        label: &str,
    ) -> Result<Option<(Ref, bool, (Ref, bool))>, ConnError> {
        let Some((session, temporary)) = self.authenticate(head) else {
            if let Some(t) = head.param("task_id") {
                self.core.lock().task_finish(
                    &t,
                    Err(ApiError::new(
                        "SESSION_AUTHENTICATION_FAILED",
                        Vec::<String>::new(),
                    )),
                );
            }
            self.fail(401, "authorisation failed").await?;
            return Ok(None);
        };
        let task = match self.handler_task(head, label) {
            Ok(t) => t,
            Err(t) => {
                self.end_session(&session, temporary);
                self.fail(404, &format!("no task {t}")).await?;
                return Ok(None);
            }
        };
        Ok(Some((session, temporary, task)))
    }

    pub(super) fn end_session(&self, session: &str, temporary: bool) {
        if temporary {
            self.core.lock().logout(session);
        }
    }
}
