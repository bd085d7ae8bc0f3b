//! Reading JSON strictly, and its canonical form. A repeated key is an
//! error here (serde_json keeps the last copy, other parsers the first: a
//! producer and this service must never read two different events out of
//! one message); the canonical form (keys sorted, no whitespace) is what
//! content hashes cover.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// SHA-256 of the canonical form of a JSON value (object keys sorted, no
/// whitespace), and that form.
pub fn canonical_hash(v: &Value) -> ([u8; 32], String) {
    // serde_json's Map is a BTreeMap here (no preserve_order feature), so
    // serialisation is already sorted and compact.
    let s = v.to_string();
    let h: [u8; 32] = Sha256::digest(s.as_bytes()).into();
    (h, s)
}

/// Why [`read_strict`] refused a text.
pub(crate) enum StrictError {
    /// An object repeats a key (the detail names it).
    RepeatedKey(String),
    /// Not JSON at all.
    NotJson(String),
}

/// Parse `text` like `serde_json::from_str::<Value>`, refusing repeated
/// keys at any depth.
pub(crate) fn read_strict(text: &str) -> Result<Value, StrictError> {
    match serde_json::from_str::<Strict>(text) {
        Ok(Strict(v)) => Ok(v),
        Err(e) if e.to_string().starts_with(DUPLICATE) => {
            Err(StrictError::RepeatedKey(e.to_string()))
        }
        Err(e) => Err(StrictError::NotJson(e.to_string())),
    }
}

const DUPLICATE: &str = "duplicate key";

/// A JSON value read in one pass like `serde_json::Value`, except that an
/// object that repeats a key is an error (serde_json keeps the last copy).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(format!(
                    "{DUPLICATE} `{}` in an object",
                    k.escape_debug()
                )));
            }
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}
