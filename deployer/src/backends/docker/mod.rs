//! The docker backend: containers on a Docker engine through bollard.
//!
//! bollard runs on tokio; harnessd runs on smol. The bridge is [`on_tokio`], and it is
//! the only one: every call into bollard in this module is awaited inside it, which
//! gives the call a tokio context (async-compat starts one tokio thread on first use).
//! Nothing outside this module sees bollard.
//!
//! Containers carry labels ([`LABEL_INSTANCE`] and friends): the daemon instance, the
//! stack, the service and a hash of the container's config. The harness only ever
//! touches containers labelled with its own instance, so two daemons (or two test
//! runs) share an engine safely, and a changed config is noticed by its hash.

mod image;
mod logs;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use async_compat::Compat;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EndpointSettings, HostConfig,
    NetworkCreateRequest, NetworkingConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, ListNetworksOptions,
    RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use protocol::methods::ExecOutput;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use image::{ImageSource, PullPolicy};

use crate::process::ExitStatus;
use crate::DeployError;

/// Label with the daemon instance id that made a container or network.
pub const LABEL_INSTANCE: &str = "dev.harness.instance";
/// Label with the stack a container or network belongs to.
pub const LABEL_STACK: &str = "dev.harness.stack";
/// Label with the service a container runs.
pub const LABEL_SERVICE: &str = "dev.harness.service";
/// Label with the hash of the container's config ([`ContainerSpec::config_hash`]).
pub const LABEL_CONFIG: &str = "dev.harness.config";

/// Runs a future that awaits bollard inside a tokio context (see the module docs).
fn on_tokio<F: Future>(future: F) -> Compat<F> {
    Compat::new(future)
}

/// A connection to a Docker engine.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    host: String,
    /// Networks known to exist, by name, with their gateways. The lock also
    /// serializes [`Engine::ensure_network`]: the engine lets several networks share a
    /// name, so concurrent starts of one stack would each make one.
    networks: std::sync::Arc<async_lock::Mutex<HashMap<String, Option<String>>>>,
}

/// What the harness asks the engine to run for one service.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerSpec {
    /// Container name (`harness-<stack>-<service>`).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// The image's id ([`Engine::ensure_image`]): a rebuilt image changes the config
    /// hash, so the container is made again from it.
    pub image_id: String,
    /// Command (empty: the image's CMD).
    pub command: Vec<String>,
    /// Entrypoint (empty: the image's ENTRYPOINT).
    pub entrypoint: Vec<String>,
    /// Environment, resolved.
    pub env: BTreeMap<String, String>,
    /// Published ports, each with a host port (picked by the caller when the config
    /// left it open).
    pub ports: Vec<PublishedPort>,
    /// Bind mounts and volumes, `"src:dst[:opts]"`.
    pub volumes: Vec<String>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// User.
    pub user: Option<String>,
    /// Extra `/etc/hosts` entries.
    pub extra_hosts: Vec<String>,
    /// Signal that `stop` sends first (e.g. `SIGTERM`).
    pub stop_signal: String,
    /// Seconds `stop` waits before SIGKILL.
    pub stop_timeout_secs: u32,
    /// The network to join (see [`Engine::ensure_network`]).
    pub network: String,
    /// Aliases on that network (the service's name).
    pub aliases: Vec<String>,
    /// Labels; [`LABEL_CONFIG`] is added by [`Engine::create`].
    pub labels: BTreeMap<String, String>,
}

impl ContainerSpec {
    /// A hash of everything that shapes the container: a different hash means the
    /// container must be made again.
    pub fn config_hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a spec serializes");
        let digest = Sha256::digest(json);
        digest[..12].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A container port published on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// Host address (`None`: all).
    pub host_ip: Option<String>,
    /// Host port (0 in a spec: the engine picks one).
    pub host_port: u16,
    /// Port inside the container.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// What harnessd records about a running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Engine id.
    pub container_id: String,
    /// Name.
    pub container_name: String,
    /// Address on the stack's network.
    pub ip: Option<String>,
    /// The network's gateway: the host as seen from the container.
    pub gateway: Option<String>,
    /// The container's main process, as the host sees it.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Published ports.
    pub ports: Vec<PublishedPort>,
    /// The SSH host whose engine runs it (its name in the stack's `hosts:`); none for
    /// the local engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_host: Option<String>,
}

