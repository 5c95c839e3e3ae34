//! Services on mesh nodes (`wireguard` targets): the hub's data plane, each node's
//! agent, their keys and mesh addresses.
//!
//! On demand: the hub (a `harness-node` beside harnessd, with a control socket in
//! `<state>/mesh/`) starts with the first mesh service and stops with the last one,
//! taking its TUN device and routes with it; stacks without mesh services never touch
//! TUN or routes. A node joins when its service starts: a mesh address (the lowest one
//! free), a fresh key pair, a peer on the hub, the agent binary and its config
//! (`network/wireguard.conf`, 0600, in the run's directory) sent over SSH, the agent
//! started, and a ping of the hub's mesh address over the tunnel before the service
//! starts. Private keys go only into 0600 files: never into arguments, logs or events.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use deployer::release;
use deployer::ssh::{quote, SshHost};
use futures_lite::{AsyncBufReadExt, AsyncWriteExt};
use protocol::config::{HostConfig, StackConfig, Target};
use serde::{Deserialize, Serialize};
use wg_mesh::config::{Cidr, Config, Interface};
use wg_mesh::keys::{PrivateKey, PublicKey};
use wg_mesh::subnet::{Subnet, DEFAULT_SUBNET};

use protocol::events::{EventKind, MeshPeerChange, MeshUp};
use protocol::methods::{MeshPeer, ServiceState};

use crate::core::Core;
use crate::remote::RemoteRun;

/// The hub's UDP port unless `network.listen_port` says otherwise.
pub const DEFAULT_PORT: u16 = 51820;

/// How long a node's tunnel may take to answer a ping once its agent started.
const TUNNEL_UP: Duration = Duration::from_secs(10);

/// What a mesh service's run records about its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshMember {
    /// Its mesh address.
    pub mesh_ip: String,
    /// Its public key (the hub's peer).
    pub public_key: String,
    /// Where its agent, its config and the agent's log and pid are on the host.
    pub network_dir: String,
    /// The hub's relay for LAN callers: `hub address towards the LAN:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan_relay: Option<String>,
    /// Whether its agent runs under `sudo -n` (the host's `sudo: true`), and so is
    /// stopped that way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sudo: bool,
    /// Whether its agent takes SIGHUP for a new handshake (agents sent before that
    /// was added end on it instead).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rehandshake: bool,
}

/// The hub's running data plane: started by this daemon (`child`), or found running
/// after a daemon restart (the data plane outlives harnessd, so no tunnel drops).
pub struct Hub {
    child: Option<std::process::Child>,
    pid: u32,
    control: PathBuf,
    public: PublicKey,
    port: u16,
    subnet: Subnet,
    /// Addresses handed out in this hub's life (recorded in the registry only once
    /// the node joined or the relay runs), so two services starting at once never get
    /// the same one.
    handed_out: HashSet<Ipv4Addr>,
}

impl Hub {
    /// A hub found running: started by an earlier daemon, not this one's child.
    fn found(pid: u32, control: PathBuf, public: PublicKey, port: u16, subnet: Subnet) -> Hub {
        Hub {
            child: None,
            pid,
            control,
            public,
            port,
            subnet,
            handed_out: HashSet::new(),
        }
    }

    /// Its line in `hub.pid` (what [`Hub::from_record`] reads back).
    fn record(&self) -> String {
        format!(
            "{} {} {} {}\n",
            self.pid, self.port, self.subnet, self.public
        )
    }

    /// The hub `hub.pid` records, serving `control` (whether it runs is not checked).
    fn from_record(text: &str, control: PathBuf) -> Option<Hub> {
        let mut words = text.split_whitespace();
        let pid: u32 = words.next()?.parse().ok()?;
        let port: u16 = words.next()?.parse().ok()?;
        let subnet = Subnet::parse(words.next()?).ok()?;
        let public = PublicKey::from_base64(words.next()?).ok()?;
        Some(Hub::found(pid, control, public, port, subnet))
    }

    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => is_hub_process(self.pid, &self.control),
        }
    }
}

/// Whether `pid` is a hub agent serving `control` (a reused pid is not).
fn is_hub_process(pid: u32, control: &std::path::Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let control = control.as_os_str().as_encoded_bytes();
    args.first().is_some_and(|a| a.ends_with(b"harness-node")) && args.contains(&control)
}

/// The pids of processes carrying exactly this daemon's hub marker.
async fn hub_agents(marker: &str) -> Vec<u32> {
    let marker = marker.to_owned();
    smol::unblock(move || {
        deployer::process::find_instances(&marker)
            .into_iter()
            .filter(|(_, m)| *m == marker)
            .map(|(pid, _)| pid)
            .collect()
    })
    .await
}

