//! A YAML document as a tree of nodes that remember their line and column.
//!
//! The config is read in two steps: serde-saphyr builds this tree, then `parse` walks it.
//! Deserializing straight into typed structs would stop at the first error and, inside
//! tagged enums, report the wrong line; walking a located tree lets us collect every
//! problem with its exact key path and position.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A node and where it starts in the file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// The value.
    pub value: Value,
    /// 1-based line (0 when serde-saphyr could not tell).
    pub line: usize,
    /// 1-based column (0 when serde-saphyr could not tell).
    pub column: usize,
}

/// The value of a node. Scalars keep their YAML type so that `8080` and `true` can be
/// told from strings where it matters, and turned back into text where it does not.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null` or nothing at all.
    Null,
    /// `true` or `false` (strict YAML 1.2 booleans: `no` stays a string).
    Bool(bool),
    /// An integer, as written in decimal.
    Int(i128),
    /// A float.
    Float(f64),
    /// Any other scalar.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping in file order.
    Map(Vec<(Key, Node)>),
}

/// A mapping key and where it is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Key {
    /// The key text.
    pub name: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Value {
    /// The scalar as text (numbers and booleans as written), or `None` for collections
    /// and null.
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            // `{:?}` keeps the `.0` of `1.0`, which `{}` drops.
            Value::Float(f) => Some(format!("{f:?}")),
            Value::Str(s) => Some(s.clone()),
            Value::Null | Value::Seq(_) | Value::Map(_) => None,
        }
    }

    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "nothing",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "a number",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// A YAML syntax problem: message and position.
pub(crate) struct SyntaxError {
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

/// Parses one YAML document into a tree. An empty document is a null node.
pub(crate) fn parse_tree(text: &str) -> Result<Node, SyntaxError> {
    let options = serde_saphyr::options! {
        // `no`, `yes`, `on` stay strings: `restart: no` is the policy "no".
        strict_booleans: true,
        // The file name and line are ours to print; a snippet would repeat them.
        with_snippet: false,
    };
    match serde_saphyr::from_str_with_options::<Option<Node>>(text, options) {
        Ok(node) => Ok(node.unwrap_or(Node {
            value: Value::Null,
            line: 1,
            column: 1,
        })),
        Err(e) => {
            let location = e.location().filter(|l| l.line() > 0);
            let message = e.without_snippet().to_string();
            Err(SyntaxError {
                message: strip_location(&message),
                line: location.map(|l| l.line() as usize),
                column: location.map(|l| l.column() as usize),
            })
        }
    }
}

/// Parses `file`'s text into a tree; a syntax error becomes the one config error,
/// "invalid YAML: ...", at its line and column.
pub(crate) fn parse_document(text: &str, file: &str) -> Result<Node, super::ConfigErrors> {
    parse_tree(text).map_err(|e| {
        super::ConfigErrors(vec![super::ConfigError {
            file: file.to_owned(),
            line: e.line,
            column: e.column,
            key: String::new(),
            message: format!("invalid YAML: {}", e.message),
        }])
    })
}

/// serde-saphyr appends " at line L column C" to its messages; we print the position in
/// front, as `file:line:col`, so drop the duplicate. Advice meant for programmers ("set
/// DuplicateKeyPolicy in Options") goes too.
fn strip_location(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message);
    let first = first
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(first);
    match first.rfind(" at line ") {
        Some(i) => first[..i].to_owned(),
        None => first.to_owned(),
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value>::deserialize(d)?;
        Ok(Node {
            value: spanned.value,
            line: spanned.referenced.line() as usize,
            column: spanned.referenced.column() as usize,
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// Builds a [`Value`] from whatever the YAML holds.
struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(node) = seq.next_element::<Node>()? {
            items.push(node);
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let value = map.next_value::<Node>()?;
            let key = Key {
                name: key.value,
                line: key.referenced.line() as usize,
                column: key.referenced.column() as usize,
            };
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(node: &Node) -> &[(Key, Node)] {
        match &node.value {
            Value::Map(m) => m,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn tree_has_positions_and_types() {
        let doc = "a:\n  b: no\n  c: 8080\n  d: [x, 1.0, true]\n  e:\n";
        let root = parse_tree(doc).unwrap_or_else(|e| panic!("{}", e.message));
        let a = &map(&root)[0];
        assert_eq!((a.0.name.as_str(), a.0.line, a.0.column), ("a", 1, 1));
        let inner = map(&a.1);
        assert_eq!(inner[0].1.value, Value::Str("no".into()));
        assert_eq!((inner[0].0.line, inner[0].0.column), (2, 3));
        assert_eq!((inner[0].1.line, inner[0].1.column), (2, 6));
        assert_eq!(inner[1].1.value, Value::Int(8080));
        let Value::Seq(items) = &inner[2].1.value else {
            panic!()
        };
        let texts: Vec<_> = items
            .iter()
            .map(|n| n.value.scalar_text().unwrap())
            .collect();
        assert_eq!(texts, ["x", "1.0", "true"]);
        assert_eq!(inner[3].1.value, Value::Null);
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let e = parse_tree("a: 1\na: 2\n").err().unwrap();
        assert_eq!(e.line, Some(2), "{}", e.message);
        let e = parse_tree("a: [1, 2\n").err().unwrap();
        assert!(e.line.is_some(), "{}", e.message);
    }
}
