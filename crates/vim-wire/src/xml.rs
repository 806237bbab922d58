//! A small namespace-aware XML element tree, sans I/O: [`parse`] reads a
//! document (quick-xml underneath) into [`Element`]s whose names are
//! resolved to (namespace URI, local name) and whose `xsi:type` is
//! resolved to a [`QName`]; [`Element::to_document`] writes one back with
//! the prefixes vSphere uses (`soapenv`, `xsi`, `xsd`, default namespace
//! `urn:vim25`) and proper escaping. SOAP has no mixed content, so an
//! element holds text or children: whitespace between children is
//! dropped, text of a leaf is kept exactly.
//!
//! Input is untrusted: the depth and size are bounded, DTDs are refused,
//! an undeclared prefix is an error, nothing panics.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

use crate::error::XmlError;

/// `http://schemas.xmlsoap.org/soap/envelope/`, prefix `soapenv`.
pub const NS_SOAP_ENV: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// XML Schema instance (`xsi:type`).
pub const NS_XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
/// XML Schema (`xsd:string`, `xsd:boolean`, ...).
pub const NS_XSD: &str = "http://www.w3.org/2001/XMLSchema";
/// The vim25 namespace, the default one of every body vSphere sends.
pub const NS_VIM25: &str = "urn:vim25";

/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Largest document accepted (the caller bounds what it reads first).
pub const MAX_DOCUMENT_BYTES: usize = 64 << 20;

/// A resolved qualified name: namespace URI ("" for none) and local name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QName {
    pub ns: String,
    pub name: String,
}

impl QName {
    pub fn vim(name: &str) -> QName {
        QName {
            ns: NS_VIM25.into(),
            name: name.into(),
        }
    }

    pub fn xsd(name: &str) -> QName {
        QName {
            ns: NS_XSD.into(),
            name: name.into(),
        }
    }
}

/// An attribute other than a namespace declaration or `xsi:type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    /// "" for an unprefixed attribute (the usual case, e.g. `type`).
    pub ns: String,
    pub name: String,
    pub value: String,
}

/// One element: resolved name, `xsi:type`, attributes, and either text or
/// child elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub ns: String,
    pub name: String,
    pub xsi_type: Option<QName>,
    pub attrs: Vec<Attribute>,
    /// The text of a leaf (kept exactly); empty when there are children.
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// An empty element in the vim25 namespace.
    pub fn vim(name: &str) -> Element {
        Element::new(NS_VIM25, name)
    }

    pub fn new(ns: &str, name: &str) -> Element {
        Element {
            ns: ns.to_string(),
            name: name.to_string(),
            xsi_type: None,
            attrs: Vec::new(),
            text: String::new(),
            children: Vec::new(),
        }
    }

    /// A vim25 leaf `<name>text</name>`.
    pub fn leaf(name: &str, text: impl Into<String>) -> Element {
        let mut e = Element::vim(name);
        e.text = text.into();
        e
    }

    /// Sets `xsi:type` to a vim25 type.
    pub fn typed(mut self, vim_type: &str) -> Element {
        self.xsi_type = Some(QName::vim(vim_type));
        self
    }

    /// Sets `xsi:type` to an XML Schema type (`xsd:boolean`, ...).
    pub fn xsd_typed(mut self, xsd_type: &str) -> Element {
        self.xsi_type = Some(QName::xsd(xsd_type));
        self
    }

    /// Adds an unprefixed attribute.
    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Element {
        self.attrs.push(Attribute {
            ns: String::new(),
            name: name.to_string(),
            value: value.into(),
        });
        self
    }

    pub fn with(mut self, child: Element) -> Element {
        self.children.push(child);
        self
    }

    pub fn with_all(mut self, children: impl IntoIterator<Item = Element>) -> Element {
        self.children.extend(children);
        self
    }

    /// Adds `<name>text</name>` when `value` is present.
    pub fn with_opt(self, name: &str, value: Option<impl ToString>) -> Element {
        match value {
            Some(v) => self.with(Element::leaf(name, v.to_string())),
            None => self,
        }
    }

    pub fn push(&mut self, child: Element) {
        self.children.push(child);
    }

    /// The value of an unprefixed attribute.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.ns.is_empty() && a.name == name)
            .map(|a| a.value.as_str())
    }

    /// The `xsi:type` local name, whatever its namespace.
    pub fn type_name(&self) -> Option<&str> {
        self.xsi_type.as_ref().map(|q| q.name.as_str())
    }

    /// The first child with this local name.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child with this local name, in order.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The whole document: XML declaration, then this element as root
    /// with the `xsi`/`xsd` (and `soapenv` when used) prefixes declared.
    pub fn to_document(&self) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        self.write_root(&mut out);
        out
    }

    /// This element as the root of a fragment (no XML declaration).
    pub fn write_root(&self, out: &mut String) {
        let mut w = Writer { out, generated: 0 };
        w.element(self, "", true);
    }
}

