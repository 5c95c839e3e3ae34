//! Parameters and results of each method. PROTOCOL.md shows every one with an example.
//!
//! Methods that act on services take `stack`; clients default it from their config.
//! Where `names` is a list, an empty list means every service of the stack.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::StackConfig;

/// Every method the daemon serves, by wire name.
pub mod names {
    /// Authenticate; must be the first message of a connection.
    pub const HELLO: &str = "hello";
    /// Store a stack's (client-resolved) config; registers, updates and removes services.
    pub const CONFIG_APPLY: &str = "config.apply";
    /// Parse and validate config YAML without applying it.
    pub const CONFIG_VALIDATE: &str = "config.validate";
    /// The stored config of a stack.
    pub const CONFIG_GET: &str = "config.get";
    /// The environment a service gets (resolved for where it runs).
    pub const CONFIG_ENV: &str = "config.env";
    /// Stacks the daemon knows.
    pub const STACK_LIST: &str = "stack.list";
    /// Services with state, health, backend and address.
    pub const SERVICE_LIST: &str = "service.list";
    /// One service.
    pub const SERVICE_GET: &str = "service.get";
    /// Start services and their dependencies.
    pub const SERVICE_START: &str = "service.start";
    /// Stop services and their dependents.
    pub const SERVICE_STOP: &str = "service.stop";
    /// Stop then start services.
    pub const SERVICE_RESTART: &str = "service.restart";
    /// Stop and unregister services (the whole stack when `names` is empty).
    pub const SERVICE_REMOVE: &str = "service.remove";
    /// Run a service's health check now.
    pub const SERVICE_HEALTH: &str = "service.health";
    /// Tail and follow a service's log.
    pub const SERVICE_LOGS: &str = "service.logs";
    /// Run a command with a service's environment and working dir.
    pub const SERVICE_EXEC: &str = "service.exec";
    /// Subscribe to event topics, optionally replaying from a `seq`.
    pub const SUBSCRIBE: &str = "subscribe";
    /// End a subscription or a log follow.
    pub const UNSUBSCRIBE: &str = "unsubscribe";
    /// Daemon facts.
    pub const DAEMON_STATUS: &str = "daemon.status";
    /// Stop the daemon (services keep running unless asked).
    pub const DAEMON_SHUTDOWN: &str = "daemon.shutdown";
    /// A one-time login link for the browser dashboard.
    pub const UI_LOGIN: &str = "ui.login";
    /// Make a service package from a directory.
    pub const PACKAGE_BUILD: &str = "package.build";
    /// Start (deploy) the services with SSH-host targets, or print the plan.
    pub const DEPLOY: &str = "deploy";
    /// Look for running services (tcp, http, dns SRV, mDNS).
    pub const DISCOVER: &str = "discover";
    /// The networks a stack's services are on.
    pub const NETWORK_LIST: &str = "network.list";
    /// Every service's address as each place of caller reaches it.
    pub const NETWORK_SHOW: &str = "network.show";
    /// Try those addresses for real.
    pub const NETWORK_TEST: &str = "network.test";
    /// The mesh hub's peers, with handshake age and bytes.
    pub const MESH_PEERS: &str = "mesh.peers";
    /// Cut a mesh node off at once and stop its services.
    pub const MESH_REVOKE: &str = "mesh.revoke";

    /// All method names, for `unknown_method` suggestions.
    pub const ALL: &[&str] = &[
        HELLO,
        CONFIG_APPLY,
        CONFIG_VALIDATE,
        CONFIG_GET,
        CONFIG_ENV,
        STACK_LIST,
        SERVICE_LIST,
        SERVICE_GET,
        SERVICE_START,
        SERVICE_STOP,
        SERVICE_RESTART,
        SERVICE_REMOVE,
        SERVICE_HEALTH,
        SERVICE_LOGS,
        SERVICE_EXEC,
        SUBSCRIBE,
        UNSUBSCRIBE,
        DAEMON_STATUS,
        DAEMON_SHUTDOWN,
        UI_LOGIN,
        PACKAGE_BUILD,
        DEPLOY,
        DISCOVER,
        NETWORK_LIST,
        NETWORK_SHOW,
        NETWORK_TEST,
        MESH_PEERS,
        MESH_REVOKE,
    ];
}

