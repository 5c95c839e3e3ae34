//! Docker compose files people already have, translated into harness configs.
//!
//! [`import_compose`] turns a compose file into the text of an equivalent
//! `harness.yaml` (every service a `docker` target) and names each key it could not
//! translate, with its line. The text then goes through [`super::parse_stack`] like any
//! harness config, so an import is validated exactly as a hand-written file.

use serde_json::{json, Map, Value as Json};

use super::error::{ConfigError, ConfigErrors};
use super::read::join;
use super::yaml::{self, Key, Node, Value};

/// A translated compose file.
#[derive(Debug, Clone, PartialEq)]
pub struct ComposeImport {
    /// The equivalent harness.yaml.
    pub yaml: String,
    /// One line per key that was not translated: `file:line:col: key: why`.
    pub untranslated: Vec<String>,
}

/// Top-level keys that are dropped without a word: they carry nothing a harness stack
/// needs (`version` is obsolete in compose itself).
const SILENT_TOP: &[&str] = &["version"];

/// Service keys without a harness equivalent, with what happens instead.
const UNTRANSLATED: &[(&str, &str)] = &[
    (
        "container_name",
        "the harness names containers harness-<stack>-<service>",
    ),
    (
        "networks",
        "each stack has one network; services reach each other by name on it",
    ),
    ("network_mode", "each stack has one network"),
    ("labels", "the harness sets its own labels"),
    ("deploy", "replicas and resources are not supported"),
    (
        "expose",
        "containers on the stack's network reach every port",
    ),
    (
        "hostname",
        "the service name resolves on the stack's network",
    ),
    ("profiles", "every service of the file is imported"),
];

/// Turns a long-syntax list item (its scalar fields, by name) into the short form, or
/// says what is missing.
type LongSyntax = fn(&dyn Fn(&str) -> Option<String>) -> Result<String, &'static str>;

struct Translator<'f> {
    file: &'f str,
    errors: Vec<ConfigError>,
    /// (line, column, note), sorted into file order at the end.
    untranslated: Vec<(usize, usize, String)>,
}

