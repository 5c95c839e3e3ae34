//! Starting, stopping and supervising services.
//!
//! `start` launches the requested services and their dependencies: one task per service
//! waits for its dependencies' conditions, takes a slot of the stack's `max_parallel`
//! semaphore, and spawns. `stop` stops dependents before their dependencies. After a
//! launch, an exit watcher applies the restart policy (exponential backoff from 100 ms,
//! doubling up to 30 s, reset once the service is healthy again) and a health monitor
//! keeps `health` current.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deployer::process::{self, ExitStatus, ProcessSpec};
use protocol::config::{
    Condition, PortSpec, RestartPolicy, StackConfig, Target, DEFAULT_CHECK_INTERVAL_MS,
    DEFAULT_CHECK_RETRIES, DEFAULT_CHECK_TIMEOUT_MS, DEFAULT_MAX_PARALLEL, DEFAULT_MAX_RESTARTS,
    DEFAULT_STOP_TIMEOUT_MS, DEFAULT_TIMEOUT_MS,
};
use protocol::events::{EventKind, Exited, Restarting};
use protocol::methods::{Health, ServiceState};

use crate::core::{Changes, Core, State};
use crate::env::Place;
use crate::run::Run;
use crate::{containers, env, health};

/// Why an operation on services failed.
#[derive(Debug, Clone)]
pub enum OpError {
    /// No such stack or service.
    NotFound(String),
    /// A backend this build does not run.
    Unsupported(String),
    /// Services failed; (service, reason) for each.
    Failed(Vec<(String, String)>),
    /// Timed out waiting.
    Timeout(String),
    /// The registry could not be saved.
    Storage(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::NotFound(m) | OpError::Unsupported(m) | OpError::Timeout(m) => f.write_str(m),
            OpError::Storage(m) => write!(f, "cannot save the registry: {m}"),
            OpError::Failed(list) => {
                let parts: Vec<String> = list.iter().map(|(s, r)| format!("{s}: {r}")).collect();
                write!(f, "{}", parts.join("; "))
            }
        }
    }
}

