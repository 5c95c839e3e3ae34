//! Reading typed values out of the located YAML tree, collecting every error.
//!
//! [`Cx`] holds the errors found so far and where each key sits in the file, so that
//! problems found later on the canonical model (cycles, unknown dependencies) can still be
//! reported at the right line and under the key the user wrote.

use std::collections::BTreeMap;

use super::error::{did_you_mean, ConfigError};
use super::model::PortSpec;
use super::yaml::{Key, Node, Value};

/// Where a key sits in the file and how the user spelled its path.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    /// Path as written in the file (`services.api.backend.binary`).
    pub key: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Place {
    /// The place of a mapping key under `path`.
    pub fn of_key(path: &str, key: &Key) -> Place {
        Place {
            key: join(path, &key.name),
            line: key.line,
            column: key.column,
        }
    }

    /// The place of a node shown under `key`.
    pub fn of_node(key: String, node: &Node) -> Place {
        Place {
            key,
            line: node.line,
            column: node.column,
        }
    }
}

/// The conversion context: errors so far and the places of canonical paths.
pub(crate) struct Cx<'a> {
    file: &'a str,
    /// Every problem found so far.
    pub errors: Vec<ConfigError>,
    /// Canonical dotted path (`services.api.target.process.binary`) to where it was written.
    places: BTreeMap<String, Place>,
}

/// Which keys a mapping may hold, and hints for keys that other tools or older designs
/// use (key, what to use instead).
pub(crate) struct Spec {
    /// Keys read by the converter.
    pub known: &'static [&'static str],
    /// Keys that are rejected with a specific hint.
    pub retired: &'static [(&'static str, &'static str)],
}

