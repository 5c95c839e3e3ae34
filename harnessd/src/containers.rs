//! Services with a docker target: turning their config into a container spec, the
//! engine connection, and removing what the harness made on `down`.
//!
//! Each stack gets one bridge network, `harness-<stack>-<instance>`, and each service one
//! container, `harness-<stack>-<service>`, both labelled with the daemon instance
//! and the stack. Host ports of published container ports are picked by the harness
//! (and kept in the registry), so a service's address stays the same across restarts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use deployer::docker::{
    ContainerRecord, ContainerSpec, Engine, ImageSource, PublishedPort, PullPolicy, LABEL_INSTANCE,
    LABEL_SERVICE, LABEL_STACK,
};
use protocol::config::{
    DockerTarget, PortMapping, PortSpec, ServiceConfig, Target, DEFAULT_STOP_TIMEOUT_MS,
};
use protocol::events::{EventKind, Progress};
use registry::ServiceRecord;

use crate::core::{Core, State};
use crate::env::{self, Place};

/// Where a container finds its env file.
const ENV_FILE_IN_CONTAINER: &str = "/run/harness/service.env";

/// The network of a stack's containers. It carries the daemon instance in its name,
/// so two daemons with a stack of the same name never share a network.
pub fn network_name(instance: &str, stack: &str) -> String {
    let short = instance.get(..8).unwrap_or(instance);
    format!("harness-{stack}-{short}")
}

/// The container of a service.
pub fn container_name(stack: &str, name: &str) -> String {
    format!("harness-{stack}-{name}")
}

/// The container record of a service, when it runs in a container.
pub fn record_of(rec: &ServiceRecord) -> Option<ContainerRecord> {
    match crate::run::Run::of(rec)? {
        crate::run::Run::Container(c) => Some(c),
        _ => None,
    }
}

/// The port a docker service is reached at: its first `ports` entry, else its
/// `port:` published on a port the harness picks.
pub fn main_port(cfg: &ServiceConfig) -> Option<PortMapping> {
    let Target::Docker(target) = &cfg.target else {
        return None;
    };
    match target.ports.first() {
        Some(first) => PortMapping::parse(first).ok(),
        None => match cfg.port {
            Some(PortSpec::Fixed(p)) => Some(PortMapping {
                host_ip: None,
                host_port: None,
                container_port: p,
                protocol: "tcp".to_owned(),
            }),
            _ => None,
        },
    }
}

/// The host port the main port is published on: fixed in the config, kept from an
/// earlier run, or a free one.
pub fn main_host_port(cfg: &ServiceConfig, kept: Option<u16>) -> Option<u16> {
    let mapping = main_port(cfg)?;
    mapping
        .host_port
        .or(kept)
        .or_else(crate::orchestrator::free_port)
}

fn image_source(target: &DockerTarget) -> ImageSource {
    match (&target.build, &target.rootfs) {
        (Some(context), _) => ImageSource::Build {
            context: PathBuf::from(context),
            dockerfile: target
                .dockerfile
                .clone()
                .unwrap_or_else(|| "Dockerfile".to_owned()),
        },
        (None, Some(rootfs)) => ImageSource::Rootfs(PathBuf::from(rootfs)),
        (None, None) => ImageSource::Registry(PullPolicy::from_config(target.pull.as_deref())),
    }
}

/// Docker wants `SIGTERM`; the config may say `TERM`, `SIGTERM` or `15`.
fn docker_signal(name: Option<&str>) -> String {
    let name = name.unwrap_or("TERM");
    if name.chars().all(|c| c.is_ascii_digit()) || name.starts_with("SIG") {
        name.to_owned()
    } else {
        format!("SIG{name}")
    }
}

