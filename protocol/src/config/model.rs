//! The canonical config model: what `config.apply` carries and the registry stores.
//!
//! YAML files have several accepted shapes (see `parse`); they all convert into these
//! types, which have exactly one JSON shape. Durations are milliseconds here.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A stack: named services, hosts and settings from one config file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// Config format version (`"1"`).
    #[serde(default)]
    pub version: Option<String>,
    /// Stack name; defaults to the config directory's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Stack-wide settings.
    #[serde(default)]
    pub settings: Settings,
    /// Mesh settings.
    #[serde(default)]
    pub network: NetworkConfig,
    /// Named hosts that services refer to.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostConfig>,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// Where `harness discover` and `discovered` targets look, when their own options
    /// do not say.
    #[serde(default, skip_serializing_if = "DiscoveryOptions::is_unset")]
    pub discovery: DiscoveryOptions,
}

/// Stack-wide settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Most services started at once (default [`DEFAULT_MAX_PARALLEL`]).
    #[serde(default)]
    pub max_parallel: Option<usize>,
    /// How long `up` waits for a service to become healthy, in ms (default 300 s).
    #[serde(default)]
    pub default_timeout_ms: Option<u64>,
}

/// Default of [`Settings::max_parallel`].
pub const DEFAULT_MAX_PARALLEL: usize = 16;
/// Default of [`Settings::default_timeout_ms`].
pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;

/// Mesh settings (used only when a service has a `wireguard` target).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Subnet of the WireGuard mesh (default `10.42.0.0/16`).
    #[serde(default)]
    pub wireguard_subnet: Option<String>,
    /// UDP port of the hub (default 51820).
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// A file holding the hub's WireGuard private key (base64), instead of the one the
    /// daemon makes and keeps in its state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_key: Option<String>,
}

/// A named host reached over SSH.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Address or host name.
    pub address: String,
    /// SSH user.
    #[serde(default)]
    pub user: Option<String>,
    /// SSH port (default 22).
    #[serde(default)]
    pub port: Option<u16>,
    /// Private key file.
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// known_hosts file to check the host key against.
    #[serde(default)]
    pub known_hosts: Option<String>,
    /// Use sudo for privileged steps.
    #[serde(default)]
    pub sudo: bool,
    /// Where releases are installed (default `/opt/harness`).
    #[serde(default)]
    pub install_root: Option<String>,
    /// `strict` (default: an unknown host key is refused) or `accept-new` (an unknown
    /// key is recorded in the daemon's known_hosts; a changed one is still refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key_checking: Option<String>,
    /// How long connecting and logging in may take, in ms (default 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// The Docker engine's socket on the host, for docker targets placed there
    /// (default `/var/run/docker.sock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_socket: Option<String>,
}

/// One service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Where and how it runs. With a [`placement`](Self::placement) list, the entry in
    /// use (the daemon moves it along the list as it falls back).
    pub target: Target,
    /// Targets tried in order (`target:` written as a list): the first that comes up
    /// healthy is used; empty for a service with one target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Target>,
    /// Port it listens on: fixed or picked by the harness.
    #[serde(default)]
    pub port: Option<PortSpec>,
    /// Services it depends on, with the condition each must meet first.
    #[serde(default)]
    pub depends_on: BTreeMap<String, Dependency>,
    /// Environment (values may hold `${svc.addr}`-style references).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A dotenv-style file whose variables are added (below `env` in precedence).
    #[serde(default)]
    pub env_file: Option<String>,
    /// Names of environment variables whose values are secrets: the service gets them,
    /// nobody else sees them (masked in `config.get`, `config.env` and `harness config`
    /// output), and one on the command line, where `ps` shows it, is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
    /// How the harness checks that it works.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartConfig,
    /// Graceful stop: signal sent first (default `TERM`).
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Graceful stop: wait this long before SIGKILL, in ms (default 10 s).
    #[serde(default)]
    pub stop_timeout_ms: Option<u64>,
    /// Do not start it when a healthy instance already answers at its fixed port; use
    /// that one (and never stop it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reuse_if_running: bool,
    /// Set by the daemon on the instances of a service that runs on several hosts
    /// (`svc@host`): the service's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_of: Option<String>,
}

