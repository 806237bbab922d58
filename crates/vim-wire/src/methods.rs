//! The vim25 calls of the CBT workflow, both ends: a [`Request`] encodes
//! to the body element a client sends and decodes from what a server
//! receives; a [`Response`] likewise for `<MethodResponse><returnval>`.
//! Parameters are written in WSDL order, `_this` first. A call this crate
//! does not model decodes as [`Request::Unknown`] so that a server can
//! answer `MethodNotFound` naming it.

use crate::error::DecodeError;
use crate::property::{PropertyFilterSpec, RetrieveOptions, RetrieveResult};
use crate::soap::{self, Body, Fault};
use crate::types::{
    decode_moref, opt_bool, opt_moref, opt_text, req_bool, req_child, req_i32, req_i64, req_moref,
    req_text, ConfigSpec, DiskChangeInfo, Moref, ServiceContent, UserSession,
};
use crate::xml::Element;

/// The calls modelled here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    RetrieveServiceContent,
    Login,
    Logout,
    RetrievePropertiesEx,
    ContinueRetrievePropertiesEx,
    FindByUuid,
    FindByInventoryPath,
    ReconfigVmTask,
    CreateSnapshotTask,
    RemoveSnapshotTask,
    QueryChangedDiskAreas,
    DeleteDatastoreFileTask,
    MakeDirectory,
}

impl Method {
    pub const ALL: [Method; 13] = [
        Method::RetrieveServiceContent,
        Method::Login,
        Method::Logout,
        Method::RetrievePropertiesEx,
        Method::ContinueRetrievePropertiesEx,
        Method::FindByUuid,
        Method::FindByInventoryPath,
        Method::ReconfigVmTask,
        Method::CreateSnapshotTask,
        Method::RemoveSnapshotTask,
        Method::QueryChangedDiskAreas,
        Method::DeleteDatastoreFileTask,
        Method::MakeDirectory,
    ];

    /// The wire name (`ReconfigVM_Task`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Method::RetrieveServiceContent => "RetrieveServiceContent",
            Method::Login => "Login",
            Method::Logout => "Logout",
            Method::RetrievePropertiesEx => "RetrievePropertiesEx",
            Method::ContinueRetrievePropertiesEx => "ContinueRetrievePropertiesEx",
            Method::FindByUuid => "FindByUuid",
            Method::FindByInventoryPath => "FindByInventoryPath",
            Method::ReconfigVmTask => "ReconfigVM_Task",
            Method::CreateSnapshotTask => "CreateSnapshot_Task",
            Method::RemoveSnapshotTask => "RemoveSnapshot_Task",
            Method::QueryChangedDiskAreas => "QueryChangedDiskAreas",
            Method::DeleteDatastoreFileTask => "DeleteDatastoreFile_Task",
            Method::MakeDirectory => "MakeDirectory",
        }
    }

    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A call with its parameters (`this` is `_this`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    RetrieveServiceContent {
        this: Moref,
    },
    Login {
        this: Moref,
        user_name: String,
        password: String,
        locale: Option<String>,
    },
    Logout {
        this: Moref,
    },
    RetrievePropertiesEx {
        this: Moref,
        spec_set: Vec<PropertyFilterSpec>,
        options: RetrieveOptions,
    },
    ContinueRetrievePropertiesEx {
        this: Moref,
        token: String,
    },
    FindByUuid {
        this: Moref,
        datacenter: Option<Moref>,
        uuid: String,
        vm_search: bool,
        instance_uuid: Option<bool>,
    },
    FindByInventoryPath {
        this: Moref,
        inventory_path: String,
    },
    ReconfigVmTask {
        this: Moref,
        spec: ConfigSpec,
    },
    CreateSnapshotTask {
        this: Moref,
        name: String,
        description: Option<String>,
        memory: bool,
        quiesce: bool,
    },
    RemoveSnapshotTask {
        this: Moref,
        remove_children: bool,
        consolidate: Option<bool>,
    },
    QueryChangedDiskAreas {
        this: Moref,
        snapshot: Option<Moref>,
        device_key: i32,
        start_offset: i64,
        change_id: String,
    },
    /// FileManager.DeleteDatastoreFile_Task: `name` is a datastore path
    /// (`[datastore1] dir/file.vmdk`); `datacenter` is required by vCenter.
    DeleteDatastoreFileTask {
        this: Moref,
        name: String,
        datacenter: Option<Moref>,
    },
    /// FileManager.MakeDirectory (void): `name` is a datastore path.
    MakeDirectory {
        this: Moref,
        name: String,
        datacenter: Option<Moref>,
        create_parent_directories: Option<bool>,
    },
    /// A call not modelled here: its name, `_this` if readable, the element.
    Unknown {
        method: String,
        this: Option<Moref>,
        element: Element,
    },
}

