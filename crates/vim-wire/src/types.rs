//! The vim25 data objects the CBT workflow reads and writes, both ways:
//! ManagedObjectReference, ServiceContent/AboutInfo, UserSession,
//! TaskInfo, VirtualMachineConfigSpec, DiskChangeInfo and the snapshot
//! tree. Element names and their order follow the vim25 WSDL (as govmomi's
//! `vim25/types` and pyVmomi's type tables give it); optional fields that
//! are absent are not written. Devices are in `device`, the
//! PropertyCollector's types in `property`.

use crate::error::DecodeError;
use crate::soap::LocalizedMethodFault;
use crate::xml::Element;

// ------------------------------------------------------------- decode helpers

/// The text of the required child `name` of `el`.
pub(crate) fn req_text<'a>(el: &'a Element, name: &str) -> Result<&'a str, DecodeError> {
    el.child(name)
        .map(|c| c.text.as_str())
        .ok_or_else(|| DecodeError::missing(name, &el.name))
}

pub(crate) fn opt_text(el: &Element, name: &str) -> Option<String> {
    el.child(name).map(|c| c.text.clone())
}

pub(crate) fn parse_bool(text: &str, name: &str, within: &str) -> Result<bool, DecodeError> {
    match text.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(DecodeError::invalid(name, within, other, "a boolean")),
    }
}

pub(crate) fn parse_i64(text: &str, name: &str, within: &str) -> Result<i64, DecodeError> {
    text.trim()
        .parse()
        .map_err(|_| DecodeError::invalid(name, within, text, "a 64-bit integer"))
}

pub(crate) fn parse_i32(text: &str, name: &str, within: &str) -> Result<i32, DecodeError> {
    text.trim()
        .parse()
        .map_err(|_| DecodeError::invalid(name, within, text, "a 32-bit integer"))
}

pub(crate) fn req_bool(el: &Element, name: &str) -> Result<bool, DecodeError> {
    parse_bool(req_text(el, name)?, name, &el.name)
}

pub(crate) fn opt_bool(el: &Element, name: &str) -> Result<Option<bool>, DecodeError> {
    el.child(name)
        .map(|c| parse_bool(&c.text, name, &el.name))
        .transpose()
}

pub(crate) fn req_i64(el: &Element, name: &str) -> Result<i64, DecodeError> {
    parse_i64(req_text(el, name)?, name, &el.name)
}

pub(crate) fn opt_i64(el: &Element, name: &str) -> Result<Option<i64>, DecodeError> {
    el.child(name)
        .map(|c| parse_i64(&c.text, name, &el.name))
        .transpose()
}

pub(crate) fn req_i32(el: &Element, name: &str) -> Result<i32, DecodeError> {
    parse_i32(req_text(el, name)?, name, &el.name)
}

pub(crate) fn opt_i32(el: &Element, name: &str) -> Result<Option<i32>, DecodeError> {
    el.child(name)
        .map(|c| parse_i32(&c.text, name, &el.name))
        .transpose()
}

pub(crate) fn req_child<'a>(el: &'a Element, name: &str) -> Result<&'a Element, DecodeError> {
    el.child(name)
        .ok_or_else(|| DecodeError::missing(name, &el.name))
}

// ------------------------------------------------------------------ MoRef

/// A ManagedObjectReference: `<name type="VirtualMachine">vm-42</name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Moref {
    /// The managed object type (`VirtualMachine`, `Task`, ...).
    pub kind: String,
    /// The id (`vm-42`).
    pub value: String,
}

impl Moref {
    pub fn new(kind: &str, value: &str) -> Moref {
        Moref {
            kind: kind.to_string(),
            value: value.to_string(),
        }
    }

    /// `<element type="kind">value</element>`.
    pub fn encode(&self, element: &str) -> Element {
        Element::leaf(element, self.value.clone()).attr("type", self.kind.clone())
    }

    /// As [`Self::encode`], with `xsi:type="ManagedObjectReference"` (an
    /// `anyType` slot such as a property value or a task result).
    pub fn encode_any(&self, element: &str) -> Element {
        self.encode(element).typed("ManagedObjectReference")
    }
}

