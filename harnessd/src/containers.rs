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
    format!("harness-{}-{short}", docker_name_part(stack))
}

/// The container of a service.
pub fn container_name(stack: &str, name: &str) -> String {
    format!("harness-{}-{name}", docker_name_part(stack))
}

/// `stack` as a part of a Docker object name, where only `[a-zA-Z0-9_.-]` is allowed
/// (a stack named after a directory may hold anything else): every other byte, and
/// `.`, becomes `.` and its two hex digits, so two stack names never give one name.
fn docker_name_part(stack: &str) -> std::borrow::Cow<'_, str> {
    let kept = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if stack.bytes().all(kept) {
        return stack.into();
    }
    stack
        .bytes()
        .map(|b| {
            if kept(b) {
                char::from(b).to_string()
            } else {
                format!(".{b:02x}")
            }
        })
        .collect::<String>()
        .into()
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

/// Where an SSH host's engine listens unless `docker_socket:` says otherwise.
const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The SSH host a docker service's engine runs on (`host:` of its target), if not the
/// local one.
pub fn engine_host(cfg: &ServiceConfig) -> Option<&str> {
    match &cfg.target {
        Target::Docker(t) => t.host.as_deref(),
        _ => None,
    }
}

/// An engine on an SSH host and the forward of its socket that carries it.
pub struct RemoteEngine {
    engine: Engine,
    forward: deployer::ssh::SocketForward,
}