/// Size at which a service's log file is rotated.
const LOG_MAX_BYTES: u64 = 10 << 20;
/// Rotated log files kept per service.
const LOG_KEEP: usize = 3;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service without a health check counts as recovered after running this long.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Restart attempt `attempt` of a service whose run ended (`how`, for the reason when it
/// gives up): marks it failed past `max`, else counts the attempt, says so
/// (`service.restarting`, and Starting "restarting {why}"), and returns the backoff to
/// wait and the generation of the new run.
#[allow(clippy::too_many_arguments)]
fn schedule_restart(
    st: &mut State,
    ch: &mut Changes,
    stack: &str,
    name: &str,
    attempt: u32,
    max: u32,
    how: &str,
    why: &str,
) -> Option<(Duration, u64)> {
    if attempt > max {
        let reason = format!("{how}; gave up after {max} restarts");
        ch.set_state(st, stack, name, ServiceState::Failed, Some(reason));
        return None;
    }
    st.service_mut(stack, name)?.restarts = attempt;
    let wait = backoff(attempt);
    ch.push(EventKind::ServiceRestarting(Restarting {
        stack: stack.to_owned(),
        name: name.to_owned(),
        attempt,
        backoff_ms: wait.as_millis() as u64,
    }));
    let generation = {
        let rt = st.runtime(stack, name);
        rt.generation += 1;
        rt.generation
    };
    ch.set_state(
        st,
        stack,
        name,
        ServiceState::Starting,
        Some(format!("restarting {why}")),
    );
    Some((wait, generation))
}

/// Backoff before restart `attempt` (from 1).
pub fn backoff(attempt: u32) -> Duration {
    BACKOFF_START
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

/// The services of `names` (all when empty) plus everything they depend on, in start
/// order.
fn with_dependencies(config: &StackConfig, names: &[String]) -> Result<Vec<String>, OpError> {
    let mut wanted = BTreeSet::new();
    let mut todo: Vec<String> = if names.is_empty() {
        config.services.keys().cloned().collect()
    } else {
        protocol::config::expand_names(config, names)
    };
    while let Some(n) = todo.pop() {
        let svc = config
            .services
            .get(&n)
            .ok_or_else(|| OpError::NotFound(not_found_message(config, &n)))?;
        if wanted.insert(n.clone()) {
            todo.extend(svc.depends_on.keys().cloned());
        }
    }
    Ok(protocol::config::start_order(config)
        .into_iter()
        .filter(|n| wanted.contains(n))
        .collect())
}

/// The services of `names` (all when empty) plus everything that depends on them, in
/// stop order (dependents first).
fn with_dependents(config: &StackConfig, names: &[String]) -> Result<Vec<String>, OpError> {
    let names = &protocol::config::expand_names(config, names);
    for n in names {
        if !config.services.contains_key(n) {
            return Err(OpError::NotFound(not_found_message(config, n)));
        }
    }
    let mut wanted: BTreeSet<String> = if names.is_empty() {
        config.services.keys().cloned().collect()
    } else {
        names.iter().cloned().collect()
    };
    loop {
        let more: Vec<String> = config
            .services
            .iter()
            .filter(|(n, s)| {
                !wanted.contains(*n) && s.depends_on.keys().any(|d| wanted.contains(d))
            })
            .map(|(n, _)| n.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        wanted.extend(more);
    }
    let mut order: Vec<String> = protocol::config::start_order(config)
        .into_iter()
        .filter(|n| wanted.contains(n))
        .collect();
    order.reverse();
    Ok(order)
}

/// "no service named X in stack S (did you mean Y?)".
pub fn not_found_message(config: &StackConfig, name: &str) -> String {
    let stack = config.name.as_deref().unwrap_or("this stack");
    match protocol::config::did_you_mean(name, config.services.keys().map(String::as_str)) {
        Some(s) => format!("no service named {name} in {stack} (did you mean {s}?)"),
        None => format!("no service named {name} in {stack}"),
    }
}

/// The condition a dependent waits for on `dep`.
fn condition_for(config: &StackConfig, dependent: &str, dep: &str) -> Condition {
    let explicit = config.services[dependent].depends_on[dep].condition;
    explicit.unwrap_or(if config.services[dep].health_check.is_some() {
        Condition::Healthy
    } else {
        Condition::Started
    })
}

enum Check {
    Met,
    Pending,
    Broken(String),
}

fn check_condition(st: &State, stack: &str, dep: &str, cond: Condition) -> Check {
    let Some(rec) = st.service(stack, dep) else {
        return Check::Broken(format!("dependency {dep} was removed"));
    };
    match (rec.state, cond) {
        (ServiceState::Failed, _) => Check::Broken(format!(
            "dependency {dep} failed: {}",
            rec.reason.as_deref().unwrap_or("unknown reason")
        )),
        (ServiceState::Running, Condition::Started) => Check::Met,
        (ServiceState::Running, Condition::Healthy) if rec.health == Health::Healthy => Check::Met,
        (ServiceState::Stopped, Condition::Completed) if rec.exit_code == Some(0) => Check::Met,
        (ServiceState::Stopped, Condition::Completed) => Check::Broken(format!(
            "dependency {dep} did not complete successfully (exit code {:?})",
            rec.exit_code
        )),
        (ServiceState::Starting | ServiceState::Running, _) => Check::Pending,
        (state, _) => Check::Broken(format!("dependency {dep} is {state:?}").to_lowercase()),
    }
}

/// Waits until `check` says met or broken, re-checking whenever an event about service
/// `name` of `stack` is published.
async fn wait_until(
    core: &Core,
    stack: &str,
    name: &str,
    mut check: impl FnMut(&State) -> Check,
) -> Result<(), String> {
    let watcher = core.watcher(stack, name);
    loop {
        let listener = watcher.listen();
        match core.read(&mut check) {
            Check::Met => return Ok(()),
            Check::Broken(reason) => return Err(reason),
            Check::Pending => listener.await,
        }
    }
}

/// Whether a service reached what `start` waits for: healthy when it has a check,
/// running otherwise, stopped with code 0 for one-shot jobs.
fn check_ready(st: &State, stack: &str, name: &str) -> Check {
    let Some(stack_rec) = st.stack(stack) else {
        return Check::Broken("stack was removed".into());
    };
    let Some(rec) = stack_rec.services.get(name) else {
        return Check::Broken("service was removed".into());
    };
    match rec.state {
        ServiceState::Running if !has_check(stack_rec, name) || rec.health == Health::Healthy => {
            Check::Met
        }
        ServiceState::Stopped if rec.exit_code == Some(0) => Check::Met,
        ServiceState::Starting | ServiceState::Running => Check::Pending,
        ServiceState::Failed => {
            Check::Broken(rec.reason.clone().unwrap_or_else(|| "failed".into()))
        }
        other => Check::Broken(format!("{other:?}").to_lowercase()),
    }
}

/// Whether a service is checked: by its own check, or (without one) by its deployed
/// package's health.sh, or as a discovered service by its protocol.
fn has_check(stack_rec: &registry::StackRecord, name: &str) -> bool {
    let run = stack_rec.services.get(name).and_then(Run::of);
    stack_rec.config.services[name].health_check.is_some()
        || matches!(&run, Some(Run::Remote(r)) if r.health_script.is_some())
        || matches!(run, Some(Run::Discovered(_)))
}

impl Core {
    /// Starts services and their dependencies; returns once all of them are ready
    /// (healthy, or running when they have no check) or one failed.
    /// `limit` caps how many start at once for this call (`deploy --max-concurrent`);
    /// the stack's `max_parallel` otherwise.
    pub async fn start_services(
        self: &Arc<Self>,
        stack: &str,
        names: &[String],
        limit: Option<usize>,
    ) -> Result<Vec<String>, OpError> {
        let (order, timeout, max_parallel) = self.read(|st| {
            let rec = st
                .stack(stack)
                .ok_or_else(|| OpError::NotFound(format!("no stack named {stack}")))?;
            let order = with_dependencies(&rec.config, names)?;
            for n in &order {
                let target = &rec.config.services[n].target;
                if !matches!(
                    target,
                    Target::Process(_)
                        | Target::Docker(_)
                        | Target::External(_)
                        | Target::Discovered(_)
                        | Target::RemoteLan(_)
                        | Target::Wireguard(_)
                ) {
                    return Err(OpError::Unsupported(format!(
                        "service {n}: the {} backend is not available in this build yet; use a process, docker, remote_lan, wireguard, discovered or external target",
                        target.backend()
                    )));
                }
            }
            let settings = &rec.config.settings;
            Ok((
                order,
                Duration::from_millis(settings.default_timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)),
                settings.max_parallel.unwrap_or(DEFAULT_MAX_PARALLEL).max(1),
            ))
        })?;
        let sem = match limit {
            Some(n) => Arc::new(async_lock::Semaphore::new(n.max(1))),
            None => self
                .semaphores
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(stack.to_owned())
                .or_insert_with(|| Arc::new(async_lock::Semaphore::new(max_parallel)))
                .clone(),
        };
        // 1. Record the intent (state `starting`, ports assigned) before spawning
        //    anything, for the services not already active. Choosing them under the
        //    same lock as marking them: two starts at once (two `up`s racing) must not
        //    both launch a service, or the second run's record hides the first's.
        let to_launch: Vec<(String, u64)> = self.update(|st, ch| {
            let inactive: Vec<String> = st.stack(stack).map_or_else(Vec::new, |rec| {
                order
                    .iter()
                    .filter(|n| rec.services.get(*n).is_some_and(|s| !s.state.is_active()))
                    .cloned()
                    .collect()
            });
            let mut launches = Vec::with_capacity(inactive.len());
            for n in inactive {
                // A start from a client tries the placement list from its first target.
                if let Some(cfg) = st
                    .stack_mut(stack)
                    .and_then(|r| r.config.services.get_mut(&n))
                {
                    if let Some(first) = cfg.placement.first() {
                        cfg.target = first.clone();
                    }
                }
                st.runtime(stack, &n).healthy_once = false;
                assign_port(st, stack, &n);
                if let Some(rec) = st.service_mut(stack, &n) {
                    rec.restarts = 0;
                    rec.exit_code = None;
                }
                let runtime = st.runtime(stack, &n);
                runtime.generation += 1;
                let generation = runtime.generation;
                ch.set_state(st, stack, &n, ServiceState::Starting, None);
                launches.push((n, generation));
            }
            launches
        });
        self.commit().await.map_err(OpError::Storage)?;
        // 2. One task per service: wait for dependencies, then launch.
        for (name, generation) in to_launch {
            let core = self.clone();
            let (stack, sem) = (stack.to_owned(), sem.clone());
            self.ex
                .spawn(async move {
                    core.launch_when_ready(&stack, &name, generation, &sem)
                        .await
                })
                .detach();
        }
        // 3. Wait until everything is ready or something failed.
        let deadline = Instant::now() + timeout;
        let mut failed = Vec::new();
        for n in &order {
            let wait = wait_until(self, stack, n, |st| check_ready(st, stack, n));
            let timer = async {
                smol::Timer::at(deadline).await;
                Err(format!("not ready after {} s", timeout.as_secs()))
            };
            if let Err(reason) = smol::future::or(wait, timer).await {
                failed.push((n.clone(), reason));
            }
        }
        // What `start` reports is on disk before the client hears it.
        self.commit().await.map_err(OpError::Storage)?;
        if failed.is_empty() {
            Ok(order)
        } else {
            Err(OpError::Failed(failed))
        }
    }

    /// Waits for `name`'s dependencies, then launches run `generation` of it (none when
    /// a newer start or a stop came meanwhile).
    async fn launch_when_ready(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
        generation: u64,
        sem: &async_lock::Semaphore,
    ) {
        let deps: Vec<(String, Condition)> = self.read(|st| {
            st.stack(stack).map_or_else(Vec::new, |r| {
                r.config.services[name]
                    .depends_on
                    .keys()
                    .map(|d| (d.clone(), condition_for(&r.config, name, d)))
                    .collect()
            })
        });
        for (dep, cond) in deps {
            if let Err(reason) = wait_until(self, stack, &dep, |st| {
                check_condition(st, stack, &dep, cond)
            })
            .await
            {
                self.update(|st, ch| {
                    if current(st, stack, name, generation) {
                        ch.set_state(st, stack, name, ServiceState::Failed, Some(reason));
                    }
                });
                return;
            }
        }
        let _permit = sem.acquire().await;
        self.launch(stack, name, generation).await;
    }

    /// Starts one run of a service and starts its watcher and health monitor.
    async fn launch(self: &Arc<Self>, stack: &str, name: &str, generation: u64) {
        let Some(target) = self.read(|st| {
            st.stack(stack)
                .and_then(|r| r.config.services.get(name))
                .filter(|_| current(st, stack, name, generation))
                .map(|s| s.target.clone())
        }) else {
            return;
        };
        let (is_container, is_remote) = (
            matches!(target, Target::Docker(_)),
            matches!(target, Target::RemoteLan(_) | Target::Wireguard(_)),
        );
        match &target {
            Target::External(_) => return self.use_running(stack, name, generation, None),
            Target::Discovered(t) => {
                return match self.discover_for(stack, name, t).await {
                    Ok(found) => self.use_running(stack, name, generation, Some(found)),
                    Err(reason) => self.fail(stack, name, generation, reason),
                };
            }
            _ => {}
        }
        if let Some(reused_at) = self.already_running(stack, name).await {
            let reused = Run::Reused(crate::run::ReusedRecord { reused_at });
            return self.use_running(stack, name, generation, Some(reused));
        }
        // The run, and a note on how it was started when that is news (a rollback).
        let started = if is_container {
            self.launch_container(stack, name)
                .await
                .map(|(record, _)| (Run::Container(record), None))
        } else if is_remote {
            self.launch_remote(stack, name)
                .await
                .map(|(run, note)| (Run::Remote(run), note))
        } else {
            self.launch_process(stack, name)
                .await
                .map(|p| (Run::Process(p), None))
        };
        let (run, note) = match started {
            Ok(started) => started,
            Err(reason) => return self.fail(stack, name, generation, reason),
        };
        let started = Instant::now();
        let still_wanted = self.update(|st, ch| {
            if !current(st, stack, name, generation) {
                return false;
            }
            if let Some(rec) = st.service_mut(stack, name) {
                rec.process = run.to_value();
            }
            ch.set_state(st, stack, name, ServiceState::Running, note);
            true
        });
        if !still_wanted {
            // Stopped or removed while it was being started: nobody else knows this
            // run, so end it here rather than leave it running unrecorded.
            let timeout = Duration::from_millis(DEFAULT_STOP_TIMEOUT_MS);
            let _ = run.stop(self, stack, "TERM", timeout).await;
            return;
        }
        self.supervise(stack, name, generation, run, started);
    }

    /// Where a `discovered` service runs now: a search of its ranges (else the stack's
    /// `discovery.ranges`) on its ports (else its fixed port, else the kind's usual one).
    async fn discover_for(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
        target: &protocol::config::DiscoveredTarget,
    ) -> Result<Run, String> {
        let (ranges, ports, timeout) = self.read(|st| {
            let rec = st.stack(stack);
            let settings = rec.map(|r| &r.config.discovery);
            let ranges = if target.ranges.is_empty() {
                settings.map(|d| d.ranges.clone()).unwrap_or_default()
            } else {
                target.ranges.clone()
            };
            let fixed = rec
                .and_then(|r| r.config.services.get(name))
                .and_then(|s| match s.port {
                    Some(protocol::config::PortSpec::Fixed(p)) => Some(p),
                    _ => None,
                });
            let ports = if target.ports.is_empty() {
                fixed.into_iter().collect()
            } else {
                target.ports.clone()
            };
            let timeout = settings
                .and_then(|d| d.tcp_timeout_ms)
                .unwrap_or(protocol::config::DEFAULT_TCP_TIMEOUT_MS);
            (ranges, ports, Duration::from_millis(timeout))
        });
        let found = crate::discovery::find(&target.kind, &ranges, &ports, timeout).await?;
        Ok(Run::Discovered(crate::run::DiscoveredRecord {
            discovered_at: found.address,
            detail: found.detail,
        }))
    }

    /// A service that runs already: an external one (`found` is `None`), an instance
    /// found by `reuse_if_running`, or one found by discovery. It is only
    /// health-checked, never started or stopped by the harness.
    pub fn use_running(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
        generation: u64,
        found: Option<Run>,
    ) {
        let running = self.update(|st, ch| {
            if !current(st, stack, name, generation) {
                return false;
            }
            let reason = match &found {
                Some(Run::Reused(r)) => Some(format!(
                    "reused the healthy instance that already answers ({})",
                    r.reused_at
                )),
                Some(Run::Discovered(d)) => Some(match &d.detail {
                    Some(detail) => format!("discovered at {} ({detail})", d.discovered_at),
                    None => format!("discovered at {}", d.discovered_at),
                }),
                _ => None,
            };
            if let Some(rec) = st.service_mut(stack, name) {
                rec.process = found.as_ref().and_then(Run::to_value);
            }
            ch.set_state(st, stack, name, ServiceState::Running, reason);
            true
        });
        if running {
            let (core, stack2, name2) = (self.clone(), stack.to_owned(), name.to_owned());
            let monitor = self
                .ex
                .spawn(async move { health::monitor(core, stack2, name2, generation).await });
            let mut tasks = vec![monitor];
            tasks.extend(self.placement_watchdog(stack, name, generation));
            self.update(|st, _| {
                if current(st, stack, name, generation) {
                    st.runtime(stack, name).tasks = tasks;
                }
            });
        }
    }

    /// For a service with `reuse_if_running`: the address where a healthy instance
    /// already answers, so it need not be started; `None` otherwise.
    async fn already_running(self: &Arc<Self>, stack: &str, name: &str) -> Option<String> {
        let env_file = self.env_file(stack, name);
        let (probe, timeout) = self.read(|st| {
            let stack_rec = st.stack(stack)?;
            let cfg = stack_rec.config.services.get(name)?;
            if !cfg.reuse_if_running {
                return None;
            }
            let port = stack_rec.services.get(name)?.port?;
            match health::probe_for(st, stack, name, &env_file) {
                Ok(Some((probe, hc))) => Some((
                    probe,
                    Duration::from_millis(hc.timeout_ms.unwrap_or(DEFAULT_CHECK_TIMEOUT_MS)),
                )),
                _ => Some((
                    health::Probe::Tcp(format!("127.0.0.1:{port}")),
                    Duration::from_millis(DEFAULT_CHECK_TIMEOUT_MS),
                )),
            }
        })?;
        probe.run(self, timeout).await.ok()?;
        Some(probe.describe())
    }

    /// Spawns a service's process under its shim.
    async fn launch_process(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
    ) -> Result<process::ProcessRecord, String> {
        let (mut spec, harness_env) = self.read(|st| self.process_spec(st, stack, name))?;
        // Written by the shim, which writes its run's other files: here it cost a hop
        // to a blocking thread on the path of every start, a millisecond or more of
        // waiting while a stack comes up.
        spec.private_files.push(process::PrivateFile {
            path: self.env_file(stack, name),
            text: env::render_env_file(&harness_env),
        });
        process::spawn(&spec, &self.shims)
            .await
            .map_err(|e| e.to_string())
    }

    /// Starts the exit watcher and the health monitor of a run (and, for a container,
    /// the copier of its output into the service's log).
    pub fn supervise(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
        generation: u64,
        run: Run,
        started: Instant,
    ) {
        let mut tasks = Vec::new();
        if let Run::Container(c) = &run {
            let (core, id, log) = (
                self.clone(),
                c.container_id.clone(),
                self.log_path(stack, name),
            );
            let (stack, name, host) = (stack.to_owned(), name.to_owned(), c.engine_host.clone());
            tasks.push(self.ex.spawn(async move {
                // Until the container's output ends; a copy cut short by the engine's
                // connection resumes after the newest line it wrote (while this run is
                // the service's).
                let ours = |st: &State| {
                    current(st, &stack, &name, generation)
                        && st
                            .service(&stack, &name)
                            .and_then(containers::record_of)
                            .is_some_and(|r| r.container_id == id)
                };
                while core.read(ours) {
                    let copied = match core.engine_for(&stack, host.as_deref()).await {
                        Ok(engine) => engine.copy_logs(&id, &log, LOG_MAX_BYTES, LOG_KEEP).await,
                        Err(e) => Err(deployer::DeployError::NoEngine {
                            host: host.clone().unwrap_or_default(),
                            detail: e,
                        }),
                    };
                    match copied {
                        Ok(()) => break,
                        Err(e) => tracing::warn!("{e}; copying again"),
                    }
                    smol::Timer::after(Duration::from_secs(1)).await;
                }
            }));
        }
        if let Run::Remote(r) = &run {
            let (core, r, log) = (self.clone(), r.clone(), self.log_path(stack, name));
            tasks.push(self.ex.spawn(async move {
                let copied = match core.ssh_for_run(&r) {
                    Ok(ssh) => {
                        deployer::remote::copy_logs(&ssh, &r.record, &log, LOG_MAX_BYTES, LOG_KEEP)
                            .await
                    }
                    Err(_) => Ok(()),
                };
                if let Err(e) = copied {
                    tracing::warn!("{e}");
                }
            }));
        }
        let (core, stack2, name2) = (self.clone(), stack.to_owned(), name.to_owned());
        tasks.push(self.ex.spawn(async move {
            let status = run.wait_exit(&core, &stack2).await;
            core.on_exit(&stack2, &name2, generation, status, started);
        }));
        let (core, stack2, name2) = (self.clone(), stack.to_owned(), name.to_owned());
        tasks.push(
            self.ex
                .spawn(async move { health::monitor(core, stack2, name2, generation).await }),
        );
        tasks.extend(self.placement_watchdog(stack, name, generation));
        self.update(|st, _| {
            if current(st, stack, name, generation) {
                st.runtime(stack, name).tasks = tasks;
            }
        });
    }

    /// A run could not be had: the service moves on to its next placement target, or
    /// (without one) fails with `reason`.
    fn fail(self: &Arc<Self>, stack: &str, name: &str, generation: u64, reason: String) {
        tracing::warn!("{stack}/{name}: {reason}");
        if self.fall_back(stack, name, generation, &reason) {
            return;
        }
        let restart = self.update(|st, ch| {
            if !current(st, stack, name, generation) {
                return None;
            }
            // A restart its policy asked for that could not start (its engine or host
            // is not back yet, say) is one more failed attempt, tried again after the
            // next backoff; a first start fails at once, with the reason.
            let cfg = &st.stack(stack)?.config.services[name];
            let (policy, max) = (
                cfg.restart.policy,
                cfg.restart.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS),
            );
            let restarts = st.service(stack, name).map_or(0, |r| r.restarts);
            if restarts == 0 || policy == RestartPolicy::No {
                ch.set_state(st, stack, name, ServiceState::Failed, Some(reason));
                return None;
            }
            let how = format!("could not start again ({reason})");
            let why = format!("after its last start failed ({reason})");
            schedule_restart(st, ch, stack, name, restarts + 1, max, &how, &why)
        });
        if let Some((wait, generation)) = restart {
            self.relaunch_after(stack, name, wait, generation);
        }
    }

    /// Gives up the target a service with a placement list runs on, when it has not
    /// been healthy there, and launches the next one (a `service.fallback` event says
    /// why). Returns false when there is no next target or the service was healthy.
    fn fall_back(self: &Arc<Self>, stack: &str, name: &str, generation: u64, reason: &str) -> bool {
        let next = self.update(|st, ch| {
            if !current(st, stack, name, generation) || st.runtime(stack, name).healthy_once {
                return None;
            }
            let cfg = st.stack_mut(stack)?.config.services.get_mut(name)?;
            let position = cfg.placement_position()? + 1;
            let next = cfg.placement.get(position)?.clone();
            let from = cfg.target.backend();
            cfg.target = next.clone();
            let total = cfg.placement.len();
            let run = st.service_mut(stack, name).and_then(|rec| {
                let run = Run::of(rec);
                rec.process = None;
                run
            });
            assign_port(st, stack, name);
            let rt = st.runtime(stack, name);
            rt.generation += 1;
            // Cancels the watcher, health monitor and watchdog of the target given up.
            rt.tasks.clear();
            let generation = rt.generation;
            ch.push(EventKind::ServiceFallback(protocol::events::Fallback {
                stack: stack.to_owned(),
                name: name.to_owned(),
                from: from.to_owned(),
                to: next.backend().to_owned(),
                position: position + 1,
                reason: reason.to_owned(),
            }));
            let note = format!(
                "{from} target given up ({reason}); trying target {} of {total} ({})",
                position + 1,
                next.backend()
            );
            ch.set_state(st, stack, name, ServiceState::Starting, Some(note));
            Some((generation, run))
        });
        let Some((generation, run)) = next else {
            return false;
        };
        let (core, stack2, name2) = (self.clone(), stack.to_owned(), name.to_owned());
        let task = self.ex.spawn(async move {
            if let Some(run) = run.filter(|r| !r.is_borrowed()) {
                let timeout = Duration::from_millis(DEFAULT_STOP_TIMEOUT_MS);
                let _ = run.stop(&core, &stack2, "TERM", timeout).await;
            }
            core.launch(&stack2, &name2, generation).await;
        });
        self.update(|st, _| {
            if current(st, stack, name, generation) {
                st.runtime(stack, name).tasks = vec![task];
            } else {
                task.detach();
            }
        });
        true
    }

    /// For a service with a later placement target: a task that gives the current one
    /// up when it is not healthy within its check's start period plus `retries`
    /// intervals (the window after which a check would call it unhealthy).
    fn placement_watchdog(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
        generation: u64,
    ) -> Option<smol::Task<()>> {
        let window = self.update(|st, _| {
            let stack_rec = st.stack(stack)?;
            let cfg = stack_rec.config.services.get(name)?;
            let position = cfg.placement_position()?;
            cfg.placement.get(position + 1)?;
            if !has_check(stack_rec, name) {
                // Nothing will ever call it healthy: running is as good as it gets.
                st.runtime(stack, name).healthy_once = true;
                return None;
            }
            let cfg = &st.stack(stack)?.config.services[name];
            let hc = cfg.health_check.as_ref();
            let interval = hc
                .and_then(|h| h.interval_ms)
                .unwrap_or(DEFAULT_CHECK_INTERVAL_MS);
            let retries = hc
                .and_then(|h| h.retries)
                .unwrap_or(DEFAULT_CHECK_RETRIES)
                .max(1);
            let start = hc.and_then(|h| h.start_period_ms).unwrap_or(0);
            Some(Duration::from_millis(start + interval * u64::from(retries)))
        })?;
        let (core, stack, name) = (self.clone(), stack.to_owned(), name.to_owned());
        Some(self.ex.spawn(async move {
            smol::Timer::after(window).await;
            let reason = format!("not healthy within {}", humantime::format_duration(window));
            core.fall_back(&stack, &name, generation, &reason);
        }))
    }

    /// A run ended on its own: record it and apply the restart policy.
    fn on_exit(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
        generation: u64,
        status: ExitStatus,
        started: Instant,
    ) {
        let before_healthy = format!("it {} before it was healthy", describe_exit(&status));
        if self.fall_back(stack, name, generation, &before_healthy) {
            return;
        }
        let restart = self.update(|st, ch| {
            if !current(st, stack, name, generation) {
                return None;
            }
            let (policy, max) = {
                let cfg = &st.stack(stack)?.config.services[name];
                (
                    cfg.restart.policy,
                    cfg.restart.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS),
                )
            };
            let has_check = st.stack(stack)?.config.services[name]
                .health_check
                .is_some();
            let rec = st.service_mut(stack, name)?;
            rec.process = None;
            rec.exit_code = status.code;
            if !has_check && started.elapsed() >= STABLE_AFTER {
                rec.restarts = 0;
            }
            let attempt = rec.restarts + 1;
            ch.push(EventKind::ServiceExited(Exited {
                stack: stack.to_owned(),
                name: name.to_owned(),
                code: status.code,
                signal: status.signal,
            }));
            let how = describe_exit(&status);
            let success = status.code == Some(0);
            let wants_restart = match policy {
                RestartPolicy::No => false,
                RestartPolicy::OnFailure => !success,
                RestartPolicy::Always => true,
            };
            if !wants_restart {
                let (to, reason) = if success {
                    (ServiceState::Stopped, how)
                } else {
                    (ServiceState::Failed, how)
                };
                ch.set_state(st, stack, name, to, Some(reason));
                return None;
            }
            schedule_restart(
                st,
                ch,
                stack,
                name,
                attempt,
                max,
                &how,
                &format!("after it {how}"),
            )
        });
        if let Some((wait, generation)) = restart {
            self.relaunch_after(stack, name, wait, generation);
        }
    }

    /// Launches a service again after `wait` (a restart its policy asked for).
    fn relaunch_after(self: &Arc<Self>, stack: &str, name: &str, wait: Duration, generation: u64) {
        let (core, stack2, name2) = (self.clone(), stack.to_owned(), name.to_owned());
        let task = self.ex.spawn(async move {
            smol::Timer::after(wait).await;
            core.launch(&stack2, &name2, generation).await;
        });
        self.update(|st, _| {
            if current(st, stack, name, generation) {
                st.runtime(stack, name).tasks = vec![task];
            }
        });
    }

    /// Stops services and everything depending on them, dependents first.
    pub async fn stop_services(
        self: &Arc<Self>,
        stack: &str,
        names: &[String],
    ) -> Result<Vec<String>, OpError> {
        let order = self.read(|st| {
            let rec = st
                .stack(stack)
                .ok_or_else(|| OpError::NotFound(format!("no stack named {stack}")))?;
            with_dependents(&rec.config, names)
        })?;
        // Stop in waves: a service is stopped once no active service depends on it.
        let deps: HashMap<String, Vec<String>> = self.read(|st| {
            st.stack(stack).map_or_else(HashMap::new, |r| {
                r.config
                    .services
                    .iter()
                    .map(|(n, s)| (n.clone(), s.depends_on.keys().cloned().collect()))
                    .collect()
            })
        });
        let mut remaining = order.clone();
        while !remaining.is_empty() {
            let wave: Vec<String> = remaining
                .iter()
                .filter(|n| {
                    !remaining
                        .iter()
                        .any(|m| deps.get(m).is_some_and(|d| d.contains(n)))
                })
                .cloned()
                .collect();
            let wave = if wave.is_empty() {
                remaining.clone()
            } else {
                wave
            };
            let stops: Vec<_> = wave
                .iter()
                .map(|n| {
                    let (core, stack, n) = (self.clone(), stack.to_owned(), n.clone());
                    self.ex
                        .spawn(async move { core.stop_one(&stack, &n).await })
                })
                .collect();
            for t in stops {
                t.await;
            }
            remaining.retain(|n| !wave.contains(n));
        }
        // A stop is on disk before the client hears of it: a daemon killed right after
        // must not find the service "running", see it gone and restart it by policy.
        self.commit().await.map_err(OpError::Storage)?;
        Ok(order)
    }

    /// Stops one service (no-op when it is not running).
    pub async fn stop_one(self: &Arc<Self>, stack: &str, name: &str) {
        let plan = self.update(|st, ch| {
            let rec = st.service(stack, name)?;
            if !rec.state.is_active() {
                return None;
            }
            let record = Run::of(rec);
            let cfg = &st.stack(stack)?.config.services[name];
            let signal = cfg.stop_signal.clone().unwrap_or_else(|| "TERM".into());
            let timeout =
                Duration::from_millis(cfg.stop_timeout_ms.unwrap_or(DEFAULT_STOP_TIMEOUT_MS));
            let rt = st.runtime(stack, name);
            // Cancels the watcher, health monitor and any pending restart.
            rt.generation += 1;
            rt.tasks.clear();
            ch.set_state(st, stack, name, ServiceState::Stopping, None);
            Some((record, signal, timeout))
        });
        let Some((record, signal, timeout)) = plan else {
            return;
        };
        let status = match &record {
            Some(r) => r.stop(self, stack, &signal, timeout).await,
            None => None,
        };
        self.update(|st, ch| {
            if let Some(rec) = st.service_mut(stack, name) {
                rec.process = None;
                if let Some(s) = &status {
                    rec.exit_code = s.code;
                    ch.push(EventKind::ServiceExited(Exited {
                        stack: stack.to_owned(),
                        name: name.to_owned(),
                        code: s.code,
                        signal: s.signal,
                    }));
                }
            }
            ch.set_state(st, stack, name, ServiceState::Stopped, None);
        });
    }

    /// The spec the process backend runs for a service, and the variables the harness
    /// sets (for the service's env file).
    fn process_spec(
        &self,
        st: &State,
        stack: &str,
        name: &str,
    ) -> Result<(ProcessSpec, BTreeMap<String, String>), String> {
        let cfg = &st.stack(stack).ok_or("stack was removed")?.config.services[name];
        let Target::Process(target) = &cfg.target else {
            return Err(format!(
                "the {} backend is not available in this build",
                cfg.target.backend()
            ));
        };
        let run_dir = self.run_dir(stack, name);
        let harness_env =
            env::service_env(st, stack, name, &Place::Host, &self.env_file(stack, name))?;
        let mut full_env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| !k.starts_with("HARNESS_"))
            .collect();
        full_env.extend(harness_env.clone());
        let args = target
            .args
            .iter()
            .map(|a| env::expand(st, stack, name, &Place::Host, a))
            .collect::<Result<Vec<_>, _>>()?;
        let spec = ProcessSpec {
            instance: format!("{}/{stack}/{name}", self.instance),
            binary: env::expand(st, stack, name, &Place::Host, &target.binary)?,
            args,
            env: full_env,
            working_dir: PathBuf::from(target.working_dir.clone().unwrap_or_else(|| "/".into())),
            run_dir,
            log_path: self.log_path(stack, name),
            log_max_bytes: LOG_MAX_BYTES,
            log_keep: LOG_KEEP,
            private_files: Vec::new(),
        };
        Ok((spec, harness_env))
    }

    /// Run directory of a service (its shim's pid and exit files, env file).
    pub fn run_dir(&self, stack: &str, name: &str) -> PathBuf {
        self.state_dir.join("run").join(stack).join(name)
    }

    /// Empties the env files of a stack that is gone (they may hold secrets) but
    /// keeps its run directories, whose files the next `up` overwrites in place: on
    /// ext4, creating files soon after deleting many costs milliseconds each, which
    /// was most of the daemon's work in an `up` after a `down`. What no stack uses
    /// goes when the daemon starts ([`prune_run_dirs`]).
    pub async fn retire_run_dirs(&self, stack: &str) {
        let dir = self.state_dir.join("run").join(stack);
        smol::unblock(move || {
            for service in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let env_file = service.path().join(ENV_FILE);
                // Truncated in place, and only if it exists: no inode is made or freed.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(env_file);
            }
        })
        .await
    }

    /// The env file of a service (in its run directory) that it can `source`.
    pub fn env_file(&self, stack: &str, name: &str) -> PathBuf {
        self.run_dir(stack, name).join(ENV_FILE)
    }

    /// Log file of a service.
    pub fn log_path(&self, stack: &str, name: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(stack)
            .join(format!("{name}.log"))
    }
}

