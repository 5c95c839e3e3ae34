//! Shared daemon state: the registry snapshot, per-service runtime data, the event bus
//! and the persister. Every mutation goes through [`Core::update`], which publishes the
//! events it produced and schedules a (group-committed) save.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use protocol::events::{EventKind, StateChange};
use protocol::methods::{Health, ServiceInfo, ServiceState};
use registry::{ServiceRecord, Snapshot, StackRecord};
use smol::Executor;

use crate::events::EventBus;
use crate::persist::Persister;

/// Identifies a service: (stack, name).
pub type Key = (String, String);

/// Runtime data of a service that is not persisted.
#[derive(Default)]
pub struct Runtime {
    /// Bumped on every launch and stop, so tasks of an older run notice they are stale.
    pub generation: u64,
    /// The exit watcher, health monitor and pending restart of the current run;
    /// dropping them cancels them.
    pub tasks: Vec<smol::Task<()>>,
    /// Healthy at least once since a client last started it or it moved to another
    /// target of its placement list (a target that was healthy is not given up).
    pub healthy_once: bool,
}

/// Mutable state behind the core's lock.
pub struct State {
    /// What is persisted.
    pub snap: Snapshot,
    /// What is not.
    pub runtime: HashMap<Key, Runtime>,
}

impl State {
    /// A registered stack.
    pub fn stack(&self, stack: &str) -> Option<&StackRecord> {
        self.snap.stacks.get(stack).map(|r| &**r)
    }

    /// A registered stack, mutable. Only this stack's file is written by the next save
    /// (see [`registry::Snapshot::stacks`]); a save in flight keeps the copy it has.
    pub fn stack_mut(&mut self, stack: &str) -> Option<&mut StackRecord> {
        self.snap.stacks.get_mut(stack).map(Arc::make_mut)
    }

    /// A registered service's record.
    pub fn service(&self, stack: &str, name: &str) -> Option<&ServiceRecord> {
        self.stack(stack)?.services.get(name)
    }

    /// A registered service's record, mutable.
    pub fn service_mut(&mut self, stack: &str, name: &str) -> Option<&mut ServiceRecord> {
        self.stack_mut(stack)?.services.get_mut(name)
    }

    /// Runtime data of a service (created on first use).
    pub fn runtime(&mut self, stack: &str, name: &str) -> &mut Runtime {
        self.runtime
            .entry((stack.to_owned(), name.to_owned()))
            .or_default()
    }
}

/// Collects the events a mutation produces; published after the lock is released.
#[derive(Default)]
pub struct Changes {
    events: Vec<EventKind>,
}

impl Changes {
    /// Records an event.
    pub fn push(&mut self, event: EventKind) {
        self.events.push(event);
    }

    /// Moves a service to `to`, recording the `service.state` event.
    pub fn set_state(
        &mut self,
        st: &mut State,
        stack: &str,
        name: &str,
        to: ServiceState,
        reason: Option<String>,
    ) {
        let Some(rec) = st.service_mut(stack, name) else {
            return;
        };
        let from = rec.state;
        if from == to && rec.reason == reason {
            return;
        }
        rec.state = to;
        rec.reason = reason.clone();
        rec.since = now();
        if !to.is_active() {
            rec.health = Health::Unknown;
        }
        self.events.push(EventKind::ServiceState(StateChange {
            stack: stack.to_owned(),
            name: name.to_owned(),
            from,
            to,
            reason,
        }));
    }
}

/// The daemon's shared state and services.
pub struct Core {
    /// Daemon instance id.
    pub instance: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// URL clients connect to.
    pub url: String,
    /// The server that forks each local service's supervisor shim.
    pub shims: deployer::process::ShimServer,
    /// When the daemon started.
    pub started: Instant,
    /// The executor every task runs on.
    pub ex: Arc<Executor<'static>>,
    /// One notifier per service, fired when an event about it is published; waiters
    /// for a service's state or health re-check only then (waking every waiter on
    /// every change made starting 100 services cost more than the starts).
    watchers: Mutex<HashMap<Key, Arc<event_listener::Event>>>,
    /// Event journal and subscribers.
    pub events: EventBus,
    /// Saves the snapshot and journal in the background.
    pub persister: Persister,
    /// Connected clients.
    pub clients: AtomicUsize,
    /// Start semaphores per stack (`settings.max_parallel`).
    pub semaphores: Mutex<HashMap<String, Arc<async_lock::Semaphore>>>,
    /// Browser login codes and sessions.
    pub logins: crate::logins::Logins,
    /// The Docker engine, connected on first use (see `containers`).
    pub docker: async_lock::Mutex<Option<deployer::docker::Engine>>,
    /// SSH sessions, one per host and login (see `remote`).
    pub ssh: Mutex<HashMap<deployer::ssh::SshTarget, deployer::ssh::SshHost>>,
    /// Engines on SSH hosts, by the host's SSH target and engine socket (see
    /// `containers`).
    pub remote_engines: async_lock::Mutex<
        HashMap<(deployer::ssh::SshTarget, String), crate::containers::RemoteEngine>,
    >,
    /// The mesh hub's data plane while a mesh service runs (see `mesh`).
    pub mesh: async_lock::Mutex<Option<crate::mesh::Hub>>,
    /// Recent `discover` results.
    pub discovery: crate::discovery::Cache,
    shutdown: (async_channel::Sender<()>, async_channel::Receiver<()>),
    state: Mutex<State>,
}

