//! `GET /export_metadata` and `PUT /import_metadata`: a VM's metadata as
//! the tar `metadata` builds and reads. Moves bytes; the format is there.

use tokio::io::AsyncWriteExt;

use super::{After, Conn, ConnError};
use crate::http::RequestHead;
use crate::model::Ref;
use xapi_wire::xmlrpc;
use xapi_wire::ApiError;
use xapi_wire::Value;

impl Conn {
    /// `GET /export_metadata` (§3.3): HTTP/1.0, Content-Length, an XVA tar
    /// holding only `ova.xml`. `export_snapshots` defaults to true.
    pub(super) async fn export_metadata(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "export_metadata").await? else {
            return Ok(After::Close);
        };
        let outcome = self.export_metadata_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    pub(super) async fn export_metadata_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        // OCaml's bool_of_string: exactly "true" or "false".
        let export_snapshots = match head.param("export_snapshots").as_deref() {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                let e = ApiError::internal(format!("bool_of_string: '{other}'"));
                return self.fail_task(task, 500, e).await;
            }
        };
        let ova = {
            let st = self.core.lock();
            let vm = match (head.param("uuid"), head.param("ref")) {
                (Some(u), _) => st.by_uuid(crate::model::Class::Vm, &u),
                (None, Some(r)) => st.vm(&r).map(|_| r.clone()),
                (None, None) => Err(ApiError::internal("Missing uuid or ref query parameter")),
            };
            vm.and_then(|vm| crate::metadata::export_ova(&st, &vm, export_snapshots))
        };
        let ova = match ova {
            Ok(o) => o,
            Err(e) => return self.fail_task(task, 500, e).await,
        };
        let body = crate::metadata::tar_single("ova.xml", ova.as_bytes());
        let head = format!(
            "HTTP/1.0 200 OK\r\ncontent-length: {}\r\ncontent-type: application/octet-stream\r\n\
             content-disposition: attachment; filename=\"export.xva\"\r\ntask-id: {}\r\n\r\n",
            body.len(),
            task.0
        );
        self.io.write_all(head.as_bytes()).await?;
        self.io.write_all(&body).await?;
        self.io.flush().await?;
        self.finish_task(task, Ok(String::new()));
        Ok(After::Close)
    }

    /// `PUT /import_metadata` (§3.4): creates the VM of an exported
    /// `ova.xml`, remapping disks with `vdi:<source-uuid>=<dest-uuid>`. The
    /// task's result lists the new VM refs.
    pub(super) async fn import_metadata(&mut self, head: RequestHead) -> Result<After, ConnError> {
        let Some((session, temporary, task)) = self.begin(&head, "import_metadata").await? else {
            return Ok(After::Close);
        };
        let outcome = self.import_metadata_inner(&head, &task).await;
        self.end_session(&session, temporary);
        outcome
    }

    pub(super) async fn import_metadata_inner(
        &mut self,
        head: &RequestHead,
        task: &(Ref, bool),
    ) -> Result<After, ConnError> {
        let limit = crate::metadata::MAX_OVA_BYTES + 4096;
        let len = match head.content_length() {
            Ok(Some(l)) if l <= limit => l,
            _ => {
                let e = ApiError::internal(format!("a Content-Length up to {limit} is required"));
                return self.fail_task(task, 400, e).await;
            }
        };
        let vdi_map: std::collections::BTreeMap<String, String> = head
            .query
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("vdi:")
                    .map(|src| (src.to_string(), v.clone()))
            })
            .collect();
        // import.ml's find_query_flag: true only for exactly "true".
        let dry_run = head.param("dry_run").as_deref() == Some("true");
        let headers = [
            ("task-id", task.0.clone()),
            ("content-type", "text/plain".to_string()),
        ];
        self.respond(200, &headers, b"", false).await?;
        let body = self.read_body(len as usize).await?;
        let result = crate::metadata::tar_find(&body, "ova.xml")
            .map_err(|e| ApiError::new("IMPORT_ERROR", [e]))
            .and_then(|ova| {
                let mut st = self.core.lock();
                let vms = crate::metadata::import_ova(&mut st, &ova, &vdi_map, dry_run);
                self.core.changed(&st);
                vms
            })
            .map(|vms| xmlrpc::value_fragment(&Value::strings(vms)));
        self.finish_task(task, result);
        Ok(After::Close)
    }
}
