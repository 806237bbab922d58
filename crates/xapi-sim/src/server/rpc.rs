//! `POST /`, `/RPC2` (XML-RPC) and `/jsonrpc`, `/json` (JSON-RPC): decode
//! one call, run it through `dispatch` off the async threads, encode the
//! answer. Knows the wires, not the calls.

use super::{After, Conn, ConnError, MAX_RPC_BODY};
use crate::dispatch;
use crate::http::RequestHead;
use xapi_wire::jsonrpc;
use xapi_wire::xmlrpc;
use xapi_wire::ApiError;
use xapi_wire::Value;

impl Conn {
    /// One XML-RPC or JSON-RPC call.
    pub(super) async fn rpc(&mut self, head: RequestHead, json: bool) -> Result<After, ConnError> {
        if head.header("transfer-encoding").is_some() {
            return self
                .fail(411, "send the request with a Content-Length")
                .await;
        }
        let len = match head.content_length() {
            Ok(Some(len)) => len,
            Ok(None) => return self.fail(411, "Content-Length required").await,
            Err(e) => return self.fail(400, &e.to_string()).await,
        };
        if len > MAX_RPC_BODY {
            return self
                .fail(413, &format!("request body over {MAX_RPC_BODY} bytes"))
                .await;
        }
        let body = self.read_body(len as usize).await?;
        let keep = head.keep_alive();
        let (content_type, out) = if json {
            let req = match jsonrpc::decode_request(&body) {
                Ok(r) => r,
                Err(e) => return self.fail(500, &e.to_string()).await,
            };
            let result = self.dispatch(req.method.clone(), req.params.clone()).await;
            (
                "application/json",
                jsonrpc::encode_response(req.version, &req.id, &result),
            )
        } else {
            let (method, params) = match xmlrpc::decode_call(&body) {
                Ok(c) => c,
                Err(e) => return self.fail(500, &e.to_string()).await,
            };
            let result = self.dispatch(method, params).await;
            ("text/xml", xmlrpc::encode_response(&result).into_bytes())
        };
        let headers = [
            ("content-type", content_type.to_string()),
            ("access-control-allow-origin", "*".to_string()),
        ];
        self.respond(200, &headers, &out, keep).await?;
        Ok(if keep { After::KeepAlive } else { After::Close })
    }

    pub(super) async fn dispatch(
        &self,
        method: String,
        params: Vec<Value>,
    ) -> Result<Value, ApiError> {
        let core = self.core.clone();
        if method == "session.login_with_password" {
            // A pool member refuses logins, naming the master (reference
            // §1.4); it checks that before the credentials.
            let master = {
                let st = core.lock();
                let master = st.master();
                (master != self.host)
                    .then(|| st.hosts.get(&master).map(|h| h.address.clone()))
                    .flatten()
            };
            if let Some(address) = master {
                core.log_call(format!("XenAPI {method} HOST_IS_SLAVE"));
                return Err(ApiError::new("HOST_IS_SLAVE", [address]));
            }
        }
        // Assumption: other calls on a member act on the pool's objects, as
        // xapi forwards them to the master.
        tokio::task::spawn_blocking(move || dispatch::call(&core, &method, &params))
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(format!("call panicked: {e}"))))
    }
}