impl std::fmt::Display for Moref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A moref element; `within` names the parent for errors.
pub fn decode_moref(el: &Element, within: &str) -> Result<Moref, DecodeError> {
    let kind = el
        .attribute("type")
        .ok_or_else(|| DecodeError::missing(&format!("{}@type", el.name), within))?;
    let value = el.text.trim();
    if value.is_empty() {
        return Err(DecodeError::invalid(
            &el.name,
            within,
            value,
            "a managed object id",
        ));
    }
    Ok(Moref::new(kind, value))
}

pub(crate) fn req_moref(el: &Element, name: &str) -> Result<Moref, DecodeError> {
    decode_moref(req_child(el, name)?, &el.name)
}

pub(crate) fn opt_moref(el: &Element, name: &str) -> Result<Option<Moref>, DecodeError> {
    el.child(name)
        .map(|c| decode_moref(c, &el.name))
        .transpose()
}

// --------------------------------------------------------- ServiceContent

/// `AboutInfo`: what the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AboutInfo {
    pub name: String,
    pub full_name: String,
    pub vendor: String,
    pub version: String,
    pub build: String,
    pub os_type: String,
    pub product_line_id: String,
    /// `HostAgent` (ESXi) or `VirtualCenter`.
    pub api_type: String,
    pub api_version: String,
    pub instance_uuid: Option<String>,
}

impl AboutInfo {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(Element::leaf("name", self.name.clone()))
            .with(Element::leaf("fullName", self.full_name.clone()))
            .with(Element::leaf("vendor", self.vendor.clone()))
            .with(Element::leaf("version", self.version.clone()))
            .with(Element::leaf("build", self.build.clone()))
            .with(Element::leaf("osType", self.os_type.clone()))
            .with(Element::leaf("productLineId", self.product_line_id.clone()))
            .with(Element::leaf("apiType", self.api_type.clone()))
            .with(Element::leaf("apiVersion", self.api_version.clone()))
            .with_opt("instanceUuid", self.instance_uuid.as_ref())
    }

    pub fn decode(el: &Element) -> Result<AboutInfo, DecodeError> {
        let t = |n: &str| req_text(el, n).map(str::to_string);
        Ok(AboutInfo {
            name: t("name")?,
            full_name: t("fullName")?,
            vendor: t("vendor")?,
            version: t("version")?,
            build: t("build")?,
            os_type: t("osType")?,
            product_line_id: t("productLineId")?,
            api_type: t("apiType")?,
            api_version: t("apiVersion")?,
            instance_uuid: opt_text(el, "instanceUuid"),
        })
    }
}

/// `ServiceContent`: the fields a backup client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    pub root_folder: Moref,
    pub property_collector: Moref,
    pub view_manager: Option<Moref>,
    pub about: AboutInfo,
    pub session_manager: Option<Moref>,
    pub search_index: Option<Moref>,
    pub file_manager: Option<Moref>,
    pub virtual_disk_manager: Option<Moref>,
}

impl ServiceContent {
    pub fn encode(&self, element: &str) -> Element {
        // WSDL order: rootFolder, propertyCollector, viewManager, about,
        // ..., sessionManager, ..., searchIndex, fileManager, ...,
        // virtualDiskManager.
        let mut e = Element::vim(element)
            .with(self.root_folder.encode("rootFolder"))
            .with(self.property_collector.encode("propertyCollector"));
        if let Some(v) = &self.view_manager {
            e.push(v.encode("viewManager"));
        }
        e.push(self.about.encode("about"));
        for (name, m) in [
            ("sessionManager", &self.session_manager),
            ("searchIndex", &self.search_index),
            ("fileManager", &self.file_manager),
            ("virtualDiskManager", &self.virtual_disk_manager),
        ] {
            if let Some(m) = m {
                e.push(m.encode(name));
            }
        }
        e
    }

    pub fn decode(el: &Element) -> Result<ServiceContent, DecodeError> {
        Ok(ServiceContent {
            root_folder: req_moref(el, "rootFolder")?,
            property_collector: req_moref(el, "propertyCollector")?,
            view_manager: opt_moref(el, "viewManager")?,
            about: AboutInfo::decode(req_child(el, "about")?)?,
            session_manager: opt_moref(el, "sessionManager")?,
            search_index: opt_moref(el, "searchIndex")?,
            file_manager: opt_moref(el, "fileManager")?,
            virtual_disk_manager: opt_moref(el, "virtualDiskManager")?,
        })
    }
}

