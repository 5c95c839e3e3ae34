//! Keeps PROTOCOL.md true: every `-> ` line in a ```json block is a valid request whose
//! params fit its method, every `<- ` line is a server message that re-serializes to the
//! same JSON (so no field is silently ignored), results fit their method's result type,
//! and every method and every event kind has at least one example.

use std::collections::{BTreeSet, HashMap};

use protocol::methods::{self as m, names};
use protocol::{Request, ServerMessage};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md");

/// Who sends an example line.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dir {
    /// `-> `: client to daemon.
    ToDaemon,
    /// `<- `: daemon to client.
    ToClient,
}

/// One example message of PROTOCOL.md.
#[derive(Debug)]
struct Example {
    /// 1-based line number in PROTOCOL.md, for messages.
    line: usize,
    /// Index of the ```json block it is in; request ids are matched within a block.
    block: usize,
    dir: Dir,
    json: String,
}

/// A fenced block: its info string (`json`, `python`...) and its lines with numbers.
struct Block {
    info: String,
    lines: Vec<(usize, String)>,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match open.take() {
                Some(b) => out.push(b),
                None => {
                    open = Some(Block {
                        info: info.trim().to_owned(),
                        lines: Vec::new(),
                    })
                }
            }
        } else if let Some(b) = &mut open {
            b.lines.push((i + 1, line.to_owned()));
        }
    }
    assert!(open.is_none(), "PROTOCOL.md has an unclosed ``` block");
    out
}

/// Every message line of every ```json block. Any other non-blank line in such a block
/// is a mistake (a missing arrow, `->` without its space...).
fn examples(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    for (block, b) in blocks(doc).iter().filter(|b| b.info == "json").enumerate() {
        for (line, text) in &b.lines {
            let (dir, json) = if let Some(j) = text.strip_prefix("-> ") {
                (Dir::ToDaemon, j)
            } else if let Some(j) = text.strip_prefix("<- ") {
                (Dir::ToClient, j)
            } else {
                assert!(
                    text.trim().is_empty(),
                    "PROTOCOL.md:{line}: a line in a ```json block must start with `-> ` or `<- `: {text}"
                );
                continue;
            };
            out.push(Example {
                line: *line,
                block,
                dir,
                json: json.to_owned(),
            });
        }
    }
    out
}

