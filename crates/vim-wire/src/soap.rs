//! The SOAP 1.1 envelope as vSphere speaks it, both ways: wrapping a body
//! element into `soapenv:Envelope/soapenv:Body` (default namespace
//! `urn:vim25`), unwrapping one into the body element or a [`Fault`], and
//! the typed vim faults carried in a fault's `<detail>` (as
//! `<FileFaultFault xsi:type="FileFault">`) or in a
//! `LocalizedMethodFault` (`<fault xsi:type="FileFault">`, e.g. a failed
//! task's `info.error`).

use crate::error::DecodeError;
use crate::types::{decode_moref, Moref};
use crate::xml::{self, Element, NS_SOAP_ENV};

/// `Content-Type` of requests and responses.
pub const CONTENT_TYPE: &str = "text/xml; charset=utf-8";
/// The `faultcode` vSphere sends for every fault it raises.
pub const SERVER_FAULT_CODE: &str = "ServerFaultCode";

/// The whole envelope around one body element.
pub fn envelope(body: Element) -> String {
    let env =
        Element::new(NS_SOAP_ENV, "Envelope").with(Element::new(NS_SOAP_ENV, "Body").with(body));
    env.to_document()
}

/// What a SOAP body holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// The one element of the body (a request or a `...Response`).
    Element(Element),
    Fault(Fault),
}

/// Parses an envelope into its body element or fault.
pub fn parse_envelope(bytes: &[u8]) -> Result<Body, DecodeError> {
    let root = xml::parse(bytes)?;
    if root.ns != NS_SOAP_ENV || root.name != "Envelope" {
        return Err(DecodeError::NotSoap(format!(
            "root element <{}> in namespace '{}'",
            root.name, root.ns
        )));
    }
    let body = root
        .children
        .into_iter()
        .find(|c| c.ns == NS_SOAP_ENV && c.name == "Body")
        .ok_or_else(|| DecodeError::missing("soapenv:Body", "soapenv:Envelope"))?;
    let mut children = body.children.into_iter();
    let first = children
        .next()
        .ok_or_else(|| DecodeError::missing("a body element", "soapenv:Body"))?;
    if let Some(extra) = children.next() {
        return Err(DecodeError::Unexpected {
            found: extra.name,
            expected: "one element in soapenv:Body".into(),
        });
    }
    if first.ns == NS_SOAP_ENV && first.name == "Fault" {
        return Ok(Body::Fault(Fault::decode(&first)?));
    }
    Ok(Body::Element(first))
}

/// A SOAP fault: `faultcode`, `faultstring` and the typed vim fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub code: String,
    pub message: String,
    /// `None` when the fault has no (readable) `<detail>`.
    pub detail: Option<VimFault>,
}

impl Fault {
    /// A server fault with its typed detail.
    pub fn new(message: impl Into<String>, detail: VimFault) -> Fault {
        Fault {
            code: SERVER_FAULT_CODE.into(),
            message: message.into(),
            detail: Some(detail),
        }
    }

    /// The `soapenv:Fault` element.
    pub fn encode(&self) -> Element {
        let mut f = Element::new(NS_SOAP_ENV, "Fault")
            .with(Element::new("", "faultcode").with_text(&self.code))
            .with(Element::new("", "faultstring").with_text(&self.message));
        if let Some(d) = &self.detail {
            let name = format!("{}Fault", d.type_name());
            f.push(Element::new("", "detail").with(d.encode(&name)));
        }
        f
    }

    /// A whole response envelope carrying this fault.
    pub fn to_envelope(&self) -> String {
        let env = Element::new(NS_SOAP_ENV, "Envelope")
            .with(Element::new(NS_SOAP_ENV, "Body").with(self.encode()));
        env.to_document()
    }

