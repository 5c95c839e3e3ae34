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

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use deployer::ssh::{quote, SshHost};
use futures_lite::{AsyncBufReadExt, AsyncWriteExt};
use protocol::config::{HostConfig, StackConfig, Target};
use serde::{Deserialize, Serialize};
use wg_mesh::config::{Cidr, Config, Interface};
use wg_mesh::keys::{PrivateKey, PublicKey};
use wg_mesh::subnet::{Subnet, DEFAULT_SUBNET};

use crate::core::Core;

/// The hub's UDP port unless `network.listen_port` says otherwise.
const DEFAULT_PORT: u16 = 51820;

/// How long a node's tunnel may take to answer a ping once its agent started.
const TUNNEL_UP: Duration = Duration::from_secs(10);

/// What a mesh service's run records about its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshMember {
    /// Its mesh address.
    pub mesh_ip: String,
    /// Its public key (the hub's peer).
    pub public_key: String,
}

/// The hub's running data plane.
pub struct Hub {
    child: std::process::Child,
    control: PathBuf,
    public: PublicKey,
    port: u16,
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

/// The interface name of this daemon's mesh (on the hub and on its nodes).
fn interface_name(instance: &str) -> String {
    format!("hm{}", instance.get(..10).unwrap_or(instance))
}

impl Core {
    /// Starts the hub's data plane unless it runs; returns its public key and port.
    async fn ensure_hub(&self, config: &StackConfig) -> Result<(PublicKey, u16), String> {
        let mut hub = self.mesh.lock().await;
        if let Some(h) = hub.as_mut() {
            if matches!(h.child.try_wait(), Ok(None)) {
                return Ok((h.public, h.port));
            }
            *hub = None;
        }
        let subnet = subnet_of(config)?;
        let port = config.network.listen_port.unwrap_or(DEFAULT_PORT);
        let dir = self.state_dir.join("mesh");
        let key = hub_key(&dir).await?;
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
        write_secret(&conf_path, conf.render()).await?;
        let control = dir.join("hub.sock");
        let log = dir.join("hub.log");
        let agent = agent_program();
        let interface = interface_name(&self.instance);
        let (child, ready) = smol::unblock(move || -> Result<_, String> {
            use std::io::BufRead;
            let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let mut child = std::process::Command::new(&agent)
                .arg("--config")
                .arg(&conf_path)
                .args(["--interface", &interface])
                .arg("--control")
                .arg(&control)
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
        *hub = Some(Hub {
            child,
            control: dir.join("hub.sock"),
            public,
            port,
        });
        Ok((public, port))
    }

    /// One request to the hub's control socket.
    async fn hub_call(&self, request: serde_json::Value) -> Result<serde_json::Value, String> {
        let control = self
            .mesh
            .lock()
            .await
            .as_ref()
            .map(|h| h.control.clone())
            .ok_or("the mesh hub is not running")?;
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
        let mesh_ip = self.free_mesh_address(subnet)?;
        let key = PrivateKey::generate().map_err(|e| e.to_string())?;
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
        let sudo = if host.sudo { "sudo -n " } else { "" };
        let start = format!(
            "cd {net} && {{ [ -f agent.pid ] && kill $(cat agent.pid) 2>/dev/null; sleep 0.1; }}; {sudo}setsid ./harness-node --config wireguard.conf --interface {ifname} > agent.log 2>&1 < /dev/null & echo $! > {pid}",
            net = quote(&net),
            ifname = interface_name(&self.instance),
            pid = quote(&format!("{net}/agent.pid")),
        );
        ssh.check("start the mesh agent", &start, b"", timeout)
            .await
            .map_err(|e| e.to_string())?;
        let hub_ip = subnet.hub();
        let ping = format!("ping -c 1 -W 1 {hub_ip} >/dev/null 2>&1 || busybox ping -c 1 -W 1 {hub_ip} >/dev/null 2>&1");
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
        Ok(MeshMember {
            mesh_ip: mesh_ip.to_string(),
            public_key,
        })
    }

    /// Takes a node out of the mesh: its agent stopped, its peer removed at once; the
    /// hub stops with the last node.
    pub async fn leave_mesh(&self, ssh: &SshHost, dir: &str, member: &MeshMember) {
        let net = format!("{dir}/network");
        let stop = format!(
            "cd {} && [ -f agent.pid ] && kill $(cat agent.pid) 2>/dev/null; rm -f agent.pid",
            quote(&net)
        );
        let _ = ssh.exec(&stop, b"", Duration::from_secs(30)).await;
        let _ = self
            .hub_call(serde_json::json!({"op": "remove_peer", "public_key": member.public_key}))
            .await;
        let others = self.read(|st| {
            st.snap.stacks.values().any(|r| {
                r.services.iter().any(|(_, s)| {
                    s.state.is_active()
                        && matches!(crate::run::Run::of(s), Some(crate::run::Run::Remote(run)) if run.mesh.as_ref().is_some_and(|m| m.public_key != member.public_key))
                })
            })
        });
        if !others {
            if let Some(mut hub) = self.mesh.lock().await.take() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &hub.child.id().to_string()])
                    .status();
                let _ = smol::unblock(move || hub.child.wait()).await;
            }
        }
    }

    /// The lowest mesh address no run of any stack holds.
    fn free_mesh_address(&self, subnet: Subnet) -> Result<Ipv4Addr, String> {
        let mut alloc = wg_mesh::subnet::Allocator::new(subnet);
        self.read(|st| {
            for r in st.snap.stacks.values() {
                for s in r.services.values() {
                    if let Some(crate::run::Run::Remote(run)) = crate::run::Run::of(s) {
                        if let Some(ip) = run.mesh.and_then(|m| m.mesh_ip.parse().ok()) {
                            alloc.taken.insert(ip);
                        }
                    }
                }
            }
        });
        alloc.allocate().map_err(|e| e.to_string())
    }
}

/// Whether a service runs on a mesh node.
pub fn is_mesh(config: &StackConfig, name: &str) -> bool {
    matches!(
        config.services.get(name).map(|s| &s.target),
        Some(Target::Wireguard(_))
    )
}

/// `harness-node`, installed beside harnessd.
fn agent_program() -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name("harness-node"))
        .unwrap_or_else(|_| PathBuf::from("harness-node"))
}

/// The hub's key, made on first use (0600 in the state directory).
async fn hub_key(dir: &std::path::Path) -> Result<PrivateKey, String> {
    let path = dir.join("hub.key");
    if let Ok(text) = smol::fs::read_to_string(&path).await {
        return PrivateKey::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    let key = PrivateKey::generate().map_err(|e| e.to_string())?;
    write_secret(&path, key.to_base64()).await?;
    Ok(key)
}

/// Writes a file only its owner may read.
async fn write_secret(path: &std::path::Path, text: String) -> Result<(), String> {
    let path = path.to_owned();
    smol::unblock(move || {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?
            .write_all(text.as_bytes())
    })
    .await
    .map_err(|e| format!("cannot write a mesh file: {e}"))
}