impl Core {
    /// Makes the core around a loaded snapshot.
    pub fn new(
        snap: Snapshot,
        state_dir: PathBuf,
        url: String,
        shim_exe: PathBuf,
        ex: Arc<Executor<'static>>,
        events: EventBus,
        persister: Persister,
    ) -> Self {
        Core {
            instance: snap.instance.clone(),
            state_dir,
            url,
            shims: deployer::process::ShimServer::new(&shim_exe, &snap.instance),
            started: Instant::now(),
            ex,
            watchers: Mutex::new(HashMap::new()),
            events,
            persister,
            clients: AtomicUsize::new(0),
            semaphores: Mutex::new(HashMap::new()),
            logins: Default::default(),
            docker: async_lock::Mutex::new(None),
            ssh: Mutex::new(HashMap::new()),
            remote_engines: Default::default(),
            mesh: async_lock::Mutex::new(None),
            discovery: Default::default(),
            shutdown: async_channel::bounded(1),
            state: Mutex::new(State {
                snap,
                runtime: HashMap::new(),
            }),
        }
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Mutates the state; publishes the recorded events, wakes waiters and schedules a
    /// save. Returns what `f` returned.
    pub fn update<R>(&self, f: impl FnOnce(&mut State, &mut Changes) -> R) -> R {
        let mut changes = Changes::default();
        let mut touched: Vec<Key> = Vec::new();
        let result = {
            let mut st = self.lock();
            let r = f(&mut st, &mut changes);
            // Publishing under the lock keeps event order equal to state-change order.
            for ev in changes.events.drain(..) {
                if let Some(key) = ev.service() {
                    touched.push((key.0.to_owned(), key.1.to_owned()));
                }
                self.events.publish(ev);
            }
            r
        };
        self.persister.mark_dirty();
        if !touched.is_empty() {
            let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
            for key in &touched {
                if let Some(w) = watchers.get(key) {
                    w.notify(usize::MAX);
                }
            }
        }
        result
    }

    /// The notifier of a service (see `watchers`).
    pub fn watcher(&self, stack: &str, name: &str) -> Arc<event_listener::Event> {
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((stack.to_owned(), name.to_owned()))
            .or_default()
            .clone()
    }

    /// Saves now (group commit) and waits until it is on disk.
    pub async fn commit(&self) -> Result<(), String> {
        self.persister.commit().await
    }

    /// A copy of the snapshot for the persister: its stacks are shared, so it costs a
    /// reference count per stack, not a copy of each.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().snap.clone()
    }

    /// The client view of one service.
    pub fn service_info(st: &State, stack: &str, name: &str) -> Option<ServiceInfo> {
        let stack_rec = st.stack(stack)?;
        let cfg = stack_rec.config.services.get(name)?;
        let rec = stack_rec.services.get(name)?;
        let run = crate::run::Run::of(rec);
        let pid = run.as_ref().and_then(crate::run::Run::pid);
        let (container, host) = match run {
            Some(crate::run::Run::Container(c)) => (Some(c.container_name), c.engine_host),
            Some(crate::run::Run::Remote(r)) => (None, Some(r.record.host)),
            _ => (None, None),
        };
        Some(ServiceInfo {
            stack: stack.to_owned(),
            name: name.to_owned(),
            state: rec.state,
            health: rec.health,
            backend: cfg.target.backend().to_owned(),
            address: crate::env::endpoint(stack_rec, name, &crate::env::Place::Host)
                .map(|(host, port)| format!("{host}:{port}")),
            port: rec.port,
            pid,
            container,
            host,
            placement: cfg.placement_position().map(|i| {
                format!(
                    "{} of {} ({})",
                    i + 1,
                    cfg.placement.len(),
                    cfg.target.backend()
                )
            }),
            restarts: rec.restarts,
            exit_code: rec.exit_code,
            reason: rec.reason.clone(),
            dependencies: cfg.depends_on.keys().cloned().collect(),
            since: rec.since.clone(),
        })
    }

    /// Asks the daemon to stop serving.
    pub fn request_shutdown(&self) {
        self.shutdown.0.close();
    }

    /// Completes once shutdown was requested.
    pub fn shutdown_requested(&self) -> impl std::future::Future<Output = ()> + 'static {
        let rx = self.shutdown.1.clone();
        async move {
            let _ = rx.recv().await;
        }
    }

    /// Number of connected clients, for `daemon.status`.
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not take the daemon down with it: the
        // state is still consistent enough to serve and to save.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Current time as RFC 3339 with microseconds, UTC (event times are precise enough to
/// measure delivery latency).
pub fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}