    pub fn decode(el: &Element) -> Result<Fault, DecodeError> {
        let code = el
            .child("faultcode")
            .map(|c| c.text.trim().to_string())
            .ok_or_else(|| DecodeError::missing("faultcode", "soapenv:Fault"))?;
        let message = el
            .child("faultstring")
            .map(|c| c.text.clone())
            .unwrap_or_default();
        let detail = match el.child("detail").and_then(|d| d.children.first()) {
            Some(d) => Some(VimFault::decode(d)?),
            None => None,
        };
        Ok(Fault {
            code,
            message,
            detail,
        })
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.detail {
            Some(d) => write!(f, "{} ({}): {}", d.type_name(), self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for Fault {}

/// The vim faults the CBT calls raise (vim25 `MethodFault` subtypes),
/// with the fields that matter; any other type keeps its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VimFault {
    /// `FileFault{file}`, e.g. QueryChangedDiskAreas before tracking.
    FileFault {
        file: String,
    },
    NotFound,
    InvalidArgument {
        invalid_property: Option<String>,
    },
    /// No (valid) session: `NotAuthenticated{object, privilegeId}`.
    NotAuthenticated {
        object: Option<Moref>,
        privilege_id: Option<String>,
    },
    InvalidLogin,
    ManagedObjectNotFound {
        obj: Moref,
    },
    InvalidState,
    /// A call the server does not implement.
    MethodNotFound {
        receiver: Moref,
        method: String,
    },
    MethodFault,
    /// Another fault type, by its vim25 name.
    Other {
        type_name: String,
    },
}

impl VimFault {
    /// The vim25 type name (`FileFault`, ...).
    pub fn type_name(&self) -> &str {
        match self {
            VimFault::FileFault { .. } => "FileFault",
            VimFault::NotFound => "NotFound",
            VimFault::InvalidArgument { .. } => "InvalidArgument",
            VimFault::NotAuthenticated { .. } => "NotAuthenticated",
            VimFault::InvalidLogin => "InvalidLogin",
            VimFault::ManagedObjectNotFound { .. } => "ManagedObjectNotFound",
            VimFault::InvalidState => "InvalidState",
            VimFault::MethodNotFound { .. } => "MethodNotFound",
            VimFault::MethodFault => "MethodFault",
            // A name XML cannot carry (only from a caller, never
            // decoded) is sent as the base type.
            VimFault::Other { type_name } if !xml::valid_name(type_name) => "MethodFault",
            VimFault::Other { type_name } => type_name,
        }
    }

    /// `<element xsi:type="Type">fields</element>`.
    pub fn encode(&self, element: &str) -> Element {
        let e = Element::vim(element).typed(self.type_name());
        match self {
            VimFault::FileFault { file } => e.with(Element::leaf("file", file.clone())),
            VimFault::InvalidArgument { invalid_property } => {
                e.with_opt("invalidProperty", invalid_property.as_ref())
            }
            VimFault::NotAuthenticated {
                object,
                privilege_id,
            } => {
                let e = match object {
                    Some(o) => e.with(o.encode("object")),
                    None => e,
                };
                e.with_opt("privilegeId", privilege_id.as_ref())
            }
            VimFault::ManagedObjectNotFound { obj } => e.with(obj.encode("obj")),
            VimFault::MethodNotFound { receiver, method } => e
                .with(receiver.encode("receiver"))
                .with(Element::leaf("method", method.clone())),
            VimFault::NotFound
            | VimFault::InvalidLogin
            | VimFault::InvalidState
            | VimFault::MethodFault
            | VimFault::Other { .. } => e,
        }
    }

    /// From a detail element (`<XFault xsi:type="X">`, the type taken
    /// from `xsi:type`, else from the element name less `Fault`) or a
    /// `LocalizedMethodFault`'s `<fault>`.
    pub fn decode(el: &Element) -> Result<VimFault, DecodeError> {
        let type_name = match el.type_name() {
            Some(t) => t.to_string(),
            None => el
                .name
                .strip_suffix("Fault")
                .filter(|t| !t.is_empty())
                .unwrap_or(&el.name)
                .to_string(),
        };
        let text = |name: &str| el.child(name).map(|c| c.text.clone());
        Ok(match type_name.as_str() {
            "FileFault" => VimFault::FileFault {
                file: text("file").unwrap_or_default(),
            },
            "NotFound" => VimFault::NotFound,
            "InvalidArgument" => VimFault::InvalidArgument {
                invalid_property: text("invalidProperty"),
            },
            "NotAuthenticated" => VimFault::NotAuthenticated {
                object: el
                    .child("object")
                    .map(|o| decode_moref(o, "NotAuthenticated"))
                    .transpose()?,
                privilege_id: text("privilegeId"),
            },
            "InvalidLogin" => VimFault::InvalidLogin,
            "ManagedObjectNotFound" => VimFault::ManagedObjectNotFound {
                obj: decode_moref(
                    el.child("obj")
                        .ok_or_else(|| DecodeError::missing("obj", "ManagedObjectNotFound"))?,
                    "ManagedObjectNotFound",
                )?,
            },
            "InvalidState" => VimFault::InvalidState,
            "MethodNotFound" => VimFault::MethodNotFound {
                receiver: decode_moref(
                    el.child("receiver")
                        .ok_or_else(|| DecodeError::missing("receiver", "MethodNotFound"))?,
                    "MethodNotFound",
                )?,
                method: text("method").unwrap_or_default(),
            },
            "MethodFault" => VimFault::MethodFault,
            _ => VimFault::Other { type_name },
        })
    }

    /// The fault by its vim25 name, with empty fields (fault injection).
    pub fn from_type_name(name: &str) -> VimFault {
        match name {
            "FileFault" => VimFault::FileFault {
                file: String::new(),
            },
            "NotFound" => VimFault::NotFound,
            "InvalidArgument" => VimFault::InvalidArgument {
                invalid_property: None,
            },
            "NotAuthenticated" => VimFault::NotAuthenticated {
                object: None,
                privilege_id: None,
            },
            "InvalidLogin" => VimFault::InvalidLogin,
            "InvalidState" => VimFault::InvalidState,
            "MethodFault" => VimFault::MethodFault,
            other => VimFault::Other {
                type_name: other.to_string(),
            },
        }
    }
}

/// `LocalizedMethodFault{fault, localizedMessage}` (a task's `info.error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalizedMethodFault {
    pub fault: VimFault,
    pub localized_message: Option<String>,
}

impl LocalizedMethodFault {
    pub fn encode(&self, element: &str) -> Element {
        Element::vim(element)
            .with(self.fault.encode("fault"))
            .with_opt("localizedMessage", self.localized_message.as_ref())
    }

    pub fn decode(el: &Element) -> Result<LocalizedMethodFault, DecodeError> {
        let fault = el
            .child("fault")
            .ok_or_else(|| DecodeError::missing("fault", &el.name))?;
        Ok(LocalizedMethodFault {
            fault: VimFault::decode(fault)?,
            localized_message: el.child("localizedMessage").map(|m| m.text.clone()),
        })
    }
}

trait WithText {
    fn with_text(self, text: &str) -> Self;
}

impl WithText for Element {
    fn with_text(mut self, text: &str) -> Element {
        self.text = text.to_string();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_looking_fault_decodes() {
        let body = br#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/"
 xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
 xmlns:xsd="http://www.w3.org/2001/XMLSchema"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body>
<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The session is not authenticated.</faultstring><detail><NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated"><object type="Folder">ha-folder-root</object><privilegeId>System.View</privilegeId></NotAuthenticatedFault></detail></soapenv:Fault>
</soapenv:Body>
</soapenv:Envelope>"#;
        let Body::Fault(f) = parse_envelope(body).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!(f.code, "ServerFaultCode");
        assert_eq!(f.message, "The session is not authenticated.");
        assert_eq!(
            f.detail,
            Some(VimFault::NotAuthenticated {
                object: Some(Moref::new("Folder", "ha-folder-root")),
                privilege_id: Some("System.View".into()),
            })
        );
        let again = parse_envelope(f.to_envelope().as_bytes()).unwrap();
        assert_eq!(again, Body::Fault(f));
    }

    #[test]
    fn every_fault_kind_round_trips() {
        let all = [
            VimFault::FileFault {
                file: "[datastore1] vm/vm.vmdk".into(),
            },
            VimFault::NotFound,
            VimFault::InvalidArgument {
                invalid_property: Some("deviceKey".into()),
            },
            VimFault::NotAuthenticated {
                object: None,
                privilege_id: None,
            },
            VimFault::InvalidLogin,
            VimFault::ManagedObjectNotFound {
                obj: Moref::new("VirtualMachineSnapshot", "snapshot-9"),
            },
            VimFault::InvalidState,
            VimFault::MethodNotFound {
                receiver: Moref::new("VirtualMachine", "vm-1"),
                method: "Frobnicate".into(),
            },
            VimFault::MethodFault,
            VimFault::Other {
                type_name: "TaskInProgress".into(),
            },
        ];
        for d in all {
            let f = Fault::new("why", d);
            assert_eq!(
                parse_envelope(f.to_envelope().as_bytes()).unwrap(),
                Body::Fault(f.clone())
            );
            let l = LocalizedMethodFault {
                fault: f.detail.clone().unwrap(),
                localized_message: Some("msg".into()),
            };
            let mut s = String::new();
            l.encode("error").write_root(&mut s);
            let back = LocalizedMethodFault::decode(&xml::parse(s.as_bytes()).unwrap()).unwrap();
            assert_eq!(back, l);
        }
    }

    #[test]
    fn not_an_envelope() {
        assert!(matches!(
            parse_envelope(b"<a/>"),
            Err(DecodeError::NotSoap(_))
        ));
        assert!(parse_envelope(
            br#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body/></s:Envelope>"#
        )
        .is_err());
    }
}