/// A service's env file, in its run directory.
const ENV_FILE: &str = "service.env";

/// Removes the run directories of stacks and services the registry no longer has, and
/// what older versions left in the others (at start, before anything runs):
/// housekeeping, logged, not a fix.
async fn prune_run_dirs(core: &Core) {
    let known: HashMap<String, Vec<String>> = core.read(|st| {
        st.snap
            .stacks
            .iter()
            .map(|(stack, r)| (stack.clone(), r.services.keys().cloned().collect()))
            .collect()
    });
    let run = core.state_dir.join("run");
    smol::unblock(move || {
        let entries = |dir: &std::path::Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                .collect()
        };
        for (stack, path) in entries(&run) {
            let mut stale = Vec::new();
            match known.get(&stack) {
                None => stale.push(path),
                Some(services) => {
                    for (name, dir) in entries(&path) {
                        if services.contains(&name) {
                            process::remove_legacy_files(&dir);
                        } else {
                            stale.push(dir);
                        }
                    }
                }
            }
            for dir in stale {
                if std::fs::remove_dir_all(&dir).is_ok() {
                    tracing::debug!("removed the unused run directory {}", dir.display());
                }
            }
        }
    })
    .await
}

fn key(stack: &str, name: &str) -> (String, String) {
    (stack.to_owned(), name.to_owned())
}

