//! The PropertyCollector's data objects, both ways: what to read
//! ([`PropertyFilterSpec`] with its [`ObjectSpec`]s, traversal
//! [`SelectionSpec`]s and [`PropertySpec`]s, [`RetrieveOptions`]) and what
//! comes back ([`RetrieveResult`] with a paging `token`, [`ObjectContent`],
//! [`DynamicProperty`] whose `val` is an `anyType` typed by `xsi:type`:
//! [`PropertyValue`]).

use crate::device::VirtualDevice;
use crate::error::DecodeError;
use crate::soap::LocalizedMethodFault;
use crate::types::{
    decode_moref, opt_bool, opt_i32, opt_text, parse_bool, parse_i32, parse_i64, req_child,
    req_moref, req_text, Moref, SnapshotInfo, TaskInfo, TaskState,
};
use crate::xml::{Element, NS_XSD};

/// `PropertySpec`: which properties of which type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertySpec {
    /// The managed object type (`VirtualMachine`, `Task`, ...).
    pub kind: String,
    pub all: Option<bool>,
    pub path_set: Vec<String>,
}

impl PropertySpec {
    pub fn new(kind: &str, paths: &[&str]) -> PropertySpec {
        PropertySpec {
            kind: kind.to_string(),
            all: None,
            path_set: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(Element::leaf("type", self.kind.clone()))
            .with_opt("all", self.all)
            .with_all(
                self.path_set
                    .iter()
                    .map(|p| Element::leaf("pathSet", p.clone())),
            )
    }

    pub fn decode(el: &Element) -> Result<PropertySpec, DecodeError> {
        Ok(PropertySpec {
            kind: req_text(el, "type")?.trim().to_string(),
            all: opt_bool(el, "all")?,
            path_set: el
                .children_named("pathSet")
                .map(|p| p.text.trim().to_string())
                .collect(),
        })
    }
}

/// `SelectionSpec` (a reference to a named traversal) or `TraversalSpec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectionSpec {
    Named(String),
    Traversal(TraversalSpec),
}

/// `TraversalSpec`: from objects of `kind`, follow property `path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraversalSpec {
    pub name: Option<String>,
    pub kind: String,
    pub path: String,
    pub skip: Option<bool>,
    pub select_set: Vec<SelectionSpec>,
}

impl SelectionSpec {
    pub fn encode(&self, element: &str) -> Element {
        match self {
            SelectionSpec::Named(n) => Element::vim(element)
                .typed("SelectionSpec")
                .with(Element::leaf("name", n.clone())),
            SelectionSpec::Traversal(t) => Element::vim(element)
                .typed("TraversalSpec")
                .with_opt("name", t.name.as_ref())
                .with(Element::leaf("type", t.kind.clone()))
                .with(Element::leaf("path", t.path.clone()))
                .with_opt("skip", t.skip)
                .with_all(t.select_set.iter().map(|s| s.encode("selectSet"))),
        }
    }

    pub fn decode(el: &Element) -> Result<SelectionSpec, DecodeError> {
        let traversal = el.type_name() == Some("TraversalSpec")
            || (el.type_name().is_none() && el.child("path").is_some());
        if !traversal {
            return Ok(SelectionSpec::Named(
                opt_text(el, "name").unwrap_or_default(),
            ));
        }
        Ok(SelectionSpec::Traversal(TraversalSpec {
            name: opt_text(el, "name"),
            kind: req_text(el, "type")?.trim().to_string(),
            path: req_text(el, "path")?.trim().to_string(),
            skip: opt_bool(el, "skip")?,
            select_set: el
                .children_named("selectSet")
                .map(SelectionSpec::decode)
                .collect::<Result<_, _>>()?,
        }))
    }
}

/// `ObjectSpec`: where to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSpec {
    pub obj: Moref,
    pub skip: Option<bool>,
    pub select_set: Vec<SelectionSpec>,
}