impl Request {
    /// The method, `None` for [`Request::Unknown`].
    pub fn method(&self) -> Option<Method> {
        Some(match self {
            Request::RetrieveServiceContent { .. } => Method::RetrieveServiceContent,
            Request::Login { .. } => Method::Login,
            Request::Logout { .. } => Method::Logout,
            Request::RetrievePropertiesEx { .. } => Method::RetrievePropertiesEx,
            Request::ContinueRetrievePropertiesEx { .. } => Method::ContinueRetrievePropertiesEx,
            Request::FindByUuid { .. } => Method::FindByUuid,
            Request::FindByInventoryPath { .. } => Method::FindByInventoryPath,
            Request::ReconfigVmTask { .. } => Method::ReconfigVmTask,
            Request::CreateSnapshotTask { .. } => Method::CreateSnapshotTask,
            Request::RemoveSnapshotTask { .. } => Method::RemoveSnapshotTask,
            Request::QueryChangedDiskAreas { .. } => Method::QueryChangedDiskAreas,
            Request::DeleteDatastoreFileTask { .. } => Method::DeleteDatastoreFileTask,
            Request::MakeDirectory { .. } => Method::MakeDirectory,
            Request::Unknown { .. } => return None,
        })
    }

    /// The wire name of the call.
    pub fn method_name(&self) -> &str {
        match (self.method(), self) {
            (Some(m), _) => m.name(),
            (None, Request::Unknown { method, .. }) => method,
            (None, _) => "",
        }
    }

    /// `_this`.
    pub fn this(&self) -> Option<&Moref> {
        match self {
            Request::RetrieveServiceContent { this }
            | Request::Login { this, .. }
            | Request::Logout { this }
            | Request::RetrievePropertiesEx { this, .. }
            | Request::ContinueRetrievePropertiesEx { this, .. }
            | Request::FindByUuid { this, .. }
            | Request::FindByInventoryPath { this, .. }
            | Request::ReconfigVmTask { this, .. }
            | Request::CreateSnapshotTask { this, .. }
            | Request::RemoveSnapshotTask { this, .. }
            | Request::QueryChangedDiskAreas { this, .. }
            | Request::DeleteDatastoreFileTask { this, .. }
            | Request::MakeDirectory { this, .. } => Some(this),
            Request::Unknown { this, .. } => this.as_ref(),
        }
    }

    /// The body element.
    pub fn encode(&self) -> Element {
        let mut e = Element::vim(self.method_name());
        if let Request::Unknown { element, .. } = self {
            return element.clone();
        }
        if let Some(this) = self.this() {
            e.push(this.encode("_this"));
        }
        match self {
            Request::RetrieveServiceContent { .. } | Request::Logout { .. } => e,
            Request::Login {
                user_name,
                password,
                locale,
                ..
            } => e
                .with(Element::leaf("userName", user_name.clone()))
                .with(Element::leaf("password", password.clone()))
                .with_opt("locale", locale.as_ref()),
            Request::RetrievePropertiesEx {
                spec_set, options, ..
            } => e
                .with_all(spec_set.iter().map(|s| s.encode("specSet")))
                .with(options.encode("options")),
            Request::ContinueRetrievePropertiesEx { token, .. } => {
                e.with(Element::leaf("token", token.clone()))
            }
            Request::FindByUuid {
                datacenter,
                uuid,
                vm_search,
                instance_uuid,
                ..
            } => {
                if let Some(dc) = datacenter {
                    e.push(dc.encode("datacenter"));
                }
                e.with(Element::leaf("uuid", uuid.clone()))
                    .with(Element::leaf("vmSearch", vm_search.to_string()))
                    .with_opt("instanceUuid", *instance_uuid)
            }
            Request::FindByInventoryPath { inventory_path, .. } => {
                e.with(Element::leaf("inventoryPath", inventory_path.clone()))
            }
            Request::ReconfigVmTask { spec, .. } => e.with(spec.encode("spec")),
            Request::CreateSnapshotTask {
                name,
                description,
                memory,
                quiesce,
                ..
            } => e
                .with(Element::leaf("name", name.clone()))
                .with_opt("description", description.as_ref())
                .with(Element::leaf("memory", memory.to_string()))
                .with(Element::leaf("quiesce", quiesce.to_string())),
            Request::RemoveSnapshotTask {
                remove_children,
                consolidate,
                ..
            } => e
                .with(Element::leaf("removeChildren", remove_children.to_string()))
                .with_opt("consolidate", *consolidate),
            Request::QueryChangedDiskAreas {
                snapshot,
                device_key,
                start_offset,
                change_id,
                ..
            } => {
                if let Some(s) = snapshot {
                    e.push(s.encode("snapshot"));
                }
                e.with(Element::leaf("deviceKey", device_key.to_string()))
                    .with(Element::leaf("startOffset", start_offset.to_string()))
                    .with(Element::leaf("changeId", change_id.clone()))
            }
            Request::DeleteDatastoreFileTask {
                name, datacenter, ..
            } => {
                let e = e.with(Element::leaf("name", name.clone()));
                match datacenter {
                    Some(dc) => e.with(dc.encode("datacenter")),
                    None => e,
                }
            }
            Request::MakeDirectory {
                name,
                datacenter,
                create_parent_directories,
                ..
            } => {
                let e = e.with(Element::leaf("name", name.clone()));
                let e = match datacenter {
                    Some(dc) => e.with(dc.encode("datacenter")),
                    None => e,
                };
                e.with_opt("createParentDirectories", *create_parent_directories)
            }
            Request::Unknown { .. } => e,
        }
    }