/// `hello` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HelloParams {
    /// The daemon's token (from the token file named in daemon.json), a one-time
    /// login code from `ui.login`, or a session from an earlier hello with such a code.
    pub token: String,
    /// Protocol version the client speaks.
    pub protocol: u32,
    /// Free-form client name, shown in the daemon's log.
    #[serde(default)]
    pub client: Option<String>,
}

/// `hello` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HelloResult {
    /// Daemon name and version, e.g. `harnessd 0.1.0`.
    pub daemon: String,
    /// Protocol version the daemon speaks.
    pub protocol: u32,
    /// Daemon instance id.
    pub instance: String,
    /// Latest journal `seq` at the time of the hello.
    pub seq: u64,
    /// After a hello with a one-time login code: a session to say hello with again
    /// (after a reload or reconnect) until the daemon stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// `ui.login` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UiLoginResult {
    /// The dashboard's address with the code in its fragment
    /// (`https://127.0.0.1:7461/#code=...`); the fragment never reaches a server log.
    pub url: String,
    /// The one-time code (valid for `expires_in_secs`, for one hello).
    pub code: String,
    /// Seconds the code stays valid.
    pub expires_in_secs: u64,
}

/// One network of a stack (`network.list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NetworkInfo {
    /// `host`, `docker`, `lan` or `mesh`.
    pub kind: String,
    /// Its name: `host`, the docker network, the LAN host, the mesh interface.
    pub name: String,
    /// Addresses that define it (the harness host's address towards a LAN host, the
    /// mesh subnet and hub address...).
    pub detail: String,
    /// The services on it.
    pub services: Vec<String>,
}

/// A service's addresses by the caller's place (`network.show`); `None` where that
/// place has no way to it (or the stack has no caller there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AddressRow {
    /// The service.
    pub name: String,
    /// Where it runs: `host process`, `host container`, `lan <host>`, `mesh <host>`,
    /// `external`, `discovered`.
    pub runs_on: String,
    /// As a process on the harness host reaches it.
    pub from_host: Option<String>,
    /// As a container on the stack's network reaches it.
    pub from_container: Option<String>,
    /// As a service on a LAN host reaches it.
    pub from_lan: Option<String>,
    /// As a service on a mesh node reaches it.
    pub from_mesh: Option<String>,
}

/// One reachability check (`network.test`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReachCheck {
    /// Where the connect was made from: `host`, or the SSH host it ran on.
    pub from: String,
    /// The service tried.
    pub to: String,
    /// The address tried.
    pub address: String,
    /// Whether a TCP connect succeeded.
    pub ok: bool,
    /// What happened.
    pub detail: String,
}

/// One peer of the mesh hub (`mesh.peers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MeshPeer {
    /// Stack of the service the node runs.
    pub stack: String,
    /// The service.
    pub name: String,
    /// The node (its name in `hosts:`).
    pub node: String,
    /// Its mesh address.
    pub mesh_ip: String,
    /// Its public key.
    pub public_key: String,
    /// Where its packets come from.
    pub endpoint: Option<String>,
    /// Seconds since its last handshake, if there was one.
    pub handshake_age_secs: Option<u64>,
    /// Bytes sent to it through the tunnel.
    pub tx_bytes: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
}

/// `mesh.revoke` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MeshRevokeParams {
    /// Stack name.
    pub stack: String,
    /// The node: its name in `hosts:` (or its address).
    pub node: String,
}

/// `discover` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoverParams {
    /// Where and how to look (unset fields take their defaults: only 127.0.0.1 is
    /// scanned when no range is given).
    #[serde(default)]
    pub options: crate::config::DiscoveryOptions,
    /// Look again even when a cached result of the same search is fresh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh: bool,
}