/// Ends the agents with this daemon's hub marker that do not serve its control socket
/// (so cannot be adopted): they would hold the interface's name, and a new hub could
/// not make its device. One that serves the socket is never ended: it is adopted.
async fn end_unrecorded_hubs(marker: &str, control: &std::path::Path) {
    let strays: Vec<u32> = hub_agents(marker)
        .await
        .into_iter()
        .filter(|&pid| !is_hub_process(pid, control))
        .collect();
    if strays.is_empty() {
        return;
    }
    for &pid in &strays {
        if deployer::process::kill_stray(pid) {
            tracing::warn!("ended mesh hub agent {pid}, which no record owned");
        }
    }
    // Its device goes with it, once it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let left = hub_agents(marker).await;
        if !strays.iter().any(|p| left.contains(p)) {
            return;
        }
        smol::Timer::after(Duration::from_millis(20)).await;
    }
}

/// The stack's mesh subnet (`network.wireguard_subnet`, default 10.42.0.0/16).
pub fn subnet_of(config: &StackConfig) -> Result<Subnet, String> {
    let text = config
        .network
        .wireguard_subnet
        .as_deref()
        .unwrap_or(DEFAULT_SUBNET);
    Subnet::parse(text).map_err(|e| e.to_string())
}

/// The hub's mesh address in a stack: where mesh nodes reach the harness host.
pub fn hub_address(config: &StackConfig) -> Option<Ipv4Addr> {
    subnet_of(config).ok().map(|s| s.hub())
}

/// The `HARNESS_INSTANCE` marker of the hub's data plane: found by the same sweeps as
/// services' processes (a test that kills the daemon still ends it), and kept by the
/// reconcile pass.
pub fn hub_instance(instance: &str) -> String {
    format!("{instance}/-/mesh-hub")
}

/// The interface name of this daemon's mesh (on the hub and on its nodes).
pub fn interface_name(instance: &str) -> String {
    format!("hm{}", instance.get(..10).unwrap_or(instance))
}

/// A dependency of a mesh service, as `Core::relay_dependencies` sees it.
struct MeshDependency {
    name: String,
    /// Where a host process reaches it.
    to: (String, u16),
    /// Whether it runs on this host (and so listens on the alias itself).
    local: bool,
    /// Its mesh address, once it has one.
    alias: Option<String>,
}

impl Core {
    /// Starts the hub's data plane unless it runs; returns its public key and port.
    async fn ensure_hub(&self, config: &StackConfig) -> Result<(PublicKey, u16), String> {
        let mut hub = self.mesh.lock().await;
        if hub.is_none() {
            *hub = self.adopt_hub().await;
        }
        if let Some(h) = hub.as_mut() {
            if h.alive() {
                return Ok((h.public, h.port));
            }
            *hub = None;
        }
        let subnet = subnet_of(config)?;
        let port = config.network.listen_port.unwrap_or(DEFAULT_PORT);
        let dir = self.state_dir.join("mesh");
        let key = match &config.network.hub_key {
            Some(file) => key_from_file(file).await?,
            None => hub_key(&dir).await?,
        };
        let public = key.public();
        let conf = Config {
            interface: Interface {
                private_key: key,
                address: Cidr {
                    addr: subnet.hub(),
                    prefix: subnet.prefix,
                },
                listen_port: Some(port),
                mtu: None,
            },
            peers: Vec::new(),
        };
        let conf_path = dir.join("hub.conf");
        crate::env::write_private(conf_path.clone(), conf.render()).await?;
        let control = dir.join("hub.sock");
        let log = dir.join("hub.log");
        let agent = agent_program();
        let interface = interface_name(&self.instance);
        let marker = hub_instance(&self.instance);
        end_unrecorded_hubs(&marker, &control).await;
        let (child, ready) = smol::unblock(move || -> Result<_, String> {
            use std::io::BufRead;
            use std::os::unix::process::CommandExt;
            let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let mut child = std::process::Command::new(&agent)
                .arg("--config")
                .arg(&conf_path)
                .args(["--interface", &interface])
                .arg("--control")
                .arg(&control)
                .env("HARNESS_INSTANCE", &marker)
                // Its own process group: a signal to the daemon's group (Ctrl-C on a
                // foreground harnessd) must not take the tunnels down.
                .process_group(0)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(err)
                .spawn()
                .map_err(|e| format!("cannot start the mesh hub ({}): {e}", agent.display()))?;
            let mut line = String::new();
            let out = child.stdout.take().expect("piped stdout");
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            Ok((child, line))
        })
        .await?;
        let mut child = child;
        if !ready.starts_with("ready") {
            let _ = child.kill();
            let _ = child.wait();
            let why = std::fs::read_to_string(dir.join("hub.log")).unwrap_or_default();
            return Err(format!("the mesh hub did not start: {}", why.trim()));
        }
        // Recorded before anything else, so a daemon killed from here on adopts it.
        let started = Hub::found(child.id(), dir.join("hub.sock"), public, port, subnet);
        crate::env::write_private(dir.join("hub.pid"), started.record()).await?;
        // While the mesh is in use its subnet never falls through to the default
        // route: with the hub's device gone (it crashed), the kernel answers
        // "unreachable" instead of sending mesh traffic elsewhere.
        ip_route("replace", &subnet).await?;
        self.events.publish(EventKind::MeshUp(MeshUp {
            subnet: subnet.to_string(),
            interface: interface_name(&self.instance),
            port,
        }));
        *hub = Some(Hub {
            child: Some(child),
            ..started
        });
        Ok((public, port))
    }