impl Core {
    /// The engine of `host` (a host reference of `stack`'s config), or the local one
    /// for `None`; made on first use.
    pub async fn engine_for(&self, stack: &str, host: Option<&str>) -> Result<Engine, String> {
        let Some(host) = host else {
            return self.engine().await;
        };
        let settings = self
            .read(|st| {
                st.stack(stack)
                    .map(|r| crate::remote::host_config(&r.config, host))
            })
            .ok_or_else(|| format!("no stack named {stack}"))?;
        let ssh = self.ssh_host(&settings, None)?;
        let socket = settings
            .docker_socket
            .clone()
            .unwrap_or_else(|| DEFAULT_DOCKER_SOCKET.to_owned());
        let key = (ssh.target().clone(), socket.clone());
        let mut engines = self.remote_engines.lock().await;
        match engines.get(&key) {
            Some(remote) if remote.forward.is_alive() => return Ok(remote.engine.clone()),
            // Its session ended (sshd restarted, the link was cut): forward again.
            Some(_) => drop(engines.remove(&key)),
            None => {}
        }
        // Say what is missing before forwarding anything.
        let probe = format!(
            "test -S {0} && test -r {0} && test -w {0}",
            deployer::ssh::quote(&socket)
        );
        let out = ssh
            .exec(&probe, b"", std::time::Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        if out.status != 0 {
            return Err(format!(
                "no Docker engine on {host}: {socket} is not a socket {} can use there; install one (`sudo apt-get install docker.io` on Debian, or https://docs.docker.com/engine/install/), start it, and add {} to the docker group (or set `docker_socket:` on the host)",
                ssh.target().user,
                ssh.target().user
            ));
        }
        let dir = self.state_dir.join("engines");
        smol::fs::create_dir_all(&dir)
            .await
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // One socket per host and engine socket, named after them (unix socket paths
        // are short).
        let local = {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            key.hash(&mut h);
            dir.join(format!("{:016x}.sock", h.finish()))
        };
        let (target, remote, at) = (ssh.target().clone(), socket.clone(), local.clone());
        let forward =
            smol::unblock(move || deployer::ssh::SocketForward::start(&target, &remote, &at))
                .await
                .map_err(|e| e.to_string())?;
        let shown = format!("{socket} on {host} (through SSH)");
        let engine = Engine::connect_unix(&local, &shown)
            .await
            .map_err(|e| e.to_string())?;
        engines.insert(
            key,
            RemoteEngine {
                engine: engine.clone(),
                forward,
            },
        );
        Ok(engine)
    }

    /// The engine a service's containers run on.
    pub async fn engine_of(&self, stack: &str, name: &str) -> Result<Engine, String> {
        let host = self.read(|st| {
            st.stack(stack)
                .and_then(|r| r.config.services.get(name))
                .and_then(|c| engine_host(c).map(str::to_owned))
        });
        self.engine_for(stack, host.as_deref()).await
    }

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
        let host = self.read(|st| {
            st.stack(stack)
                .and_then(|r| r.config.services.get(name))
                .and_then(|c| engine_host(c).map(str::to_owned))
        });
        let engine = self.engine_for(stack, host.as_deref()).await?;
        let network = network_name(&self.instance, stack);
        let gateway = engine
            .ensure_network(&network, &self.labels(stack))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("network {network} has no gateway address"))?;
        // A container on the local engine calls others from the bridge; one on an SSH
        // host's engine from that host's LAN, as a service there does.
        let place = match &host {
            None => Place::Container { gateway },
            Some(_) => self.read(|st| env::place_of(st, stack, name)),
        };
        let reaches_host_at = match &place {
            Place::Container { gateway } => format!("containers reach the host at {gateway}"),
            Place::Lan { hub } => format!(
                "containers on {} reach the harness host at {hub}",
                host.as_deref().unwrap_or_default()
            ),
            _ => String::new(),
        };
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
                "dependency {dep} listens on loopback only (127.0.0.1:{port}), which a container cannot reach; {reaches_host_at}, so make {dep} listen on all interfaces (0.0.0.0, or ${{self.bind}} in its args)"
            ));
        }
        let env_file_on_engine = match &host {
            None => self.env_file(stack, name),
            Some(h) => {
                let settings = self.read(|st| {
                    st.stack(stack)
                        .map(|r| crate::remote::host_config(&r.config, h))
                });
                let settings = settings.ok_or("stack was removed")?;
                PathBuf::from(self.remote_dir(&settings, stack, name)).join("service.env")
            }
        };
        let (mut spec, source, harness_env) =
            self.read(|st| self.container_spec(st, stack, name, &place, &env_file_on_engine))?;
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
        if let Some(h) = &host {
            self.put_env_file_on(stack, h, &env_file_on_engine, &harness_env)
                .await?;
        }
        engine.create(&spec).await.map_err(|e| e.to_string())?;
        let mut record = engine
            .start(&spec.name, &network)
            .await
            .map_err(|e| e.to_string())?;
        record.engine_host = host;
        Ok((record, harness_env))
    }

    /// Writes a container's env file on SSH host `host`, where its engine mounts it
    /// (0600: values may be secrets).
    async fn put_env_file_on(
        &self,
        stack: &str,
        host: &str,
        path: &std::path::Path,
        env: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let settings = self
            .read(|st| {
                st.stack(stack)
                    .map(|r| crate::remote::host_config(&r.config, host))
            })
            .ok_or("stack was removed")?;
        let ssh = self.ssh_host(&settings, None)?;
        let dir = path.parent().unwrap_or(std::path::Path::new("/"));
        let command = format!(
            "umask 077 && mkdir -p {} && cat > {}",
            deployer::ssh::quote(&dir.display().to_string()),
            deployer::ssh::quote(&path.display().to_string())
        );
        ssh.check(
            "write the container's env file",
            &command,
            env::render_env_file(env).as_bytes(),
            std::time::Duration::from_secs(30),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn container_spec(
        &self,
        st: &State,
        stack: &str,
        name: &str,
        place: &Place,
        env_file_on_engine: &std::path::Path,
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
        volumes.push(format!(
            "{}:{ENV_FILE_IN_CONTAINER}:ro",
            env_file_on_engine.display()
        ));
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
        // Every engine the stack's docker services use: the local one, SSH hosts'.
        let engines: std::collections::BTreeSet<Option<String>> = self.read(|st| {
            st.stack(stack).map_or_else(Default::default, |r| {
                r.config
                    .services
                    .values()
                    .filter(|s| matches!(s.target, Target::Docker(_)))
                    .map(|s| engine_host(s).map(str::to_owned))
                    .collect()
            })
        });
        let mut done = Vec::new();
        for host in engines {
            match self.engine_for(stack, host.as_deref()).await {
                Ok(engine) => done.extend(self.remove_on(&engine, stack, names).await),
                Err(e) => done.push(format!("cannot remove the containers of {stack}: {e}")),
            }
        }
        done
    }

    /// [`remove_containers`](Self::remove_containers) on one engine.
    async fn remove_on(&self, engine: &Engine, stack: &str, names: &[String]) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_stack_name_gives_a_docker_name_of_its_own() {
        assert_eq!(container_name("shop_2-x", "web"), "harness-shop_2-x-web");
        assert_eq!(container_name("My Shop", "web"), "harness-My.20Shop-web");
        // `.` is escaped too, so the escape of one name is never another name.
        assert_eq!(
            container_name("My.20Shop", "web"),
            "harness-My.2e20Shop-web"
        );
        assert_eq!(container_name("ü", "db"), "harness-.c3.bc-db");
        assert_eq!(
            network_name("0123456789abcdef", "a b"),
            "harness-a.20b-01234567"
        );
    }
}
