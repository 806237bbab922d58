//! XML-RPC as xapi speaks it, sans I/O: decode a `methodCall` (or a
//! `methodResponse`, for tests and clients), encode responses and values.
//! Input is untrusted: quick-xml reads it into a small tree (elements,
//! text, entities, CDATA, comments, the XML declaration), with a depth limit
//! and no DTDs; the tree is then checked against XML-RPC's shapes.
//!
//! Encoding follows xapi (xenapi-reference.md §1.2): strings, refs, enums
//! and 64-bit ints are untagged `<value>text</value>`; bools are
//! `<boolean>0|1</boolean>`; datetimes `<dateTime.iso8601>YYYYMMDDTHH:MM:SSZ`;
//! the answer is always a success `methodResponse` whose struct carries
//! `Status` first, then `Value` or `ErrorDescription`.

use std::collections::BTreeMap;

use quick_xml::events::Event;
use quick_xml::Reader;

use super::error::{ApiError, WireError};
use super::value::Value;

/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Element(Element),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Element {
    name: String,
    children: Vec<Node>,
}

impl Element {
    fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }

    fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    /// Element children only; text between them must be whitespace.
    fn only_elements(&self) -> Result<Vec<&Element>, WireError> {
        for n in &self.children {
            if let Node::Text(t) = n {
                if !t.trim().is_empty() {
                    return Err(WireError::XmlRpc(format!(
                        "unexpected text in <{}>",
                        self.name
                    )));
                }
            }
        }
        Ok(self.elements().collect())
    }
}

/// Reads a whole document into a tree with quick-xml. The input must be
/// UTF-8; elements, text, the five predefined entities, character
/// references, CDATA, comments and processing instructions are accepted;
/// a DTD, text or a second element outside the root, and nesting deeper
/// than [`MAX_DEPTH`] are refused. Text is kept exactly as sent (no
/// whitespace trimming, no end-of-line normalisation).
fn parse(body: &[u8]) -> Result<Element, WireError> {
    let s = std::str::from_utf8(body).map_err(|e| WireError::Xml {
        at: e.valid_up_to(),
        reason: "not UTF-8".into(),
    })?;
    let mut reader = Reader::from_str(s);
    // Open elements, each with the text read since its last child.
    let mut open: Vec<(Element, String)> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let at = reader.buffer_position() as usize;
        let err = |reason: String| WireError::Xml { at, reason };
        let event = reader.read_event().map_err(|e| WireError::Xml {
            at: reader.error_position() as usize,
            reason: e.to_string(),
        })?;
        match event {
            Event::Start(ref tag) | Event::Empty(ref tag) => {
                if root.is_some() {
                    return Err(err("content after the root element".into()));
                }
                if open.len() >= MAX_DEPTH {
                    return Err(WireError::TooDeep(MAX_DEPTH));
                }
                let name = tag.name().0;
                if name.is_empty() {
                    return Err(err("expected an element name".into()));
                }
                let el = Element {
                    name: name.to_string(),
                    children: Vec::new(),
                };
                if let Some((parent, text)) = open.last_mut() {
                    if !text.is_empty() {
                        parent.children.push(Node::Text(std::mem::take(text)));
                    }
                }
                if matches!(event, Event::Start(_)) {
                    open.push((el, String::new()));
                } else {
                    close(el, &mut open, &mut root);
                }
            }
            // quick-xml has checked that the name matches the open element.
            Event::End(_) => {
                let Some((mut el, text)) = open.pop() else {
                    return Err(err("end tag without a start tag".into()));
                };
                if !text.is_empty() {
                    el.children.push(Node::Text(text));
                }
                close(el, &mut open, &mut root);
            }
            Event::Text(t) => match open.last_mut() {
                Some((_, text)) => text.push_str(&t),
                None if t.trim().is_empty() => {}
                None if root.is_some() => return Err(err("content after the root element".into())),
                None => return Err(err("text before the root element".into())),
            },
            Event::CData(t) => match open.last_mut() {
                Some((_, text)) => text.push_str(&t),
                None => return Err(err("CDATA outside the root element".into())),
            },
            Event::GeneralRef(r) => {
                let Some((_, text)) = open.last_mut() else {
                    return Err(err("reference outside the root element".into()));
                };
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
                        .ok_or_else(|| err(format!("unknown entity '&{name};'")))?,
                };
                text.push(c);
            }
            Event::DocType(_) => return Err(err("DTDs are not accepted".into())),
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
            Event::Eof => {
                if let Some((el, _)) = open.last() {
                    return Err(err(format!("unterminated <{}>", el.name)));
                }
                return root.ok_or_else(|| err("no root element".into()));
            }
        }
    }
}

