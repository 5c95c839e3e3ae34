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
//! `{"op":"remove_peer","public_key":"…"}`, `{"op":"peers"}`. SIGTERM or SIGINT ends it
//! and removes the device.

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
}

fn main() -> anyhow::Result<()> {
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
    smol::block_on(run(args, config))
}

async fn run(args: Args, config: Config) -> anyhow::Result<()> {
    let device = Arc::new(Device::start(&args.interface, &config).await?);
    let control = match &args.control {
        Some(path) => Some(serve_control(path, device.clone())?),
        None => None,
    };
    println!("ready {}", device.port().unwrap_or(0));
    std::io::stdout().flush()?;
    let signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    let mut signals = signals;
    let _ = signals.next().await;
    drop(control);
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn serve_control(path: &Path, device: Arc<Device>) -> anyhow::Result<smol::Task<()>> {
    let _ = std::fs::remove_file(path);
    let listener = async_net::unix::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(smol::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let device = device.clone();
            smol::spawn(async move {
                let mut lines = futures_lite::io::BufReader::new(stream.clone()).lines();
                let mut stream = stream;
                while let Some(Ok(line)) = lines.next().await {
                    let reply = answer(&device, &line).await;
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

async fn answer(device: &Device, line: &str) -> serde_json::Value {
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
                    device.add_peer(&peer).await;
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
    }
}