/// A container of this daemon found on the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedContainer {
    /// Engine id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Its stack label.
    pub stack: String,
    /// Its service label.
    pub service: String,
    /// Whether it runs.
    pub running: bool,
}

/// State of a container, as far as the harness cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// It runs.
    Running,
    /// It stopped with this status.
    Exited(ExitStatus),
    /// The engine does not know it.
    Gone,
}

fn engine_error(action: &str, target: &str, e: BollardError) -> DeployError {
    let detail = match e {
        BollardError::DockerResponseServerError { message, .. } => message,
        other => other.to_string(),
    };
    DeployError::Docker {
        action: format!("{action} {target}"),
        detail,
    }
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Exit status from an engine exit code (a container killed by signal N exits 128+N).
fn exit_status(code: i64) -> ExitStatus {
    ExitStatus {
        code: Some(code as i32),
        signal: None,
        error: None,
    }
}

impl Engine {
    /// Connects to the engine at `DOCKER_HOST`, else the default unix socket, and
    /// checks that it answers.
    pub async fn connect() -> Result<Engine, DeployError> {
        let host = std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
        let unreachable = |detail: String| DeployError::NoEngine {
            host: host.clone(),
            detail,
        };
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(e.to_string()))?;
        Self::checked(docker, host).await
    }

    /// Connects to an engine through the unix socket `path` (a forward of a remote
    /// host's engine socket); `shown` names it in messages.
    pub async fn connect_unix(path: &std::path::Path, shown: &str) -> Result<Engine, DeployError> {
        let unreachable = |detail: String| DeployError::NoEngine {
            host: shown.to_owned(),
            detail,
        };
        let path = path
            .to_str()
            .ok_or_else(|| unreachable("the socket path is not UTF-8".into()))?;
        let docker = Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
            .map_err(|e| unreachable(e.to_string()))?;
        Self::checked(docker, shown.to_owned()).await
    }

    /// The engine behind `docker` once it answers a ping (at the API version both
    /// sides speak).
    async fn checked(docker: Docker, host: String) -> Result<Engine, DeployError> {
        let docker = on_tokio(async move {
            let docker = docker.negotiate_version().await?;
            docker.ping().await?;
            Ok::<_, BollardError>(docker)
        })
        .await
        .map_err(|e| DeployError::NoEngine {
            host: host.clone(),
            detail: e.to_string(),
        })?;
        Ok(Engine {
            docker,
            host,
            networks: Default::default(),
        })
    }

    /// The address the engine was reached at.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Makes the bridge network `name` unless it exists; returns its gateway address
    /// (the host as seen from its containers).
    pub async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>, DeployError> {
        let docker = &self.docker;
        let mut known = self.networks.lock().await;
        if let Some(gateway) = known.get(name) {
            // Starting a stack's containers asks once per container; ask the engine
            // once.
            return Ok(gateway.clone());
        }
        let gateway = on_tokio(async {
            let existing = match docker.inspect_network(name, None).await {
                Ok(n) => Some(n),
                Err(e) if is_not_found(&e) => None,
                Err(e) => return Err(engine_error("inspect network", name, e)),
            };
            let network = match existing {
                Some(n) => n,
                None => {
                    let request = NetworkCreateRequest {
                        name: name.to_owned(),
                        driver: Some("bridge".to_owned()),
                        labels: Some(labels.clone().into_iter().collect()),
                        ..Default::default()
                    };
                    docker
                        .create_network(request)
                        .await
                        .map_err(|e| engine_error("create network", name, e))?;
                    docker
                        .inspect_network(name, None)
                        .await
                        .map_err(|e| engine_error("inspect network", name, e))?
                }
            };
            Ok(network
                .ipam
                .and_then(|i| i.config)
                .and_then(|c| c.into_iter().find_map(|c| c.gateway)))
        })
        .await?;
        known.insert(name.to_owned(), gateway.clone());
        Ok(gateway)
    }

    /// Removes the networks labelled with `instance` (and `stack`, when given);
    /// returns their names.
    pub async fn remove_networks(
        &self,
        instance: &str,
        stack: Option<&str>,
    ) -> Result<Vec<String>, DeployError> {
        let docker = &self.docker;
        let mut known = self.networks.lock().await;
        on_tokio(async {
            let filters = HashMap::from([("label".to_owned(), label_filter(instance, stack))]);
            let networks = docker
                .list_networks(Some(ListNetworksOptions {
                    filters: Some(filters),
                }))
                .await
                .map_err(|e| engine_error("list networks of", instance, e))?;
            let mut removed = Vec::new();
            // By id: names need not be unique on an engine.
            for network in networks {
                let (Some(id), name) = (network.id, network.name.unwrap_or_default()) else {
                    continue;
                };
                known.remove(&name);
                match docker.remove_network(&id).await {
                    Ok(()) => removed.push(name),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(engine_error("remove network", &name, e)),
                }
            }
            Ok(removed)
        })
        .await
    }

    /// The container named `spec.name` when it exists and was made by this instance
    /// from the same config; otherwise removes it (only when it is ours) and creates
    /// it afresh. Returns the container id. A container of that name that is not ours
    /// is an error: the harness never touches it.
    pub async fn create(&self, spec: &ContainerSpec) -> Result<String, DeployError> {
        let hash = spec.config_hash();
        let instance = spec.labels.get(LABEL_INSTANCE).cloned().unwrap_or_default();
        let docker = &self.docker;
        let created = on_tokio(async {
            match docker
                .inspect_container(&spec.name, None::<InspectContainerOptions>)
                .await
            {
                Ok(existing) => {
                    let labels = existing
                        .config
                        .as_ref()
                        .and_then(|c| c.labels.clone())
                        .unwrap_or_default();
                    let id = existing.id.clone().unwrap_or_default();
                    if labels.get(LABEL_INSTANCE) != Some(&instance) {
                        return Err(DeployError::Docker {
                            action: format!("create container {}", spec.name),
                            detail: format!(
                                "a container of that name exists and was not made by this harness daemon ({}); remove or rename it",
                                labels
                                    .get(LABEL_INSTANCE)
                                    .map_or("no harness label".to_owned(), |i| format!("instance {i}"))
                            ),
                        });
                    }
                    if labels.get(LABEL_CONFIG) == Some(&hash) {
                        return Ok(id);
                    }
                    remove(docker, &id).await?;
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(engine_error("inspect container", &spec.name, e)),
            }
            let body = create_body(spec, &hash);
            let created = docker
                .create_container(
                    Some(CreateContainerOptions {
                        name: Some(spec.name.clone()),
                        ..Default::default()
                    }),
                    body,
                )
                .await
                .map_err(|e| engine_error("create container", &spec.name, e))?;
            Ok(created.id)
        })
        .await;
        if created.is_err() {
            // Perhaps the network went away behind our back: look again next time.
            self.networks.lock().await.remove(&spec.network);
        }
        created
    }

    /// Starts a container (by id or name; a running one is left alone) and returns its
    /// record. A container that cannot start is removed, so nothing half-made stays
    /// behind.
    pub async fn start(&self, id: &str, network: &str) -> Result<ContainerRecord, DeployError> {
        let docker = &self.docker;
        on_tokio(async {
            if let Err(e) = docker.start_container(id, None).await {
                let _ = remove(docker, id).await;
                return Err(engine_error("start container", id, e));
            }
            let info = inspect(docker, id).await?;
            Ok(record(info, network))
        })
        .await
    }

    /// A container's record, for adopting it after a daemon restart.
    pub async fn record(&self, id: &str, network: &str) -> Result<ContainerRecord, DeployError> {
        let docker = &self.docker;
        on_tokio(async { Ok(record(inspect(docker, id).await?, network)) }).await
    }

    /// Whether a container runs, exited (and how) or is gone.
    pub async fn state(&self, id: &str) -> Result<ContainerState, DeployError> {
        let docker = &self.docker;
        on_tokio(async {
            match docker
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
            {
                Ok(info) => Ok(container_state(&info)),
                Err(e) if is_not_found(&e) => Ok(ContainerState::Gone),
                Err(e) => Err(engine_error("inspect container", id, e)),
            }
        })
        .await
    }

    /// Waits until a container stops; returns how it ended.
    pub async fn wait_exit(&self, id: &str) -> ExitStatus {
        let docker = &self.docker;
        on_tokio(async {
            let options = WaitContainerOptions {
                condition: "not-running".to_owned(),
            };
            let mut waits = docker.wait_container(id, Some(options));
            let outcome = waits.next().await;
            match outcome {
                Some(Ok(r)) => exit_status(r.status_code),
                // bollard reports a non-zero exit as this error.
                Some(Err(BollardError::DockerContainerWaitError { code, .. })) => exit_status(code),
                Some(Err(e)) => match inspect(docker, id).await.map(|i| container_state(&i)) {
                    Ok(ContainerState::Exited(status)) => status,
                    _ => ExitStatus {
                        code: None,
                        signal: None,
                        error: Some(format!("lost track of container {id}: {e}")),
                    },
                },
                None => ExitStatus {
                    code: None,
                    signal: None,
                    error: Some(format!("the engine ended the wait for container {id}")),
                },
            }
        })
        .await
    }

    /// Stops a container: its stop signal, then SIGKILL after `timeout`. Returns how
    /// it ended (`None` when it was not running).
    pub async fn stop(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<ExitStatus>, DeployError> {
        let docker = &self.docker;
        on_tokio(async {
            let options = StopContainerOptions {
                t: Some(timeout.as_secs().try_into().unwrap_or(i32::MAX)),
                signal: None,
            };
            match docker.stop_container(id, Some(options)).await {
                Ok(()) => {}
                Err(BollardError::DockerResponseServerError {
                    status_code: 304, ..
                }) => return Ok(None),
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(engine_error("stop container", id, e)),
            }
            match container_state(&inspect(docker, id).await?) {
                ContainerState::Exited(status) => Ok(Some(status)),
                _ => Ok(None),
            }
        })
        .await
    }

    /// Removes a container with its anonymous volumes (forcefully: it may run).
    pub async fn remove(&self, id: &str) -> Result<(), DeployError> {
        on_tokio(remove(&self.docker, id)).await
    }

    /// Runs a command inside a running container with extra `env`, sending its output
    /// to `sink` as (stream, bytes) as it comes; returns its exit code.
    pub async fn exec(
        &self,
        id: &str,
        argv: &[String],
        env: &[(String, String)],
        sink: async_channel::Sender<ExecOutput>,
    ) -> Result<Option<i32>, DeployError> {
        let config = CreateExecOptions {
            cmd: Some(argv.to_vec()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..Default::default()
        };
        let docker = &self.docker;
        on_tokio(async {
            let exec = docker
                .create_exec(id, config)
                .await
                .map_err(|e| engine_error("exec in container", id, e))?;
            let started = docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| engine_error("exec in container", id, e))?;
            if let StartExecResults::Attached { mut output, .. } = started {
                while let Some(chunk) = output.next().await {
                    let (stream, bytes) =
                        match chunk.map_err(|e| engine_error("read exec output of", id, e))? {
                            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                                ("stdout", message)
                            }
                            LogOutput::StdErr { message } => ("stderr", message),
                            LogOutput::StdIn { .. } => continue,
                        };
                    let output = ExecOutput {
                        stream: stream.to_owned(),
                        data: String::from_utf8_lossy(&bytes).into_owned(),
                    };
                    if sink.send(output).await.is_err() {
                        break;
                    }
                }
            }
            let info = docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| engine_error("inspect exec in", id, e))?;
            Ok(info.exit_code.map(|c| c as i32))
        })
        .await
    }

    /// The containers labelled with `instance` (and `stack`, when given).
    pub async fn owned(
        &self,
        instance: &str,
        stack: Option<&str>,
    ) -> Result<Vec<OwnedContainer>, DeployError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_owned(),
                label_filter(instance, stack),
            )])),
            ..Default::default()
        };
        let docker = &self.docker;
        let list = on_tokio(docker.list_containers(Some(options)))
            .await
            .map_err(|e| engine_error("list containers of", instance, e))?;
        Ok(list
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
                OwnedContainer {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_owned())
                        .unwrap_or_default(),
                    stack: label(LABEL_STACK),
                    service: label(LABEL_SERVICE),
                    running: c.state.is_some_and(|s| s.to_string() == "running"),
                }
            })
            .collect())
    }
}