/// Whether `generation` is still the service's current run.
fn current(st: &State, stack: &str, name: &str, generation: u64) -> bool {
    st.runtime
        .get(&key(stack, name))
        .is_some_and(|r| r.generation == generation)
}

/// Gives a service its port: the fixed one, the one it had, or a free one.
pub(crate) fn assign_port(st: &mut State, stack: &str, name: &str) {
    let Some(cfg) = st.stack(stack).map(|r| r.config.services[name].clone()) else {
        return;
    };
    let Some(rec) = st.service_mut(stack, name) else {
        return;
    };
    rec.port = match (&cfg.target, cfg.port) {
        // A container is reached at the host port its main port is published on.
        (Target::Docker(_), _) => containers::main_host_port(&cfg, rec.port),
        (Target::External(t), _) => t.host_port().map(|(_, port)| port),
        (_, Some(PortSpec::Fixed(p))) => Some(p),
        (_, Some(PortSpec::Auto)) => rec.port.or_else(free_port),
        (_, None) => return,
    };
}

/// A port nobody listens on right now.
pub fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()
}

/// "exited with code 3", "was killed by signal 9", or the spawn error.
pub fn describe_exit(status: &ExitStatus) -> String {
    match (&status.error, status.code, status.signal) {
        (Some(e), _, _) => e.clone(),
        (None, Some(c), _) => format!("exited with code {c}"),
        (None, None, Some(s)) => format!("was killed by signal {s}"),
        (None, None, None) => "exited".to_owned(),
    }
}