/// What a secret's value is shown as.
pub const SECRET_MASK: &str = "(secret)";

impl ServiceConfig {
    /// With a placement list: the position of the target in use (from 0).
    pub fn placement_position(&self) -> Option<usize> {
        self.placement.iter().position(|t| *t == self.target)
    }

    /// Whether variable `name` holds a secret.
    pub fn is_secret(&self, name: &str) -> bool {
        self.secret_env.iter().any(|s| s == name)
    }

    /// The values of its secrets as the config gives them (the service's `env` before
    /// its targets'), with the variable each belongs to.
    pub fn secret_values(&self) -> Vec<(&str, &str)> {
        let targets = std::iter::once(&self.target).chain(&self.placement);
        let envs = std::iter::once(&self.env).chain(targets.filter_map(Target::env));
        let mut values = Vec::new();
        for env in envs {
            for name in &self.secret_env {
                if let Some(v) = env.get(name) {
                    values.push((name.as_str(), v.as_str()));
                }
            }
        }
        values
    }

    /// The config as it may be shown: its secrets' variables say [`SECRET_MASK`], and
    /// so does each place one of `values` appears in (the stack's secrets, from
    /// [`StackConfig::secret_values`]), such as a variable built from one or a health
    /// check's URL.
    pub fn masked_with(&self, values: &[&str]) -> ServiceConfig {
        let mut shown = self.clone();
        if !values.is_empty() {
            if let Ok(mut tree) = serde_json::to_value(self) {
                mask_tree(&mut tree, values);
                if let Ok(masked) = serde_json::from_value(tree) {
                    shown = masked;
                }
            }
        }
        let by_name = |env: &mut BTreeMap<String, String>| {
            for (k, v) in env.iter_mut() {
                if self.is_secret(k) {
                    *v = SECRET_MASK.to_owned();
                }
            }
        };
        by_name(&mut shown.env);
        for target in std::iter::once(&mut shown.target).chain(&mut shown.placement) {
            if let Some(env) = target.env_mut() {
                by_name(env);
            }
        }
        shown
    }
}

/// `text` with each of `values` replaced by [`SECRET_MASK`].
pub fn mask_secrets(text: &str, values: &[&str]) -> String {
    let mut out = text.to_owned();
    for v in values {
        if out.contains(v) {
            out = out.replace(v, SECRET_MASK);
        }
    }
    out
}

/// Masks `values` in every string of `tree` that still reads back as a config once
/// masked: a secret that is also a keyword of the config (`port: auto`, a check's
/// `type: http`, a policy `on-failure` around `fail`) stays where masking it would
/// make the config unreadable; the keyword tells nothing of the secret there.
fn mask_tree(tree: &mut serde_json::Value, values: &[&str]) {
    let mut paths = Vec::new();
    string_paths(tree, String::new(), values, &mut paths);
    for path in paths {
        let Some(serde_json::Value::String(text)) = tree.pointer_mut(&path) else {
            continue;
        };
        let original = std::mem::take(text);
        *text = mask_secrets(&original, values);
        if serde_json::from_value::<ServiceConfig>(tree.clone()).is_err() {
            if let Some(serde_json::Value::String(text)) = tree.pointer_mut(&path) {
                *text = original;
            }
        }
    }
}

/// JSON pointers of the strings in `tree` that hold one of `values`.
fn string_paths(tree: &serde_json::Value, at: String, values: &[&str], out: &mut Vec<String>) {
    match tree {
        serde_json::Value::String(s) if values.iter().any(|v| s.contains(v)) => out.push(at),
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                string_paths(item, format!("{at}/{i}"), values, out);
            }
        }
        serde_json::Value::Object(map) => {
            for (key, item) in map {
                let key = key.replace('~', "~0").replace('/', "~1");
                string_paths(item, format!("{at}/{key}"), values, out);
            }
        }
        _ => {}
    }
}