/// `discover` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiscoverResult {
    /// What was found, by address.
    pub services: Vec<DiscoveredService>,
    /// Addresses in the ranges scanned.
    pub addresses: u64,
    /// TCP connects tried.
    pub probes: u64,
    /// How long the search took, in ms.
    pub elapsed_ms: u64,
    /// Served from the daemon's cache (a search with the same options less than its TTL
    /// ago); `refresh` looks again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// Strategies skipped or failed, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One service found by `discover`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct DiscoveredService {
    /// `postgresql`, `redis`, `http`, `ssh`, or `unknown` (a port that accepts but
    /// answers no known protocol).
    pub kind: String,
    /// `host:port`.
    pub address: String,
    /// The strategy that found it: `tcp`, `http`, `dns` or `mdns`.
    pub found_by: String,
    /// What identified it: a banner, an HTTP status and `Server` header, an SRV or mDNS
    /// name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `deploy` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployParams {
    /// Stack name.
    pub stack: String,
    /// Services (default: every service with an SSH-host target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Only the instances on these hosts (names from `hosts:`; default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Most hosts deployed to at once (default: the stack's `max_parallel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    /// Only say what would be done: every step and command, nothing run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// With `dry_run`: plan with this config (as `config.apply` takes it) instead of the
    /// stored one; nothing is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<crate::config::StackConfig>,
}

/// `deploy` result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployResult {
    /// Services deployed (or that would be), with their dependencies, in order.
    pub services: Vec<String>,
    /// With `dry_run`: the steps, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<PlannedStep>,
}

/// One step a deploy would take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlannedStep {
    /// The service (instance).
    pub service: String,
    /// The host (`user@address:port`).
    pub host: String,
    /// What the step does.
    pub step: String,
    /// The command run on the host, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// `package.build` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PackageBuildParams {
    /// The package directory (manifest.yaml, bin/, scripts/start.sh...), absolute.
    pub dir: String,
    /// Where to write `NAME-VERSION.tar.zst` (default: `dir`'s parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dir: Option<String>,
}

/// `package.build` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PackageInfo {
    /// The package file.
    pub path: String,
    /// Name from the manifest.
    pub name: String,
    /// Version from the manifest.
    pub version: String,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// `config.apply` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplyParams {
    /// Stack name.
    pub stack: String,
    /// The config, with `${VAR}`, `~` and relative paths already resolved by the client.
    pub config: StackConfig,
    /// Path of the file it came from, for messages.
    #[serde(default)]
    pub source: Option<String>,
}

/// `config.apply` result: what changed in the registry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ApplyResult {
    /// Stack name.
    pub stack: String,
    /// Services that were not registered before.
    pub added: Vec<String>,
    /// Services whose config changed (a running one is restarted on its next start).
    pub changed: Vec<String>,
    /// Services no longer in the config; stopped and removed.
    pub removed: Vec<String>,
    /// Services whose config is the same.
    pub unchanged: Vec<String>,
}

/// `config.validate` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateParams {
    /// YAML text of a harness.yaml.
    pub yaml: String,
    /// File name used in error messages.
    #[serde(default)]
    pub file: Option<String>,
}

/// `config.validate` result (an invalid config is an `invalid_config` error instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ValidateResult {
    /// Services defined, in start order.
    pub services: Vec<String>,
}

/// Parameters naming a stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StackParams {
    /// Stack name.
    pub stack: String,
}

/// Parameters naming one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceParams {
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub name: String,
}

/// `service.list` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only this stack; every stack when absent.
    #[serde(default)]
    pub stack: Option<String>,
}

/// Parameters naming some services of a stack (empty `names`: all of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServicesParams {
    /// Stack name.
    pub stack: String,
    /// Service names; empty means all.
    #[serde(default)]
    pub names: Vec<String>,
    /// `service.remove` only: also remove what the services left on their SSH hosts
    /// (run directories, releases).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purge: bool,
}

/// Result of start, stop, restart and remove: the services acted on, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServicesResult {
    /// Services acted on, in the order the daemon handled them.
    pub services: Vec<String>,
}

/// Lifecycle state of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Known, never started (or removed from the running set).
    Registered,
    /// Being started (dependencies, spawn, first health check).
    Starting,
    /// Its process runs.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped on request.
    Stopped,
    /// Failed: could not start, or died and the restart policy gave up.
    Failed,
}

impl ServiceState {
    /// Whether the service has a live process in this state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            ServiceState::Starting | ServiceState::Running | ServiceState::Stopping
        )
    }
}

/// Health of a service as its checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// The last check passed.
    Healthy,
    /// `retries` checks in a row failed.
    Unhealthy,
    /// Not checked yet, no check configured, or not running.
    Unknown,
}

