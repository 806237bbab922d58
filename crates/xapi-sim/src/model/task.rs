//! Tasks: create, finish with a result or an error, cancel, status. The
//! threads that run `Async.` calls are in `dispatch`; tasks only record.

use std::collections::BTreeMap;

use chrono::Utc;

use super::*;
use xapi_wire::ApiError;

impl State {
    pub fn task_create(&mut self, label: &str, description: &str) -> Ref {
        let r = new_ref();
        self.tasks.insert(
            r.clone(),
            Task {
                uuid: new_uuid(),
                name_label: label.to_string(),
                name_description: description.to_string(),
                status: "pending".into(),
                progress: 0.0,
                created: Utc::now(),
                finished: None,
                result: String::new(),
                error_info: Vec::new(),
                other_config: BTreeMap::new(),
            },
        );
        r
    }

    /// Completes a task with `result` stored as an XML-RPC value fragment
    /// (TaskHelper), or fails it with the error's description.
    pub fn task_finish(&mut self, r: &str, result: Result<String, ApiError>) {
        if let Some(t) = self.tasks.get_mut(r) {
            if t.status != "pending" && t.status != "cancelling" {
                return;
            }
            t.finished = Some(Utc::now());
            t.progress = 1.0;
            match result {
                Ok(v) => {
                    t.status = "success".into();
                    t.result = v;
                }
                Err(e) => {
                    t.status = if e.code == "TASK_CANCELLED" {
                        "cancelled"
                    } else {
                        "failure"
                    }
                    .into();
                    t.error_info = e.description();
                }
            }
        }
    }

    pub fn task_cancel(&mut self, r: &str) -> Result<(), ApiError> {
        let t = self
            .tasks
            .get_mut(r)
            .ok_or_else(|| ApiError::handle_invalid("task", r))?;
        if t.status != "pending" {
            return Err(ApiError::operation_not_allowed(format!(
                "task {r} is not pending"
            )));
        }
        t.status = "cancelling".into();
        Ok(())
    }

    pub fn task_status(&self, r: &str) -> Option<&str> {
        self.tasks.get(r).map(|t| t.status.as_str())
    }
}
