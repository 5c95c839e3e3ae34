//! The data plane: one TUN device and one UDP socket, with a boringtun `noise::Tunn`
//! per peer, driven by three smol tasks (TUN to UDP, UDP to TUN, timers).
//!
//! - Outgoing: a packet read from the TUN goes to the peer its destination routes to
//!   (the longest matching allowed IP).
//! - Incoming: a handshake initiation finds its peer by the static key it carries,
//!   everything else by the receiver index; a decrypted packet whose source is not
//!   among the peer's allowed IPs is dropped. A packet for another peer (node to node,
//!   on the hub) is sent on to it directly, without a trip through the kernel, so the
//!   hub needs no IP forwarding.
//! - Peers are added and removed while it runs; a removed peer's packets are dropped
//!   from the next one on. A peer with an endpoint gets a handshake at once, so a node's
//!   tunnel is up as soon as the hub answers.
//!
//! Locks are std mutexes held only around `Tunn` calls, never across an await.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use crate::config::{Cidr, Config, Peer, DEFAULT_MTU};
use crate::keys::PublicKey;
use crate::peers::Routes;
use crate::MeshError;

/// Handshakes a peer may start per second before cookies are asked for.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// How often `Tunn` timers run (what boringtun's own device does).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Largest packet read from either side, plus WireGuard's overhead.
const BUFFER: usize = 65536 + 32;

/// What a peer has done, for `mesh.peers`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeerStats {
    /// Its key.
    pub public_key: String,
    /// Where its packets come from (or the configured endpoint, before any came).
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Seconds since the last handshake, if any happened.
    pub handshake_age_secs: Option<u64>,
    /// Bytes sent to it (inner packets).
    pub tx_bytes: u64,
    /// Bytes received from it (inner packets).
    pub rx_bytes: u64,
}

struct PeerState {
    key: PublicKey,
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: Mutex<Option<SocketAddr>>,
    allowed: Vec<Cidr>,
}

#[derive(Default)]
struct Table {
    by_key: HashMap<PublicKey, Arc<PeerState>>,
    by_index: HashMap<u32, Arc<PeerState>>,
    routes: Routes<PublicKey>,
}

impl Table {
    fn route(&self, dst: Ipv4Addr) -> Option<Arc<PeerState>> {
        self.routes
            .lookup(dst)
            .and_then(|k| self.by_key.get(k))
            .cloned()
    }
}

struct Shared {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    limiter: Arc<RateLimiter>,
    table: RwLock<Table>,
    next_index: AtomicU32,
    tun: tun_rs::AsyncDevice,
    udp: async_net::UdpSocket,
}

/// A running data plane; dropping it stops its tasks and removes the TUN device.
pub struct Device {
    shared: Arc<Shared>,
    _tasks: Vec<smol::Task<()>>,
}

impl Device {
    /// Creates TUN device `name` with the config's address and MTU, binds the UDP
    /// port, adds the config's peers and starts its tasks on `ex`. Needs root or
    /// CAP_NET_ADMIN. An executor run by the thread that also drives the reactor (as
    /// `smol::block_on(ex.run(..))` does) saves a thread hop per packet.
    pub async fn start(
        ex: &smol::Executor<'static>,
        name: &str,
        config: &Config,
    ) -> Result<Device, MeshError> {
        let i = &config.interface;
        let tun = tun_rs::DeviceBuilder::new()
            .name(name)
            .ipv4(i.address.addr, i.address.prefix, None)
            .mtu(i.mtu.unwrap_or(DEFAULT_MTU))
            .build_async()
            .map_err(|e| MeshError::Tun {
                name: name.to_owned(),
                detail: if e.kind() == std::io::ErrorKind::PermissionDenied {
                    format!("{e}: the mesh needs root or CAP_NET_ADMIN (and /dev/net/tun)")
                } else {
                    e.to_string()
                },
            })?;
        let port = i.listen_port.unwrap_or(0);
        let udp = async_net::UdpSocket::bind(("0.0.0.0", port))
            .await
            .map_err(|e| MeshError::Io {
                action: format!("listen on UDP port {port}"),
                source: e,
            })?;
        let secret = i.private_key.secret();
        let public = x25519::PublicKey::from(&secret);
        let shared = Arc::new(Shared {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            table: RwLock::new(Table::default()),
            next_index: AtomicU32::new(1),
            tun,
            udp,
        });
        for peer in &config.peers {
            shared.add_peer(peer);
        }
        let tasks = vec![
            ex.spawn(tun_to_udp(shared.clone())),
            ex.spawn(udp_to_tun(shared.clone())),
            ex.spawn(timers(shared.clone())),
        ];
        // Peers with an endpoint: handshake now rather than at the first packet.
        shared.initiate_all().await;
        Ok(Device {
            shared,
            _tasks: tasks,
        })
    }