/// Secrets shorter than this are masked where they are named, not looked for elsewhere
/// (they would turn up by chance).
pub const MIN_SECRET_CHARS: usize = 4;

/// The secret values worth looking for, once each, longest first (a secret that
/// contains another is masked whole).
fn longest_first<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut values: Vec<&str> = values
        .filter(|v| v.chars().count() >= MIN_SECRET_CHARS)
        .collect();
    // By length, then by text, so that equal ones are neighbours for `dedup`.
    values.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    values.dedup();
    values
}

impl StackConfig {
    /// The values of every service's secrets (of [`MIN_SECRET_CHARS`] or more), longest
    /// first (a secret that contains another is masked whole).
    pub fn secret_values(&self) -> Vec<&str> {
        longest_first(
            self.services
                .values()
                .flat_map(ServiceConfig::secret_values)
                .map(|(_, v)| v),
        )
    }

    /// Masks the secrets in `env`, the environment of service `name` as resolved: its
    /// `secret_env` variables, and every secret of the stack (these included, wherever
    /// they came from, an env file too) inside the other values.
    pub fn mask_env(&self, name: &str, env: &mut BTreeMap<String, String>) {
        let Some(svc) = self.services.get(name) else {
            return;
        };
        let resolved: Vec<String> = env
            .iter()
            .filter(|(k, _)| svc.is_secret(k))
            .map(|(_, v)| v.clone())
            .collect();
        let values = longest_first(
            self.secret_values()
                .into_iter()
                .chain(resolved.iter().map(String::as_str)),
        );
        for (k, v) in env.iter_mut() {
            *v = if svc.is_secret(k) {
                SECRET_MASK.to_owned()
            } else {
                mask_secrets(v, &values)
            };
        }
    }

    /// The config as it may be shown: every secret masked wherever it appears, in any
    /// service (a database's password in its client's URL too).
    pub fn masked(&self) -> StackConfig {
        let values = self.secret_values();
        let mut shown = self.clone();
        for svc in shown.services.values_mut() {
            *svc = svc.masked_with(&values);
        }
        shown
    }
}

/// Where a service runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A local process.
    Process(ProcessTarget),
    /// A Docker container.
    Docker(DockerTarget),
    /// A process on a LAN host over SSH.
    RemoteLan(RemoteTarget),
    /// A packaged service on a remote host joined through the WireGuard mesh.
    Wireguard(RemoteTarget),
    /// An already running service found by discovery.
    Discovered(DiscoveredTarget),
    /// An already running service at a known address.
    External(ExternalTarget),
}

impl Target {
    /// The target's own environment, for those that have one.
    pub fn env(&self) -> Option<&BTreeMap<String, String>> {
        match self {
            Target::Process(p) => Some(&p.env),
            Target::Docker(d) => Some(&d.env),
            Target::RemoteLan(r) | Target::Wireguard(r) => Some(&r.env),
            Target::Discovered(_) | Target::External(_) => None,
        }
    }

    /// [`Target::env`], to change.
    pub fn env_mut(&mut self) -> Option<&mut BTreeMap<String, String>> {
        match self {
            Target::Process(p) => Some(&mut p.env),
            Target::Docker(d) => Some(&mut d.env),
            Target::RemoteLan(r) | Target::Wireguard(r) => Some(&mut r.env),
            Target::Discovered(_) | Target::External(_) => None,
        }
    }

    /// The commands it runs, word by word, where `ps` on their host shows them: its
    /// program and arguments, and on a remote host the setup and install commands.
    pub fn command_words(&self) -> Vec<&str> {
        let words: Vec<&String> = match self {
            Target::Process(p) => std::iter::once(&p.binary).chain(&p.args).collect(),
            Target::Docker(d) => d.entrypoint.iter().chain(&d.command).collect(),
            Target::RemoteLan(r) | Target::Wireguard(r) => r
                .binary
                .iter()
                .chain(&r.args)
                .chain(&r.setup_commands)
                .chain(&r.pre_install)
                .chain(&r.post_install)
                .collect(),
            Target::Discovered(_) | Target::External(_) => Vec::new(),
        };
        words.into_iter().map(String::as_str).collect()
    }