struct Writer<'a> {
    out: &'a mut String,
    generated: usize,
}

impl Writer<'_> {
    /// Writes `el` where `default_ns` is the default namespace in scope.
    fn element(&mut self, el: &Element, default_ns: &str, root: bool) {
        let mut decls: Vec<(String, String)> = Vec::new();
        let tag = if el.ns == NS_SOAP_ENV {
            if root {
                decls.push(("soapenv".into(), NS_SOAP_ENV.into()));
            }
            format!("soapenv:{}", el.name)
        } else {
            el.name.clone()
        };
        let mut element_default = default_ns.to_string();
        if el.ns != NS_SOAP_ENV && el.ns != default_ns {
            element_default = el.ns.clone();
            decls.insert(0, (String::new(), el.ns.clone()));
        }
        if root {
            decls.push(("xsd".into(), NS_XSD.into()));
            decls.push(("xsi".into(), NS_XSI.into()));
        }
        let mut attrs = String::new();
        for a in &el.attrs {
            let prefix = match a.ns.as_str() {
                "" => None,
                NS_XSI => Some("xsi".to_string()),
                NS_XSD => Some("xsd".to_string()),
                NS_SOAP_ENV => Some("soapenv".to_string()),
                other => {
                    let p = format!("ns{}", self.generated);
                    self.generated += 1;
                    decls.push((p.clone(), other.to_string()));
                    Some(p)
                }
            };
            attrs.push(' ');
            if let Some(p) = prefix {
                attrs.push_str(&p);
                attrs.push(':');
            }
            attrs.push_str(&a.name);
            attrs.push_str("=\"");
            escape_attribute(&a.value, &mut attrs);
            attrs.push('"');
        }
        if let Some(t) = &el.xsi_type {
            let value = if t.ns == NS_XSD {
                format!("xsd:{}", t.name)
            } else if t.ns == element_default || t.ns.is_empty() {
                t.name.clone()
            } else {
                let p = format!("ns{}", self.generated);
                self.generated += 1;
                decls.push((p.clone(), t.ns.clone()));
                format!("{p}:{}", t.name)
            };
            attrs.push_str(" xsi:type=\"");
            escape_attribute(&value, &mut attrs);
            attrs.push('"');
        }
        self.out.push('<');
        self.out.push_str(&tag);
        for (p, ns) in &decls {
            self.out.push_str(" xmlns");
            if !p.is_empty() {
                self.out.push(':');
                self.out.push_str(p);
            }
            self.out.push_str("=\"");
            escape_attribute(ns, self.out);
            self.out.push('"');
        }
        self.out.push_str(&attrs);
        if el.children.is_empty() && el.text.is_empty() {
            self.out.push_str("/>");
            return;
        }
        self.out.push('>');
        if el.children.is_empty() {
            escape_text(&el.text, self.out);
        } else {
            for c in &el.children {
                self.element(c, &element_default, false);
            }
        }
        self.out.push_str("</");
        self.out.push_str(&tag);
        self.out.push('>');
    }
}

