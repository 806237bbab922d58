//! `POST /sdk`: one SOAP request in, one SOAP response (or fault) out.
//! The checks before a call runs (a valid `vmware_soap_session`, the
//! receiver's type, injected faults), the call on the model, the task it
//! creates, the call log line, and saving the state after a change.

use vim_wire::{
    AboutInfo, Element, Fault, Method, Moref, Request, Response, RetrieveResult, ServiceContent,
    UserSession, VimFault,
};

use crate::inventory;
use crate::model::{self, fault_message, State};
use crate::Core;

/// The API version the simulator reports (ESXi 8.0 U3).
pub const API_VERSION: &str = "8.0.3.0";
/// The session cookie.
pub const COOKIE: &str = "vmware_soap_session";

/// What to send back for one SOAP request.
#[derive(Debug)]
pub struct SoapOutcome {
    /// 200, or 500 with a fault.
    pub status: u16,
    pub body: String,
    pub set_cookie: Option<String>,
    /// Cut the response mid-way (fault injection).
    pub drop: bool,
}

fn fault_outcome(fault: VimFault, message: Option<String>) -> SoapOutcome {
    let message = message.unwrap_or_else(|| fault_message(&fault));
    SoapOutcome {
        status: 500,
        body: Fault::new(message, fault).to_envelope(),
        set_cookie: None,
        drop: false,
    }
}

/// Handles one SOAP body with the session cookie the client sent.
pub fn handle(core: &Core, cookie: Option<&str>, user_agent: &str, body: &[u8]) -> SoapOutcome {
    let req = match Request::from_envelope(body) {
        Ok(r) => r,
        Err(e) => {
            core.log_call("SOAP ? InvalidRequest".to_string());
            return fault_outcome(
                VimFault::Other {
                    type_name: "InvalidRequest".into(),
                },
                Some(format!("malformed request: {e}")),
            );
        }
    };
    let method = req.method_name().to_string();
    let mut st = core.lock();
    let outcome = call(core, &mut st, &req, cookie, user_agent);
    let mut out = match outcome {
        Ok((response, set_cookie)) => {
            core.log_call(format!("SOAP {method} ok"));
            SoapOutcome {
                status: 200,
                body: response,
                set_cookie,
                drop: false,
            }
        }
        Err((fault, message)) => {
            core.log_call(format!("SOAP {method} {}", fault.type_name()));
            fault_outcome(fault, message)
        }
    };
    out.drop = st.take_drop(&method);
    if matches!(
        req.method(),
        Some(Method::ReconfigVmTask | Method::CreateSnapshotTask | Method::RemoveSnapshotTask)
    ) {
        core.changed(&st);
    }
    out
}

type CallResult = Result<(String, Option<String>), (VimFault, Option<String>)>;

fn expect_kind(this: &Moref, kind: &str) -> Result<(), (VimFault, Option<String>)> {
    if this.kind == kind {
        Ok(())
    } else {
        Err((VimFault::ManagedObjectNotFound { obj: this.clone() }, None))
    }
}