impl ObjectSpec {
    pub fn new(obj: Moref) -> ObjectSpec {
        ObjectSpec {
            obj,
            skip: None,
            select_set: Vec::new(),
        }
    }

    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(self.obj.encode("obj"))
            .with_opt("skip", self.skip)
            .with_all(self.select_set.iter().map(|s| s.encode("selectSet")))
    }

    pub fn decode(el: &Element) -> Result<ObjectSpec, DecodeError> {
        Ok(ObjectSpec {
            obj: req_moref(el, "obj")?,
            skip: opt_bool(el, "skip")?,
            select_set: el
                .children_named("selectSet")
                .map(SelectionSpec::decode)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// `PropertyFilterSpec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyFilterSpec {
    pub prop_set: Vec<PropertySpec>,
    pub object_set: Vec<ObjectSpec>,
}

impl PropertyFilterSpec {
    /// Properties `paths` of the one object `obj`.
    pub fn of(obj: &Moref, paths: &[&str]) -> PropertyFilterSpec {
        PropertyFilterSpec {
            prop_set: vec![PropertySpec::new(&obj.kind, paths)],
            object_set: vec![ObjectSpec::new(obj.clone())],
        }
    }

    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with_all(self.prop_set.iter().map(|p| p.encode("propSet")))
            .with_all(self.object_set.iter().map(|o| o.encode("objectSet")))
    }

    pub fn decode(el: &Element) -> Result<PropertyFilterSpec, DecodeError> {
        Ok(PropertyFilterSpec {
            prop_set: el
                .children_named("propSet")
                .map(PropertySpec::decode)
                .collect::<Result<_, _>>()?,
            object_set: el
                .children_named("objectSet")
                .map(ObjectSpec::decode)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// `RetrieveOptions`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetrieveOptions {
    pub max_objects: Option<i32>,
}

impl RetrieveOptions {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element).with_opt("maxObjects", self.max_objects)
    }

    pub fn decode(el: &Element) -> Result<RetrieveOptions, DecodeError> {
        Ok(RetrieveOptions {
            max_objects: opt_i32(el, "maxObjects")?,
        })
    }
}

/// A property value (`DynamicProperty.val`, an `anyType`), by its
/// `xsi:type`. A VM's whole `config` (`VirtualMachineConfigInfo`) and any
/// type not listed stay an opaque element ([`PropertyValue::Other`]) that
/// encodes back exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropertyValue {
    String(String),
    Bool(bool),
    Int(i32),
    Long(i64),
    Moref(Moref),
    Morefs(Vec<Moref>),
    /// `ArrayOfVirtualDevice` (`config.hardware.device`).
    Devices(Vec<VirtualDevice>),
    TaskInfo(Box<TaskInfo>),
    TaskState(TaskState),
    /// `LocalizedMethodFault` (a task's `info.error`).
    Fault(LocalizedMethodFault),
    /// `VirtualMachineSnapshotInfo` (a VM's `snapshot`).
    SnapshotInfo(SnapshotInfo),
    /// An enumeration value, e.g. `VirtualMachinePowerState` `poweredOn`.
    Enum {
        type_name: String,
        value: String,
    },
    /// Anything else, kept whole (its `xsi:type` included).
    Other(Element),
}

impl PropertyValue {
    pub fn encode(&self, element: &str) -> Element {
        let xsd = |t: &str, v: String| Element::leaf(element, v).xsd_typed(t);
        match self {
            PropertyValue::String(s) => xsd("string", s.clone()),
            PropertyValue::Bool(b) => xsd("boolean", b.to_string()),
            PropertyValue::Int(i) => xsd("int", i.to_string()),
            PropertyValue::Long(i) => xsd("long", i.to_string()),
            PropertyValue::Moref(m) => m.encode_any(element),
            PropertyValue::Morefs(ms) => Element::vim(element)
                .typed("ArrayOfManagedObjectReference")
                .with_all(ms.iter().map(|m| m.encode("ManagedObjectReference"))),
            PropertyValue::Devices(ds) => Element::vim(element)
                .typed("ArrayOfVirtualDevice")
                .with_all(ds.iter().map(|d| d.encode("VirtualDevice"))),
            PropertyValue::TaskInfo(t) => t.encode(element).typed("TaskInfo"),
            PropertyValue::TaskState(s) => {
                Element::leaf(element, s.as_str()).typed("TaskInfoState")
            }
            PropertyValue::Fault(f) => f.encode(element).typed("LocalizedMethodFault"),
            PropertyValue::SnapshotInfo(s) => s.encode(element).typed("VirtualMachineSnapshotInfo"),
            PropertyValue::Enum { type_name, value } => {
                Element::leaf(element, value.clone()).typed(type_name)
            }
            PropertyValue::Other(el) => {
                let mut el = el.clone();
                el.name = element.to_string();
                el
            }
        }
    }

    pub fn decode(el: &Element) -> Result<PropertyValue, DecodeError> {
        let Some(t) = &el.xsi_type else {
            return Ok(PropertyValue::Other(el.clone()));
        };
        let within = "DynamicProperty";
        if t.ns == NS_XSD {
            return Ok(match t.name.as_str() {
                "string" => PropertyValue::String(el.text.clone()),
                "boolean" => PropertyValue::Bool(parse_bool(&el.text, &el.name, within)?),
                "int" | "short" | "byte" => {
                    PropertyValue::Int(parse_i32(&el.text, &el.name, within)?)
                }
                "long" => PropertyValue::Long(parse_i64(&el.text, &el.name, within)?),
                _ => PropertyValue::Other(el.clone()),
            });
        }
        Ok(match t.name.as_str() {
            "ManagedObjectReference" => PropertyValue::Moref(decode_moref(el, within)?),
            "ArrayOfManagedObjectReference" => PropertyValue::Morefs(
                el.children
                    .iter()
                    .map(|c| decode_moref(c, "ArrayOfManagedObjectReference"))
                    .collect::<Result<_, _>>()?,
            ),
            "ArrayOfVirtualDevice" => PropertyValue::Devices(
                el.children
                    .iter()
                    .map(VirtualDevice::decode)
                    .collect::<Result<_, _>>()?,
            ),
            "TaskInfo" => PropertyValue::TaskInfo(Box::new(TaskInfo::decode(el)?)),
            "TaskInfoState" => PropertyValue::TaskState(TaskState::parse(&el.text, within)?),
            "LocalizedMethodFault" => PropertyValue::Fault(LocalizedMethodFault::decode(el)?),
            "VirtualMachineSnapshotInfo" => PropertyValue::SnapshotInfo(SnapshotInfo::decode(el)?),
            "VirtualMachinePowerState"
            | "VirtualMachineConnectionState"
            | "ManagedEntityStatus"
            | "VirtualMachineToolsRunningStatus" => PropertyValue::Enum {
                type_name: t.name.clone(),
                value: el.text.trim().to_string(),
            },
            _ => PropertyValue::Other(el.clone()),
        })
    }
}

/// `DynamicProperty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicProperty {
    pub name: String,
    pub val: PropertyValue,
}