/// Whether `s` can be an element name or a type's local name (an XML
/// NCName, simplified: a letter or `_`, then letters, digits, `_-.`).
pub fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A character XML 1.0 can carry (even as a reference).
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Escapes text content. `\r` becomes `&#13;` so that a reader's
/// end-of-line normalisation keeps it; a character XML cannot carry at
/// all (e.g. NUL) becomes U+FFFD.
pub fn escape_text(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            c if !xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// Escapes an attribute value (double-quoted); white space other than
/// the space is written as references so attribute normalisation keeps it.
pub fn escape_attribute(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if !xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// Reads a whole document into a tree. UTF-8 only; elements, text, the
/// predefined entities, character references, CDATA, comments, processing
/// instructions and the XML declaration are accepted; a DTD, content
/// outside the root, an undeclared prefix and nesting deeper than
/// [`MAX_DEPTH`] are refused.
pub fn parse(body: &[u8]) -> Result<Element, XmlError> {
    if body.len() > MAX_DOCUMENT_BYTES {
        return Err(XmlError::TooLarge(MAX_DOCUMENT_BYTES));
    }
    let s = std::str::from_utf8(body).map_err(|e| XmlError::Malformed {
        at: e.valid_up_to(),
        reason: "not UTF-8".into(),
    })?;
    let mut reader = NsReader::from_str(s);
    let mut open: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let at = reader.buffer_position() as usize;
        let err = |reason: String| XmlError::Malformed { at, reason };
        let (resolved, event) = match reader.read_resolved_event() {
            Ok((r, e)) => (namespace_of(&r), e),
            Err(e) => {
                return Err(XmlError::Malformed {
                    at: reader.error_position() as usize,
                    reason: e.to_string(),
                })
            }
        };
        match event {
            Event::Start(ref tag) | Event::Empty(ref tag) => {
                if root.is_some() {
                    return Err(err("content after the root element".into()));
                }
                if open.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep(MAX_DEPTH));
                }
                let el = start_element(&reader, tag, resolved, at)?;
                if let Some(parent) = open.last_mut() {
                    if !parent.text.trim().is_empty() {
                        return Err(err(format!(
                            "mixed content (text and elements) in <{}>",
                            parent.name
                        )));
                    }
                    parent.text.clear();
                }
                if matches!(event, Event::Start(_)) {
                    open.push(el);
                } else {
                    close(el, &mut open, &mut root);
                }
            }
            // quick-xml has checked that the name matches the open element.
            Event::End(_) => {
                let Some(el) = open.pop() else {
                    return Err(err("end tag without a start tag".into()));
                };
                close(el, &mut open, &mut root);
            }
            Event::Text(t) => {
                let t = t.xml_content(quick_xml::XmlVersion::Implicit1_0);
                check_chars(&t, at)?;
                match open.last_mut() {
                    Some(el) if el.children.is_empty() => el.text.push_str(&t),
                    Some(el) if t.trim().is_empty() => {
                        let _ = el;
                    }
                    Some(el) => {
                        return Err(err(format!(
                            "mixed content (text and elements) in <{}>",
                            el.name
                        )))
                    }
                    None if t.trim().is_empty() => {}
                    None => return Err(err("text outside the root element".into())),
                }
            }
            Event::CData(t) => match open.last_mut() {
                Some(el) if el.children.is_empty() => el.text.push_str(&t.into_inner()),
                Some(el) => {
                    return Err(err(format!(
                        "mixed content (CDATA and elements) in <{}>",
                        el.name
                    )))
                }
                None => return Err(err("CDATA outside the root element".into())),
            },
            Event::GeneralRef(r) => {
                let Some(el) = open.last_mut() else {
                    return Err(err("reference outside the root element".into()));
                };
                if !el.children.is_empty() {
                    return Err(err(format!(
                        "mixed content (text and elements) in <{}>",
                        el.name
                    )));
                }
                let c = match &*r {
                    "lt" => '<',
                    "gt" => '>',
                    "amp" => '&',
                    "quot" => '"',
                    "apos" => '\'',
                    name => r
                        .resolve_char_ref()
                        .ok()
                        .flatten()
                        .filter(|&c| xml_char(c))
                        .ok_or_else(|| err(format!("unknown entity '&{name};'")))?,
                };
                el.text.push(c);
            }
            Event::DocType(_) => return Err(err("DTDs are not accepted".into())),
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            Event::Eof => {
                if let Some(el) = open.last() {
                    return Err(err(format!("unterminated <{}>", el.name)));
                }
                return root.ok_or_else(|| err("no root element".into()));
            }
        }
    }
}

/// Text must consist of characters XML 1.0 allows (what the encoder
/// can write back).
fn check_chars(s: &str, at: usize) -> Result<(), XmlError> {
    match s.chars().find(|&c| !xml_char(c)) {
        None => Ok(()),
        Some(c) => Err(XmlError::Malformed {
            at,
            reason: format!("character U+{:04X} is not allowed in XML", c as u32),
        }),
    }
}

/// `Ok(namespace)` ("" when unbound) or `Err(prefix)` when undeclared.
fn namespace_of(r: &ResolveResult) -> Result<String, String> {
    match r {
        // The declaration's value as written: references still escaped
        // (one that does not resolve is kept as it is).
        ResolveResult::Bound(ns) => Ok(quick_xml::escape::unescape(ns.0)
            .map(|u| u.into_owned())
            .unwrap_or_else(|_| ns.0.to_string())),
        ResolveResult::Unbound => Ok(String::new()),
        ResolveResult::Unknown(p) => Err(p.clone()),
    }
}