/// A finished element goes to its parent, or is the root.
fn close(el: Element, open: &mut [(Element, String)], root: &mut Option<Element>) {
    match open.last_mut() {
        Some((parent, _)) => parent.children.push(Node::Element(el)),
        None => *root = Some(el),
    }
}

fn decode_value(el: &Element) -> Result<Value, WireError> {
    if el.name != "value" {
        return Err(WireError::XmlRpc(format!(
            "expected <value>, found <{}>",
            el.name
        )));
    }
    let typed = el.only_elements().ok().and_then(|v| match v.as_slice() {
        [one] => Some(*one),
        _ => None,
    });
    let Some(t) = typed else {
        // Untagged: a string, whitespace and all.
        if el.elements().next().is_some() {
            return Err(WireError::XmlRpc("<value> with mixed content".into()));
        }
        return Ok(Value::String(el.text()));
    };
    let bad = |what: &str| WireError::XmlRpc(format!("bad <{}>: {what}", t.name));
    Ok(match t.name.as_str() {
        "string" => Value::String(t.text()),
        "i4" | "int" | "i8" => {
            Value::Int(t.text().trim().parse().map_err(|_| bad("not an integer"))?)
        }
        "boolean" => match t.text().trim() {
            "1" => Value::Bool(true),
            "0" => Value::Bool(false),
            _ => return Err(bad("not 0 or 1")),
        },
        "double" => Value::Double(t.text().trim().parse().map_err(|_| bad("not a number"))?),
        "dateTime.iso8601" => Value::DateTime(t.text().trim().to_string()),
        // Kept as its base64 text: no XenAPI call of ours takes binary.
        "base64" => Value::String(t.text().split_whitespace().collect()),
        "nil" => Value::Nil,
        "array" => {
            let data = match t.only_elements()?.as_slice() {
                [d] if d.name == "data" => *d,
                _ => return Err(bad("expected one <data>")),
            };
            Value::Array(
                data.only_elements()?
                    .into_iter()
                    .map(decode_value)
                    .collect::<Result<_, _>>()?,
            )
        }
        "struct" => {
            let mut map = BTreeMap::new();
            for member in t.only_elements()? {
                if member.name != "member" {
                    return Err(bad("expected <member>"));
                }
                let name = member
                    .child("name")
                    .ok_or_else(|| bad("member without <name>"))?;
                let value = member
                    .child("value")
                    .ok_or_else(|| bad("member without <value>"))?;
                map.insert(name.text(), decode_value(value)?);
            }
            Value::Struct(map)
        }
        other => return Err(WireError::XmlRpc(format!("unknown type <{other}>"))),
    })
}

fn decode_params(params: Option<&Element>) -> Result<Vec<Value>, WireError> {
    let Some(params) = params else {
        return Ok(Vec::new());
    };
    params
        .only_elements()?
        .into_iter()
        .map(|p| {
            if p.name != "param" {
                return Err(WireError::XmlRpc(format!("<{}> in <params>", p.name)));
            }
            match p.only_elements()?.as_slice() {
                [v] => decode_value(v),
                _ => Err(WireError::XmlRpc("<param> needs one <value>".into())),
            }
        })
        .collect()
}