    /// A body element as a server reads it.
    pub fn decode(el: &Element) -> Result<Request, DecodeError> {
        let Some(method) = Method::from_name(&el.name) else {
            return Ok(Request::Unknown {
                method: el.name.clone(),
                this: el
                    .child("_this")
                    .and_then(|t| decode_moref(t, &el.name).ok()),
                element: el.clone(),
            });
        };
        let this = req_moref(el, "_this")?;
        Ok(match method {
            Method::RetrieveServiceContent => Request::RetrieveServiceContent { this },
            Method::Login => Request::Login {
                this,
                user_name: req_text(el, "userName")?.to_string(),
                password: req_text(el, "password")?.to_string(),
                locale: opt_text(el, "locale"),
            },
            Method::Logout => Request::Logout { this },
            Method::RetrievePropertiesEx => Request::RetrievePropertiesEx {
                this,
                spec_set: el
                    .children_named("specSet")
                    .map(PropertyFilterSpec::decode)
                    .collect::<Result<_, _>>()?,
                options: match el.child("options") {
                    Some(o) => RetrieveOptions::decode(o)?,
                    None => RetrieveOptions::default(),
                },
            },
            Method::ContinueRetrievePropertiesEx => Request::ContinueRetrievePropertiesEx {
                this,
                token: req_text(el, "token")?.trim().to_string(),
            },
            Method::FindByUuid => Request::FindByUuid {
                this,
                datacenter: opt_moref(el, "datacenter")?,
                uuid: req_text(el, "uuid")?.trim().to_string(),
                vm_search: req_bool(el, "vmSearch")?,
                instance_uuid: opt_bool(el, "instanceUuid")?,
            },
            Method::FindByInventoryPath => Request::FindByInventoryPath {
                this,
                inventory_path: req_text(el, "inventoryPath")?.to_string(),
            },
            Method::ReconfigVmTask => Request::ReconfigVmTask {
                this,
                spec: ConfigSpec::decode(req_child(el, "spec")?)?,
            },
            Method::CreateSnapshotTask => Request::CreateSnapshotTask {
                this,
                name: req_text(el, "name")?.to_string(),
                description: opt_text(el, "description"),
                memory: req_bool(el, "memory")?,
                quiesce: req_bool(el, "quiesce")?,
            },
            Method::RemoveSnapshotTask => Request::RemoveSnapshotTask {
                this,
                remove_children: req_bool(el, "removeChildren")?,
                consolidate: opt_bool(el, "consolidate")?,
            },
            Method::QueryChangedDiskAreas => Request::QueryChangedDiskAreas {
                this,
                snapshot: opt_moref(el, "snapshot")?,
                device_key: req_i32(el, "deviceKey")?,
                start_offset: req_i64(el, "startOffset")?,
                change_id: req_text(el, "changeId")?.trim().to_string(),
            },
            Method::DeleteDatastoreFileTask => Request::DeleteDatastoreFileTask {
                this,
                name: req_text(el, "name")?.to_string(),
                datacenter: opt_moref(el, "datacenter")?,
            },
            Method::MakeDirectory => Request::MakeDirectory {
                this,
                name: req_text(el, "name")?.to_string(),
                datacenter: opt_moref(el, "datacenter")?,
                create_parent_directories: opt_bool(el, "createParentDirectories")?,
            },
        })
    }