/// What the reconcile pass found of a service's last run.
enum Found {
    /// It still runs.
    Alive(Box<Run>),
    /// It ended while the daemon was down.
    Exited(ExitStatus),
    /// Nothing of it is left; why.
    Gone(String),
}

/// Looks for the run of an active service: its recorded run, or (after a crash
/// between starting it and saving the record) the record its shim wrote or the
/// container of its name.
async fn find_run(core: &Arc<Core>, stack: &str, name: &str, recorded: Option<Run>) -> Found {
    if let Some(Run::Remote(r)) = recorded {
        return find_remote(core, r).await;
    }
    let is_container = core.read(|st| {
        st.stack(stack)
            .and_then(|r| r.config.services.get(name))
            .is_some_and(|s| matches!(s.target, Target::Docker(_)))
    });
    if !is_container {
        let found = match recorded {
            Some(Run::Process(r)) => Some((process::adopt(&r), r)),
            // No record: the daemon died between a spawn and saving it, and the shim's
            // own shim.json names the run. Only a live one counts: a shim.json whose
            // shim is gone may be an earlier run's (a start that was still waiting for
            // its dependencies had spawned nothing yet), whose exit was counted then.
            _ => process::recover(&core.run_dir(stack, name))
                .map(|r| (process::adopt(&r), r))
                .filter(|(adoption, _)| *adoption == process::Adoption::Alive),
        };
        return match found {
            Some((process::Adoption::Alive, r)) => Found::Alive(Box::new(Run::Process(r))),
            Some((process::Adoption::Exited(status), _)) => Found::Exited(status),
            _ => Found::Gone("its process disappeared while the daemon was down".to_owned()),
        };
    }
    let engine = match core.engine_of(stack, name).await {
        Ok(e) => e,
        Err(e) => return Found::Gone(e),
    };
    let id = match recorded {
        Some(Run::Container(c)) => c.container_id,
        // Started but not recorded (the daemon died in between): find it by this
        // daemon's labels, never by name alone.
        _ => {
            let owned = engine.owned(&core.instance, Some(stack)).await;
            match owned.map(|list| list.into_iter().find(|c| c.service == name)) {
                Ok(Some(c)) => c.id,
                Ok(None) => {
                    return Found::Gone("its container was never made".to_owned());
                }
                Err(e) => return Found::Gone(e.to_string()),
            }
        }
    };
    match engine.state(&id).await {
        Ok(deployer::docker::ContainerState::Running) => {
            match engine
                .record(&id, &containers::network_name(&core.instance, stack))
                .await
            {
                Ok(record) => Found::Alive(Box::new(Run::Container(record))),
                Err(e) => Found::Gone(e.to_string()),
            }
        }
        Ok(deployer::docker::ContainerState::Exited(status)) => Found::Exited(status),
        Ok(deployer::docker::ContainerState::Gone) => {
            Found::Gone("its container disappeared while the daemon was down".to_owned())
        }
        Err(e) => Found::Gone(e.to_string()),
    }
}

