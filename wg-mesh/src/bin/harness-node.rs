//! `harness-node`: the mesh's node agent. It runs one data plane from a wg-quick style
//! config: on a remote node (one peer, the hub) and on the harness host as the hub
//! (peers added and removed through its control socket while it runs).
//!
//! ```text
//! harness-node --config network/wireguard.conf --interface hm0 [--control /run/hm0.sock]
//! ```
//!
//! It prints `ready <udp port>` on stdout once the device is up. The control socket
//! takes one JSON request per line and answers one JSON line each:
//! `{"op":"add_peer","public_key":"…","allowed_ips":["10.42.0.3/32"],"endpoint":null,"persistent_keepalive":null}`,
//! `{"op":"remove_peer","public_key":"…"}`, `{"op":"peers"}`,
//! `{"op":"add_relay","listen":"10.42.0.9:5432","to":"198.18.0.11:5432"}` (a TCP relay; a
//! `listen` address inside the mesh subnet is added to the device first, as an alias),
//! `{"op":"remove_relay","listen":"…"}`, `{"op":"add_alias","address":"10.42.0.9"}` (an
//! address of the mesh subnet on the device, for what already listens on all of this
//! host's addresses). Relays live here, not in harnessd, so a daemon
//! restart drops no relayed connection. SIGTERM or SIGINT ends it and removes the
//! device. SIGHUP starts a new handshake with every peer that has an endpoint: a node's
//! agent gets one when the hub restarted, which has lost its side of their session.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use futures_lite::{AsyncBufReadExt, AsyncWriteExt, StreamExt};
use serde::Deserialize;
use wg_mesh::config::{Cidr, Config, Peer};
use wg_mesh::dataplane::Device;
use wg_mesh::keys::PublicKey;

#[derive(Parser)]
#[command(
    version,
    about = "The harness mesh's node agent: one WireGuard data plane on boringtun"
)]
struct Args {
    /// wg-quick style config ([Interface] and [Peer] sections).
    #[arg(long)]
    config: PathBuf,
    /// TUN device to create.
    #[arg(long)]
    interface: String,
    /// Unix socket for peer changes at run time.
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    AddPeer {
        public_key: String,
        allowed_ips: Vec<String>,
        #[serde(default)]
        endpoint: Option<std::net::SocketAddr>,
        #[serde(default)]
        persistent_keepalive: Option<u16>,
    },
    RemovePeer {
        public_key: String,
    },
    Peers,
    AddRelay {
        listen: std::net::SocketAddr,
        to: String,
    },
    RemoveRelay {
        listen: std::net::SocketAddr,
    },
    AddAlias {
        address: std::net::Ipv4Addr,
    },
}

/// A TCP relay's destination and its task (ended with [`end_relay`]).
type Relay = (String, smol::Task<()>);

/// The agent's device and its relays.
struct Agent {
    device: Device,
    interface: String,
    address: Cidr,
    /// By listen address: where each relays to, and its task.
    relays: std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, Relay>>,
    ex: Arc<smol::Executor<'static>>,
}

impl Agent {
    /// Whether `ip` can be an alias on the device: in its subnet, not its own address.
    fn is_alias(&self, ip: std::net::Ipv4Addr) -> bool {
        self.address.contains(ip) && ip != self.address.addr
    }
}

fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: harnessd shows it in the error of the service that needed it.
            eprintln!("harness-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn start() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HARNESS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let config = Config::parse(&text, &args.config.display().to_string())?;
    // The control socket and the relays run here; the data plane has a thread of its
    // own (see `wg_mesh::dataplane`).
    let ex = Arc::new(smol::Executor::new());
    smol::block_on(ex.run(run(args, config, ex.clone())))
}