    /// The hub a previous run of the daemon started, when it still runs: the one
    /// `hub.pid` names, else one it started but did not get to record (it was killed
    /// in between), known by its marker and control socket and read from `hub.conf`.
    async fn adopt_hub(&self) -> Option<Hub> {
        match self.adopt_recorded_hub().await {
            Some(hub) => Some(hub),
            None => self.adopt_unrecorded_hub().await,
        }
    }

    async fn adopt_unrecorded_hub(&self) -> Option<Hub> {
        let dir = self.state_dir.join("mesh");
        let control = dir.join("hub.sock");
        let pid = hub_agents(&hub_instance(&self.instance))
            .await
            .into_iter()
            .find(|&pid| is_hub_process(pid, &control))?;
        let text = smol::fs::read_to_string(dir.join("hub.conf")).await.ok()?;
        let conf = Config::parse(&text, "hub.conf").ok()?;
        let i = &conf.interface;
        let port = i.listen_port?;
        let subnet = Subnet::parse(&format!("{}/{}", i.address.addr, i.address.prefix)).ok()?;
        let hub = Hub::found(pid, control, i.private_key.public(), port, subnet);
        if let Err(e) = crate::env::write_private(dir.join("hub.pid"), hub.record()).await {
            tracing::warn!("{e}");
        }
        if let Err(e) = ip_route("replace", &hub.subnet).await {
            tracing::warn!("{e}");
        }
        tracing::info!("adopted the mesh hub (pid {pid}), which no record named");
        Some(hub)
    }

    async fn adopt_recorded_hub(&self) -> Option<Hub> {
        let dir = self.state_dir.join("mesh");
        let text = smol::fs::read_to_string(dir.join("hub.pid")).await.ok()?;
        let hub = Hub::from_record(&text, dir.join("hub.sock"))?;
        if !is_hub_process(hub.pid, &hub.control) {
            return None;
        }
        tracing::info!("adopted the mesh hub (pid {})", hub.pid);
        Some(hub)
    }