    /// Backend name as shown by `ps`.
    pub fn backend(&self) -> &'static str {
        match self {
            Target::Process(_) => "process",
            Target::Docker(_) => "docker",
            Target::RemoteLan(_) => "remote_lan",
            Target::Wireguard(_) => "wireguard",
            Target::Discovered(_) => "discovered",
            Target::External(_) => "external",
        }
    }
}

/// A local process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessTarget {
    /// Program to run (absolute after the client resolved it, or looked up in PATH).
    pub binary: String,
    /// Arguments (may hold `${self.port}`-style references).
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment for this target (merged under the service's `env`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the config file's directory).
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// A Docker container (run by the docker backend).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DockerTarget {
    /// Image reference.
    pub image: String,
    /// `never`, `missing` (default) or `always`.
    #[serde(default)]
    pub pull: Option<String>,
    /// Command (overrides the image's CMD).
    #[serde(default)]
    pub command: Vec<String>,
    /// Entrypoint (overrides the image's ENTRYPOINT).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Ports: `5432`, `"8080:80"`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Volumes: `"/data:/var/lib/app"`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Working directory inside the container.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// User inside the container.
    #[serde(default)]
    pub user: Option<String>,
    /// Extra `/etc/hosts` entries: `"name:ip"` (`host-gateway` is the host's address).
    #[serde(default)]
    pub extra_hosts: Vec<String>,
    /// Build `image` from this context directory (its `Dockerfile`) when it is missing
    /// or the context changed.
    #[serde(default)]
    pub build: Option<String>,
    /// Dockerfile inside the `build` context (default `Dockerfile`).
    #[serde(default)]
    pub dockerfile: Option<String>,
    /// Import `image` from this root filesystem tarball (like `docker import`) when it
    /// is missing.
    #[serde(default)]
    pub rootfs: Option<String>,
    /// Run it on this SSH host's engine instead of the local one (a name in `hosts:`,
    /// or an address), reached through the host's SSH connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// One entry of a docker target's `ports`: `80` (published on a port the harness
/// picks), `"8080:80"`, `"127.0.0.1:8080:80"`, each optionally with `/tcp` or `/udp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    /// Host address to publish on (default: all).
    pub host_ip: Option<String>,
    /// Host port; `None` lets the harness pick one.
    pub host_port: Option<u16>,
    /// Port inside the container.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl PortMapping {
    /// Parses one `ports` entry.
    pub fn parse(text: &str) -> Result<PortMapping, String> {
        let (spec, protocol) = match text.rsplit_once('/') {
            Some((spec, proto @ ("tcp" | "udp"))) => (spec, proto),
            Some((_, other)) => {
                return Err(format!(
                    "bad port {text:?}: unknown protocol {other:?} (use tcp or udp)"
                ))
            }
            None => (text, "tcp"),
        };
        let number = |s: &str| {
            match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!(
                "bad port {text:?}: {s:?} is not a port number (1-65535); expected \"80\", \"8080:80\" or \"127.0.0.1:8080:80\""
            )),
        }
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, host_port, container) = match parts.as_slice() {
            [c] => (None, None, *c),
            [h, c] => (None, Some(number(h)?), *c),
            [ip, h, c] => (Some((*ip).to_owned()), Some(number(h)?), *c),
            _ => {
                return Err(format!(
                    "bad port {text:?}: expected \"80\", \"8080:80\" or \"127.0.0.1:8080:80\""
                ))
            }
        };
        Ok(PortMapping {
            host_ip,
            host_port,
            container_port: number(container)?,
            protocol: protocol.to_owned(),
        })
    }
}