/// `a.b` from `a` and `b`, or `b` at the top.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> Cx<'a> {
    /// A context for `file`.
    pub fn new(file: &'a str) -> Self {
        Cx {
            file,
            errors: Vec::new(),
            places: BTreeMap::new(),
        }
    }

    /// Records an error at `place`.
    pub fn error_at(&mut self, place: Place, message: impl Into<String>) {
        let known = |n: usize| (n > 0).then_some(n);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: known(place.line),
            column: known(place.column).filter(|_| place.line > 0),
            key: place.key,
            message: message.into(),
        });
    }

    /// Records an error about `node`, shown under `key`.
    pub fn error(&mut self, key: &str, node: &Node, message: impl Into<String>) {
        self.error_at(Place::of_node(key.to_owned(), node), message);
    }

    /// Remembers where the canonical path `canon` was written.
    pub fn record(&mut self, canon: String, place: Place) {
        self.places.insert(canon, place);
    }

    /// Gives an error about a canonical path (from validation) the line and the spelling
    /// of the closest recorded enclosing key.
    pub fn locate(&self, mut e: ConfigError) -> ConfigError {
        let mut prefix = e.key.as_str();
        loop {
            if let Some(place) = self.places.get(prefix) {
                e.key = format!("{}{}", place.key, &e.key[prefix.len()..]);
                e.line = (place.line > 0).then_some(place.line);
                e.column = (place.column > 0).then_some(place.column);
                return e;
            }
            // `a.b[2]` is inside `a.b`, which is inside `a`.
            let parent = match prefix.strip_suffix(']') {
                Some(rest) => rest.rfind('['),
                None => prefix.rfind('.'),
            };
            match parent {
                Some(i) => prefix = &prefix[..i],
                None => return e,
            }
        }
    }

    /// The entries of a mapping, after reporting keys that `spec` does not know. Null is
    /// an empty mapping (`env:` followed only by a comment).
    pub fn fields<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        canon: &str,
        spec: &Spec,
    ) -> Option<Fields<'n>> {
        let fields = self.any_fields(node, path, canon)?;
        for (key, _) in fields.entries {
            if !spec.known.contains(&key.name.as_str()) {
                let message = unknown_message("key", &key.name, spec);
                self.error_at(Place::of_key(path, key), message);
            }
        }
        Some(fields)
    }

    /// The entries of a mapping whose keys are names chosen by the user (services, env).
    pub fn any_fields<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        canon: &str,
    ) -> Option<Fields<'n>> {
        let entries: &'n [(Key, Node)] = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => &[],
            other => {
                self.error(
                    path,
                    node,
                    format!("expected a mapping, found {}", other.kind()),
                );
                return None;
            }
        };
        for (key, _) in entries {
            self.record(join(canon, &key.name), Place::of_key(path, key));
        }
        Some(Fields {
            path: path.to_owned(),
            canon: canon.to_owned(),
            entries,
        })
    }

    /// A scalar as text (numbers and booleans as written).
    pub fn text(&mut self, node: &Node, path: &str) -> Option<String> {
        let text = node.value.scalar_text();
        if text.is_none() {
            self.error(
                path,
                node,
                format!("expected a string, found {}", node.value.kind()),
            );
        }
        text
    }

    /// A list of scalars as text.
    pub fn texts(&mut self, node: &Node, path: &str) -> Vec<String> {
        match &node.value {
            Value::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.extend(self.text(item, &format!("{path}[{i}]")));
                }
                out
            }
            other => {
                self.error(
                    path,
                    node,
                    format!("expected a list, found {}", other.kind()),
                );
                Vec::new()
            }
        }
    }

    /// A mapping of names to scalar values, stored as text (`PORT: 8080` is `"8080"`).
    pub fn text_map(&mut self, node: &Node, path: &str, canon: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(fields) = self.any_fields(node, path, canon) else {
            return out;
        };
        for (key, value) in fields.entries {
            let key_path = join(path, &key.name);
            if value.value == Value::Null {
                let message = format!("`{}` has no value (write \"\" for an empty one)", key.name);
                self.error_at(Place::of_key(path, key), message);
            } else if let Some(text) = self.text(value, &key_path) {
                out.insert(key.name.clone(), text);
            }
        }
        out
    }

    /// `true` or `false`.
    pub fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.value {
            Value::Bool(b) => Some(b),
            ref other => {
                self.error(
                    path,
                    node,
                    format!("expected true or false, found {}", other.kind()),
                );
                None
            }
        }
    }

    /// A whole number that fits `T`; `what` names it in errors ("a number of services").
    pub fn number<T: TryFrom<i128>>(&mut self, node: &Node, path: &str, what: &str) -> Option<T> {
        let parsed = match &node.value {
            Value::Int(i) => Some(*i),
            Value::Str(s) => s.trim().parse::<i128>().ok(),
            _ => None,
        };
        let value = parsed.and_then(|i| T::try_from(i).ok());
        if value.is_none() {
            let shown = node
                .value
                .scalar_text()
                .unwrap_or_else(|| node.value.kind().to_owned());
            self.error(path, node, format!("bad value {shown}: expected {what}"));
        }
        value
    }

    /// A port number from 1 to 65535.
    pub fn port(&mut self, node: &Node, path: &str) -> Option<u16> {
        let port = port_of(&node.value);
        if port.is_none() {
            self.error(
                path,
                node,
                bad_port(&node.value, "a port number from 1 to 65535"),
            );
        }
        port
    }

    /// A port number or `auto`.
    pub fn port_spec(&mut self, node: &Node, path: &str) -> Option<PortSpec> {
        if node.value == Value::Str("auto".into()) {
            return Some(PortSpec::Auto);
        }
        let port = port_of(&node.value).map(PortSpec::Fixed);
        if port.is_none() {
            let expected = "a port number from 1 to 65535 or \"auto\"";
            self.error(path, node, bad_port(&node.value, expected));
        }
        port
    }

    /// A duration in ms: a number of seconds, or (unless `seconds_only`) a humantime
    /// string such as `500ms`, `2s`, `1m`.
    pub fn duration_ms(&mut self, node: &Node, path: &str, seconds_only: bool) -> Option<u64> {
        // Err carries humantime's explanation when there is one.
        let ms: Result<u64, Option<String>> = match &node.value {
            Value::Int(i) => u64::try_from(*i)
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .ok_or(None),
            Value::Float(f) if f.is_finite() && *f >= 0.0 => Ok((f * 1000.0).round() as u64),
            Value::Str(s) if !seconds_only => humantime::parse_duration(s)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .map_err(|e| Some(e.to_string())),
            _ => Err(None),
        };
        let detail = match ms {
            Ok(ms) => return Some(ms),
            Err(detail) => detail.map(|d| format!(" ({d})")).unwrap_or_default(),
        };
        let shown = match &node.value {
            Value::Str(s) => format!("{s:?}"),
            other => other
                .scalar_text()
                .unwrap_or_else(|| other.kind().to_owned()),
        };
        let expected = if seconds_only {
            "expected a whole number of seconds (a key without `_secs` takes units: 500ms, 2s, 1m)"
        } else {
            "expected a number of seconds or a duration such as 500ms, 2s, 1m"
        };
        self.error(
            path,
            node,
            format!("bad duration {shown}{detail}: {expected}"),
        );
        None
    }
}

