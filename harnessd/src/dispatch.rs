//! Requests to methods: parameter parsing, the methods themselves, and the one place
//! where daemon errors become wire error codes ([`op_error`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::config::{self, StackConfig};
use protocol::envelope::{LogMessage, OutputMessage};
use protocol::events::{EventKind, ServiceRef};
use protocol::methods::{self as m, names};
use protocol::{ErrorCode, ErrorObject, Request, RequestId, Response};
use serde::de::DeserializeOwned;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::core::Core;
use crate::events::EventSink;
use crate::orchestrator::OpError;

/// A connection as the methods see it.
pub struct Conn {
    id: u64,
    /// Queue of responses, log lines and exec output.
    pub out: async_channel::Sender<String>,
    sink: EventSink,
    follows: Mutex<HashMap<u64, smol::Task<()>>>,
}

impl Conn {
    /// A connection with its queues.
    pub fn new(id: u64, out: async_channel::Sender<String>, sink: EventSink) -> Self {
        Conn {
            id,
            out,
            sink,
            follows: Mutex::new(HashMap::new()),
        }
    }

    /// Ends everything the connection had running.
    pub fn close(&self) {
        self.out.close();
        self.sink.tx.close();
        self.follows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorObject {
    ErrorObject {
        code,
        message: message.into(),
        data: None,
    }
}

/// The one mapping from daemon errors to wire errors.
fn op_error(e: OpError) -> ErrorObject {
    let code = match &e {
        OpError::NotFound(_) => ErrorCode::NotFound,
        OpError::Unsupported(_) => ErrorCode::UnsupportedBackend,
        OpError::Failed(_) => ErrorCode::BackendError,
        OpError::Timeout(_) => ErrorCode::Timeout,
        OpError::Storage(_) => ErrorCode::StorageError,
    };
    let data = match &e {
        OpError::Failed(list) => Some(serde_json::json!({
            "failed": list.iter().map(|(s, r)| serde_json::json!({"service": s, "reason": r})).collect::<Vec<_>>()
        })),
        _ => None,
    };
    ErrorObject {
        code,
        message: e.to_string(),
        data,
    }
}

/// Handles the first request of a connection, which must be `hello` with the token.
/// Returns the response, whether the client is now authenticated, and whether to close.
pub fn hello(core: &Core, token: &str, req: &Request) -> (Response, bool, bool) {
    if req.method != names::HELLO {
        let r = Response::err(
            Some(req.id),
            ErrorCode::HelloRequired,
            format!(
                "the first request must be hello with the token (got {}); see PROTOCOL.md",
                req.method
            ),
        );
        return (r, false, false);
    }
    let params: m::HelloParams = match params(&req.params) {
        Ok(p) => p,
        Err(e) => {
            return (
                Response {
                    id: Some(req.id),
                    outcome: protocol::envelope::Outcome::Error(e),
                },
                false,
                false,
            )
        }
    };
    // Constant time, so response timing reveals nothing about the token.
    let session = if bool::from(params.token.as_bytes().ct_eq(token.as_bytes())) {
        None
    } else {
        let new_session = || crate::pki::random_hex(32).unwrap_or_default();
        match core.logins.check(&params.token, new_session) {
            crate::logins::Login::Session => None,
            crate::logins::Login::NewSession(s) if !s.is_empty() => Some(s),
            _ => {
                let r = Response::err(Some(req.id), ErrorCode::Unauthorized, "wrong token: read it from the token file named in daemon.json in the daemon's state directory (a browser gets a login link from `harness ui`)");
                return (r, false, true);
            }
        }
    };
    if params.protocol != protocol::PROTOCOL_VERSION {
        let r = Response::err(Some(req.id), ErrorCode::ProtocolMismatch, format!(
            "this daemon speaks protocol {}, the client {}: use matching versions of harness and harnessd",
            protocol::PROTOCOL_VERSION, params.protocol
        ));
        return (r, false, true);
    }
    let result = m::HelloResult {
        daemon: format!("harnessd {}", env!("CARGO_PKG_VERSION")),
        protocol: protocol::PROTOCOL_VERSION,
        instance: core.instance.clone(),
        seq: core.events.last_seq(),
        session,
    };
    (Response::ok(Some(req.id), result), true, false)
}

fn params<P: DeserializeOwned>(value: &Value) -> Result<P, ErrorObject> {
    let value = if value.is_null() {
        Value::Object(Default::default())
    } else {
        value.clone()
    };
    serde_json::from_value(value)
        .map_err(|e| error(ErrorCode::InvalidParams, format!("invalid params: {e}")))
}

fn ok(v: impl serde::Serialize) -> Result<Option<Value>, ErrorObject> {
    Ok(Some(serde_json::to_value(v).expect("results serialize")))
}

fn unknown_method(method: &str) -> ErrorObject {
    let hint = config::did_you_mean(method, names::ALL.iter().copied())
        .map(|s| format!(" (did you mean {s}?)"))
        .unwrap_or_default();
    error(
        ErrorCode::UnknownMethod,
        format!("unknown method {method}{hint}"),
    )
}

/// Whether a method answers from memory at once, so the connection's reader can run it
/// inline instead of spawning a task (which it does for anything that waits).
pub fn is_quick(method: &str) -> bool {
    matches!(
        method,
        names::HELLO
            | names::CONFIG_VALIDATE
            | names::CONFIG_GET
            | names::CONFIG_ENV
            | names::STACK_LIST
            | names::SERVICE_LIST
            | names::SERVICE_GET
            | names::SUBSCRIBE
            | names::UNSUBSCRIBE
            | names::DAEMON_STATUS
            | names::UI_LOGIN
    ) || !names::ALL.contains(&method)
}

/// Runs one request; `None` when the response was already queued (log follow).
pub async fn handle(core: &Arc<Core>, conn: &Arc<Conn>, req: Request) -> Option<Response> {
    let id = req.id;
    let outcome = match route(core, conn, req).await {
        Ok(None) => return None,
        Ok(Some(v)) => protocol::envelope::Outcome::Result(v),
        Err(e) => protocol::envelope::Outcome::Error(e),
    };
    Some(Response {
        id: Some(id),
        outcome,
    })
}

async fn route(
    core: &Arc<Core>,
    conn: &Arc<Conn>,
    req: Request,
) -> Result<Option<Value>, ErrorObject> {
    let p = &req.params;
    match req.method.as_str() {
        names::HELLO => Err(error(ErrorCode::InvalidRequest, "already authenticated")),
        names::CONFIG_APPLY => ok(apply(core, params(p)?).await?),
        names::CONFIG_VALIDATE => {
            let v: m::ValidateParams = params(p)?;
            let file = v.file.as_deref().unwrap_or("harness.yaml");
            let cfg = config::parse_stack(&v.yaml, file).map_err(config_error)?;
            ok(m::ValidateResult {
                services: config::start_order(&cfg),
            })
        }
        names::CONFIG_GET => {
            let s: m::StackParams = params(p)?;
            let cfg = core.read(|st| st.stack(&s.stack).map(|r| r.config.masked()));
            ok(cfg.ok_or_else(|| no_stack(&s.stack))?)
        }
        names::CONFIG_ENV => {
            let s: m::ServiceParams = params(p)?;
            let env_file = core.env_file(&s.stack, &s.name);
            let env = core.read(|st| {
                known_service(st, &s.stack, &s.name)?;
                let mut env = crate::env::service_env(
                    st,
                    &s.stack,
                    &s.name,
                    &crate::env::place_of(st, &s.stack, &s.name),
                    &env_file,
                )
                .map_err(|e| error(ErrorCode::InvalidConfig, e))?;
                if let Some(stack) = st.stack(&s.stack) {
                    stack.config.mask_env(&s.name, &mut env);
                }
                Ok(env)
            })?;
            ok(m::EnvResult { env })
        }
        names::STACK_LIST => ok(core.read(|st| {
            st.snap
                .stacks
                .values()
                .map(|r| m::StackInfo {
                    name: r.name.clone(),
                    source: r.source.clone(),
                    services: r.services.len(),
                    running: r.services.values().filter(|s| s.state.is_active()).count(),
                })
                .collect::<Vec<_>>()
        })),
        names::SERVICE_LIST => {
            let l: m::ListParams = params(p)?;
            let list = core.read(|st| {
                if let Some(s) = &l.stack {
                    st.stack(s).ok_or_else(|| no_stack(s))?;
                }
                Ok::<_, ErrorObject>(
                    st.snap
                        .stacks
                        .iter()
                        .filter(|(name, _)| l.stack.as_ref().is_none_or(|s| s == *name))
                        .flat_map(|(stack, r)| {
                            config::start_order(&r.config)
                                .into_iter()
                                .filter_map(|n| Core::service_info(st, stack, &n))
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>(),
                )
            })?;
            ok(list)
        }
        names::SERVICE_GET => {
            let s: m::ServiceParams = params(p)?;
            let info = core.read(|st| {
                known_service(st, &s.stack, &s.name)?;
                Ok::<_, ErrorObject>(Core::service_info(st, &s.stack, &s.name))
            })?;
            ok(info)
        }
        names::SERVICE_START => {
            let s: m::ServicesParams = params(p)?;
            let services = core
                .start_services(&s.stack, &s.names, None)
                .await
                .map_err(op_error)?;
            ok(m::ServicesResult { services })
        }
        names::SERVICE_STOP => {
            let s: m::ServicesParams = params(p)?;
            let services = core
                .stop_services(&s.stack, &s.names)
                .await
                .map_err(op_error)?;
            ok(m::ServicesResult { services })
        }
        names::SERVICE_RESTART => {
            let s: m::ServicesParams = params(p)?;
            core.stop_services(&s.stack, &s.names)
                .await
                .map_err(op_error)?;
            let services = core
                .start_services(&s.stack, &s.names, None)
                .await
                .map_err(op_error)?;
            ok(m::ServicesResult { services })
        }
        names::SERVICE_REMOVE => {
            let s: m::ServicesParams = params(p)?;
            ok(remove(core, &s.stack, &s.names, s.purge).await?)
        }
        names::SERVICE_HEALTH => {
            let s: m::ServiceParams = params(p)?;
            ok(check_health(core, &s).await?)
        }
        names::SERVICE_LOGS => logs(core, conn, req.id, params(p)?).await,
        names::SERVICE_EXEC => ok(exec(core, conn, req.id, params(p)?).await?),
        names::SUBSCRIBE => {
            let s: m::SubscribeParams = params(p)?;
            // Held for the whole replay: a compaction between two batches would skip
            // events without a word.
            let journal = core.persister.journal.clone();
            let j = journal.lock().unwrap_or_else(|e| e.into_inner());
            let (subscription, seq) = core
                .events
                .subscribe(conn.id, &s, &conn.sink, |from, until, limit| {
                    let mut batch = j.read_since(from, limit).map_err(|e| e.to_string())?;
                    batch.retain(|e| e.seq < until);
                    Ok(batch)
                })
                .map_err(|e| error(ErrorCode::Internal, format!("cannot replay events: {e}")))?;
            drop(j);
            ok(m::SubscribeResult { subscription, seq })
        }
        names::UNSUBSCRIBE => {
            let u: m::UnsubscribeParams = params(p)?;
            let follow = conn
                .follows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&u.subscription);
            if follow.is_none() && !core.events.unsubscribe(conn.id, u.subscription) {
                return Err(error(
                    ErrorCode::NotFound,
                    format!("no subscription or log follow {}", u.subscription),
                ));
            }
            ok(m::Empty {})
        }
        names::DEPLOY => {
            let d: m::DeployParams = params(p)?;
            ok(deploy(core, d).await?)
        }
        names::NETWORK_LIST => {
            let s: m::StackParams = params(p)?;
            ok(core
                .network_list(&s.stack)
                .map_err(|e| error(ErrorCode::NotFound, e))?)
        }
        names::NETWORK_SHOW => {
            let s: m::StackParams = params(p)?;
            ok(core
                .network_show(&s.stack)
                .map_err(|e| error(ErrorCode::NotFound, e))?)
        }
        names::NETWORK_TEST => {
            let s: m::StackParams = params(p)?;
            ok(core
                .network_test(&s.stack)
                .await
                .map_err(|e| error(ErrorCode::NotFound, e))?)
        }
        names::MESH_PEERS => {
            let l: m::ListParams = params(p)?;
            let peers = core.mesh_peers(l.stack.as_deref()).await;
            ok(peers.map_err(|e| error(ErrorCode::BackendError, e))?)
        }
        names::MESH_REVOKE => {
            let r: m::MeshRevokeParams = params(p)?;
            let services = core.revoke(&r.stack, &r.node).await;
            ok(m::ServicesResult {
                services: services.map_err(|e| error(ErrorCode::NotFound, e))?,
            })
        }
        names::DISCOVER => {
            let d: m::DiscoverParams = params(p)?;
            let found = core.discovery.discover(d).await;
            ok(found.map_err(|e| error(ErrorCode::InvalidParams, e))?)
        }
        names::PACKAGE_BUILD => {
            let b: m::PackageBuildParams = params(p)?;
            ok(build_package(b).await?)
        }
        names::UI_LOGIN => {
            let code = crate::pki::random_hex(16)
                .map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
            core.logins.add_code(code.clone());
            // The daemon's URL is wss://host:port; the dashboard is served there too.
            let base = core.url.replacen("wss://", "https://", 1);
            ok(m::UiLoginResult {
                url: format!("{}/#code={code}", base.trim_end_matches('/')),
                code,
                expires_in_secs: crate::logins::CODE_TTL.as_secs(),
            })
        }
        names::DAEMON_STATUS => ok(core.read(|st| m::DaemonStatus {
            daemon: format!("harnessd {}", env!("CARGO_PKG_VERSION")),
            instance: core.instance.clone(),
            pid: std::process::id(),
            state_dir: core.state_dir.display().to_string(),
            url: core.url.clone(),
            uptime_secs: core.started.elapsed().as_secs(),
            stacks: st.snap.stacks.len(),
            services: st.snap.stacks.values().map(|s| s.services.len()).sum(),
            seq: core.events.last_seq(),
            clients: core.client_count(),
        })),
        names::DAEMON_SHUTDOWN => {
            let s: m::ShutdownParams = params(p)?;
            if s.stop_services {
                let stacks: Vec<String> = core.read(|st| st.snap.stacks.keys().cloned().collect());
                for stack in stacks {
                    core.stop_services(&stack, &[]).await.map_err(op_error)?;
                }
            }
            let core2 = core.clone();
            core.ex
                .spawn(async move {
                    // Let the response reach the client first.
                    smol::Timer::after(Duration::from_millis(100)).await;
                    core2.request_shutdown();
                })
                .detach();
            ok(m::Empty {})
        }
        other => Err(unknown_method(other)),
    }
}

fn no_stack(stack: &str) -> ErrorObject {
    error(
        ErrorCode::NotFound,
        format!("no stack named {stack}; apply its config first (harness up)"),
    )
}

fn known_service(st: &crate::core::State, stack: &str, name: &str) -> Result<(), ErrorObject> {
    let rec = st.stack(stack).ok_or_else(|| no_stack(stack))?;
    if rec.services.contains_key(name) {
        Ok(())
    } else {
        Err(error(
            ErrorCode::NotFound,
            crate::orchestrator::not_found_message(&rec.config, name),
        ))
    }
}

fn config_error(e: config::ConfigErrors) -> ErrorObject {
    ErrorObject {
        code: ErrorCode::InvalidConfig,
        message: e.to_string(),
        data: Some(
            serde_json::json!({ "errors": e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>() }),
        ),
    }
}

/// `config.apply`: stores a stack's config and reconciles the registry with it.
async fn apply(core: &Arc<Core>, p: m::ApplyParams) -> Result<m::ApplyResult, ErrorObject> {
    let file = p.source.clone().unwrap_or_else(|| "config".to_owned());
    config::validate(&p.config, &file).map_err(config_error)?;
    if let Some(problem) = config::stack_name_problem(&p.stack) {
        return Err(error(ErrorCode::InvalidParams, problem));
    }
    // Services on several hosts are stored as their instances (`svc@host`).
    let p = m::ApplyParams {
        config: config::expand_instances(&p.config),
        ..p
    };
    let mut result = m::ApplyResult {
        stack: p.stack.clone(),
        ..Default::default()
    };
    let old: Option<StackConfig> = core.read(|st| st.stack(&p.stack).map(|r| r.config.clone()));
    let old_services = old.map(|c| c.services).unwrap_or_default();
    let mut p = p;
    for (name, svc) in p.config.services.iter_mut() {
        // The same placement list keeps the target in use (a fallback is not a change).
        if let Some(o) = old_services.get(name) {
            if !svc.placement.is_empty() && svc.placement == o.placement {
                svc.target = o.target.clone();
            }
        }
    }
    for (name, svc) in &p.config.services {
        match old_services.get(name) {
            None => result.added.push(name.clone()),
            Some(o) if o != svc => result.changed.push(name.clone()),
            Some(_) => result.unchanged.push(name.clone()),
        }
    }
    result.removed = old_services
        .keys()
        .filter(|n| !p.config.services.contains_key(*n))
        .cloned()
        .collect();
    // Stop what goes away or changes while it runs, under the old config.
    let mut to_stop = result.removed.clone();
    to_stop.extend(result.changed.iter().cloned());
    for name in &to_stop {
        core.stop_one(&p.stack, name).await;
    }
    let removed_containers = old_services
        .iter()
        .any(|(n, s)| result.removed.contains(n) && matches!(s.target, config::Target::Docker(_)));
    if removed_containers {
        for note in core.remove_containers(&p.stack, &result.removed).await {
            tracing::info!("{}: {note}", p.stack);
        }
    }
    core.update(|st, ch| {
        let stack = Arc::make_mut(
            st.snap
                .stacks
                .entry(p.stack.clone())
                .or_insert_with(|| Arc::new(registry::StackRecord::new(&p.stack))),
        );
        stack.source = p.source.clone();
        stack.config = p.config.clone();
        stack.config.name = Some(p.stack.clone());
        for name in &result.removed {
            stack.services.remove(name);
            ch.push(EventKind::ServiceRemoved(ServiceRef {
                stack: p.stack.clone(),
                name: name.clone(),
            }));
        }
        for name in result.added.iter().chain(&result.changed) {
            stack
                .services
                .entry(name.clone())
                .or_insert_with(|| registry::ServiceRecord::new(crate::core::now()));
            ch.push(EventKind::ServiceRegistered(ServiceRef {
                stack: p.stack.clone(),
                name: name.clone(),
            }));
        }
        for name in &result.removed {
            st.runtime.remove(&(p.stack.clone(), name.clone()));
        }
    });
    core.commit()
        .await
        .map_err(|e| op_error(OpError::Storage(e)))?;
    Ok(result)
}

/// `service.remove`: stop services; with no names, also forget the whole stack.
async fn remove(
    core: &Arc<Core>,
    stack: &str,
    names: &[String],
    purge: bool,
) -> Result<m::ServicesResult, ErrorObject> {
    let services = core.stop_services(stack, names).await.map_err(op_error)?;
    if purge {
        let remote: Vec<String> = core.read(|st| {
            st.stack(stack).map_or_else(Vec::new, |r| {
                services
                    .iter()
                    .filter(|n| {
                        matches!(
                            r.config.services.get(*n).map(|s| &s.target),
                            Some(
                                protocol::config::Target::RemoteLan(_)
                                    | protocol::config::Target::Wireguard(_)
                            )
                        )
                    })
                    .cloned()
                    .collect()
            })
        });
        let mut failed = Vec::new();
        for name in remote {
            if let Err(e) = core.purge_remote(stack, &name).await {
                failed.push((name, e));
            }
        }
        if !failed.is_empty() {
            return Err(op_error(OpError::Failed(failed)));
        }
    }
    let had_containers = core.read(|st| {
        st.stack(stack)
            .is_some_and(|r| crate::containers::has_containers(&r.config))
    });
    if had_containers {
        for note in core.remove_containers(stack, names).await {
            tracing::info!("{stack}: {note}");
        }
    }
    if names.is_empty() {
        // Before the stack goes, so that an `up` of it right after keeps its new files.
        core.retire_run_dirs(stack).await;
    }
    core.update(|st, ch| {
        if names.is_empty() {
            let Some(rec) = st.snap.stacks.remove(stack) else {
                return;
            };
            st.runtime.retain(|(s, _), _| s != stack);
            for name in rec.services.keys() {
                ch.push(EventKind::ServiceRemoved(ServiceRef {
                    stack: stack.to_owned(),
                    name: name.clone(),
                }));
            }
        } else {
            for name in names {
                if let Some(rec) = st.service_mut(stack, name) {
                    // The config still defines it: forget its run, keep it registered.
                    *rec = registry::ServiceRecord::new(crate::core::now());
                }
            }
        }
    });
    core.commit()
        .await
        .map_err(|e| op_error(OpError::Storage(e)))?;
    Ok(m::ServicesResult { services })
}

/// `deploy`: `up` for the services with SSH-host targets (or its plan).
async fn deploy(core: &Arc<Core>, d: m::DeployParams) -> Result<m::DeployResult, ErrorObject> {
    if d.dry_run {
        // Plan on a copy of the state, with the given config in place of the stored one.
        let mut snap = core.snapshot();
        if let Some(c) = &d.config {
            config::validate(c, "config").map_err(config_error)?;
            let c = config::expand_instances(c);
            let stack = Arc::make_mut(
                snap.stacks
                    .entry(d.stack.clone())
                    .or_insert_with(|| Arc::new(registry::StackRecord::new(&d.stack))),
            );
            for name in c.services.keys() {
                stack
                    .services
                    .entry(name.clone())
                    .or_insert_with(|| registry::ServiceRecord::new(crate::core::now()));
            }
            stack.config = c;
        }
        let mut st = crate::core::State {
            snap,
            runtime: Default::default(),
        };
        // Ports as they would be picked now (a real deploy picks its own).
        let names: Vec<String> = st
            .stack(&d.stack)
            .map(|r| r.config.services.keys().cloned().collect())
            .unwrap_or_default();
        for name in &names {
            crate::orchestrator::assign_port(&mut st, &d.stack, name);
        }
        let selected = crate::remote::remote_services(&st, &d.stack, &d.names, &d.hosts)
            .map_err(|e| error(ErrorCode::NotFound, e))?;
        let plan = core
            .deploy_plan(&st, &d.stack, &selected)
            .await
            .map_err(|e| error(ErrorCode::BackendError, e))?;
        return Ok(m::DeployResult {
            services: selected,
            plan,
        });
    }
    let selected = core
        .read(|st| crate::remote::remote_services(st, &d.stack, &d.names, &d.hosts))
        .map_err(|e| error(ErrorCode::NotFound, e))?;
    let services = core
        .start_services(&d.stack, &selected, d.max_concurrent)
        .await
        .map_err(op_error)?;
    Ok(m::DeployResult {
        services,
        plan: Vec::new(),
    })
}

async fn build_package(b: m::PackageBuildParams) -> Result<m::PackageInfo, ErrorObject> {
    let dir = std::path::PathBuf::from(&b.dir);
    let out = match &b.out_dir {
        Some(o) => std::path::PathBuf::from(o),
        None => dir.parent().unwrap_or(&dir).to_owned(),
    };
    let pkg = smol::unblock(move || deployer::package::build(&dir, &out))
        .await
        .map_err(|e| error(ErrorCode::InvalidParams, e.to_string()))?;
    Ok(m::PackageInfo {
        path: pkg.path.display().to_string(),
        name: pkg.manifest.name,
        version: pkg.manifest.version,
        sha256: pkg.sha256,
        bytes: pkg.bytes,
    })
}

async fn check_health(
    core: &Arc<Core>,
    s: &m::ServiceParams,
) -> Result<m::HealthResult, ErrorObject> {
    let env_file = core.env_file(&s.stack, &s.name);
    let probe = core.read(|st| {
        known_service(st, &s.stack, &s.name)?;
        crate::health::probe_for(st, &s.stack, &s.name, &env_file)
            .map_err(|e| error(ErrorCode::InvalidConfig, e))
    })?;
    let Some((probe, hc)) = probe else {
        return Ok(m::HealthResult {
            stack: s.stack.clone(),
            name: s.name.clone(),
            health: m::Health::Unknown,
            check: "none".into(),
            output: "no health_check configured".into(),
        });
    };
    let timeout = Duration::from_millis(hc.timeout_ms.unwrap_or(config::DEFAULT_CHECK_TIMEOUT_MS));
    let (health, output) = match probe.run(core, timeout).await {
        Ok(o) => (m::Health::Healthy, o),
        Err(o) => (m::Health::Unhealthy, o),
    };
    Ok(m::HealthResult {
        stack: s.stack.clone(),
        name: s.name.clone(),
        health,
        check: probe.describe(),
        output,
    })
}

fn to_line(stack: &str, service: &str, e: deployer::logs::LogEntry) -> m::LogLine {
    m::LogLine {
        stack: stack.to_owned(),
        service: service.to_owned(),
        offset: e.offset,
        time: e.time,
        stream: e.stream,
        line: e.line,
    }
}

/// How often a followed log is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

async fn logs(
    core: &Arc<Core>,
    conn: &Arc<Conn>,
    id: RequestId,
    p: m::LogsParams,
) -> Result<Option<Value>, ErrorObject> {
    core.read(|st| known_service(st, &p.stack, &p.name))?;
    let path = core.log_path(&p.stack, &p.name);
    let (stack, name) = (p.stack.clone(), p.name.clone());
    let read = {
        let path = path.clone();
        smol::unblock(
            move || -> Result<(Vec<deployer::logs::LogEntry>, u64), deployer::DeployError> {
                let entries = match p.since {
                    Some(since) => deployer::logs::read_from(&path, since, 10_000)?,
                    None => deployer::logs::tail(&path, p.tail.unwrap_or(100))?,
                };
                let next = entries
                    .last()
                    .map_or(deployer::logs::next_offset(&path)?, |e| e.offset + 1);
                Ok((entries, next))
            },
        )
        .await
    };
    let (entries, next_offset) = read.map_err(|e| error(ErrorCode::BackendError, e.to_string()))?;
    let result = m::LogsResult {
        lines: entries
            .into_iter()
            .map(|e| to_line(&stack, &name, e))
            .collect(),
        next_offset,
    };
    if !p.follow {
        return ok(result);
    }
    // Queue the response before any followed line so the client sees them in order.
    let response = Response::ok(Some(id), result);
    conn.out
        .send(serde_json::to_string(&response).expect("responses serialize"))
        .await
        .map_err(|_| error(ErrorCode::Internal, "connection closed"))?;
    let out = conn.out.clone();
    let task = core.ex.spawn(async move {
        let mut offset = next_offset;
        loop {
            let path2 = path.clone();
            let batch = smol::unblock(move || deployer::logs::read_from(&path2, offset, 1000))
                .await
                .unwrap_or_default();
            if batch.is_empty() {
                smol::Timer::after(FOLLOW_POLL).await;
                continue;
            }
            for e in batch {
                offset = e.offset + 1;
                let msg = LogMessage {
                    id,
                    log: to_line(&stack, &name, e),
                };
                if out
                    .send(serde_json::to_string(&msg).expect("log lines serialize"))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    conn.follows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.0, task);
    Ok(None)
}

/// How long `harness exec` on an SSH host may run.
const REMOTE_EXEC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

async fn exec(
    core: &Arc<Core>,
    conn: &Arc<Conn>,
    id: RequestId,
    p: m::ExecParams,
) -> Result<m::ExecResult, ErrorObject> {
    if p.command.is_empty() {
        return Err(error(ErrorCode::InvalidParams, "command is empty"));
    }
    let env_file = core.env_file(&p.stack, &p.name);
    let (env, cwd, container, remote) = core.read(|st| {
        known_service(st, &p.stack, &p.name)?;
        let place = crate::env::place_of(st, &p.stack, &p.name);
        let env = crate::env::service_env(st, &p.stack, &p.name, &place, &env_file)
            .map_err(|e| error(ErrorCode::InvalidConfig, e))?;
        let target = st
            .stack(&p.stack)
            .map(|r| &r.config.services[&p.name].target);
        let (cwd, container) = match target {
            Some(config::Target::Process(t)) => (t.working_dir.clone(), None),
            Some(config::Target::Docker(_)) => {
                let record = st
                    .service(&p.stack, &p.name)
                    .and_then(crate::containers::record_of)
                    .ok_or_else(|| {
                        error(
                            ErrorCode::InvalidParams,
                            format!("service {} is not running; start it first", p.name),
                        )
                    })?;
                (None, Some(record.container_id))
            }
            Some(config::Target::RemoteLan(_) | config::Target::Wireguard(_)) => {
                let Some(crate::run::Run::Remote(run)) =
                    st.service(&p.stack, &p.name).and_then(crate::run::Run::of)
                else {
                    return Err(error(
                        ErrorCode::InvalidParams,
                        format!(
                            "service {} is not running on its host; start it first",
                            p.name
                        ),
                    ));
                };
                return Ok((env, None, None, Some(run)));
            }
            _ => (None, None),
        };
        Ok::<_, ErrorObject>((env, cwd, container, None))
    })?;
    let (tx, rx) = async_channel::bounded(64);
    let out = conn.out.clone();
    let forward = async move {
        while let Ok(output) = rx.recv().await {
            let msg = OutputMessage { id, output };
            if out
                .send(serde_json::to_string(&msg).expect("output serializes"))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let env: Vec<(String, String)> = env.into_iter().collect();
    let run = async {
        if let Some(run) = &remote {
            // On the service's host, in its run directory with its environment; the
            // output comes when the command ends.
            let ssh = core.ssh_for_run(run)?;
            let command = crate::remote::on_host_command(&run.record.remote_dir, &p.command);
            let out = ssh
                .exec(&command, b"", REMOTE_EXEC_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            for (stream, data) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                if !data.is_empty() {
                    let _ = tx
                        .send(m::ExecOutput {
                            stream: stream.to_owned(),
                            data: String::from_utf8_lossy(data).into_owned(),
                        })
                        .await;
                }
            }
            drop(tx);
            return Ok((Some(out.status), None));
        }
        match container {
            Some(id) => {
                let engine = core.engine_of(&p.stack, &p.name).await?;
                let code = engine.exec(&id, &p.command, &env, tx).await;
                code.map(|c| (c, None)).map_err(|e| e.to_string())
            }
            None => crate::exec::run_streamed(&p.command, &env, cwd.as_deref(), tx).await,
        }
    };
    let (status, ()) = futures_lite::future::zip(run, forward).await;
    let (exit_code, signal) = status.map_err(|e| error(ErrorCode::BackendError, e))?;
    Ok(m::ExecResult { exit_code, signal })
}