// ------------------------------------------------------------ UserSession

/// `UserSession`, what `Login` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSession {
    pub key: String,
    pub user_name: String,
    pub full_name: String,
    /// `xsd:dateTime` text, e.g. `2026-11-21T22:00:00Z`.
    pub login_time: String,
    pub last_active_time: String,
    pub locale: String,
    pub message_locale: String,
    pub extension_session: bool,
    pub ip_address: String,
    pub user_agent: String,
    pub call_count: i64,
}

impl UserSession {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(Element::leaf("key", self.key.clone()))
            .with(Element::leaf("userName", self.user_name.clone()))
            .with(Element::leaf("fullName", self.full_name.clone()))
            .with(Element::leaf("loginTime", self.login_time.clone()))
            .with(Element::leaf(
                "lastActiveTime",
                self.last_active_time.clone(),
            ))
            .with(Element::leaf("locale", self.locale.clone()))
            .with(Element::leaf("messageLocale", self.message_locale.clone()))
            .with(Element::leaf(
                "extensionSession",
                self.extension_session.to_string(),
            ))
            .with(Element::leaf("ipAddress", self.ip_address.clone()))
            .with(Element::leaf("userAgent", self.user_agent.clone()))
            .with(Element::leaf("callCount", self.call_count.to_string()))
    }

    pub fn decode(el: &Element) -> Result<UserSession, DecodeError> {
        let t = |n: &str| opt_text(el, n).unwrap_or_default();
        Ok(UserSession {
            key: req_text(el, "key")?.to_string(),
            user_name: req_text(el, "userName")?.to_string(),
            full_name: t("fullName"),
            login_time: t("loginTime"),
            last_active_time: t("lastActiveTime"),
            locale: t("locale"),
            message_locale: t("messageLocale"),
            extension_session: opt_bool(el, "extensionSession")?.unwrap_or(false),
            ip_address: t("ipAddress"),
            user_agent: t("userAgent"),
            call_count: opt_i64(el, "callCount")?.unwrap_or(0),
        })
    }
}

// --------------------------------------------------------------- TaskInfo

/// `TaskInfoState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Queued,
    Running,
    Success,
    Error,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Success => "success",
            TaskState::Error => "error",
        }
    }

    pub fn parse(text: &str, within: &str) -> Result<TaskState, DecodeError> {
        Ok(match text.trim() {
            "queued" => TaskState::Queued,
            "running" => TaskState::Running,
            "success" => TaskState::Success,
            "error" => TaskState::Error,
            other => {
                return Err(DecodeError::invalid(
                    "state",
                    within,
                    other,
                    "queued, running, success or error",
                ))
            }
        })
    }

    /// Whether the task has ended (success or error).
    pub fn is_done(self) -> bool {
        matches!(self, TaskState::Success | TaskState::Error)
    }
}

/// A task's `info.result`: what the CBT calls' tasks return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskResult {
    /// A moref (CreateSnapshot_Task: the `VirtualMachineSnapshot`).
    Moref(Moref),
    /// Any other value, kept as its element.
    Other(Element),
}

/// `TaskInfo` (the fields a client polls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub key: String,
    pub task: Moref,
    /// The method, e.g. `VirtualMachine.createSnapshot`.
    pub name: Option<String>,
    pub description_id: String,
    pub entity: Option<Moref>,
    pub entity_name: Option<String>,
    pub state: TaskState,
    pub cancelled: bool,
    pub cancelable: bool,
    pub error: Option<LocalizedMethodFault>,
    pub result: Option<TaskResult>,
    pub progress: Option<i32>,
    pub queue_time: String,
    pub start_time: Option<String>,
    pub complete_time: Option<String>,
    pub event_chain_id: i32,
    /// `reason` as `TaskReasonUser{userName}`: who started the task.
    pub reason_user_name: String,
}