/// A service as clients see it (`service.list`, `service.get`, `harness ps`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceInfo {
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Lifecycle state.
    pub state: ServiceState,
    /// Health.
    pub health: Health,
    /// Backend that runs it (`process`, `docker`...).
    pub backend: String,
    /// Address reachable from the harness host (`127.0.0.1:8080`), when it has a port.
    pub address: Option<String>,
    /// Port the service listens on, when it has one.
    pub port: Option<u16>,
    /// Pid of the service's main process while it runs, as its host sees it.
    pub pid: Option<u32>,
    /// Container name, for a service running in a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The SSH host it runs on (its name in `hosts:`, or its address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// For a service with a placement list: which target is in use, e.g.
    /// `2 of 3 (remote_lan)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// Restarts by policy since the service was last started by a client.
    pub restarts: u32,
    /// Exit code of the last exit, when it exited normally.
    pub exit_code: Option<i32>,
    /// Why it is in this state, when it was not asked for.
    pub reason: Option<String>,
    /// Services it depends on.
    pub dependencies: Vec<String>,
    /// When the state last changed (RFC 3339).
    pub since: String,
}

/// A stack as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StackInfo {
    /// Stack name.
    pub name: String,
    /// File the config came from.
    pub source: Option<String>,
    /// Number of services.
    pub services: usize,
    /// Number of services running.
    pub running: usize,
}

/// `service.health` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HealthResult {
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Health after this check.
    pub health: Health,
    /// The check that ran, or `none`.
    pub check: String,
    /// What the check saw.
    pub output: String,
}

/// `config.env` result: the environment a service gets, in the order it is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EnvResult {
    /// Variable name to value.
    pub env: BTreeMap<String, String>,
}

/// `service.logs` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsParams {
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Return at most this many of the last lines (default 100).
    #[serde(default)]
    pub tail: Option<usize>,
    /// Start at this offset instead (resume after a reconnect); overrides `tail`.
    #[serde(default)]
    pub since: Option<u64>,
    /// Keep sending new lines as `log` messages until `unsubscribe` with this request's id.
    #[serde(default)]
    pub follow: bool,
}

/// `service.logs` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogsResult {
    /// The lines, oldest first.
    pub lines: Vec<LogLine>,
    /// Offset of the next line; resume from here.
    pub next_offset: u64,
}

/// One captured line of a service's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LogLine {
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub service: String,
    /// Position of the line in the service's log, from 0, never reused.
    pub offset: u64,
    /// When the line was read (RFC 3339).
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text, without the newline.
    pub line: String,
}

/// `service.exec` parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// Stack name.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
}

/// A chunk of output of a running exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ExecOutput {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The bytes, as (lossy) UTF-8.
    pub data: String,
}

/// `service.exec` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ExecResult {
    /// Exit code; `null` when killed by a signal.
    pub exit_code: Option<i32>,
    /// Signal that ended it.
    pub signal: Option<i32>,
}

/// `subscribe` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    /// Topics (`service`, `daemon`...); all when empty.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Only events of this stack (daemon events always pass).
    #[serde(default)]
    pub stack: Option<String>,
    /// Replay journaled events with `seq >= since` first.
    #[serde(default)]
    pub since: Option<u64>,
}

/// `subscribe` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SubscribeResult {
    /// Subscription id, for `unsubscribe`.
    pub subscription: u64,
    /// Latest `seq` when subscribed.
    pub seq: u64,
}

/// `unsubscribe` parameters: a subscription id or the id of a following `service.logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeParams {
    /// Subscription id (from `subscribe`) or request id (of `service.logs`).
    pub subscription: u64,
}

/// `daemon.status` result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DaemonStatus {
    /// Daemon name and version.
    pub daemon: String,
    /// Instance id.
    pub instance: String,
    /// harnessd's pid.
    pub pid: u32,
    /// State directory.
    pub state_dir: String,
    /// URL clients connect to.
    pub url: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Number of stacks.
    pub stacks: usize,
    /// Number of services.
    pub services: usize,
    /// Latest journal seq.
    pub seq: u64,
    /// Connected clients.
    pub clients: usize,
}

/// `daemon.shutdown` parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownParams {
    /// Stop every service first (default: leave them running for the next daemon).
    #[serde(default)]
    pub stop_services: bool,
}

/// Empty result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Empty {}