impl Translator<'_> {
    fn note(&mut self, path: &str, key: &Key, why: &str) {
        let note = format!(
            "{}:{}:{}: {path}: not translated: {why}",
            self.file, key.line, key.column
        );
        self.untranslated.push((key.line, key.column, note));
    }

    fn error(&mut self, path: &str, node: &Node, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: (node.line > 0).then_some(node.line),
            column: (node.column > 0).then_some(node.column),
            key: path.to_owned(),
            message,
        });
    }

    fn text(&mut self, path: &str, node: &Node) -> Option<String> {
        let text = node.value.scalar_text();
        if text.is_none() {
            let found = node.value.kind();
            self.error(path, node, format!("expected a string, found {found}"));
        }
        text
    }

    fn entries<'n>(&mut self, path: &str, node: &'n Node) -> &'n [(Key, Node)] {
        match &node.value {
            Value::Map(entries) => entries,
            Value::Null => &[],
            other => {
                let found = other.kind();
                self.error(path, node, format!("expected a mapping, found {found}"));
                &[]
            }
        }
    }

    /// A command: a list as is, a string split like a shell would (as compose does).
    fn command(&mut self, path: &str, node: &Node) -> Option<Vec<String>> {
        match &node.value {
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| self.text(&format!("{path}[{i}]"), n))
                .collect(),
            _ => {
                let text = self.text(path, node)?;
                let words = shlex::split(&text);
                if words.is_none() {
                    self.error(path, node, format!("unbalanced quotes in {text:?}"));
                }
                words
            }
        }
    }

    /// `[A=1, B]` or `{A: 1, B: null}` as a map; a name without a value takes it from
    /// the caller's environment, as in compose.
    fn environment(&mut self, path: &str, node: &Node) -> Map<String, Json> {
        let mut env = Map::new();
        let mut add = |k: &str, v: Option<String>| {
            let v = v.unwrap_or_else(|| format!("${{{k}}}"));
            env.insert(k.to_owned(), Json::String(v));
        };
        match &node.value {
            Value::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(line) = self.text(&format!("{path}[{i}]"), item) {
                        match line.split_once('=') {
                            Some((k, v)) => add(k, Some(v.to_owned())),
                            None => add(&line, None),
                        }
                    }
                }
            }
            _ => {
                for (key, value) in self.entries(path, node) {
                    add(&key.name, value.value.scalar_text());
                }
            }
        }
        env
    }

    /// A list of strings; a single string is a list of one.
    fn strings(&mut self, path: &str, node: &Node) -> Vec<String> {
        match &node.value {
            Value::Seq(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, n)| self.text(&format!("{path}[{i}]"), n))
                .collect(),
            _ => self.text(path, node).into_iter().collect(),
        }
    }

    /// A list whose items are strings (short syntax, kept as they are) or mappings (long
    /// syntax), each mapping turned into the short form by `long`, which gets the
    /// mapping's scalar fields and says what is missing when it cannot.
    fn short_or_long(&mut self, path: &str, node: &Node, long: LongSyntax) -> Vec<String> {
        let Value::Seq(items) = &node.value else {
            let found = node.value.kind();
            self.error(path, node, format!("expected a list, found {found}"));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Value::Map(fields) = &item.value else {
                out.extend(self.text(&item_path, item));
                continue;
            };
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(key, _)| key.name == k)
                    .and_then(|(_, v)| v.value.scalar_text())
            };
            match long(&get) {
                Ok(short) => out.push(short),
                Err(missing) => self.error(&item_path, item, missing.to_owned()),
            }
        }
        out
    }

    /// Short (`"8080:80"`) and long (`{target: 80, published: 8080}`) port syntax.
    fn ports(&mut self, path: &str, node: &Node) -> Vec<String> {
        self.short_or_long(path, node, |get| {
            let target = get("target").ok_or("a long-syntax port needs `target`")?;
            let spec = match (get("host_ip"), get("published")) {
                (Some(ip), Some(p)) => format!("{ip}:{p}:{target}"),
                (None, Some(p)) => format!("{p}:{target}"),
                _ => target,
            };
            Ok(match get("protocol") {
                Some(proto) => format!("{spec}/{proto}"),
                None => spec,
            })
        })
    }

    /// Short (`"./data:/data:ro"`) and long (`{type: bind, source, target}`) syntax.
    fn volumes(&mut self, path: &str, node: &Node) -> Vec<String> {
        self.short_or_long(path, node, |get| {
            let target = get("target").ok_or("a long-syntax volume needs `target`")?;
            let ro = if get("read_only").as_deref() == Some("true") {
                ":ro"
            } else {
                ""
            };
            Ok(match get("source") {
                Some(source) => format!("{source}:{target}{ro}"),
                None => target,
            })
        })
    }

    /// `healthcheck:` as a harness `command` check (it runs inside the container, as
    /// compose's does). `None` when disabled.
    fn healthcheck(&mut self, path: &str, node: &Node) -> Option<Json> {
        let mut check = Map::new();
        check.insert("type".into(), json!("command"));
        for (key, value) in self.entries(path, node) {
            let key_path = join(path, &key.name);
            match key.name.as_str() {
                "test" => {
                    let words = match &value.value {
                        Value::Seq(_) => self.command(&key_path, value)?,
                        _ => vec!["CMD-SHELL".to_owned(), self.text(&key_path, value)?],
                    };
                    match words.split_first() {
                        Some((kind, rest)) if kind == "CMD" && !rest.is_empty() => {
                            check.insert("command".into(), json!(rest[0]));
                            check.insert("args".into(), json!(rest[1..]));
                        }
                        Some((kind, rest)) if kind == "CMD-SHELL" && !rest.is_empty() => {
                            check.insert("command".into(), json!(rest.join(" ")));
                        }
                        Some((kind, _)) if kind == "NONE" => return None,
                        _ => {
                            self.error(
                                &key_path,
                                value,
                                "expected [CMD, ...], [CMD-SHELL, \"...\"], [NONE] or a shell command".into(),
                            );
                            return None;
                        }
                    }
                }
                "interval" | "timeout" | "start_period" | "retries" => {
                    if let Some(v) = self.text(&key_path, value) {
                        check.insert(key.name.clone(), json!(v));
                    }
                }
                "disable" if value.value == Value::Bool(true) => return None,
                _ => self.note(&key_path, key, "not a harness health check setting"),
            }
        }
        check.contains_key("command").then_some(Json::Object(check))
    }

    fn service(&mut self, project: &str, name: &str, node: &Node) -> Json {
        let path = join("services", name);
        let mut docker = Map::new();
        let mut service = Map::new();
        for (key, value) in self.entries(&path, node) {
            let key_path = join(&path, &key.name);
            let k = key.name.as_str();
            match k {
                "image" | "working_dir" | "user" | "stop_signal" | "pull_policy" => {
                    if let Some(v) = self.text(&key_path, value) {
                        let (target, key) = match k {
                            "stop_signal" => (&mut service, "stop_signal"),
                            "pull_policy" => (&mut docker, "pull"),
                            _ => (&mut docker, k),
                        };
                        target.insert(key.to_owned(), json!(v));
                    }
                }
                "build" => match &value.value {
                    Value::Map(fields) => {
                        for (bk, bv) in fields {
                            let bpath = join(&key_path, &bk.name);
                            match bk.name.as_str() {
                                "context" => docker.extend(
                                    self.text(&bpath, bv)
                                        .map(|v| ("build".to_owned(), json!(v))),
                                ),
                                "dockerfile" => docker.extend(
                                    self.text(&bpath, bv)
                                        .map(|v| ("dockerfile".to_owned(), json!(v))),
                                ),
                                _ => self.note(
                                    &bpath,
                                    bk,
                                    "only `context` and `dockerfile` are used",
                                ),
                            }
                        }
                    }
                    _ => docker.extend(
                        self.text(&key_path, value)
                            .map(|v| ("build".to_owned(), json!(v))),
                    ),
                },
                "command" | "entrypoint" => {
                    if let Some(words) = self.command(&key_path, value) {
                        docker.insert(k.to_owned(), json!(words));
                    }
                }
                "environment" => {
                    let env = self.environment(&key_path, value);
                    docker.insert("env".into(), Json::Object(env));
                }
                "env_file" => {
                    let files = self.strings(&key_path, value);
                    if files.len() > 1 {
                        self.note(
                            &key_path,
                            key,
                            "a harness service has one env_file; the first is used",
                        );
                    }
                    if let Some(first) = files.into_iter().next() {
                        service.insert("env_file".into(), json!(first));
                    }
                }
                "ports" => {
                    let ports = self.ports(&key_path, value);
                    docker.insert("ports".into(), json!(ports));
                }
                "volumes" => {
                    let volumes = self.volumes(&key_path, value);
                    docker.insert("volumes".into(), json!(volumes));
                }
                "extra_hosts" => {
                    let hosts: Vec<String> = match &value.value {
                        Value::Map(_) => self
                            .entries(&key_path, value)
                            .iter()
                            .map(|(h, ip)| {
                                format!("{}:{}", h.name, ip.value.scalar_text().unwrap_or_default())
                            })
                            .collect(),
                        _ => self.strings(&key_path, value),
                    };
                    docker.insert("extra_hosts".into(), json!(hosts));
                }
                "depends_on" => {
                    let mut deps = Map::new();
                    match &value.value {
                        Value::Seq(_) => {
                            for dep in self.strings(&key_path, value) {
                                deps.insert(dep, json!({"condition": "started"}));
                            }
                        }
                        _ => {
                            for (dep, spec) in self.entries(&key_path, value) {
                                let mut condition = "service_started".to_owned();
                                for (ck, cv) in self.entries(&join(&key_path, &dep.name), spec) {
                                    if ck.name == "condition" {
                                        condition = cv.value.scalar_text().unwrap_or(condition);
                                    } else {
                                        let cpath = join(&join(&key_path, &dep.name), &ck.name);
                                        self.note(&cpath, ck, "only `condition` is used");
                                    }
                                }
                                deps.insert(dep.name.clone(), json!({ "condition": condition }));
                            }
                        }
                    }
                    service.insert("depends_on".into(), Json::Object(deps));
                }
                "healthcheck" => {
                    if let Some(check) = self.healthcheck(&key_path, value) {
                        service.insert("health_check".into(), check);
                    }
                }
                "restart" => {
                    let policy = self.text(&key_path, value).unwrap_or_default();
                    let (policy, max) = match policy.split_once(':') {
                        Some(("on-failure", n)) => ("on-failure", n.parse::<u32>().ok()),
                        _ => (policy.as_str(), None),
                    };
                    let policy = match policy {
                        "unless-stopped" => "always",
                        other => other,
                    };
                    let restart = match max {
                        Some(n) => json!({"policy": policy, "max_restarts": n}),
                        None => json!(policy),
                    };
                    service.insert("restart".into(), restart);
                }
                "stop_grace_period" => {
                    if let Some(v) = self.text(&key_path, value) {
                        service.insert("stop_timeout".into(), json!(v));
                    }
                }
                _ => {
                    let why = UNTRANSLATED
                        .iter()
                        .find(|(n, _)| *n == k)
                        .map_or("the harness has no equivalent", |(_, why)| why);
                    self.note(&key_path, key, why);
                }
            }
        }
        if !docker.contains_key("image") {
            // compose names a built image after the project and service.
            docker.insert("image".into(), json!(format!("{project}-{name}")));
        }
        service.insert("target".into(), json!({ "docker": docker }));
        Json::Object(service)
    }
}