/// A `methodCall`: the method name and its positional parameters.
pub fn decode_call(body: &[u8]) -> Result<(String, Vec<Value>), WireError> {
    let root = parse(body)?;
    if root.name != "methodCall" {
        return Err(WireError::XmlRpc(format!(
            "root is <{}>, not <methodCall>",
            root.name
        )));
    }
    let elements = root.only_elements()?;
    let name = elements
        .iter()
        .find(|e| e.name == "methodName")
        .ok_or_else(|| WireError::XmlRpc("no <methodName>".into()))?
        .text()
        .trim()
        .to_string();
    let params = elements.iter().find(|e| e.name == "params").copied();
    // wire-protocol.md's malformed example: a call without <params> is a parse error.
    if params.is_none() {
        return Err(WireError::XmlRpc("no <params>".into()));
    }
    Ok((name, decode_params(params)?))
}

/// The single value of a `methodResponse` (xapi's Status struct); a
/// `<fault>` is returned as `Err` with its struct rendered.
pub fn decode_response(body: &[u8]) -> Result<Value, WireError> {
    let root = parse(body)?;
    if root.name != "methodResponse" {
        return Err(WireError::XmlRpc("not a <methodResponse>".into()));
    }
    if let Some(fault) = root.child("fault") {
        let v = fault
            .child("value")
            .map(decode_value)
            .transpose()?
            .unwrap_or(Value::Nil);
        return Err(WireError::XmlRpc(format!("fault: {v:?}")));
    }
    let mut values = decode_params(root.child("params"))?;
    match values.len() {
        1 => Ok(values.remove(0)),
        n => Err(WireError::XmlRpc(format!("{n} values in a response"))),
    }
}

/// A document whose root is a single `<value>` (XVA's `ova.xml`).
pub fn decode_value_document(body: &[u8]) -> Result<Value, WireError> {
    decode_value(&parse(body)?)
}

/// Escapes character data.
pub fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