/// A service on a remote host over SSH (LAN or mesh).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteTarget {
    /// One host: a name from `hosts:` or an address.
    #[serde(default)]
    pub host: Option<String>,
    /// Several hosts (instances `svc@host`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// SSH user (overrides the host's).
    #[serde(default)]
    pub user: Option<String>,
    /// SSH key (overrides the host's).
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// For a `wireguard` target: a file holding the node's WireGuard private key
    /// (base64), instead of one made for each run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_key: Option<String>,
    /// A program already on the host.
    #[serde(default)]
    pub binary: Option<String>,
    /// Arguments of `binary`.
    #[serde(default)]
    pub args: Vec<String>,
    /// A package to deploy (`NAME-VERSION.tar.zst` or `.tar.gz`).
    #[serde(default)]
    pub package: Option<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Commands run on the host before each deploy (e.g. installing what the
    /// package's `system_requires` names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup_commands: Vec<String>,
    /// Package only: commands run in a new release before `current` points at it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_install: Vec<String>,
    /// Package only: commands run in the release once `current` points at it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_install: Vec<String>,
    /// Package only: releases kept on the host, the current one included (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_releases: Option<usize>,
    /// `simple` (default: the harness supervises it) or `systemd` (a generated unit,
    /// checked with `systemd-analyze verify`, run by systemd where systemd runs the
    /// host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<String>,
    /// Builds the program that `package` (then a package directory) bundles in bin/.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
}

/// How to build the program a package directory bundles (`type: cargo` or
/// `type: command`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// `cargo` or `command`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Where the build runs (default: the config file's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// cargo: the Cargo.toml (default: the one in `dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// cargo: the binary to build (`--bin`); its name in the package's bin/ (default:
    /// cargo's only binary, or the command's output file name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bin: Option<String>,
    /// cargo: `--target` (a target triple).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// cargo: `--features`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// cargo: `--profile` (default `release`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// command: run with `sh -c` in `dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// command: the program it makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// A service the harness finds and uses instead of starting one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoveredTarget {
    /// Kind of service: `postgresql`, `redis`, `http`, `ssh`.
    #[serde(rename = "type")]
    pub kind: String,
    /// CIDR ranges to look in (default: the stack's `discovery.ranges`, else
    /// 127.0.0.1 only).
    #[serde(default)]
    pub ranges: Vec<String>,
    /// Ports to try (default: the service's fixed `port`, else the kind's usual port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// Where and how discovery looks: flags of `harness discover`, the `DISCOVERY_*`
/// variables, a config's `discovery:` section. Unset fields take the defaults below.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryOptions {
    /// Strategies to run: `tcp`, `http`, `dns`, `mdns` (default: tcp and http, plus dns
    /// when SRV names are given and mdns when interfaces are given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub strategies: Vec<String>,
    /// CIDR ranges or single addresses to scan (IPv4; default `127.0.0.1` only, never
    /// a private range).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<String>,
    /// Ports the tcp strategy tries (default [`DEFAULT_TCP_PORTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_ports: Vec<u16>,
    /// Ports the http strategy asks for `/health` and `/ready` (default
    /// [`DEFAULT_HTTP_PORTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_ports: Vec<u16>,
    /// Connect timeout per probe, in ms (default [`DEFAULT_TCP_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_timeout_ms: Option<u64>,
    /// Timeout of an HTTP request, in ms (default [`DEFAULT_HTTP_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_timeout_ms: Option<u64>,
    /// Most connects in flight at once (default [`DEFAULT_DISCOVERY_CONCURRENCY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Probe every port of every address. By default an on-link address that does not
    /// answer ARP within the connect timeout has no host, and its other ports are
    /// skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub probe_all: bool,
    /// DNS servers (`ip` or `ip:port`) asked for SRV records (default: the system's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    /// SRV names to look up, e.g. `_postgresql._tcp.example.internal`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub srv_names: Vec<String>,
    /// Interfaces mDNS queries go out on (mdns runs only on interfaces given).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mdns_interfaces: Vec<String>,
    /// mDNS service types to browse (default [`DEFAULT_MDNS_TYPES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mdns_types: Vec<String>,
    /// How long mDNS listens for answers, in ms (default [`DEFAULT_MDNS_WAIT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdns_wait_ms: Option<u64>,
}