/// Translates a compose file (`file` names it in messages) into harness.yaml text;
/// `default_name` is the stack name when the file has no `name:`.
pub fn import_compose(
    text: &str,
    file: &str,
    default_name: &str,
) -> Result<ComposeImport, ConfigErrors> {
    let root = yaml::parse_document(text, file)?;
    let mut t = Translator {
        file,
        errors: Vec::new(),
        untranslated: Vec::new(),
    };
    let mut name = default_name.to_owned();
    let mut services = Map::new();
    let top = t.entries("", &root);
    for (key, value) in top {
        match key.name.as_str() {
            "name" => name = t.text("name", value).unwrap_or(name),
            "services" => {}
            k if SILENT_TOP.contains(&k) => {}
            k if k.starts_with("x-") => {}
            _ => t.note(&key.name, key, "only `name` and `services` are translated"),
        }
    }
    for (key, value) in top.iter().filter(|(k, _)| k.name == "services") {
        for (svc, body) in t.entries(&key.name, value) {
            let translated = t.service(&name, &svc.name, body);
            services.insert(svc.name.clone(), translated);
        }
    }
    if !t.errors.is_empty() {
        return Err(ConfigErrors(t.errors));
    }
    let doc = json!({ "name": name, "services": services });
    let mut body = serde_saphyr::to_string(&doc).expect("a JSON value serializes as YAML");
    if !body.ends_with('\n') {
        body.push('\n');
    }
    t.untranslated.sort();
    Ok(ComposeImport {
        yaml: format!("# Imported from {file} by `harness import`.\n{body}"),
        untranslated: t
            .untranslated
            .into_iter()
            .map(|(_, _, note)| note)
            .collect(),
    })
}

/// Whether a file name is one docker compose looks for (`compose.yaml`,
/// `docker-compose.yml`, `docker-compose.override.yml`...).
pub fn is_compose_file_name(name: &str) -> bool {
    let stem = name
        .strip_suffix(".yml")
        .or_else(|| name.strip_suffix(".yaml"))
        .unwrap_or("");
    stem == "compose" || stem.starts_with("docker-compose") || stem.starts_with("compose.")
}