/// Asks the host how a recorded remote run does.
async fn find_remote(core: &Arc<Core>, run: crate::remote::RemoteRun) -> Found {
    let ssh = match core.ssh_for_run(&run) {
        Ok(ssh) => ssh,
        Err(e) => return Found::Gone(e),
    };
    match deployer::remote::state(&ssh, &run.record).await {
        Ok(deployer::remote::RemoteState::Running) => Found::Alive(Box::new(Run::Remote(run))),
        Ok(deployer::remote::RemoteState::Exited(status)) => Found::Exited(status),
        Ok(deployer::remote::RemoteState::Gone) => Found::Gone(format!(
            "its process on {} disappeared while the daemon was down",
            run.record.address
        )),
        // The host may be unreachable for a while: keep the record and watch it; the
        // watcher keeps asking.
        Err(e) => {
            tracing::warn!("{}: {e}", run.remote_service);
            Found::Alive(Box::new(Run::Remote(run)))
        }
    }
}

/// The startup reconcile pass: re-adopts the services that still run, applies the
/// restart policy to those that exited while the daemon was down, marks lost ones
/// failed, kills strays (processes carrying this daemon's `HARNESS_INSTANCE` that no
/// record owns), stops running containers of this daemon that no running service owns
/// and reports those of services no longer registered (`down` removes them). Returns
/// every difference it fixed, in words.
pub async fn reconcile(core: &Arc<Core>) -> Vec<String> {
    let mut fixes = Vec::new();
    let active: Vec<(String, String, ServiceState, Option<Run>)> = core.read(|st| {
        st.snap
            .stacks
            .iter()
            .flat_map(|(stack, r)| {
                r.services
                    .iter()
                    .filter(|(_, s)| s.state.is_active())
                    .map(|(n, s)| (stack.clone(), n.clone(), s.state, Run::of(s)))
            })
            .collect()
    });
    // Instances (`<daemon>/<stack>/<service>`) owned by a live run; a process carrying
    // one of them (the service, its children) is not a stray.
    let mut owned = std::collections::HashSet::new();
    let mut adopted = Vec::new();
    for (stack, name, state, recorded) in active {
        let generation = core.update(|st, _| {
            let rt = st.runtime(&stack, &name);
            rt.generation += 1;
            rt.generation
        });
        let external = core.read(|st| {
            st.stack(&stack)
                .and_then(|r| r.config.services.get(&name))
                .is_some_and(|s| matches!(s.target, Target::External(_)))
        });
        let borrowed = recorded.as_ref().filter(|r| r.is_borrowed()).cloned();
        if external || borrowed.is_some() {
            // Nothing of ours runs for it: check its health again, as before.
            if state == ServiceState::Stopping {
                core.update(|st, ch| ch.set_state(st, &stack, &name, ServiceState::Stopped, None));
            } else {
                core.use_running(&stack, &name, generation, borrowed);
            }
            continue;
        }
        match find_run(core, &stack, &name, recorded).await {
            Found::Alive(run) => {
                owned.insert(format!("{}/{stack}/{name}", core.instance));
                core.update(|st, _| {
                    if let Some(rec) = st.service_mut(&stack, &name) {
                        rec.process = run.to_value();
                    }
                });
                if state == ServiceState::Stopping {
                    fixes.push(format!(
                        "{stack}/{name}: finishing a stop interrupted by the daemon's exit"
                    ));
                    core.supervise(&stack, &name, generation, *run, Instant::now());
                    core.stop_one(&stack, &name).await;
                    continue;
                }
                if state == ServiceState::Starting {
                    fixes.push(format!("{stack}/{name}: was starting, found running"));
                    core.update(|st, ch| {
                        ch.set_state(st, &stack, &name, ServiceState::Running, None)
                    });
                }
                adopted.push(protocol::events::ServiceRef {
                    stack: stack.clone(),
                    name: name.clone(),
                });
                // Uptime before the daemon's restart is unknown; count from now.
                core.supervise(&stack, &name, generation, *run, Instant::now());
            }
            Found::Exited(status) => {
                fixes.push(format!(
                    "{stack}/{name}: {} while the daemon was down",
                    describe_exit(&status)
                ));
                core.on_exit(&stack, &name, generation, status, Instant::now());
            }
            Found::Gone(why) => {
                let reason = if state == ServiceState::Starting {
                    "its start was interrupted by the daemon's exit".to_owned()
                } else {
                    why
                };
                fixes.push(format!("{stack}/{name}: {reason}"));
                core.update(|st, ch| {
                    if let Some(rec) = st.service_mut(&stack, &name) {
                        rec.process = None;
                    }
                    let to = if state == ServiceState::Stopping {
                        ServiceState::Stopped
                    } else {
                        ServiceState::Failed
                    };
                    ch.set_state(st, &stack, &name, to, Some(reason));
                });
            }
        }
    }
    // The mesh hub's data plane is the daemon's own, not a service's: it is adopted
    // (while a mesh service runs), never taken for a stray.
    owned.insert(crate::mesh::hub_instance(&core.instance));
    // Nor is the shim server, nor the shims it forked (their initial environment is
    // the server's): a stray shim ends with its service, which carries its own.
    owned.insert(process::server_instance(&core.instance));
    let prefix = format!("{}/", core.instance);
    let strays: Vec<(u32, String)> = smol::unblock(move || process::find_instances(&prefix)).await;
    for (pid, instance) in strays.into_iter().filter(|(_, i)| !owned.contains(i)) {
        if process::kill_stray(pid) {
            fixes.push(format!(
                "killed stray process {pid} ({instance}) that no record owned"
            ));
        }
    }
    fixes.extend(reconcile_containers(core, &owned).await);
    prune_run_dirs(core).await;
    fixes.extend(core.reconcile_mesh().await);
    core.events
        .publish(EventKind::DaemonStarted(protocol::events::DaemonStarted {
            instance: core.instance.clone(),
            pid: std::process::id(),
            adopted,
        }));
    fixes
}

