//! The values XenAPI calls take and return, independent of the wire
//! format. XML-RPC and JSON-RPC encode them differently (xenapi-reference.md
//! §1.2-1.3): an `Int` is a decimal string in XML-RPC and a number in JSON,
//! a `DateTime` is `<dateTime.iso8601>` in XML-RPC and a string in JSON.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// One XenAPI value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    /// Already in xapi's form `YYYYMMDDTHH:MM:SSZ`.
    DateTime(String),
    Array(Vec<Value>),
    Struct(BTreeMap<String, Value>),
    /// XML-RPC `<nil/>` or JSON `null` (only ever received).
    Nil,
}

/// xapi's datetime form (`Date.to_rfc3339` without dashes).
pub fn format_datetime(t: &DateTime<Utc>) -> String {
    t.format("%Y%m%dT%H:%M:%SZ").to_string()
}

/// The epoch, xapi's default datetime.
pub const EPOCH: &str = "19700101T00:00:00Z";

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }

    /// xapi's `void`: an empty string on both wires.
    pub fn void() -> Value {
        Value::String(String::new())
    }

    pub fn strings<I, S>(items: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Value::Array(items.into_iter().map(|s| Value::String(s.into())).collect())
    }

    pub fn string_map<'a, I>(items: I) -> Value
    where
        I: IntoIterator<Item = (&'a String, &'a String)>,
    {
        Value::Struct(
            items
                .into_iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A 64-bit int: a number, or a decimal string as XML-RPC clients send
    /// (Python's xmlrpc refuses ints above 2^31, so sizes come as strings).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// A bool, also from the strings `true`/`false`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }

    pub fn as_struct(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Struct(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Int(i)
    }
}

impl From<u64> for Value {
    fn from(i: u64) -> Value {
        Value::Int(i64::try_from(i).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn datetime_form() {
        let t = Utc.with_ymd_and_hms(2024, 3, 5, 7, 8, 9).unwrap();
        assert_eq!(format_datetime(&t), "20240305T07:08:09Z");
        assert_eq!(
            format_datetime(&DateTime::<Utc>::from_timestamp(0, 0).unwrap()),
            EPOCH
        );
    }

    #[test]
    fn lenient_inputs() {
        assert_eq!(Value::str("10737418240").as_int(), Some(10737418240));
        assert_eq!(Value::Int(5).as_int(), Some(5));
        assert_eq!(Value::str("x").as_int(), None);
        assert_eq!(Value::str("True").as_bool(), Some(true));
    }
}