/// Appends `<value>...</value>` in xapi's style.
pub fn encode_value(v: &Value, out: &mut String) {
    out.push_str("<value>");
    match v {
        Value::String(s) => escape(s, out),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::Bool(b) => out.push_str(if *b {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        Value::Double(d) => {
            out.push_str("<double>");
            out.push_str(&d.to_string());
            out.push_str("</double>");
        }
        Value::DateTime(t) => {
            out.push_str("<dateTime.iso8601>");
            escape(t, out);
            out.push_str("</dateTime.iso8601>");
        }
        Value::Array(items) => {
            out.push_str("<array><data>");
            for item in items {
                encode_value(item, out);
            }
            out.push_str("</data></array>");
        }
        Value::Struct(map) => {
            out.push_str("<struct>");
            for (k, v) in map {
                out.push_str("<member><name>");
                escape(k, out);
                out.push_str("</name>");
                encode_value(v, out);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
        Value::Nil => out.push_str("<nil/>"),
    }
    out.push_str("</value>");
}

/// A value alone, as xapi stores a task's `result`.
pub fn value_fragment(v: &Value) -> String {
    let mut s = String::new();
    encode_value(v, &mut s);
    s
}

/// `{Status: Success, Value: v}` or `{Status: Failure, ErrorDescription: [...]}`.
pub fn encode_response(result: &Result<Value, ApiError>) -> String {
    let mut s = String::from(
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct>\
         <member><name>Status</name>",
    );
    match result {
        Ok(v) => {
            s.push_str("<value>Success</value></member><member><name>Value</name>");
            encode_value(v, &mut s);
        }
        Err(e) => {
            s.push_str("<value>Failure</value></member><member><name>ErrorDescription</name>");
            encode_value(&Value::strings(e.description()), &mut s);
        }
    }
    s.push_str("</member></struct></value></param></params></methodResponse>");
    s
}

/// A `methodCall` (for tests and the fuzz round trip).
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut s = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
    escape(method, &mut s);
    s.push_str("</methodName><params>");
    for p in params {
        s.push_str("<param>");
        encode_value(p, &mut s);
        s.push_str("</param>");
    }
    s.push_str("</params></methodCall>");
    s
}

/// What a value reads back as after [`encode_value`] then decoding: ints
/// become decimal strings (that is the wire form), all else is unchanged.
pub fn normalize(v: &Value) -> Value {
    match v {
        Value::Int(i) => Value::String(i.to_string()),
        Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
        Value::Struct(m) => {
            Value::Struct(m.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
        }
        other => other.clone(),
    }
}

/// Splits xapi's Status struct into the value or the error.
pub fn status_result(v: Value) -> Result<Result<Value, ApiError>, WireError> {
    let Value::Struct(mut m) = v else {
        return Err(WireError::XmlRpc("response is not a struct".into()));
    };
    match m.get("Status").and_then(Value::as_str) {
        Some("Success") => m
            .remove("Value")
            .map(Ok)
            .ok_or_else(|| WireError::XmlRpc("Success without Value".into())),
        Some("Failure") => {
            let desc = m
                .remove("ErrorDescription")
                .ok_or_else(|| WireError::XmlRpc("Failure without ErrorDescription".into()))?;
            let items: Vec<String> = desc
                .as_array()
                .ok_or_else(|| WireError::XmlRpc("ErrorDescription is not an array".into()))?
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect();
            let (code, params) = items
                .split_first()
                .ok_or_else(|| WireError::XmlRpc("empty ErrorDescription".into()))?;
            Ok(Err(ApiError::new(code, params.iter().cloned())))
        }
        _ => Err(WireError::XmlRpc("no Status".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Python's xmlrpc.client sends for `VDI.get_by_uuid(s, u)`.
    const PYTHON_CALL: &str = "<?xml version='1.0'?>\n<methodCall>\n<methodName>VDI.get_by_uuid</methodName>\n<params>\n<param>\n<value><string>OpaqueRef:abc</string></value>\n</param>\n<param>\n<value><string>a&amp;b &lt;c&gt;</string></value>\n</param>\n<param>\n<value><int>42</int></value>\n</param>\n<param>\n<value><struct>\n<member>\n<name>SR</name>\n<value><string>OpaqueRef:sr</string></value>\n</member>\n<member>\n<name>read_only</name>\n<value><boolean>0</boolean></value>\n</member>\n</struct></value>\n</param>\n<param>\n<value><array><data>\n</data></array></value>\n</param>\n</params>\n</methodCall>\n";

    #[test]
    fn python_call() {
        let (m, p) = decode_call(PYTHON_CALL.as_bytes()).unwrap();
        assert_eq!(m, "VDI.get_by_uuid");
        assert_eq!(p[0], Value::str("OpaqueRef:abc"));
        assert_eq!(p[1], Value::str("a&b <c>"));
        assert_eq!(p[2], Value::Int(42));
        let s = p[3].as_struct().unwrap();
        assert_eq!(s["read_only"], Value::Bool(false));
        assert_eq!(p[4], Value::Array(vec![]));
    }

    #[test]
    fn untagged_and_entities() {
        let body = "<methodCall><methodName>x</methodName><params><param><value> a&#65;&#x42;<![CDATA[<c>]]></value></param><param><value/></param></params></methodCall>";
        let (_, p) = decode_call(body.as_bytes()).unwrap();
        assert_eq!(p, vec![Value::str(" aAB<c>"), Value::str("")]);
    }

    #[test]
    fn hostile_inputs_are_errors() {
        for bad in [
            "",
            "<methodCall>",
            "<methodCall><methodName>x</methodName></methodCall>",
            "<!DOCTYPE x [<!ENTITY a 'b'>]><methodCall/>",
            "<methodCall><methodName>x</methodName><params><param><value><int>z</int></value></param></params></methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value>&bogus;</value></param></params></methodCall>",
            "<a></b>",
        ] {
            assert!(decode_call(bad.as_bytes()).is_err(), "{bad}");
        }
        let deep = "<value><array><data>".repeat(100);
        let body = format!("<methodCall><methodName>x</methodName><params><param>{deep}</param></params></methodCall>");
        assert!(decode_call(body.as_bytes()).is_err());
    }

    #[test]
    fn response_forms() {
        let ok = encode_response(&Ok(Value::Int(10737418240)));
        assert_eq!(
            ok,
            "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>10737418240</value></member></struct></value></param></params></methodResponse>"
        );
        let err = encode_response(&Err(ApiError::new(
            "VDI_IN_USE",
            ["OpaqueRef:x", "destroy"],
        )));
        assert!(err.contains("<name>ErrorDescription</name><value><array><data><value>VDI_IN_USE</value><value>OpaqueRef:x</value><value>destroy</value></data></array></value></member></struct>"), "{err}");
        let v = decode_response(err.as_bytes()).unwrap();
        assert_eq!(
            status_result(v).unwrap(),
            Err(ApiError::new("VDI_IN_USE", ["OpaqueRef:x", "destroy"]))
        );
        let v = decode_response(ok.as_bytes()).unwrap();
        assert_eq!(status_result(v).unwrap(), Ok(Value::str("10737418240")));
    }

    fn call_with(value: &str) -> String {
        format!("<methodCall><methodName>x</methodName><params><param>{value}</param></params></methodCall>")
    }

    /// Hostile documents: each is refused with the right kind of error,
    /// syntax errors carry a byte position inside the input, nothing panics.
    #[test]
    fn hostile_inputs_by_kind() {
        // Nesting past the limit, both as a value tree and as bare elements.
        let deep = "<value><array><data>".repeat(MAX_DEPTH);
        assert!(matches!(
            decode_call(call_with(&deep).as_bytes()),
            Err(WireError::TooDeep(MAX_DEPTH))
        ));
        let bare = format!("{}{}", "<a>".repeat(100_000), "</a>".repeat(100_000));
        assert!(matches!(
            decode_call(bare.as_bytes()),
            Err(WireError::TooDeep(MAX_DEPTH))
        ));
        // Exactly at the limit is still read (then refused as not XML-RPC).
        let ok_depth = format!("{}{}", "<a>".repeat(MAX_DEPTH), "</a>".repeat(MAX_DEPTH));
        assert!(matches!(
            decode_call(ok_depth.as_bytes()),
            Err(WireError::XmlRpc(_))
        ));

        let syntax: &[(&str, &str)] = &[
            ("unterminated root", "<methodCall><methodName>x"),
            ("unterminated tag", "<methodCall><methodName"),
            ("unterminated comment", "<methodCall><!-- x"),
            ("unterminated CDATA", "<methodCall><![CDATA[x"),
            ("mismatched end", "<methodCall></methodName>"),
            ("unknown entity", "<methodCall>&bogus;</methodCall>"),
            ("external entity", "<methodCall>&xxe;</methodCall>"),
            ("unterminated entity", "<methodCall>&amp</methodCall>"),
            ("bad char ref", "<methodCall>&#xD800;</methodCall>"),
            ("huge char ref", "<methodCall>&#99999999999;</methodCall>"),
            (
                "DOCTYPE with an entity",
                "<?xml version=\"1.0\"?><!DOCTYPE m [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]><methodCall>&xxe;</methodCall>",
            ),
            (
                "billion laughs",
                "<!DOCTYPE l [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;&a;&a;\">]><methodCall>&b;</methodCall>",
            ),
            ("DOCTYPE inside", "<methodCall><!DOCTYPE x></methodCall>"),
            ("second root", "<methodCall/><methodCall/>"),
            ("text after root", "<methodCall/>junk"),
            ("text before root", "junk<methodCall/>"),
            ("no root", "<?xml version=\"1.0\"?>"),
            ("empty", ""),
        ];
        for (what, body) in syntax {
            match decode_call(body.as_bytes()) {
                Err(WireError::Xml { at, reason }) => {
                    assert!(at <= body.len(), "{what}: position {at} past the end");
                    assert!(!reason.is_empty(), "{what}");
                }
                other => panic!("{what}: expected an XML error, got {other:?}"),
            }
        }
        match decode_call(b"<!DOCTYPE m [<!ENTITY a 'b'>]><methodCall/>") {
            Err(WireError::Xml { reason, .. }) => assert!(reason.contains("DTD"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Not UTF-8: the position is the first bad byte.
        assert!(matches!(
            decode_call(b"<methodCall>\xff</methodCall>"),
            Err(WireError::Xml { at: 12, .. })
        ));

        // A huge attribute is skipped, not choked on.
        let attr = format!(
            "<methodCall a=\"{}\"><methodName>m</methodName><params/></methodCall>",
            "x".repeat(4 << 20)
        );
        assert_eq!(
            decode_call(attr.as_bytes()).unwrap(),
            ("m".to_string(), vec![])
        );
        // Predefined entities and character references still decode.
        let (_, p) = decode_call(
            call_with("<value>&lt;&gt;&amp;&quot;&apos;&#65;&#x1F600;</value>").as_bytes(),
        )
        .unwrap();
        assert_eq!(p, vec![Value::str("<>&\"'A\u{1F600}")]);
    }

    fn value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<String>()
                .prop_filter("XML 1.0 characters", |s| s
                    .chars()
                    .all(|c| c >= ' ' || c == '\t' || c == '\n'))
                .prop_map(Value::String),
            any::<i64>().prop_map(Value::Int),
            any::<bool>().prop_map(Value::Bool),
            (-1e12f64..1e12).prop_map(Value::Double),
            "[0-9]{8}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z".prop_map(Value::DateTime),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-zA-Z_<&>]{0,8}", inner, 0..6)
                    .prop_map(Value::Struct),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever a client sends, the decoder answers (never panics).
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode_call(&body);
            let _ = decode_response(&body);
        }

        /// Mutated valid calls: still no panic.
        #[test]
        fn mutated_calls_never_panic(cut in 0usize..PYTHON_CALL.len(), byte in proptest::prelude::any::<u8>()) {
            let mut body = PYTHON_CALL.as_bytes().to_vec();
            body[cut] = byte;
            let _ = decode_call(&body);
            let _ = decode_call(&body[..cut]);
        }

        /// Encode then decode gives the value back (ints as their wire strings).
        #[test]
        fn values_round_trip(params in proptest::collection::vec(value(), 0..4)) {
            let (_, back) = decode_call(encode_call("a.b", &params).as_bytes()).unwrap();
            proptest::prop_assert_eq!(back, params.iter().map(normalize).collect::<Vec<_>>());
            for p in &params {
                let r = encode_response(&Ok(p.clone()));
                proptest::prop_assert_eq!(status_result(decode_response(r.as_bytes()).unwrap()).unwrap(), Ok(normalize(p)));
            }
        }
    }

    #[test]
    fn round_trip() {
        let mut m = BTreeMap::new();
        m.insert(
            "a<".to_string(),
            Value::DateTime("19700101T00:00:00Z".into()),
        );
        m.insert(
            "b".to_string(),
            Value::Array(vec![Value::Bool(true), Value::Double(0.5)]),
        );
        let params = vec![Value::Struct(m), Value::Int(-3), Value::str("&x")];
        let (name, back) = decode_call(encode_call("m.n", &params).as_bytes()).unwrap();
        assert_eq!(name, "m.n");
        assert_eq!(back, params.iter().map(normalize).collect::<Vec<_>>());
    }
}