impl TaskInfo {
    pub fn encode(&self, element: &str) -> Element {
        let mut e = Element::vim(element)
            .with(Element::leaf("key", self.key.clone()))
            .with(self.task.encode("task"))
            .with_opt("name", self.name.as_ref())
            .with(Element::leaf("descriptionId", self.description_id.clone()));
        if let Some(en) = &self.entity {
            e.push(en.encode("entity"));
        }
        e = e
            .with_opt("entityName", self.entity_name.as_ref())
            .with(Element::leaf("state", self.state.as_str()))
            .with(Element::leaf("cancelled", self.cancelled.to_string()))
            .with(Element::leaf("cancelable", self.cancelable.to_string()));
        if let Some(err) = &self.error {
            e.push(err.encode("error"));
        }
        match &self.result {
            Some(TaskResult::Moref(m)) => e.push(m.encode_any("result")),
            Some(TaskResult::Other(el)) => {
                let mut el = el.clone();
                el.name = "result".into();
                e.push(el);
            }
            None => {}
        }
        // reason: TaskReasonUser (the user who called).
        e.with_opt("progress", self.progress)
            .with(
                Element::vim("reason")
                    .typed("TaskReasonUser")
                    .with(Element::leaf("userName", self.reason_user_name.clone())),
            )
            .with(Element::leaf("queueTime", self.queue_time.clone()))
            .with_opt("startTime", self.start_time.as_ref())
            .with_opt("completeTime", self.complete_time.as_ref())
            .with(Element::leaf(
                "eventChainId",
                self.event_chain_id.to_string(),
            ))
    }

    pub fn decode(el: &Element) -> Result<TaskInfo, DecodeError> {
        let result = match el.child("result") {
            None => None,
            Some(r) if r.attribute("type").is_some() => {
                Some(TaskResult::Moref(decode_moref(r, "TaskInfo")?))
            }
            Some(r) => Some(TaskResult::Other(r.clone())),
        };
        Ok(TaskInfo {
            key: req_text(el, "key")?.to_string(),
            task: req_moref(el, "task")?,
            name: opt_text(el, "name"),
            description_id: opt_text(el, "descriptionId").unwrap_or_default(),
            entity: opt_moref(el, "entity")?,
            entity_name: opt_text(el, "entityName"),
            state: TaskState::parse(req_text(el, "state")?, &el.name)?,
            cancelled: opt_bool(el, "cancelled")?.unwrap_or(false),
            cancelable: opt_bool(el, "cancelable")?.unwrap_or(false),
            error: el
                .child("error")
                .map(LocalizedMethodFault::decode)
                .transpose()?,
            result,
            progress: opt_i32(el, "progress")?,
            queue_time: opt_text(el, "queueTime").unwrap_or_default(),
            start_time: opt_text(el, "startTime"),
            complete_time: opt_text(el, "completeTime"),
            event_chain_id: opt_i32(el, "eventChainId")?.unwrap_or(0),
            reason_user_name: el
                .child("reason")
                .and_then(|r| opt_text(r, "userName"))
                .unwrap_or_default(),
        })
    }
}

// ------------------------------------------------- VirtualMachineConfigSpec

/// `VirtualMachineConfigSpec`: only `changeTrackingEnabled` is modelled;
/// other fields a peer sends are kept in `other` (in order).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSpec {
    pub change_tracking_enabled: Option<bool>,
    pub other: Vec<Element>,
}

impl ConfigSpec {
    pub fn encode(&self, element: &str) -> Element {
        let mut e = Element::vim(element).with_all(self.other.iter().cloned());
        if let Some(v) = self.change_tracking_enabled {
            e.push(Element::leaf("changeTrackingEnabled", v.to_string()));
        }
        e
    }

    pub fn decode(el: &Element) -> Result<ConfigSpec, DecodeError> {
        Ok(ConfigSpec {
            change_tracking_enabled: opt_bool(el, "changeTrackingEnabled")?,
            other: el
                .children
                .iter()
                .filter(|c| c.name != "changeTrackingEnabled")
                .cloned()
                .collect(),
        })
    }
}

// ---------------------------------------------------------- DiskChangeInfo

/// `DiskChangeExtent`, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DiskChangeExtent {
    pub start: i64,
    pub length: i64,
}