    /// The whole request envelope.
    pub fn to_envelope(&self) -> String {
        soap::envelope(self.encode())
    }

    /// A request envelope as a server receives it.
    pub fn from_envelope(bytes: &[u8]) -> Result<Request, DecodeError> {
        match soap::parse_envelope(bytes)? {
            Body::Element(el) => Request::decode(&el),
            Body::Fault(_) => Err(DecodeError::Unexpected {
                found: "soapenv:Fault".into(),
                expected: "a request".into(),
            }),
        }
    }
}

/// What a call returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    ServiceContent(Box<ServiceContent>),
    Login(UserSession),
    /// `void` (Logout).
    Void,
    /// RetrievePropertiesEx: `None` when nothing matched.
    RetrieveResult(Option<RetrieveResult>),
    /// FindByUuid / FindByInventoryPath: `None` when not found.
    Found(Option<Moref>),
    /// A `Task` moref (the `*_Task` calls).
    Task(Moref),
    DiskChangeInfo(DiskChangeInfo),
}

impl Response {
    /// `<MethodResponse><returnval>...</returnval></MethodResponse>`.
    pub fn encode(&self, method: Method) -> Element {
        let e = Element::vim(&format!("{}Response", method.name()));
        match self {
            Response::ServiceContent(c) => e.with(c.encode("returnval")),
            Response::Login(s) => e.with(s.encode("returnval")),
            Response::Void | Response::RetrieveResult(None) | Response::Found(None) => e,
            Response::RetrieveResult(Some(r)) => e.with(r.encode("returnval")),
            Response::Found(Some(m)) | Response::Task(m) => e.with(m.encode("returnval")),
            Response::DiskChangeInfo(d) => e.with(d.encode("returnval")),
        }
    }

    /// The response element of `method`.
    pub fn decode(method: Method, el: &Element) -> Result<Response, DecodeError> {
        let expected = format!("{}Response", method.name());
        if el.name != expected {
            return Err(DecodeError::Unexpected {
                found: el.name.clone(),
                expected: format!("<{expected}>"),
            });
        }
        let ret = el.child("returnval");
        let need = || ret.ok_or_else(|| DecodeError::missing("returnval", &expected));
        Ok(match method {
            Method::RetrieveServiceContent => {
                Response::ServiceContent(Box::new(ServiceContent::decode(need()?)?))
            }
            Method::Login => Response::Login(UserSession::decode(need()?)?),
            Method::Logout | Method::MakeDirectory => Response::Void,
            Method::RetrievePropertiesEx => {
                Response::RetrieveResult(ret.map(RetrieveResult::decode).transpose()?)
            }
            Method::ContinueRetrievePropertiesEx => {
                Response::RetrieveResult(Some(RetrieveResult::decode(need()?)?))
            }
            Method::FindByUuid | Method::FindByInventoryPath => {
                Response::Found(ret.map(|r| decode_moref(r, &expected)).transpose()?)
            }
            Method::ReconfigVmTask
            | Method::CreateSnapshotTask
            | Method::RemoveSnapshotTask
            | Method::DeleteDatastoreFileTask => Response::Task(decode_moref(need()?, &expected)?),
            Method::QueryChangedDiskAreas => {
                Response::DiskChangeInfo(DiskChangeInfo::decode(need()?)?)
            }
        })
    }

    /// The whole response envelope.
    pub fn to_envelope(&self, method: Method) -> String {
        soap::envelope(self.encode(method))
    }

    /// A response envelope as a client receives it: the response, or the
    /// fault the server answered.
    pub fn from_envelope(
        method: Method,
        bytes: &[u8],
    ) -> Result<Result<Response, Fault>, DecodeError> {
        match soap::parse_envelope(bytes)? {
            Body::Element(el) => Response::decode(method, &el).map(Ok),
            Body::Fault(f) => Ok(Err(f)),
        }
    }
}

/// The `SOAPAction` header for an API version: `urn:vim25/8.0.3.0`.
pub fn soap_action(api_version: &str) -> String {
    format!("urn:vim25/{api_version}")
}