impl DiscoveryOptions {
    /// Nothing set (the section is left out of the canonical config).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    /// `self`, with every field it leaves unset taken from `fallback`.
    pub fn or(mut self, fallback: &DiscoveryOptions) -> DiscoveryOptions {
        fn list<T: Clone>(own: &mut Vec<T>, other: &[T]) {
            if own.is_empty() {
                *own = other.to_vec();
            }
        }
        list(&mut self.strategies, &fallback.strategies);
        list(&mut self.ranges, &fallback.ranges);
        list(&mut self.tcp_ports, &fallback.tcp_ports);
        list(&mut self.http_ports, &fallback.http_ports);
        list(&mut self.dns_servers, &fallback.dns_servers);
        list(&mut self.srv_names, &fallback.srv_names);
        list(&mut self.mdns_interfaces, &fallback.mdns_interfaces);
        list(&mut self.mdns_types, &fallback.mdns_types);
        self.tcp_timeout_ms = self.tcp_timeout_ms.or(fallback.tcp_timeout_ms);
        self.http_timeout_ms = self.http_timeout_ms.or(fallback.http_timeout_ms);
        self.concurrency = self.concurrency.or(fallback.concurrency);
        self.mdns_wait_ms = self.mdns_wait_ms.or(fallback.mdns_wait_ms);
        self.probe_all |= fallback.probe_all;
        self
    }
}

/// Ports the tcp strategy tries by default (the deployment guide's list).
pub const DEFAULT_TCP_PORTS: [u16; 7] = [22, 5432, 6379, 8000, 8080, 9090, 3000];
/// Ports the http strategy tries by default.
pub const DEFAULT_HTTP_PORTS: [u16; 5] = [80, 8000, 8080, 9090, 3000];
/// Default connect timeout of a discovery probe, in ms.
pub const DEFAULT_TCP_TIMEOUT_MS: u64 = 1000;
/// Default timeout of a discovery HTTP request, in ms.
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 3000;
/// Default number of discovery connects in flight.
pub const DEFAULT_DISCOVERY_CONCURRENCY: usize = 256;
/// mDNS service types browsed by default.
pub const DEFAULT_MDNS_TYPES: [&str; 4] = [
    "_postgresql._tcp.local.",
    "_redis._tcp.local.",
    "_http._tcp.local.",
    "_ssh._tcp.local.",
];
/// Default time mDNS listens for answers, in ms.
pub const DEFAULT_MDNS_WAIT_MS: u64 = 1500;
/// The strategies [`DiscoveryOptions::strategies`] may name.
pub const DISCOVERY_STRATEGIES: [&str; 4] = ["tcp", "http", "dns", "mdns"];

/// A service that already runs at a known address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalTarget {
    /// `host:port`.
    pub address: String,
}

impl ExternalTarget {
    /// (host, port) of the address (`[v6]:port` gives the bare v6 host); `None` when it
    /// is not `host:port`.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let (host, port) = self.address.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| (host.to_owned(), port))
    }
}

/// Port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[schemars(with = "PortSpecRepr")]
pub enum PortSpec {
    /// This port.
    Fixed(u16),
    /// A free port picked by the harness when the service starts.
    Auto,
}

/// Wire shape of [`PortSpec`]: a number or the string `auto`.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum PortSpecRepr {
    Fixed(u16),
    Auto(AutoWord),
}

/// The word `auto`.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum AutoWord {
    Auto,
}

