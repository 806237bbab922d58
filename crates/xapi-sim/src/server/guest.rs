//! `PUT /sim/guest_write`: the simulator-only hook that writes into a
//! live VDI as a guest would (tests only; a real host has no such path).

use super::{After, Conn, ConnError, MAX_GUEST_WRITE};
use crate::dispatch;
use crate::http::RequestHead;
use xapi_wire::ApiError;

impl Conn {
    /// `PUT /sim/guest_write?vdi=<uuid|ref>&offset=N`: the body is written
    /// as the running VM would (simulator only). Answers JSON.
    pub(super) async fn guest_write(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary)) = self.authenticate(&head) else {
            return self.fail(401, "authorisation failed").await;
        };
        let len = match head.content_length() {
            Ok(Some(l)) if l <= MAX_GUEST_WRITE => l,
            _ => {
                self.end_session(&session, temporary);
                return self
                    .fail(
                        411,
                        &format!("a Content-Length up to {MAX_GUEST_WRITE} is required"),
                    )
                    .await;
            }
        };
        let body = self.read_body(len as usize).await?;
        let offset = head.param("offset").and_then(|o| o.parse::<u64>().ok());
        let key = head.param("vdi").unwrap_or_default();
        let core = self.core.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut st = core.lock();
            let vdi = st.vdi_by_ref_or_uuid(&key)?;
            let offset = offset.ok_or_else(|| ApiError::field_type("offset"))?;
            dispatch::guest_write_checked(&mut st, &vdi, offset, &body)
        })
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(e.to_string())));
        self.end_session(&session, temporary);
        let (status, body) = match result {
            Ok(()) => (200, serde_json::json!({"Status": "Success"})),
            Err(e) => (
                400,
                serde_json::json!({"Status": "Failure", "ErrorDescription": e.description()}),
            ),
        };
        let keep = head.keep_alive();
        self.respond(
            status,
            &[("content-type", "application/json".into())],
            body.to_string().as_bytes(),
            keep,
        )
        .await?;
        Ok(if keep { After::KeepAlive } else { After::Close })
    }
}