async fn run(args: Args, config: Config, ex: Arc<smol::Executor<'static>>) -> anyhow::Result<()> {
    let device = Device::start(&args.interface, &config)?;
    let port = device.port().unwrap_or(0);
    let agent = Arc::new(Agent {
        device,
        interface: args.interface.clone(),
        address: config.interface.address,
        relays: Default::default(),
        ex: ex.clone(),
    });
    let control = match &args.control {
        Some(path) => Some(serve_control(path, agent.clone())?),
        None => None,
    };
    println!("ready {port}");
    std::io::stdout().flush()?;
    use async_signal::Signal;
    let mut signals = async_signal::Signals::new([Signal::Term, Signal::Int, Signal::Hup])?;
    while let Some(Ok(Signal::Hup)) = signals.next().await {
        tracing::info!("SIGHUP: a new handshake with every peer that has an endpoint");
        agent.device.rehandshake();
    }
    drop(control);
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn serve_control(path: &Path, agent: Arc<Agent>) -> anyhow::Result<smol::Task<()>> {
    let _ = std::fs::remove_file(path);
    let listener = async_net::unix::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let ex = agent.ex.clone();
    Ok(agent.ex.clone().spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let agent = agent.clone();
            ex.spawn(async move {
                let mut lines = futures_lite::io::BufReader::new(stream.clone()).lines();
                let mut stream = stream;
                while let Some(Ok(line)) = lines.next().await {
                    let reply = answer(&agent, &line).await;
                    if stream
                        .write_all(format!("{reply}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            })
            .detach();
        }
    }))
}

async fn answer(agent: &Agent, line: &str) -> serde_json::Value {
    let device = &agent.device;
    let request: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return serde_json::json!({"error": format!("bad request: {e}")}),
    };
    match request {
        Request::AddPeer {
            public_key,
            allowed_ips,
            endpoint,
            persistent_keepalive,
        } => {
            let peer = PublicKey::from_base64(&public_key).and_then(|public_key| {
                let allowed_ips = allowed_ips
                    .iter()
                    .map(|c| Cidr::parse(c))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Peer {
                    public_key,
                    endpoint,
                    allowed_ips,
                    persistent_keepalive,
                })
            });
            match peer {
                Ok(peer) => {
                    device.add_peer(&peer);
                    serde_json::json!({"ok": true})
                }
                Err(e) => serde_json::json!({"error": e.to_string()}),
            }
        }
        Request::RemovePeer { public_key } => match PublicKey::from_base64(&public_key) {
            Ok(key) => serde_json::json!({"ok": device.remove_peer(&key)}),
            Err(e) => serde_json::json!({"error": e.to_string()}),
        },
        Request::Peers => serde_json::json!({"peers": device.peers()}),
        Request::AddRelay { listen, to } => match add_relay(agent, listen, to).await {
            Ok(()) => serde_json::json!({"ok": true}),
            Err(e) => serde_json::json!({"error": e}),
        },
        Request::AddAlias { address } => {
            let added = if agent.is_alias(address) {
                add_alias(&agent.interface, address).await
            } else {
                Err(format!(
                    "{address} is not an alias address in {}",
                    agent.address
                ))
            };
            match added {
                Ok(()) => serde_json::json!({"ok": true}),
                Err(e) => serde_json::json!({"error": e}),
            }
        }
        Request::RemoveRelay { listen } => {
            let removed = agent
                .relays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&listen);
            let found = removed.is_some();
            if let Some((_, task)) = removed {
                end_relay(task).await;
            }
            serde_json::json!({"ok": found})
        }
    }
}

/// Starts a TCP relay from `listen` to `to`: replacing one on the same address to
/// elsewhere, keeping one that is already the same.
async fn add_relay(agent: &Agent, listen: std::net::SocketAddr, to: String) -> Result<(), String> {
    if let std::net::IpAddr::V4(ip) = listen.ip() {
        if agent.is_alias(ip) {
            add_alias(&agent.interface, ip).await?;
        }
    }
    let old = agent
        .relays
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&listen);
    if let Some((old_to, task)) = old {
        if old_to == to {
            agent
                .relays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(listen, (old_to, task));
            return Ok(());
        }
        end_relay(task).await;
    }
    let listener = async_net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("relay on {listen}: {e}"))?;
    let ex = agent.ex.clone();
    let relayed = to.clone();
    let task = agent.ex.spawn(async move {
        loop {
            let Ok((inbound, _)) = listener.accept().await else {
                continue;
            };
            let to = to.clone();
            ex.spawn(async move {
                match async_net::TcpStream::connect(to.as_str()).await {
                    Ok(outbound) => {
                        // Each way until its end, which is passed on (a half-close).
                        let pipe = |from: async_net::TcpStream, to: async_net::TcpStream| async move {
                            let _ = futures_lite::io::copy(from, to.clone()).await;
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        };
                        futures_lite::future::zip(
                            pipe(inbound.clone(), outbound.clone()),
                            pipe(outbound, inbound),
                        )
                        .await;
                    }
                    Err(e) => tracing::warn!("relay {listen} -> {to}: {e}"),
                }
            })
            .detach();
        }
    });
    agent
        .relays
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(listen, (relayed, task));
    Ok(())
}

/// Ends a relay and waits until its listener is closed: a task only dropped would
/// let go of it when the executor next gets to it, and a new relay may bind the same
/// port at once.
async fn end_relay(task: smol::Task<()>) {
    task.cancel().await;
}

/// Adds `ip` to the device (a mesh alias), unless it has it already.
async fn add_alias(interface: &str, ip: std::net::Ipv4Addr) -> Result<(), String> {
    let args = ["addr", "replace", &format!("{ip}/32"), "dev", interface];
    wg_mesh::ip::run(args.map(str::to_owned).to_vec())
        .await
        .map_err(|e| format!("alias {ip}: {e}"))
}