/// The container half of the stray hunt; only for daemons that run containers.
async fn reconcile_containers(
    core: &Arc<Core>,
    owned: &std::collections::HashSet<String>,
) -> Vec<String> {
    // The local engine (for every stack at once) and each SSH host's engine that a
    // stack's docker services use (for that stack).
    let engines: BTreeSet<(Option<String>, Option<String>)> = core.read(|st| {
        st.snap
            .stacks
            .iter()
            .flat_map(|(stack, r)| {
                r.config
                    .services
                    .values()
                    .filter(|s| matches!(s.target, Target::Docker(_)))
                    .map(|s| match containers::engine_host(s) {
                        Some(h) => (Some(stack.clone()), Some(h.to_owned())),
                        None => (None, None),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    });
    let mut fixes = Vec::new();
    for (stack, host) in engines {
        let engine = match &stack {
            Some(stack) => core.engine_for(stack, host.as_deref()).await,
            None => core.engine().await,
        };
        let Ok(engine) = engine else {
            continue;
        };
        match engine.owned(&core.instance, stack.as_deref()).await {
            Ok(list) => fixes.extend(stray_containers(core, &engine, list, owned).await),
            Err(e) => fixes.push(e.to_string()),
        }
    }
    fixes
}

/// Reports this daemon's containers that no registered service has, and stops running
/// ones that no running service owns.
async fn stray_containers(
    core: &Arc<Core>,
    engine: &deployer::docker::Engine,
    list: Vec<deployer::docker::OwnedContainer>,
    owned: &std::collections::HashSet<String>,
) -> Vec<String> {
    let mut fixes = Vec::new();
    for c in list {
        let registered = core.read(|st| {
            st.stack(&c.stack)
                .is_some_and(|r| r.config.services.contains_key(&c.service))
        });
        let instance = format!("{}/{}/{}", core.instance, c.stack, c.service);
        if !registered {
            fixes.push(format!(
                "found container {} of {}/{}, which is no longer registered; `harness down -p {}` removes it",
                c.name, c.stack, c.service, c.stack
            ));
        } else if c.running && !owned.contains(&instance) {
            let timeout = Duration::from_millis(DEFAULT_STOP_TIMEOUT_MS);
            match engine.stop(&c.id, timeout).await {
                Ok(_) => fixes.push(format!(
                    "stopped container {} that no running service owned",
                    c.name
                )),
                Err(e) => fixes.push(e.to_string()),
            }
        }
    }
    fixes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