impl Core {
    /// The engine connection, made on first use (stacks without containers never
    /// touch the engine); a failed attempt is not kept, so a later start retries.
    pub async fn engine(&self) -> Result<Engine, String> {
        let mut slot = self.docker.lock().await;
        if let Some(engine) = slot.as_ref() {
            return Ok(engine.clone());
        }
        let engine = Engine::connect().await.map_err(|e| e.to_string())?;
        *slot = Some(engine.clone());
        Ok(engine)
    }

    /// Labels that mark what this daemon made for `stack`.
    fn labels(&self, stack: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_INSTANCE.to_owned(), self.instance.clone()),
            (LABEL_STACK.to_owned(), stack.to_owned()),
        ])
    }

    /// Makes (or reuses) and starts the container of a service; returns its record and
    /// the variables the harness set (for the env file).
    pub async fn launch_container(
        &self,
        stack: &str,
        name: &str,
    ) -> Result<(ContainerRecord, BTreeMap<String, String>), String> {
        let engine = self.engine().await?;
        let network = network_name(&self.instance, stack);
        let gateway = engine
            .ensure_network(&network, &self.labels(stack))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("network {network} has no gateway address"))?;
        let candidates = self.read(|st| host_process_dependencies(st, stack, name));
        let blocking = smol::unblock(move || {
            candidates.into_iter().find(|(_, port)| {
                let listeners = deployer::process::tcp_listeners(*port);
                !listeners.is_empty() && listeners.iter().all(|ip| ip.is_loopback())
            })
        })
        .await;
        if let Some((dep, port)) = blocking {
            return Err(format!(
                "dependency {dep} listens on loopback only (127.0.0.1:{port}), which a container cannot reach; containers reach the host at {gateway}, so make {dep} listen on all interfaces (0.0.0.0, or ${{self.bind}} in its args)"
            ));
        }
        let place = Place::Container { gateway };
        let (mut spec, source, harness_env) =
            self.read(|st| self.container_spec(st, stack, name, &place))?;
        // Each distinct line once: a pull repeats "<layer>: Downloading" for every chunk.
        let mut seen = std::collections::HashSet::new();
        let mut progress = |message: String| {
            if seen.insert(message.clone()) {
                self.events.publish(EventKind::ServiceProgress(Progress {
                    stack: stack.to_owned(),
                    name: name.to_owned(),
                    message,
                }));
            }
        };
        spec.image_id = engine
            .ensure_image(&spec.image, &source, &mut progress)
            .await
            .map_err(|e| e.to_string())?;
        env::save_env_file(self.env_file(stack, name), harness_env.clone()).await?;
        engine.create(&spec).await.map_err(|e| e.to_string())?;
        let record = engine
            .start(&spec.name, &network)
            .await
            .map_err(|e| e.to_string())?;
        Ok((record, harness_env))
    }

    fn container_spec(
        &self,
        st: &State,
        stack: &str,
        name: &str,
        place: &Place,
    ) -> Result<(ContainerSpec, ImageSource, BTreeMap<String, String>), String> {
        let stack_rec = st.stack(stack).ok_or("stack was removed")?;
        let cfg = &stack_rec.config.services[name];
        let Target::Docker(target) = &cfg.target else {
            return Err(format!("service {name} is not a container"));
        };
        let env_file = self.env_file(stack, name);
        let mut harness_env = env::service_env(st, stack, name, place, &env_file)?;
        harness_env.insert(
            "HARNESS_ENV_FILE".to_owned(),
            ENV_FILE_IN_CONTAINER.to_owned(),
        );
        let expand = |s: &String| env::expand(st, stack, name, place, s);
        let kept = stack_rec.services.get(name).and_then(|r| r.port);
        let mut ports = Vec::new();
        let mappings: Vec<PortMapping> = match target.ports.is_empty() {
            true => main_port(cfg).into_iter().collect(),
            false => target
                .ports
                .iter()
                .map(|p| PortMapping::parse(p))
                .collect::<Result<_, _>>()?,
        };
        for (i, m) in mappings.into_iter().enumerate() {
            let host_port = match (i, m.host_port) {
                (_, Some(p)) => p,
                // The main port's host port is the service's address: keep it stable.
                (0, None) => kept.ok_or("no free port to publish on")?,
                (_, None) => 0,
            };
            ports.push(PublishedPort {
                host_ip: m.host_ip,
                host_port,
                container_port: m.container_port,
                protocol: m.protocol,
            });
        }
        let mut volumes = target.volumes.clone();
        volumes.push(format!("{}:{ENV_FILE_IN_CONTAINER}:ro", env_file.display()));
        let mut labels = self.labels(stack);
        labels.insert(LABEL_SERVICE.to_owned(), name.to_owned());
        let timeout_ms = cfg.stop_timeout_ms.unwrap_or(DEFAULT_STOP_TIMEOUT_MS);
        let spec = ContainerSpec {
            name: container_name(stack, name),
            image: target.image.clone(),
            // Known once the image is made (see `launch_container`).
            image_id: String::new(),
            command: target
                .command
                .iter()
                .map(expand)
                .collect::<Result<_, _>>()?,
            entrypoint: target
                .entrypoint
                .iter()
                .map(expand)
                .collect::<Result<_, _>>()?,
            env: harness_env.clone(),
            ports,
            volumes,
            working_dir: target.working_dir.clone(),
            user: target.user.clone(),
            extra_hosts: target.extra_hosts.clone(),
            stop_signal: docker_signal(cfg.stop_signal.as_deref()),
            stop_timeout_secs: timeout_ms.div_ceil(1000) as u32,
            network: network_name(&self.instance, stack),
            aliases: vec![name.to_owned()],
            labels,
        };
        Ok((spec, image_source(target), harness_env))
    }

    /// Removes the containers of `names` of a stack (all of the stack's, and its
    /// network, when `names` is empty) that this daemon made; returns what it did, in
    /// words.
    pub async fn remove_containers(&self, stack: &str, names: &[String]) -> Vec<String> {
        let engine = match self.engine().await {
            Ok(e) => e,
            Err(e) => return vec![format!("cannot remove the containers of {stack}: {e}")],
        };
        let mut done = Vec::new();
        let owned = match engine.owned(&self.instance, Some(stack)).await {
            Ok(list) => list,
            Err(e) => return vec![e.to_string()],
        };
        let removals = owned
            .into_iter()
            .filter(|c| names.is_empty() || names.contains(&c.service))
            .map(|c| {
                let engine = engine.clone();
                async move {
                    match engine.remove(&c.id).await {
                        Ok(()) => format!("removed container {}", c.name),
                        Err(e) => e.to_string(),
                    }
                }
            });
        // All at once: the engine removes containers in parallel.
        done.extend(futures_util::future::join_all(removals).await);
        if names.is_empty() {
            match engine.remove_networks(&self.instance, Some(stack)).await {
                Ok(removed) => {
                    done.extend(removed.into_iter().map(|n| format!("removed network {n}")))
                }
                Err(e) => done.push(e.to_string()),
            }
        }
        done
    }
}

/// The host-process dependencies of a service with their ports: a container reaches
/// them through the host gateway, which a loopback-only listener does not answer.
fn host_process_dependencies(st: &State, stack: &str, name: &str) -> Vec<(String, u16)> {
    let Some(stack_rec) = st.stack(stack) else {
        return Vec::new();
    };
    stack_rec.config.services[name]
        .depends_on
        .keys()
        .filter(|dep| {
            matches!(
                stack_rec.config.services.get(*dep).map(|s| &s.target),
                Some(Target::Process(_))
            )
        })
        .filter_map(|dep| Some((dep.clone(), stack_rec.services.get(dep)?.port?)))
        .collect()
}

/// Whether a stack config has a docker service.
pub fn has_containers(config: &protocol::config::StackConfig) -> bool {
    config
        .services
        .values()
        .any(|s| matches!(s.target, Target::Docker(_)))
}