impl Serialize for PortSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortSpec::Fixed(p) => s.serialize_u16(*p),
            PortSpec::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a port number from 1 to 65535 or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortSpec, E> {
                match u16::try_from(v) {
                    Ok(p) if p > 0 => Ok(PortSpec::Fixed(p)),
                    _ => Err(E::custom(format!(
                        "bad port {v}: expected a port number from 1 to 65535 or \"auto\""
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortSpec, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "bad port {v}: expected a port number from 1 to 65535 or \"auto\""
                    ))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortSpec, E> {
                if v == "auto" {
                    return Ok(PortSpec::Auto);
                }
                match v.parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!(
                        "bad port {v:?}: expected a port number from 1 to 65535 or \"auto\""
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A dependency edge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    /// What the dependency must reach before the dependent starts. Default: `healthy`
    /// when the dependency has a health check, else `started`.
    #[serde(default)]
    pub condition: Option<Condition>,
}

/// Condition a dependency must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Its process runs.
    Started,
    /// Its health check passed.
    Healthy,
    /// It ran to completion with exit code 0 (one-shot jobs such as migrations).
    Completed,
}

/// A health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// What to check.
    pub check: CheckKind,
    /// Time between checks once healthy, in ms (default 10 s).
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// Time one check may take, in ms (default 5 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Failures in a row before the service is unhealthy (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// Grace period after start during which failures do not count, in ms (default 0).
    #[serde(default)]
    pub start_period_ms: Option<u64>,
}

/// Default of [`HealthCheck::interval_ms`].
pub const DEFAULT_CHECK_INTERVAL_MS: u64 = 10_000;
/// Default of [`HealthCheck::timeout_ms`].
pub const DEFAULT_CHECK_TIMEOUT_MS: u64 = 5_000;
/// Default of [`HealthCheck::retries`].
pub const DEFAULT_CHECK_RETRIES: u32 = 3;
/// Default of [`ServiceConfig::stop_timeout_ms`].
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 10_000;

/// The kinds of health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckKind {
    /// An HTTP GET that must answer with `expected_status` (default: any 2xx).
    Http {
        /// URL (may hold `${self.addr}`).
        url: String,
        /// Status that counts as healthy.
        #[serde(default)]
        expected_status: Option<u16>,
    },
    /// A TCP connect.
    Tcp {
        /// Host (default: the service's address).
        #[serde(default)]
        host: Option<String>,
        /// Port (default: the service's port).
        #[serde(default)]
        port: Option<u16>,
    },
    /// A command run with the service's environment; exit code must match.
    Command {
        /// Program, or a shell command line when `args` is empty.
        command: String,
        /// Arguments.
        #[serde(default)]
        args: Vec<String>,
        /// Exit code that counts as healthy (default 0).
        #[serde(default)]
        expected_exit_code: Option<i32>,
    },
    /// A script file run with the service's environment; must exit 0.
    Script {
        /// Path of the script.
        path: String,
        /// Arguments.
        #[serde(default)]
        args: Vec<String>,
    },
}

/// Restart policy and its backoff.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartConfig {
    /// When to restart.
    #[serde(default)]
    pub policy: RestartPolicy,
    /// Restarts in a row (without becoming healthy) before the service is failed
    /// (default [`DEFAULT_MAX_RESTARTS`]).
    #[serde(default)]
    pub max_restarts: Option<u32>,
}

/// Default of [`RestartConfig::max_restarts`].
pub const DEFAULT_MAX_RESTARTS: u32 = 5;

/// When a service is restarted after it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never (the default, as in docker compose).
    #[default]
    No,
    /// When it exits with a non-zero code or a signal.
    OnFailure,
    /// Whenever it exits on its own.
    Always,
}

/// Linux number of a signal named like `TERM`, `SIGTERM`, `sigint` or `15`, as accepted
/// by `stop_signal`.
pub fn signal_number(name: &str) -> Option<i32> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("ABRT", 6),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("ALRM", 14),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
        ("TSTP", 20),
        ("WINCH", 28),
        ("PWR", 30),
    ];
    let name = name.trim();
    if let Ok(n) = name.parse::<i32>() {
        return NAMES.iter().any(|(_, v)| *v == n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    NAMES.iter().find(|(n, _)| *n == bare).map(|(_, v)| *v)
}