    /// The UDP port it listens on.
    pub fn port(&self) -> Option<u16> {
        self.shared.udp.local_addr().ok().map(|a| a.port())
    }

    /// Adds a peer, or replaces the one with that key (a new session: a short blip).
    pub async fn add_peer(&self, peer: &Peer) {
        self.shared.add_peer(peer);
        self.shared.initiate_all().await;
    }

    /// Removes a peer; its packets are dropped from now on. False when none had that key.
    pub fn remove_peer(&self, key: &PublicKey) -> bool {
        self.shared.remove_peer(key)
    }

    /// Every peer with its counters.
    pub fn peers(&self) -> Vec<PeerStats> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<PeerStats> = table
            .by_key
            .values()
            .map(|p| {
                let (age, tx, rx, _, _) = p.tunn.lock().unwrap_or_else(|e| e.into_inner()).stats();
                PeerStats {
                    public_key: p.key.to_string(),
                    endpoint: *p.endpoint.lock().unwrap_or_else(|e| e.into_inner()),
                    allowed_ips: p.allowed.iter().map(Cidr::to_string).collect(),
                    handshake_age_secs: age.map(|d| d.as_secs()),
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect();
        out.sort_by(|a, b| a.public_key.cmp(&b.public_key));
        out
    }
}

impl Shared {
    fn add_peer(&self, peer: &Peer) {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let tunn = Tunn::new(
            self.secret.clone(),
            peer.public_key.x25519(),
            None,
            peer.persistent_keepalive,
            index,
            Some(self.limiter.clone()),
        );
        let state = Arc::new(PeerState {
            key: peer.public_key,
            index,
            tunn: Mutex::new(tunn),
            endpoint: Mutex::new(peer.endpoint),
            allowed: peer.allowed_ips.clone(),
        });
        self.remove_peer(&peer.public_key);
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.routes.add(&peer.allowed_ips, peer.public_key);
        table.by_index.insert(index, state.clone());
        table.by_key.insert(peer.public_key, state);
    }

    fn remove_peer(&self, key: &PublicKey) -> bool {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let Some(old) = table.by_key.remove(key) else {
            return false;
        };
        table.by_index.remove(&old.index);
        table.routes.remove(key);
        true
    }

    fn peer_by_index(&self, receiver_idx: u32) -> Option<Arc<PeerState>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.by_index.get(&(receiver_idx >> 8)).cloned()
    }

    /// Sends a handshake initiation to every peer that has an endpoint and no session.
    async fn initiate_all(&self) {
        let peers: Vec<Arc<PeerState>> = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table.by_key.values().cloned().collect()
        };
        let mut buf = vec![0u8; 256];
        for p in peers {
            let Some(endpoint) = *p.endpoint.lock().unwrap_or_else(|e| e.into_inner()) else {
                continue;
            };
            let packet = {
                let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
                if t.time_since_last_handshake().is_some() {
                    continue;
                }
                match t.format_handshake_initiation(&mut buf, false) {
                    TunnResult::WriteToNetwork(pkt) => pkt.to_vec(),
                    _ => continue,
                }
            };
            let _ = self.udp.send_to(&packet, endpoint).await;
        }
    }

    /// Encrypts `packet` for `peer` and sends it (a handshake first, when needed).
    async fn send_to_peer(&self, peer: &PeerState, packet: &[u8], out: &mut [u8]) {
        let wire = {
            let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            match t.encapsulate(packet, out) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                TunnResult::Err(e) => {
                    tracing::debug!("encapsulate for {}: {e:?}", peer.key);
                    return;
                }
                _ => return,
            }
        };
        let endpoint = *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(endpoint) = endpoint {
            let _ = self.udp.send_to(&wire, endpoint).await;
        }
    }
}

fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    match Tunn::dst_address(packet)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

async fn tun_to_udp(shared: Arc<Shared>) {
    let (mut src, mut out) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    loop {
        let n = match shared.tun.recv(&mut src).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("reading the TUN device: {e}");
                return;
            }
        };
        let Some(dst) = destination(&src[..n]) else {
            continue;
        };
        let peer = shared
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .route(dst);
        if let Some(peer) = peer {
            shared.send_to_peer(&peer, &src[..n], &mut out).await;
        }
    }
}

async fn udp_to_tun(shared: Arc<Shared>) {
    let (mut src, mut out, mut relay) = (vec![0u8; BUFFER], vec![0u8; BUFFER], vec![0u8; BUFFER]);
    loop {
        let (n, from) = match shared.udp.recv_from(&mut src).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("reading the UDP socket: {e}");
                return;
            }
        };
        let peer = match Tunn::parse_incoming_packet(&src[..n]) {
            Ok(Packet::HandshakeInit(init)) => {
                match parse_handshake_anon(&shared.secret, &shared.public, &init) {
                    Ok(half) => {
                        let key = PublicKey(half.peer_static_public);
                        let table = shared.table.read().unwrap_or_else(|e| e.into_inner());
                        table.by_key.get(&key).cloned()
                    }
                    Err(_) => None,
                }
            }
            Ok(Packet::HandshakeResponse(p)) => shared.peer_by_index(p.receiver_idx),
            Ok(Packet::PacketCookieReply(p)) => shared.peer_by_index(p.receiver_idx),
            Ok(Packet::PacketData(p)) => shared.peer_by_index(p.receiver_idx),
            Err(_) => None,
        };
        // Unknown (or removed) peers get nothing back.
        let Some(peer) = peer else {
            continue;
        };
        let (mut replies, mut inner) = (Vec::new(), Vec::new());
        {
            let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
            let mut result = t.decapsulate(Some(from.ip()), &src[..n], &mut out);
            loop {
                match result {
                    TunnResult::WriteToNetwork(p) => {
                        replies.push(p.to_vec());
                        // Packets queued during the handshake go out now.
                        result = t.decapsulate(None, &[], &mut out);
                    }
                    TunnResult::WriteToTunnelV4(p, source) => {
                        if peer.allowed.iter().any(|c| c.contains(source)) {
                            inner.push(p.to_vec());
                        }
                        break;
                    }
                    TunnResult::WriteToTunnelV6(..) | TunnResult::Done => break,
                    TunnResult::Err(e) => {
                        tracing::debug!("from {from}: {e:?}");
                        break;
                    }
                }
            }
        }
        if replies.is_empty() && inner.is_empty() {
            continue;
        }
        // It authenticated: this is where the peer is now (it may have roamed).
        *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
        for r in replies {
            let _ = shared.udp.send_to(&r, from).await;
        }
        for packet in inner {
            let next = destination(&packet).and_then(|dst| {
                shared
                    .table
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .route(dst)
            });
            match next {
                // For another peer: on through its tunnel.
                Some(other) if other.key != peer.key => {
                    shared.send_to_peer(&other, &packet, &mut relay).await
                }
                _ => {
                    let _ = shared.tun.send(&packet).await;
                }
            }
        }
    }
}

async fn timers(shared: Arc<Shared>) {
    let mut buf = vec![0u8; BUFFER];
    let mut last_reset = Instant::now();
    loop {
        smol::Timer::after(TIMER_TICK).await;
        if last_reset.elapsed() >= Duration::from_secs(1) {
            shared.limiter.reset_count();
            last_reset = Instant::now();
        }
        let peers: Vec<Arc<PeerState>> = {
            let table = shared.table.read().unwrap_or_else(|e| e.into_inner());
            table.by_key.values().cloned().collect()
        };
        for p in peers {
            let packet = {
                let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
                match t.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(pkt) => pkt.to_vec(),
                    _ => continue,
                }
            };
            let endpoint = *p.endpoint.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(endpoint) = endpoint {
                let _ = shared.udp.send_to(&packet, endpoint).await;
            }
        }
    }
}