fn start_element(
    reader: &NsReader<&[u8]>,
    tag: &BytesStart,
    ns: Result<String, String>,
    at: usize,
) -> Result<Element, XmlError> {
    let local = tag.local_name();
    let name: &str = local.as_ref();
    let ns = ns.map_err(|prefix| XmlError::UnboundPrefix {
        prefix,
        element: name.to_string(),
    })?;
    let mut el = Element::new(&ns, name);
    for a in tag.attributes() {
        let a = a.map_err(|e| XmlError::Malformed {
            at,
            reason: e.to_string(),
        })?;
        let key = a.key;
        let raw_name: &str = key.0;
        if raw_name == "xmlns" || raw_name.starts_with("xmlns:") {
            continue;
        }
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| XmlError::Malformed {
                at,
                reason: e.to_string(),
            })?
            .into_owned();
        check_chars(&value, at)?;
        let (res, attr_local) = reader.resolver().resolve_attribute(key);
        let attr_local: &str = attr_local.as_ref();
        let attr_ns = namespace_of(&res).map_err(|prefix| XmlError::UnboundPrefix {
            prefix,
            element: name.to_string(),
        })?;
        if attr_ns == NS_XSI && attr_local == "type" {
            el.xsi_type = Some(resolve_type_value(reader, &value, name)?);
        } else {
            el.attrs.push(Attribute {
                ns: attr_ns,
                name: attr_local.to_string(),
                value,
            });
        }
    }
    Ok(el)
}

/// An `xsi:type` value `prefix:Local` or `Local` (default namespace).
fn resolve_type_value(
    reader: &NsReader<&[u8]>,
    value: &str,
    element: &str,
) -> Result<QName, XmlError> {
    let value = value.trim();
    let q = quick_xml::name::QName(value);
    let (res, local) = reader.resolver().resolve_element(q);
    let local: &str = local.as_ref();
    if !valid_name(local) || value.matches(':').count() > 1 {
        return Err(XmlError::Malformed {
            at: 0,
            reason: format!(
                "xsi:type '{}' of <{element}> is not a type name",
                value.chars().take(60).collect::<String>()
            ),
        });
    }
    let ns = namespace_of(&res).map_err(|prefix| XmlError::UnboundPrefix {
        prefix,
        element: element.to_string(),
    })?;
    Ok(QName {
        ns,
        name: local.to_string(),
    })
}

fn close(el: Element, open: &mut [Element], root: &mut Option<Element>) {
    let mut el = el;
    if !el.children.is_empty() {
        el.text.clear();
    }
    match open.last_mut() {
        Some(parent) => parent.children.push(el),
        None => *root = Some(el),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_prefixes_and_xsi_type_resolve() {
        let doc = br#"<?xml version="1.0"?>
<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/" xmlns:x="http://www.w3.org/2001/XMLSchema-instance" xmlns:s="http://www.w3.org/2001/XMLSchema">
 <e:Body><Foo xmlns="urn:vim25"><val x:type="s:boolean">true</val><backing x:type="VirtualDiskFlatVer2BackingInfo"/>
 <_this type="VirtualMachine">vm-1 &amp; &#65;</_this></Foo></e:Body></e:Envelope>"#;
        let root = parse(doc).unwrap();
        assert_eq!(
            (root.ns.as_str(), root.name.as_str()),
            (NS_SOAP_ENV, "Envelope")
        );
        let foo = &root.children[0].children[0];
        assert_eq!(foo.ns, NS_VIM25);
        assert_eq!(foo.children[0].xsi_type, Some(QName::xsd("boolean")));
        assert_eq!(
            foo.children[1].xsi_type,
            Some(QName::vim("VirtualDiskFlatVer2BackingInfo"))
        );
        assert_eq!(foo.children[2].attribute("type"), Some("VirtualMachine"));
        assert_eq!(foo.children[2].text, "vm-1 & A");
        let again = parse(root.to_document().as_bytes()).unwrap();
        assert_eq!(again, root);
    }

    #[test]
    fn hostile_documents_are_refused() {
        assert!(matches!(parse(b"<a><b>"), Err(XmlError::Malformed { .. })));
        assert!(matches!(
            parse(b"<p:a/>"),
            Err(XmlError::UnboundPrefix { .. })
        ));
        assert!(parse(b"<!DOCTYPE a [<!ENTITY x 'y'>]><a>&x;</a>").is_err());
        assert!(parse(b"<a>t<b/></a>").is_err());
        assert!(parse(b"<a/><b/>").is_err());
        assert!(parse(b"\xff").is_err());
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(deep.as_bytes()), Err(XmlError::TooDeep(MAX_DEPTH)));
    }

    #[test]
    fn escaping_round_trips() {
        let e = Element::leaf("s", "a<b>&\"c'\r\n\t\u{0}").attr("k", "x\"y\n<&>\r\t");
        let back = parse(e.to_document().as_bytes()).unwrap();
        assert_eq!(back.text, "a<b>&\"c'\r\n\t\u{FFFD}");
        assert_eq!(back.attribute("k"), Some("x\"y\n<&>\r\t"));
    }
}