/// `MissingProperty`: a path that could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingProperty {
    pub path: String,
    pub fault: LocalizedMethodFault,
}

/// `ObjectContent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectContent {
    pub obj: Moref,
    pub prop_set: Vec<DynamicProperty>,
    pub missing_set: Vec<MissingProperty>,
}

impl ObjectContent {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(self.obj.encode("obj"))
            .with_all(self.prop_set.iter().map(|p| {
                Element::vim("propSet")
                    .with(Element::leaf("name", p.name.clone()))
                    .with(p.val.encode("val"))
            }))
            .with_all(self.missing_set.iter().map(|m| {
                Element::vim("missingSet")
                    .with(Element::leaf("path", m.path.clone()))
                    .with(m.fault.encode("fault"))
            }))
    }

    pub fn decode(el: &Element) -> Result<ObjectContent, DecodeError> {
        Ok(ObjectContent {
            obj: req_moref(el, "obj")?,
            prop_set: el
                .children_named("propSet")
                .map(|p| {
                    Ok(DynamicProperty {
                        name: req_text(p, "name")?.to_string(),
                        val: PropertyValue::decode(req_child(p, "val")?)?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?,
            missing_set: el
                .children_named("missingSet")
                .map(|m| {
                    Ok(MissingProperty {
                        path: req_text(m, "path")?.to_string(),
                        fault: LocalizedMethodFault::decode(req_child(m, "fault")?)?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?,
        })
    }

    /// The value of property `name`, if it was returned.
    pub fn property(&self, name: &str) -> Option<&PropertyValue> {
        self.prop_set
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.val)
    }
}

/// `RetrieveResult`: some objects, and a token when more remain
/// (`ContinueRetrievePropertiesEx`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrieveResult {
    pub token: Option<String>,
    pub objects: Vec<ObjectContent>,
}

impl RetrieveResult {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with_opt("token", self.token.as_ref())
            .with_all(self.objects.iter().map(|o| o.encode("objects")))
    }

    pub fn decode(el: &Element) -> Result<RetrieveResult, DecodeError> {
        Ok(RetrieveResult {
            token: opt_text(el, "token"),
            objects: el
                .children_named("objects")
                .map(ObjectContent::decode)
                .collect::<Result<_, _>>()?,
        })
    }
}