fn call(
    core: &Core,
    st: &mut State,
    req: &Request,
    cookie: Option<&str>,
    user_agent: &str,
) -> CallResult {
    let method = req.method_name().to_string();
    let anonymous = matches!(
        req.method(),
        Some(Method::RetrieveServiceContent | Method::Login)
    );
    let session = cookie
        .filter(|c| st.sessions.contains_key(*c))
        .map(str::to_string);
    if !anonymous && session.is_none() {
        return Err((
            VimFault::NotAuthenticated {
                object: req.this().cloned(),
                privilege_id: Some("System.View".into()),
            },
            None,
        ));
    }
    let user = match &session {
        Some(s) => {
            let sess = st.sessions.get_mut(s);
            sess.map(|x| {
                x.call_count += 1;
                x.user.clone()
            })
            .unwrap_or_default()
        }
        None => String::new(),
    };
    if let Some((fault, message)) = st.take_call_fault(&method) {
        return Err((fault, Some(message).filter(|m| !m.is_empty())));
    }
    let ok = |m: Method, r: Response| Ok((r.to_envelope(m), None));
    let vm_name = |st: &State, id: &str| st.vms.get(id).map(|v| v.name.clone()).unwrap_or_default();
    match req {
        Request::RetrieveServiceContent { this } => {
            expect_kind(this, "ServiceInstance")?;
            ok(
                Method::RetrieveServiceContent,
                Response::ServiceContent(Box::new(service_content())),
            )
        }
        Request::Login {
            this,
            user_name,
            password,
            locale,
        } => {
            expect_kind(this, "SessionManager")?;
            if *user_name != core.username || *password != core.password {
                return Err((VimFault::InvalidLogin, None));
            }
            let key = hex::encode(rand::random::<[u8; 20]>());
            let now = model::now_iso();
            let session = model::Session {
                key: model::new_uuid("52"),
                user: user_name.clone(),
                call_count: 1,
            };
            let us = UserSession {
                key: session.key.clone(),
                user_name: user_name.clone(),
                full_name: user_name.clone(),
                login_time: now.clone(),
                last_active_time: now,
                locale: locale.clone().unwrap_or_else(|| "en".into()),
                message_locale: locale.clone().unwrap_or_else(|| "en".into()),
                extension_session: false,
                ip_address: "127.0.0.1".into(),
                user_agent: user_agent.to_string(),
                call_count: 1,
            };
            st.sessions.insert(key.clone(), session);
            Ok((
                Response::Login(us).to_envelope(Method::Login),
                Some(format!("{COOKIE}=\"{key}\"; Path=/; HttpOnly; Secure;")),
            ))
        }
        Request::Logout { this } => {
            expect_kind(this, "SessionManager")?;
            if let Some(s) = &session {
                st.sessions.remove(s);
            }
            ok(Method::Logout, Response::Void)
        }
        Request::RetrievePropertiesEx {
            this,
            spec_set,
            options,
        } => {
            expect_kind(this, "PropertyCollector")?;
            let mut objects = inventory::retrieve(st, spec_set).map_err(|f| (f, None))?;
            if objects.is_empty() {
                return ok(Method::RetrievePropertiesEx, Response::RetrieveResult(None));
            }
            let max = options
                .max_objects
                .filter(|&m| m > 0)
                .map(|m| m as usize)
                .unwrap_or(usize::MAX);
            let token = if objects.len() > max {
                let rest = objects.split_off(max);
                let t = st.next("token");
                st.pending.insert(t.clone(), (max, rest));
                Some(t)
            } else {
                None
            };
            ok(
                Method::RetrievePropertiesEx,
                Response::RetrieveResult(Some(RetrieveResult { token, objects })),
            )
        }
        Request::ContinueRetrievePropertiesEx { this, token } => {
            expect_kind(this, "PropertyCollector")?;
            let (page, mut rest) = st.pending.remove(token).ok_or_else(|| {
                (
                    VimFault::InvalidArgument {
                        invalid_property: Some("token".into()),
                    },
                    None,
                )
            })?;
            // Pages as large as the first call's `maxObjects`.
            let more = rest.split_off(page.min(rest.len()));
            let token = if more.is_empty() {
                None
            } else {
                let t = st.next("token");
                st.pending.insert(t.clone(), (page, more));
                Some(t)
            };
            ok(
                Method::ContinueRetrievePropertiesEx,
                Response::RetrieveResult(Some(RetrieveResult {
                    token,
                    objects: rest,
                })),
            )
        }
        Request::FindByUuid {
            this,
            uuid,
            vm_search,
            instance_uuid,
            ..
        } => {
            expect_kind(this, "SearchIndex")?;
            let found = if *vm_search {
                inventory::find_by_uuid(st, uuid, instance_uuid.unwrap_or(false))
            } else {
                None
            };
            ok(Method::FindByUuid, Response::Found(found))
        }
        Request::FindByInventoryPath {
            this,
            inventory_path,
        } => {
            expect_kind(this, "SearchIndex")?;
            ok(
                Method::FindByInventoryPath,
                Response::Found(inventory::find_by_inventory_path(st, inventory_path)),
            )
        }
        Request::ReconfigVmTask { this, spec } => {
            expect_kind(this, "VirtualMachine")?;
            st.vm(&this.value).map_err(|f| (f, None))?;
            let outcome = match st.take_task_fault(&method) {
                Some(f) => Err(f),
                None => match spec.change_tracking_enabled {
                    Some(on) => st.set_change_tracking(&this.value, on).map(|_| None),
                    None => Ok(None),
                },
            };
            let name = vm_name(st, &this.value);
            let task = st.add_task(
                "VirtualMachine.reconfigure",
                this.clone(),
                &name,
                outcome,
                &user,
            );
            ok(Method::ReconfigVmTask, Response::Task(task))
        }
        Request::CreateSnapshotTask {
            this,
            name,
            description,
            memory,
            quiesce,
        } => {
            expect_kind(this, "VirtualMachine")?;
            st.vm(&this.value).map_err(|f| (f, None))?;
            let outcome = match st.take_task_fault(&method) {
                Some(f) => Err(f),
                None => st
                    .create_snapshot(
                        &this.value,
                        name,
                        description.as_deref().unwrap_or(""),
                        *memory,
                        *quiesce,
                    )
                    .map(|id| Some(Moref::new("VirtualMachineSnapshot", &id))),
            };
            let vname = vm_name(st, &this.value);
            let task = st.add_task(
                "VirtualMachine.createSnapshot",
                this.clone(),
                &vname,
                outcome,
                &user,
            );
            ok(Method::CreateSnapshotTask, Response::Task(task))
        }
        Request::RemoveSnapshotTask {
            this,
            remove_children,
            ..
        } => {
            expect_kind(this, "VirtualMachineSnapshot")?;
            let vm = st.snapshot(&this.value).map_err(|f| (f, None))?.vm.clone();
            let outcome = match st.take_task_fault(&method) {
                Some(f) => Err(f),
                None => st
                    .remove_snapshot(&this.value, *remove_children)
                    .map(|_| None),
            };
            let vname = vm_name(st, &vm);
            let task = st.add_task(
                "VirtualMachine.removeSnapshot",
                Moref::new("VirtualMachine", &vm),
                &vname,
                outcome,
                &user,
            );
            ok(Method::RemoveSnapshotTask, Response::Task(task))
        }
        Request::QueryChangedDiskAreas {
            this,
            snapshot,
            device_key,
            start_offset,
            change_id,
        } => {
            expect_kind(this, "VirtualMachine")?;
            if let Some(s) = snapshot {
                expect_kind(s, "VirtualMachineSnapshot")?;
            }
            let info = st
                .query_changed_disk_areas(
                    &this.value,
                    snapshot.as_ref().map(|s| s.value.as_str()),
                    *device_key,
                    *start_offset,
                    change_id,
                )
                .map_err(|f| (f, None))?;
            ok(
                Method::QueryChangedDiskAreas,
                Response::DiskChangeInfo(info),
            )
        }
        Request::MakeDirectory {
            this,
            name,
            datacenter,
            create_parent_directories,
        } => {
            expect_kind(this, "FileManager")?;
            if let Some(dc) = datacenter {
                if dc.kind != "Datacenter" || dc.value != model::DATACENTER {
                    return Err((VimFault::ManagedObjectNotFound { obj: dc.clone() }, None));
                }
            }
            st.make_directory(name, create_parent_directories.unwrap_or(false))
                .map_err(|f| (f, None))?;
            ok(Method::MakeDirectory, Response::Void)
        }
        Request::DeleteDatastoreFileTask {
            this,
            name,
            datacenter,
        } => {
            expect_kind(this, "FileManager")?;
            if let Some(dc) = datacenter {
                if dc.kind != "Datacenter" || dc.value != model::DATACENTER {
                    return Err((VimFault::ManagedObjectNotFound { obj: dc.clone() }, None));
                }
            }
            let outcome = match st.take_task_fault(&method) {
                Some(f) => Err(f),
                None => st.delete_datastore_file(name).map(|_| None),
            };
            let task = st.add_task("FileManager.deleteFile", this.clone(), "", outcome, &user);
            ok(Method::DeleteDatastoreFileTask, Response::Task(task))
        }
        Request::Unknown {
            method,
            this,
            element,
        } => match (method.as_str(), this) {
            // The hidden property accessor pyVmomi uses for `vm.name` etc.
            ("Fetch", Some(obj)) => {
                let prop = element
                    .child("prop")
                    .map(|p| p.text.trim().to_string())
                    .unwrap_or_default();
                let value = inventory::property(st, obj, &prop).map_err(|f| (f, None))?;
                let mut resp = Element::vim("FetchResponse");
                if let Some(v) = value {
                    resp.push(v.encode("returnval"));
                }
                Ok((vim_wire::soap::envelope(resp), None))
            }
            _ => Err((
                VimFault::MethodNotFound {
                    receiver: this
                        .clone()
                        .unwrap_or_else(|| Moref::new("ServiceInstance", model::SERVICE_INSTANCE)),
                    method: method.clone(),
                },
                None,
            )),
        },
    }
}