/// `DiskChangeInfo`: the window `[start_offset, start_offset + length)`
/// it covers and the changed areas in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChangeInfo {
    pub start_offset: i64,
    pub length: i64,
    pub changed_area: Vec<DiskChangeExtent>,
}

impl DiskChangeInfo {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(Element::leaf("startOffset", self.start_offset.to_string()))
            .with(Element::leaf("length", self.length.to_string()))
            .with_all(self.changed_area.iter().map(|a| {
                Element::vim("changedArea")
                    .with(Element::leaf("start", a.start.to_string()))
                    .with(Element::leaf("length", a.length.to_string()))
            }))
    }

    pub fn decode(el: &Element) -> Result<DiskChangeInfo, DecodeError> {
        let changed_area = el
            .children_named("changedArea")
            .map(|a| {
                Ok(DiskChangeExtent {
                    start: req_i64(a, "start")?,
                    length: req_i64(a, "length")?,
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        Ok(DiskChangeInfo {
            start_offset: req_i64(el, "startOffset")?,
            length: req_i64(el, "length")?,
            changed_area,
        })
    }

    /// Where the next call starts: `startOffset + length` (saturating).
    pub fn next_offset(&self) -> i64 {
        self.start_offset.saturating_add(self.length)
    }
}

// ---------------------------------------------------------- snapshot tree

/// `VirtualMachineSnapshotTree`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotTree {
    pub snapshot: Moref,
    pub vm: Moref,
    pub name: String,
    pub description: String,
    pub id: i32,
    pub create_time: String,
    /// `VirtualMachinePowerState` of the snapshot (`poweredOff` without memory).
    pub state: String,
    pub quiesced: bool,
    pub children: Vec<SnapshotTree>,
}

impl SnapshotTree {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(self.snapshot.encode("snapshot"))
            .with(self.vm.encode("vm"))
            .with(Element::leaf("name", self.name.clone()))
            .with(Element::leaf("description", self.description.clone()))
            .with(Element::leaf("id", self.id.to_string()))
            .with(Element::leaf("createTime", self.create_time.clone()))
            .with(Element::leaf("state", self.state.clone()))
            .with(Element::leaf("quiesced", self.quiesced.to_string()))
            .with_all(self.children.iter().map(|c| c.encode("childSnapshotList")))
    }

    pub fn decode(el: &Element) -> Result<SnapshotTree, DecodeError> {
        Ok(SnapshotTree {
            snapshot: req_moref(el, "snapshot")?,
            vm: req_moref(el, "vm")?,
            name: req_text(el, "name")?.to_string(),
            description: opt_text(el, "description").unwrap_or_default(),
            id: opt_i32(el, "id")?.unwrap_or(0),
            create_time: opt_text(el, "createTime").unwrap_or_default(),
            state: opt_text(el, "state").unwrap_or_default(),
            quiesced: opt_bool(el, "quiesced")?.unwrap_or(false),
            children: el
                .children_named("childSnapshotList")
                .map(SnapshotTree::decode)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// `VirtualMachineSnapshotInfo`, a VM's `snapshot` property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub current_snapshot: Option<Moref>,
    pub root_snapshot_list: Vec<SnapshotTree>,
}

impl SnapshotInfo {
    pub fn encode(&self, element: &str) -> Element {
        let mut e = Element::vim(element);
        if let Some(c) = &self.current_snapshot {
            e.push(c.encode("currentSnapshot"));
        }
        e.with_all(
            self.root_snapshot_list
                .iter()
                .map(|t| t.encode("rootSnapshotList")),
        )
    }

    pub fn decode(el: &Element) -> Result<SnapshotInfo, DecodeError> {
        Ok(SnapshotInfo {
            current_snapshot: opt_moref(el, "currentSnapshot")?,
            root_snapshot_list: el
                .children_named("rootSnapshotList")
                .map(SnapshotTree::decode)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Every snapshot of the tree, depth first.
    pub fn all(&self) -> Vec<&SnapshotTree> {
        fn walk<'a>(t: &'a SnapshotTree, out: &mut Vec<&'a SnapshotTree>) {
            out.push(t);
            for c in &t.children {
                walk(c, out);
            }
        }
        let mut out = Vec::new();
        for t in &self.root_snapshot_list {
            walk(t, &mut out);
        }
        out
    }
}