/// The engine's label filter for what `instance` made (for `stack`).
fn label_filter(instance: &str, stack: Option<&str>) -> Vec<String> {
    let mut labels = vec![format!("{LABEL_INSTANCE}={instance}")];
    if let Some(stack) = stack {
        labels.push(format!("{LABEL_STACK}={stack}"));
    }
    labels
}

async fn inspect(docker: &Docker, id: &str) -> Result<ContainerInspectResponse, DeployError> {
    docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .map_err(|e| engine_error("inspect container", id, e))
}

async fn remove(docker: &Docker, id: &str) -> Result<(), DeployError> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        link: false,
    };
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(engine_error("remove container", id, e)),
    }
}

fn container_state(info: &ContainerInspectResponse) -> ContainerState {
    let Some(state) = &info.state else {
        return ContainerState::Gone;
    };
    if state.running == Some(true) {
        return ContainerState::Running;
    }
    let error = state.error.clone().filter(|e| !e.is_empty());
    ContainerState::Exited(ExitStatus {
        code: state.exit_code.map(|c| c as i32),
        signal: None,
        error,
    })
}

fn record(info: ContainerInspectResponse, network: &str) -> ContainerRecord {
    let settings = info.network_settings.unwrap_or_default();
    let endpoint = settings
        .networks
        .as_ref()
        .and_then(|n| n.get(network))
        .cloned()
        .unwrap_or_default();
    let mut ports = Vec::new();
    for (key, bindings) in settings.ports.unwrap_or_default() {
        let (port, protocol) = key.split_once('/').unwrap_or((&key, "tcp"));
        let Ok(container_port) = port.parse() else {
            continue;
        };
        for b in bindings.unwrap_or_default() {
            // The engine lists IPv4 and IPv6 bindings; one per port is enough.
            if ports
                .iter()
                .any(|p: &PublishedPort| p.container_port == container_port)
            {
                continue;
            }
            if let Some(host_port) = b.host_port.and_then(|p| p.parse().ok()) {
                ports.push(PublishedPort {
                    host_ip: b.host_ip.filter(|ip| !ip.is_empty() && ip != "0.0.0.0"),
                    host_port,
                    container_port,
                    protocol: protocol.to_owned(),
                });
            }
        }
    }
    ports.sort_by_key(|p| p.container_port);
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    ContainerRecord {
        container_id: info.id.unwrap_or_default(),
        container_name: info
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        pid: info
            .state
            .and_then(|s| s.pid)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0),
        ip: nonempty(endpoint.ip_address),
        gateway: nonempty(endpoint.gateway),
        ports,
        engine_host: None,
    }
}