/// What RetrieveServiceContent answers: an ESXi 8.0 U3 host.
pub fn service_content() -> ServiceContent {
    ServiceContent {
        root_folder: Moref::new("Folder", model::ROOT_FOLDER),
        property_collector: Moref::new("PropertyCollector", model::PROPERTY_COLLECTOR),
        view_manager: Some(Moref::new("ViewManager", model::VIEW_MANAGER)),
        about: AboutInfo {
            name: "VMware ESXi".into(),
            full_name: "VMware ESXi 8.0.3 build-24022510 (cbtvault simulator)".into(),
            vendor: "VMware, Inc.".into(),
            version: "8.0.3".into(),
            build: "24022510".into(),
            os_type: "vmnix-x86".into(),
            product_line_id: "embeddedEsx".into(),
            api_type: "HostAgent".into(),
            api_version: API_VERSION.into(),
            instance_uuid: None,
        },
        session_manager: Some(Moref::new("SessionManager", model::SESSION_MANAGER)),
        search_index: Some(Moref::new("SearchIndex", model::SEARCH_INDEX)),
        file_manager: Some(Moref::new("FileManager", model::FILE_MANAGER)),
        virtual_disk_manager: Some(Moref::new(
            "VirtualDiskManager",
            model::VIRTUAL_DISK_MANAGER,
        )),
    }
}

/// `GET /sdk/vimServiceVersions.xml`, what SmartConnect reads first.
pub fn service_versions() -> String {
    let prior = [
        "8.0.2.0", "8.0.1.0", "8.0.0.0", "7.0.3.0", "7.0.2.0", "7.0.1.0", "7.0.0.0", "6.7.3",
        "6.7", "6.5", "6.0", "5.5", "5.1", "5.0", "4.1", "4.0", "2.5",
    ];
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\" ?>\n<namespaces version=\"1.0\">\n <namespace>\n  <name>urn:vim25</name>\n",
    );
    s.push_str(&format!(
        "  <version>{API_VERSION}</version>\n  <priorVersions>\n"
    ));
    for v in prior {
        s.push_str(&format!("   <version>{v}</version>\n"));
    }
    s.push_str("  </priorVersions>\n </namespace>\n</namespaces>\n");
    s
}