/// A mapping being read: its entries and both its display and canonical paths.
pub(crate) struct Fields<'n> {
    /// Path as written (`services.api.backend`).
    pub path: String,
    /// Canonical path (`services.api.target.process`).
    pub canon: String,
    /// The entries in file order.
    pub entries: &'n [(Key, Node)],
}

impl<'n> Fields<'n> {
    /// The value under `name`, unless absent or null.
    pub fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(_, v)| v)
            .filter(|v| v.value != Value::Null)
    }

    /// Where the key `name` is written, when present.
    pub fn place(&self, name: &str) -> Option<Place> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == name)
            .map(|(k, _)| Place::of_key(&self.path, k))
    }

    /// The display path of `name` in this mapping.
    pub fn key(&self, name: &str) -> String {
        join(&self.path, name)
    }

    /// The canonical path of `name` in this mapping.
    pub fn canon(&self, name: &str) -> String {
        join(&self.canon, name)
    }

    /// `name` as text.
    pub fn text(&self, cx: &mut Cx<'_>, name: &str) -> Option<String> {
        self.get(name).and_then(|n| cx.text(n, &self.key(name)))
    }

    /// `name` as a list of texts (empty when absent).
    pub fn texts(&self, cx: &mut Cx<'_>, name: &str) -> Vec<String> {
        self.get(name)
            .map(|n| cx.texts(n, &self.key(name)))
            .unwrap_or_default()
    }

    /// `name` as a map of texts (empty when absent).
    pub fn text_map(&self, cx: &mut Cx<'_>, name: &str) -> BTreeMap<String, String> {
        self.get(name)
            .map(|n| cx.text_map(n, &self.key(name), &self.canon(name)))
            .unwrap_or_default()
    }

    /// The duration under `base` (units allowed) or `base_secs` (whole seconds), in ms;
    /// both at once is an error.
    pub fn duration(&self, cx: &mut Cx<'_>, base: &str) -> Option<u64> {
        let secs_key = format!("{base}_secs");
        match (self.get(base), self.get(&secs_key)) {
            (Some(_), Some(n)) => {
                cx.error(
                    &self.key(&secs_key),
                    n,
                    format!("give either `{base}` or `{secs_key}`, not both"),
                );
                None
            }
            (Some(n), None) => cx.duration_ms(n, &self.key(base), false),
            (None, Some(n)) => cx.duration_ms(n, &self.key(&secs_key), true),
            (None, None) => None,
        }
    }
}

/// "unknown {what} `name`", with the specific hint for a retired name or a did-you-mean.
pub(crate) fn unknown_message(what: &str, name: &str, spec: &Spec) -> String {
    if let Some((_, hint)) = spec.retired.iter().find(|(k, _)| *k == name) {
        return format!("`{name}` is not supported: {hint}");
    }
    match did_you_mean(name, spec.known.iter().copied()) {
        Some(close) => format!("unknown {what} `{name}` (did you mean `{close}`?)"),
        None => format!(
            "unknown {what} `{name}` (expected one of: {})",
            spec.known.join(", ")
        ),
    }
}

/// A port from a number or a numeric string.
fn port_of(value: &Value) -> Option<u16> {
    let n = match value {
        Value::Int(i) => *i,
        Value::Str(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    u16::try_from(n).ok().filter(|p| *p > 0)
}

/// "bad port X: expected ...".
fn bad_port(value: &Value, expected: &str) -> String {
    match value {
        Value::Str(s) => format!("bad port {s:?}: expected {expected}"),
        other => match other.scalar_text() {
            Some(t) => format!("bad port {t}: expected {expected}"),
            None => format!("bad port: expected {expected}, found {}", other.kind()),
        },
    }
}