fn create_body(spec: &ContainerSpec, hash: &str) -> ContainerCreateBody {
    let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
    labels.insert(LABEL_CONFIG.to_owned(), hash.to_owned());
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        bindings
            .entry(format!("{}/{}", p.container_port, p.protocol))
            .or_default()
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: p.host_ip.clone(),
                // 0: the engine picks one.
                host_port: (p.host_port != 0).then(|| p.host_port.to_string()),
            });
    }
    let nonempty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: nonempty(&spec.command),
        entrypoint: nonempty(&spec.entrypoint),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        exposed_ports: Some(bindings.keys().cloned().collect()),
        working_dir: spec.working_dir.clone(),
        user: spec.user.clone(),
        labels: Some(labels),
        stop_signal: Some(spec.stop_signal.clone()),
        stop_timeout: Some(spec.stop_timeout_secs.into()),
        host_config: Some(HostConfig {
            port_bindings: Some(bindings),
            binds: nonempty(&spec.volumes),
            extra_hosts: nonempty(&spec.extra_hosts),
            network_mode: Some(spec.network.clone()),
            // The harness restarts by its own policy, never the engine's.
            restart_policy: None,
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                spec.network.clone(),
                EndpointSettings {
                    aliases: Some(spec.aliases.clone()),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "harness-s-web".into(),
            image: "busybox".into(),
            image_id: "sha256:1".into(),
            command: vec!["httpd".into(), "-f".into()],
            entrypoint: vec![],
            env: BTreeMap::from([("A".into(), "1".into())]),
            ports: vec![PublishedPort {
                host_ip: None,
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
            }],
            volumes: vec![],
            working_dir: None,
            user: None,
            extra_hosts: vec![],
            stop_signal: "SIGTERM".into(),
            stop_timeout_secs: 10,
            network: "harness-s".into(),
            aliases: vec!["web".into()],
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn config_hash_changes_with_the_config_only() {
        let a = spec();
        assert_eq!(a.config_hash(), spec().config_hash());
        let mut b = spec();
        b.env.insert("A".into(), "2".into());
        assert_ne!(a.config_hash(), b.config_hash());
        let body = create_body(&a, &a.config_hash());
        let bindings = body.host_config.unwrap().port_bindings.unwrap();
        assert_eq!(
            bindings["80/tcp"].as_ref().unwrap()[0].host_port.as_deref(),
            Some("8080")
        );
        assert_eq!(body.labels.unwrap()[LABEL_CONFIG], a.config_hash());
    }
}