/// Deserializes `value` as `T` (as the daemon would).
fn parses<T: DeserializeOwned>(value: &Value) -> Result<(), String> {
    serde_json::from_value::<T>(value.clone())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Deserializes `value` as `T` and checks that serializing it gives `value` back.
fn round_trips<T: DeserializeOwned + Serialize>(value: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == value {
        Ok(())
    } else {
        Err(format!(
            "does not round-trip; the daemon would send\n{back}"
        ))
    }
}

/// Methods that take no params accept `null` and `{}`.
fn no_params(value: &Value) -> Result<(), String> {
    match value {
        Value::Object(o) if o.is_empty() => Ok(()),
        _ => Err(format!("this method takes no params, got {value}")),
    }
}

/// Checks a request's params against its method's params type.
fn check_params(method: &str, params: &Value) -> Result<(), String> {
    // The daemon reads absent or null params as `{}`.
    let params = if params.is_null() {
        &serde_json::json!({})
    } else {
        params
    };
    match method {
        names::HELLO => parses::<m::HelloParams>(params),
        names::CONFIG_APPLY => parses::<m::ApplyParams>(params),
        names::CONFIG_VALIDATE => parses::<m::ValidateParams>(params),
        names::CONFIG_GET => parses::<m::StackParams>(params),
        names::CONFIG_ENV | names::SERVICE_GET | names::SERVICE_HEALTH => {
            parses::<m::ServiceParams>(params)
        }
        names::STACK_LIST | names::DAEMON_STATUS | names::UI_LOGIN => no_params(params),
        names::PACKAGE_BUILD => round_trips::<m::PackageBuildParams>(params),
        names::DEPLOY => round_trips::<m::DeployParams>(params),
        names::DISCOVER => round_trips::<m::DiscoverParams>(params),
        names::NETWORK_LIST | names::NETWORK_SHOW | names::NETWORK_TEST => {
            round_trips::<m::StackParams>(params)
        }
        names::MESH_PEERS => round_trips::<m::ListParams>(params),
        names::MESH_REVOKE => round_trips::<m::MeshRevokeParams>(params),
        names::SERVICE_LIST => parses::<m::ListParams>(params),
        names::SERVICE_START
        | names::SERVICE_STOP
        | names::SERVICE_RESTART
        | names::SERVICE_REMOVE => parses::<m::ServicesParams>(params),
        names::SERVICE_LOGS => parses::<m::LogsParams>(params),
        names::SERVICE_EXEC => parses::<m::ExecParams>(params),
        names::SUBSCRIBE => parses::<m::SubscribeParams>(params),
        names::UNSUBSCRIBE => parses::<m::UnsubscribeParams>(params),
        names::DAEMON_SHUTDOWN => parses::<m::ShutdownParams>(params),
        other => Err(format!(
            "no params type known for method {other}: add it to this test"
        )),
    }
}

/// Checks a successful response's `result` against its method's result type.
fn check_result(method: &str, result: &Value) -> Result<(), String> {
    match method {
        names::HELLO => round_trips::<m::HelloResult>(result),
        names::CONFIG_APPLY => round_trips::<m::ApplyResult>(result),
        names::CONFIG_VALIDATE => round_trips::<m::ValidateResult>(result),
        names::CONFIG_GET => round_trips::<protocol::config::StackConfig>(result),
        names::CONFIG_ENV => round_trips::<m::EnvResult>(result),
        names::STACK_LIST => round_trips::<Vec<m::StackInfo>>(result),
        names::SERVICE_LIST => round_trips::<Vec<m::ServiceInfo>>(result),
        names::SERVICE_GET => round_trips::<m::ServiceInfo>(result),
        names::SERVICE_START
        | names::SERVICE_STOP
        | names::SERVICE_RESTART
        | names::SERVICE_REMOVE => round_trips::<m::ServicesResult>(result),
        names::SERVICE_HEALTH => round_trips::<m::HealthResult>(result),
        names::SERVICE_LOGS => round_trips::<m::LogsResult>(result),
        names::SERVICE_EXEC => round_trips::<m::ExecResult>(result),
        names::SUBSCRIBE => round_trips::<m::SubscribeResult>(result),
        names::UNSUBSCRIBE | names::DAEMON_SHUTDOWN => round_trips::<m::Empty>(result),
        names::DAEMON_STATUS => round_trips::<m::DaemonStatus>(result),
        names::UI_LOGIN => round_trips::<m::UiLoginResult>(result),
        names::PACKAGE_BUILD => round_trips::<m::PackageInfo>(result),
        names::DEPLOY => round_trips::<m::DeployResult>(result),
        names::DISCOVER => round_trips::<m::DiscoverResult>(result),
        names::NETWORK_LIST => round_trips::<Vec<m::NetworkInfo>>(result),
        names::NETWORK_SHOW => round_trips::<Vec<m::AddressRow>>(result),
        names::NETWORK_TEST => round_trips::<Vec<m::ReachCheck>>(result),
        names::MESH_PEERS => round_trips::<Vec<m::MeshPeer>>(result),
        names::MESH_REVOKE => round_trips::<m::ServicesResult>(result),
        other => Err(format!(
            "no result type known for method {other}: add it to this test"
        )),
    }
}

/// Every event name (`service.state`...) the protocol defines, read from its JSON Schema
/// so a new event kind needs an example without anyone updating this test.
fn event_names() -> BTreeSet<String> {
    fn walk(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(o) => {
                if let Some(name) = o
                    .get("event")
                    .and_then(|e| e.get("const"))
                    .and_then(Value::as_str)
                {
                    out.insert(name.to_owned());
                }
                o.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let schema = serde_json::to_value(schemars::schema_for!(protocol::EventKind)).unwrap();
    let mut out = BTreeSet::new();
    walk(&schema, &mut out);
    out
}

#[test]
fn protocol_md_examples_are_true_and_complete() {
    let doc = std::fs::read_to_string(DOC_PATH).unwrap_or_else(|e| panic!("{DOC_PATH}: {e}"));
    let examples = examples(&doc);
    assert!(
        !examples.is_empty(),
        "PROTOCOL.md has no `-> `/`<- ` lines in ```json blocks"
    );

    let mut problems: Vec<String> = Vec::new();
    let mut methods_shown = BTreeSet::new();
    let mut events_shown = BTreeSet::new();
    // (block, request id) -> method, to check results, log lines and exec output.
    let mut requests: HashMap<(usize, u64), String> = HashMap::new();

    for ex in &examples {
        let mut fail = |what: String| {
            problems.push(format!("PROTOCOL.md:{}: {what}\n    {}", ex.line, ex.json))
        };
        let value: Value = match serde_json::from_str(&ex.json) {
            Ok(v) => v,
            Err(e) => {
                fail(format!("not one JSON value: {e}"));
                continue;
            }
        };
        match ex.dir {
            Dir::ToDaemon => {
                let req: Request = match serde_json::from_value(value) {
                    Ok(r) => r,
                    Err(e) => {
                        fail(format!("not a Request: {e}"));
                        continue;
                    }
                };
                if !names::ALL.contains(&req.method.as_str()) {
                    fail(format!("method {} is not in names::ALL", req.method));
                    continue;
                }
                if let Err(e) = check_params(&req.method, &req.params) {
                    fail(format!("params of {}: {e}", req.method));
                }
                methods_shown.insert(req.method.clone());
                requests.insert((ex.block, req.id.0), req.method);
            }
            Dir::ToClient => {
                if let Err(e) = round_trips::<ServerMessage>(&value) {
                    fail(format!("not a ServerMessage: {e}"));
                    continue;
                }
                // A request id this message refers to, and the method it must belong to.
                let method_of =
                    |id: &Value| id.as_u64().and_then(|id| requests.get(&(ex.block, id)));
                match serde_json::from_value::<ServerMessage>(value.clone()).unwrap() {
                    ServerMessage::Event(e) => {
                        events_shown.insert(value["event"].as_str().unwrap_or_default().to_owned());
                        if !e.time.ends_with('Z') {
                            fail("event time must be RFC 3339 UTC".into());
                        }
                    }
                    ServerMessage::Log(_) => match method_of(&value["id"]) {
                        Some(method) if method == names::SERVICE_LOGS => {}
                        other => fail(format!("a `log` message must carry the id of a service.logs request shown above it in its block (got {other:?})")),
                    },
                    ServerMessage::Output(_) => match method_of(&value["id"]) {
                        Some(method) if method == names::SERVICE_EXEC => {}
                        other => fail(format!("an `output` message must carry the id of a service.exec request shown above it in its block (got {other:?})")),
                    },
                    ServerMessage::Response(_) => {
                        if let (Some(result), Some(method)) = (value.get("result"), method_of(&value["id"])) {
                            if let Err(e) = check_result(method, result) {
                                fail(format!("result of {method}: {e}"));
                            }
                        }
                    }
                }
            }
        }
    }

    for method in names::ALL {
        if !methods_shown.contains(*method) {
            problems.push(format!("method {method} has no `-> ` example"));
        }
    }
    let all_events = event_names();
    assert!(
        all_events.contains("service.state"),
        "event names not found in the schema: {all_events:?}"
    );
    for event in &all_events {
        if !events_shown.contains(event) {
            problems.push(format!("event {event} has no `<- ` example"));
        }
    }

    // The daemon.json example (a ```json daemon.json block) is a DaemonFile.
    let daemon_files: Vec<Block> = blocks(&doc)
        .into_iter()
        .filter(|b| b.info == "json daemon.json")
        .collect();
    if daemon_files.is_empty() {
        problems.push("no ```json daemon.json block with an example daemon.json".into());
    }
    for b in daemon_files {
        let text: String = b.lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        let checked = serde_json::from_str(&text)
            .map_err(|e| e.to_string())
            .and_then(|v: Value| round_trips::<protocol::DaemonFile>(&v));
        if let Err(e) = checked {
            problems.push(format!(
                "PROTOCOL.md:{}: daemon.json example: {e}",
                b.lines.first().map_or(0, |l| l.0)
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "{} problem(s) in PROTOCOL.md:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