    /// One request to the hub's control socket.
    async fn hub_call(&self, request: serde_json::Value) -> Result<serde_json::Value, String> {
        let control = {
            let mut hub = self.mesh.lock().await;
            if hub.is_none() {
                *hub = self.adopt_hub().await;
            }
            hub.as_ref()
                .map(|h| h.control.clone())
                .ok_or("the mesh hub is not running")?
        };
        let mut stream = async_net::unix::UnixStream::connect(&control)
            .await
            .map_err(|e| format!("mesh hub control socket: {e}"))?;
        stream
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(|e| format!("mesh hub control socket: {e}"))?;
        let mut line = String::new();
        futures_lite::io::BufReader::new(stream)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("mesh hub control socket: {e}"))?;
        let answer: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("mesh hub answered {line:?}: {e}"))?;
        match answer.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(format!("mesh hub: {e}")),
            None => Ok(answer),
        }
    }

    /// Joins a node to the mesh for service `name`, whose run directory on the host is
    /// `dir`: address, key, hub peer, agent and config, tunnel checked by a ping.
    pub async fn join_mesh(
        &self,
        stack: &str,
        name: &str,
        ssh: &SshHost,
        host: &HostConfig,
        dir: &str,
    ) -> Result<MeshMember, String> {
        let config = self
            .read(|st| st.stack(stack).map(|r| r.config.clone()))
            .ok_or("stack was removed")?;
        let subnet = subnet_of(&config)?;
        let (hub_public, port) = self.ensure_hub(&config).await?;
        let mesh_ip = self.free_mesh_address(subnet).await?;
        let given = match config.services.get(name).map(|s| &s.target) {
            Some(Target::Wireguard(t)) => t.wireguard_key.clone(),
            _ => None,
        };
        let key = match given {
            Some(file) => key_from_file(&file).await?,
            None => PrivateKey::generate().map_err(|e| e.to_string())?,
        };
        let public_key = key.public().to_string();
        self.hub_call(serde_json::json!({
            "op": "add_peer", "public_key": public_key, "allowed_ips": [format!("{mesh_ip}/32")],
        }))
        .await?;
        let hub_lan = crate::remote::hub_address_towards(&host.address)
            .ok_or_else(|| format!("no route from here to {}", host.address))?;
        let endpoint = format!("{hub_lan}:{port}")
            .parse()
            .map_err(|e| format!("hub endpoint: {e}"))?;
        let node = Config::node(
            key,
            Cidr {
                addr: mesh_ip,
                prefix: subnet.prefix,
            },
            hub_public,
            endpoint,
            Cidr {
                addr: subnet.network,
                prefix: subnet.prefix,
            },
        );
        let net = format!("{dir}/network");
        let timeout = Duration::from_secs(60);
        let agent = smol::unblock(|| std::fs::read(agent_program()))
            .await
            .map_err(|e| {
                format!(
                    "cannot read the node agent {}: {e}",
                    agent_program().display()
                )
            })?;
        let to = format!("{net}/harness-node");
        let upload = format!(
            "umask 077 && mkdir -p {0} && cat > {1}.tmp && chmod 700 {1}.tmp && mv -f {1}.tmp {1}",
            quote(&net),
            quote(&to)
        );
        ssh.check("send the mesh agent", &upload, &agent, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let conf = format!("{net}/wireguard.conf");
        let write = format!("umask 077 && cat > {}", quote(&conf));
        ssh.check(
            "write the node's WireGuard config",
            &write,
            node.render().as_bytes(),
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        // Under sudo the whole script runs as root, so the pid it records is the
        // agent's own (not sudo's) and a later stop may signal it.
        let start = release::privileged(
            &format!(
                "cd {net} && {{ [ -f agent.pid ] && kill $(cat agent.pid) 2>/dev/null; sleep 0.1; }}; setsid ./harness-node --config wireguard.conf --interface {ifname} > agent.log 2>&1 < /dev/null & echo $! > {pid}",
                net = quote(&net),
                ifname = interface_name(&self.instance),
                pid = quote(&format!("{net}/agent.pid")),
            ),
            host.sudo,
        );
        ssh.check("start the mesh agent", &start, b"", timeout)
            .await
            .map_err(|e| e.to_string())?;
        let hub_ip = subnet.hub();
        // (busybox's ping needs root for its raw socket.)
        let ping = release::privileged(
            &format!("ping -c 1 -W 1 {hub_ip} >/dev/null 2>&1 || busybox ping -c 1 -W 1 {hub_ip} >/dev/null 2>&1"),
            host.sudo,
        );
        let deadline = Instant::now() + TUNNEL_UP;
        loop {
            let out = ssh
                .exec(&ping, b"", timeout)
                .await
                .map_err(|e| e.to_string())?;
            if out.status == 0 {
                break;
            }
            if Instant::now() >= deadline {
                let log = ssh
                    .exec(&format!("tail -5 {}/agent.log", quote(&net)), b"", timeout)
                    .await
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                    .unwrap_or_default();
                let _ = self
                    .hub_call(serde_json::json!({"op": "remove_peer", "public_key": public_key}))
                    .await;
                return Err(format!(
                    "{name}: the mesh tunnel from {} to the hub ({hub_ip}) did not answer a ping within {} s; the agent said: {log}",
                    host.address,
                    TUNNEL_UP.as_secs()
                ));
            }
            smol::Timer::after(Duration::from_millis(100)).await;
        }
        self.events
            .publish(EventKind::MeshPeerAdded(MeshPeerChange {
                stack: stack.to_owned(),
                name: name.to_owned(),
                node: host_name(&config, host),
                mesh_ip: mesh_ip.to_string(),
                public_key: public_key.clone(),
                reason: None,
            }));
        let lan_relay = self.relay_for_lan(stack, name, mesh_ip).await?;
        Ok(MeshMember {
            mesh_ip: mesh_ip.to_string(),
            public_key,
            network_dir: net,
            lan_relay,
            sudo: host.sudo,
            rehandshake: true,
        })
    }

    /// Takes a node out of the mesh: its agent stopped, its peer removed at once; the
    /// hub stops with the last node.
    pub async fn leave_mesh(&self, ssh: &SshHost, run: &RemoteRun, why: &str) {
        let Some(member) = &run.mesh else {
            return;
        };
        let net = &member.network_dir;
        let stop = release::privileged(
            &format!(
                "cd {} && [ -f agent.pid ] && kill $(cat agent.pid) 2>/dev/null; rm -f agent.pid",
                quote(net)
            ),
            member.sudo,
        );
        let _ = ssh.exec(&stop, b"", Duration::from_secs(30)).await;
        self.remove_peer(run, member, why).await;
        if let Some(listen) = &member.lan_relay {
            let _ = self
                .hub_call(serde_json::json!({"op": "remove_relay", "listen": listen}))
                .await;
        }
        // Another mesh service still active: one with a run of another key, or one
        // still joining (no run recorded yet), whose join needs the hub.
        let others = self.read(|st| {
            st.snap.stacks.iter().any(|(stack, r)| {
                r.services.iter().any(|(name, s)| {
                    let itself = stack == &run.remote_stack && name == &run.remote_service;
                    let other_key = matches!(crate::run::Run::of(s), Some(crate::run::Run::Remote(run)) if run.mesh.as_ref().is_some_and(|m| m.public_key != member.public_key));
                    s.state.is_active() && (other_key || (!itself && is_mesh(&r.config, name)))
                })
            })
        });
        if !others {
            self.end_hub().await;
        }
    }

    /// Stops the hub this daemon runs, if any, and says so.
    async fn end_hub(&self) {
        let hub = self.mesh.lock().await.take();
        if let Some(hub) = hub {
            let subnet = hub.subnet.to_string();
            let port = hub.port;
            stop_hub(hub, &self.state_dir.join("mesh")).await;
            self.events.publish(EventKind::MeshDown(MeshUp {
                subnet,
                interface: interface_name(&self.instance),
                port,
            }));
        }
    }

    /// Gives every dependency of mesh service `name` that is not itself on the mesh a
    /// mesh address of its own, an alias on the hub's device (kept in the registry),
    /// so a node, which has only its tunnel, reaches host processes, host containers,
    /// LAN and external services alike (DESIGN.md's network model). What runs on this
    /// host listens on all its addresses (processes bind `${self.bind}`, which is all
    /// of them once a stack has more than processes; containers publish on all), the
    /// alias included; everything else gets a relay from the alias to the address a
    /// host process would use.
    pub async fn relay_dependencies(&self, stack: &str, name: &str) -> Result<(), String> {
        let (config, deps) = self
            .read(|st| {
                let r = st.stack(stack)?;
                let deps: Vec<MeshDependency> = r.config.services[name]
                    .depends_on
                    .keys()
                    .filter(|d| {
                        r.config
                            .services
                            .get(*d)
                            .is_some_and(|s| !matches!(s.target, Target::Wireguard(_)))
                    })
                    .filter_map(|d| {
                        let to = crate::env::endpoint(r, d, &crate::env::Place::Host)?;
                        let local = match &r.config.services.get(d)?.target {
                            Target::Process(_) => true,
                            Target::Docker(t) => t.host.is_none(),
                            _ => false,
                        };
                        let alias = r.services.get(d)?.mesh_alias.clone();
                        Some(MeshDependency {
                            name: d.clone(),
                            to,
                            local,
                            alias,
                        })
                    })
                    .collect();
                Some((r.config.clone(), deps))
            })
            .ok_or("stack was removed")?;
        if deps.is_empty() {
            return Ok(());
        }
        let subnet = subnet_of(&config)?;
        self.ensure_hub(&config).await?;
        for MeshDependency {
            name: dep,
            to: (host, port),
            local,
            alias,
        } in deps
        {
            let alias = match alias {
                Some(a) => a,
                None => self.free_mesh_address(subnet).await?.to_string(),
            };
            let request = if local {
                serde_json::json!({"op": "add_alias", "address": alias})
            } else {
                serde_json::json!({"op": "add_relay", "listen": format!("{alias}:{port}"), "to": format!("{host}:{port}")})
            };
            self.hub_call(request).await?;
            self.update(|st, _| {
                if let Some(rec) = st.service_mut(stack, &dep) {
                    rec.mesh_alias = Some(alias.clone());
                }
            });
        }
        Ok(())
    }

    /// A relay on the hub's LAN address for a mesh service that LAN services depend
    /// on; its address (`None` when none does).
    async fn relay_for_lan(
        &self,
        stack: &str,
        name: &str,
        mesh_ip: Ipv4Addr,
    ) -> Result<Option<String>, String> {
        let target = self.read(|st| {
            let r = st.stack(stack)?;
            let lan_caller = r.config.services.iter().find(|(_, s)| {
                matches!(s.target, Target::RemoteLan(_)) && s.depends_on.contains_key(name)
            })?;
            let (_, _, host) = crate::remote::remote_target(&r.config, lan_caller.0)?;
            Some((host.address, r.services.get(name)?.port?))
        });
        let Some((lan_host, port)) = target else {
            return Ok(None);
        };
        let hub = crate::remote::hub_address_towards(&lan_host)
            .ok_or_else(|| format!("no route from here to {lan_host}"))?;
        let relay_port =
            crate::orchestrator::free_port().ok_or("no free port for the LAN relay")?;
        let listen = format!("{hub}:{relay_port}");
        self.hub_call(serde_json::json!({"op": "add_relay", "listen": listen, "to": format!("{mesh_ip}:{port}")}))
            .await?;
        Ok(Some(listen))
    }

    /// Removes a node's peer from the hub (its traffic stops at once) and says so.
    async fn remove_peer(&self, run: &RemoteRun, member: &MeshMember, why: &str) {
        let removed = self
            .hub_call(serde_json::json!({"op": "remove_peer", "public_key": member.public_key}))
            .await;
        if matches!(removed, Ok(ref a) if a["ok"] == true) {
            self.events
                .publish(EventKind::MeshPeerRemoved(MeshPeerChange {
                    stack: run.remote_stack.clone(),
                    name: run.remote_service.clone(),
                    node: run.record.host.clone(),
                    mesh_ip: member.mesh_ip.clone(),
                    public_key: member.public_key.clone(),
                    reason: Some(why.to_owned()),
                }));
        }
    }

    /// The hub's peers (`mesh.peers`), with the services their nodes run; none while
    /// no mesh service runs.
    pub async fn mesh_peers(&self, stack: Option<&str>) -> Result<Vec<MeshPeer>, String> {
        let running = self.mesh.lock().await.is_some() || self.adopt_hub().await.is_some();
        if !running {
            return Ok(Vec::new());
        }
        let answer = self.hub_call(serde_json::json!({"op": "peers"})).await?;
        let stats: Vec<wg_mesh::dataplane::PeerStats> =
            serde_json::from_value(answer["peers"].clone()).map_err(|e| e.to_string())?;
        let runs = self.mesh_runs(stack);
        Ok(stats
            .into_iter()
            .filter_map(|p| {
                let (run, member) = runs.iter().find(|(_, m)| m.public_key == p.public_key)?;
                Some(MeshPeer {
                    stack: run.remote_stack.clone(),
                    name: run.remote_service.clone(),
                    node: run.record.host.clone(),
                    mesh_ip: member.mesh_ip.clone(),
                    public_key: p.public_key,
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    handshake_age_secs: p.handshake_age_secs,
                    tx_bytes: p.tx_bytes,
                    rx_bytes: p.rx_bytes,
                })
            })
            .collect())
    }

    /// At start: removes the hub's peers that no active mesh run owns (a daemon killed
    /// between stopping a node's agent and removing its peer leaves one behind).
    /// Returns what it removed, for `daemon.reconciled`.
    pub async fn reconcile_mesh(&self) -> Vec<String> {
        let running = self.mesh.lock().await.is_some() || self.adopt_hub().await.is_some();
        if !running {
            return Vec::new();
        }
        let stats: Vec<wg_mesh::dataplane::PeerStats> =
            match self.hub_call(serde_json::json!({"op": "peers"})).await {
                Ok(answer) => serde_json::from_value(answer["peers"].clone()).unwrap_or_default(),
                Err(e) => return vec![format!("the mesh hub did not list its peers: {e}")],
            };
        let owned: HashSet<String> = self
            .mesh_runs(None)
            .into_iter()
            .map(|(_, m)| m.public_key)
            .collect();
        let mut fixes = Vec::new();
        for peer in stats.into_iter().filter(|p| !owned.contains(&p.public_key)) {
            let request = serde_json::json!({"op": "remove_peer", "public_key": peer.public_key});
            match self.hub_call(request).await {
                Ok(_) => fixes.push(format!(
                    "removed the mesh peer {} ({}), which no service owns",
                    peer.public_key,
                    peer.allowed_ips.join(", ")
                )),
                Err(e) => fixes.push(format!(
                    "cannot remove the stale mesh peer {}: {e}",
                    peer.public_key
                )),
            }
        }
        fixes
    }

    /// Cuts node `node` of `stack` off the mesh (`mesh.revoke`): its peers removed at
    /// once, then its services stopped, so no restart brings it back. Returns them.
    pub async fn revoke(
        self: &std::sync::Arc<Self>,
        stack: &str,
        node: &str,
    ) -> Result<Vec<String>, String> {
        let on_node: Vec<(RemoteRun, MeshMember)> = self
            .mesh_runs(Some(stack))
            .into_iter()
            .filter(|(r, _)| r.record.host == node || r.record.address == node)
            .collect();
        if on_node.is_empty() {
            return Err(format!("no mesh service of {stack} runs on {node}"));
        }
        for (run, member) in &on_node {
            self.remove_peer(run, member, "revoked").await;
        }
        let names: Vec<String> = on_node
            .iter()
            .map(|(r, _)| r.remote_service.clone())
            .collect();
        self.stop_services(stack, &names)
            .await
            .map_err(|e| e.to_string())?;
        Ok(names)
    }

    /// Starts the hub again when mesh services run but it does not (it crashed, or was
    /// killed, maybe while no daemon ran), with what it had: every running node's peer,
    /// the LAN relays and the dependencies' aliases and relays. Each node's agent is
    /// then asked over SSH for a new handshake, since the new hub has no session with
    /// it. A hub that runs while no mesh service is active (one started again by a
    /// restore that raced with the last node's leaving) is stopped. Returns what it
    /// did, or nothing when all was as it should be.
    pub async fn revive_hub(&self) -> Result<Option<String>, String> {
        let in_use = self.read(|st| {
            st.snap.stacks.values().any(|r| {
                r.services
                    .iter()
                    .any(|(name, s)| s.state.is_active() && is_mesh(&r.config, name))
            })
        });
        if !in_use {
            let running = self.mesh.lock().await.as_mut().is_some_and(Hub::alive);
            if running {
                self.end_hub().await;
                return Ok(Some(
                    "stopped the mesh hub, which ran without a mesh service".into(),
                ));
            }
            return Ok(None);
        }
        // Running ones only: a service on its way down (or to another target) may have
        // just stopped the hub on purpose, as its last node left.
        let runs: Vec<(RemoteRun, MeshMember)> = self
            .mesh_runs(None)
            .into_iter()
            .filter(|(run, _)| self.running_member(run).is_some())
            .collect();
        let Some((first, _)) = runs.first() else {
            return Ok(None);
        };
        {
            let mut hub = self.mesh.lock().await;
            if hub.is_none() {
                *hub = self.adopt_hub().await;
            }
            if hub.as_mut().is_some_and(Hub::alive) {
                return Ok(None);
            }
        }
        let config = self
            .read(|st| st.stack(&first.remote_stack).map(|r| r.config.clone()))
            .ok_or("the stack of a mesh service was removed")?;
        self.ensure_hub(&config).await?;
        let mut failed = Vec::new();
        for (run, member) in &runs {
            if let Err(e) = self.restore_node(run, member).await {
                failed.push(format!("{}/{}: {e}", run.remote_stack, run.remote_service));
            }
        }
        let mut done = format!(
            "started the mesh hub again, which was gone, with the peers of {} running node(s)",
            runs.len()
        );
        if !failed.is_empty() {
            done.push_str(&format!("; not restored: {}", failed.join("; ")));
        }
        Ok(Some(done))
    }

    /// A node's place on a hub started again: its peer, its LAN relay, its
    /// dependencies' aliases and relays, and a new handshake from its agent (SIGHUP over
    /// SSH). Without that handshake its tunnel comes back only when the node's own
    /// timers give up on the session the old hub had.
    async fn restore_node(&self, run: &RemoteRun, member: &MeshMember) -> Result<(), String> {
        // Still running with that key? It may have left (or been revoked) since the
        // list was made.
        if self
            .running_member(run)
            .is_none_or(|now| now.public_key != member.public_key)
        {
            return Ok(());
        }
        self.hub_call(serde_json::json!({
            "op": "add_peer", "public_key": member.public_key,
            "allowed_ips": [format!("{}/32", member.mesh_ip)],
        }))
        .await?;
        let port = self.read(|st| {
            st.stack(&run.remote_stack)?
                .services
                .get(&run.remote_service)?
                .port
        });
        if let (Some(listen), Some(port)) = (&member.lan_relay, port) {
            self.hub_call(serde_json::json!({"op": "add_relay", "listen": listen, "to": format!("{}:{port}", member.mesh_ip)}))
                .await?;
        }
        self.relay_dependencies(&run.remote_stack, &run.remote_service)
            .await?;
        if !member.rehandshake {
            return Err("its agent is too old for SIGHUP; its own timers bring it back".into());
        }
        // The pid checked first: a pid file outlives its process, and pids are reused.
        let poke = release::privileged(
            &format!(
                "cd {} && pid=$(cat agent.pid) && grep -q harness-node /proc/$pid/cmdline && kill -HUP $pid",
                quote(&member.network_dir)
            ),
            member.sudo,
        );
        self.ssh_for_run(run)?
            .check(
                "ask the mesh agent for a handshake",
                &poke,
                b"",
                Duration::from_secs(30),
            )
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// The mesh place of `run`'s service as the registry has it now, while the service
    /// is running (not on its way up or down).
    fn running_member(&self, run: &RemoteRun) -> Option<MeshMember> {
        self.read(|st| {
            let s = st
                .stack(&run.remote_stack)?
                .services
                .get(&run.remote_service)?;
            match crate::run::Run::of(s)? {
                crate::run::Run::Remote(now) if s.state == ServiceState::Running => now.mesh,
                _ => None,
            }
        })
    }

    /// The runs of active mesh services (of `stack`, or of all stacks).
    fn mesh_runs(&self, stack: Option<&str>) -> Vec<(RemoteRun, MeshMember)> {
        self.read(|st| {
            st.snap
                .stacks
                .iter()
                .filter(|(name, _)| stack.is_none_or(|s| s == name.as_str()))
                .flat_map(|(_, r)| r.services.values())
                .filter(|s| s.state.is_active())
                .filter_map(|s| match crate::run::Run::of(s)? {
                    crate::run::Run::Remote(run) => {
                        let member = run.mesh.clone()?;
                        Some((run, member))
                    }
                    _ => None,
                })
                .collect()
        })
    }

    /// The lowest mesh address no run of any stack holds.
    async fn free_mesh_address(&self, subnet: Subnet) -> Result<Ipv4Addr, String> {
        let mut alloc = wg_mesh::subnet::Allocator::new(subnet);
        self.read(|st| {
            for r in st.snap.stacks.values() {
                for s in r.services.values() {
                    if let Some(ip) = s.mesh_alias.as_deref().and_then(|a| a.parse().ok()) {
                        alloc.taken.insert(ip);
                    }
                    if let Some(crate::run::Run::Remote(run)) = crate::run::Run::of(s) {
                        if let Some(ip) = run.mesh.and_then(|m| m.mesh_ip.parse().ok()) {
                            alloc.taken.insert(ip);
                        }
                    }
                }
            }
        });
        let mut hub = self.mesh.lock().await;
        let hub = hub.as_mut().ok_or("the mesh hub is not running")?;
        alloc.taken.extend(&hub.handed_out);
        let ip = alloc.allocate().map_err(|e| e.to_string())?;
        hub.handed_out.insert(ip);
        Ok(ip)
    }
}

/// How often the daemon looks whether the hub still runs while mesh services do.
const HUB_WATCH: Duration = Duration::from_secs(1);

/// Supervises the hub for as long as the daemon runs: a hub that is gone while mesh
/// services run is started again with their peers and relays ([`Core::revive_hub`]).
/// A hub that cannot be started is tried again, and one that keeps dying is started
/// again, less often each time (up to every 30 s). A node that could not be restored
/// on a hub started again is named in the log, not retried.
pub async fn watch_hub(core: std::sync::Arc<Core>) {
    let mut pause = HUB_WATCH;
    let mut last_change: Option<Instant> = None;
    loop {
        smol::Timer::after(pause).await;
        match core.revive_hub().await {
            Ok(None) => pause = HUB_WATCH,
            Ok(Some(done)) => {
                tracing::warn!("{done}");
                // A hub that keeps dying is started again less often each time.
                let soon = last_change.is_some_and(|t| t.elapsed() < Duration::from_secs(30));
                pause = if soon {
                    (pause * 2).min(Duration::from_secs(30))
                } else {
                    HUB_WATCH
                };
                last_change = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!("the mesh hub is gone and could not be started again: {e}");
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Ends the hub's data plane (its device and routes go with it) and waits for it.
async fn stop_hub(mut hub: Hub, dir: &std::path::Path) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &hub.pid.to_string()])
        .status();
    match hub.child.take() {
        Some(mut child) => {
            let _ = smol::unblock(move || child.wait()).await;
        }
        None => {
            let deadline = Instant::now() + Duration::from_secs(10);
            while is_hub_process(hub.pid, &hub.control) && Instant::now() < deadline {
                smol::Timer::after(Duration::from_millis(20)).await;
            }
        }
    }
    // Only the stopped hub's record: a new hub may have started and recorded itself.
    let record = smol::fs::read_to_string(dir.join("hub.pid"))
        .await
        .unwrap_or_default();
    if Hub::from_record(&record, hub.control.clone()).is_some_and(|r| r.pid == hub.pid) {
        let _ = smol::fs::remove_file(dir.join("hub.pid")).await;
    }
    if let Err(e) = ip_route("del", &hub.subnet).await {
        tracing::warn!("{e}");
    }
}

/// Metric of the `unreachable` route under the mesh subnet (the hub device's own route,
/// metric 0, wins while it exists).
const UNREACHABLE_METRIC: &str = "4242";

/// Adds (`replace`) or removes (`del`) the `unreachable` route covering `subnet`.
async fn ip_route(action: &'static str, subnet: &Subnet) -> Result<(), String> {
    let args = [
        "route",
        action,
        "unreachable",
        &subnet.to_string(),
        "metric",
        UNREACHABLE_METRIC,
    ];
    wg_mesh::ip::run(args.map(str::to_owned).to_vec())
        .await
        .map_err(|e| format!("ip route {action} unreachable {subnet}: {e}"))
}

/// Whether a service runs on a mesh node.
pub fn is_mesh(config: &StackConfig, name: &str) -> bool {
    matches!(
        config.services.get(name).map(|s| &s.target),
        Some(Target::Wireguard(_))
    )
}

/// A host's name in the stack's `hosts:` (its address when it has none).
fn host_name(config: &StackConfig, host: &HostConfig) -> String {
    config
        .hosts
        .iter()
        .find(|(_, h)| h.address == host.address)
        .map_or_else(|| host.address.clone(), |(n, _)| n.clone())
}

/// `harness-node`, installed beside harnessd.
fn agent_program() -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name("harness-node"))
        .unwrap_or_else(|_| PathBuf::from("harness-node"))
}

/// A pre-generated private key from a file the config names (the message names the
/// file, never its contents).
async fn key_from_file(file: &str) -> Result<PrivateKey, String> {
    let text = smol::fs::read_to_string(file)
        .await
        .map_err(|e| format!("cannot read the WireGuard key file {file}: {e}"))?;
    PrivateKey::from_base64(&text).map_err(|e| format!("{file}: {e}"))
}

/// The hub's key, made on first use (0600 in the state directory).
async fn hub_key(dir: &std::path::Path) -> Result<PrivateKey, String> {
    let path = dir.join("hub.key");
    if let Ok(text) = smol::fs::read_to_string(&path).await {
        return PrivateKey::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    let key = PrivateKey::generate().map_err(|e| e.to_string())?;
    crate::env::write_private(path, key.to_base64()).await?;
    Ok(key)
}
