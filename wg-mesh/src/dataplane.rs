//! The data plane: one TUN device and one UDP socket (and a connected socket per
//! peer, its link), with a boringtun `noise::Tunn` per peer, driven by one thread: it
//! waits on them all and on a timerfd (epoll, level-triggered), makes one read from
//! each that is ready per turn and runs the timers at each tick; one thread, so the
//! two directions of a peer never contend for its `Tunn`. The thread ends with the
//! process.
//!
//! One read per readiness, not a drain to `EAGAIN`: epoll reports again whatever is
//! left, so a lone packet costs no read that finds nothing (one system call of four
//! on each of its passes), and under load each side gets its turn between reads.
//!
//! Packets cross the kernel in bulk, with the offloads the kernel has for TUN devices
//! and UDP sockets: the TUN device hands over TCP superpackets (split here) and takes
//! a batch's packets coalesced back into them; the UDP socket takes a run of
//! ciphertexts for one peer in one send and hands over a sender's datagrams
//! coalesced ([`crate::udp`]). Each side's TCP and UDP stacks then see a few large
//! packets where they would see many small ones: that, not the cipher, was the cost.
//!
//! - Outgoing: a packet read from the TUN goes to the peer its destination routes to
//!   (the longest matching allowed IP).
//! - Incoming: a handshake initiation finds its peer by the static key it carries,
//!   everything else by the receiver index; a decrypted packet whose source does not
//!   route back to that peer (an allowed IP belongs to the last peer to claim it) is
//!   dropped. A packet for another peer (node to node,
//!   on the hub) is sent on to it directly, without a trip through the kernel, so the
//!   hub needs no IP forwarding.
//! - A peer's data packets go through its link (a socket connected to its endpoint,
//!   [`crate::udp::Link`]) once a packet from that endpoint authenticated; the link is
//!   replaced when the peer roams and closed with the peer. Handshakes, cookies and
//!   timer packets go out through the shared socket, from the same port, so their
//!   answers come back to the link all the same.
//! - Peers are added and removed while it runs; a removed peer's packets are dropped
//!   from the next one on. A peer with an endpoint gets a handshake at once, so a node's
//!   tunnel is up as soon as the hub answers.
//!
//! Locks (for the control socket's peer changes) are std mutexes, uncontended on the
//! packet path.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::config::{Cidr, Config, Peer, DEFAULT_MTU};
use crate::keys::PublicKey;
use crate::peers::Routes;
use crate::udp::{send_one, Link, Receiver, SendQueue};
use crate::MeshError;

/// Handshakes a peer may start per second before cookies are asked for.
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// How often `Tunn` timers run (what boringtun's own device does).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// Timer ticks between resets of the handshake rate limiter's count (once a second).
const TICKS_PER_LIMITER_RESET: u64 = 4;

/// Largest packet read from either side, plus WireGuard's overhead.
const BUFFER: usize = 65536 + 32;

/// Packets of one read: segments of what the TUN device hands over (a TCP superpacket
/// of up to 64 KiB is split into at most this many), and the datagrams of one
/// (coalesced) read from the UDP socket.
const BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;

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
    endpoint: Mutex<Endpoint>,
    allowed: Vec<Cidr>,
}

/// Where a peer's packets go.
#[derive(Default)]
struct Endpoint {
    addr: Option<SocketAddr>,
    /// A socket connected to `addr`, once a packet from there authenticated.
    link: Option<Arc<Link>>,
}

#[derive(Default)]
struct Table {
    by_key: HashMap<PublicKey, Arc<PeerState>>,
    by_index: HashMap<u32, Arc<PeerState>>,
    routes: Routes<PublicKey>,
    /// Every peer's link, by its epoll token.
    links: HashMap<u64, Arc<Link>>,
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
    tun: tun_rs::SyncDevice,
    udp: std::net::UdpSocket,
    /// What the pump waits on: the TUN device, the UDP socket, the links, the timers.
    epoll: Epoll,
    next_token: AtomicU64,
    /// Whether links can be opened (until one fails to).
    links: AtomicBool,
}

/// Epoll tokens: the TUN device, the shared UDP socket, the timer tick, then links.
const TUN: u64 = 0;
const UDP: u64 = 1;
const TICK: u64 = 2;
const FIRST_LINK: u64 = 3;

/// A running data plane; its thread (and the TUN device) last as long as the process.
pub struct Device {
    shared: Arc<Shared>,
}

impl Device {
    /// Creates TUN device `name` with the config's address and MTU, binds the UDP
    /// port, adds the config's peers and starts. Needs root or CAP_NET_ADMIN.
    pub fn start(name: &str, config: &Config) -> Result<Device, MeshError> {
        let i = &config.interface;
        // Offloads (virtio headers): the kernel hands over TCP superpackets, which
        // are split here, and takes the packets of a batch coalesced, so the TCP
        // stacks on both ends see a few large packets instead of many small ones.
        // Without kernel support the device works a packet at a time.
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .ipv4(i.address.addr, i.address.prefix, None)
                .mtu(i.mtu.unwrap_or(DEFAULT_MTU))
                .offload(offload)
                .build_sync()
        };
        let tun = build(true)
            .or_else(|e| {
                tracing::debug!("TUN offloads unavailable ({e}); one packet at a time");
                build(false)
            })
            .map_err(|e| MeshError::Tun {
                name: name.to_owned(),
                detail: if e.kind() == std::io::ErrorKind::PermissionDenied {
                    format!("{e}: the mesh needs root or CAP_NET_ADMIN (and /dev/net/tun)")
                } else {
                    e.to_string()
                },
            })?;
        let port = i.listen_port.unwrap_or(0);
        let io = |action: String| move |source| MeshError::Io { action, source };
        let udp =
            crate::udp::bind_shared(port).map_err(io(format!("listen on UDP port {port}")))?;
        tun.set_nonblocking(true)
            .map_err(io("make the TUN device non-blocking".into()))?;
        // epoll rather than poll: what it waits on is registered once
        // (level-triggered), and a wake-up costs less, which is most of a lone
        // packet's latency.
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .and_then(|epoll| {
                epoll.add(&tun, EpollEvent::new(EpollFlags::EPOLLIN, TUN))?;
                epoll.add(&udp, EpollEvent::new(EpollFlags::EPOLLIN, UDP))?;
                Ok(epoll)
            })
            .map_err(|e| io("set up the data plane's epoll".into())(e.into()))?;
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
            epoll,
            next_token: AtomicU64::new(FIRST_LINK),
            links: AtomicBool::new(true),
        });
        for peer in &config.peers {
            shared.add_peer(peer);
        }
        let pumped = shared.clone();
        std::thread::Builder::new()
            .name("mesh data plane".into())
            .spawn(move || pump(&pumped))
            .map_err(io("start the data plane thread".into()))?;
        // Peers with an endpoint: handshake now rather than at the first packet.
        shared.initiate(false);
        Ok(Device { shared })
    }

    /// The UDP port it listens on.
    pub fn port(&self) -> Option<u16> {
        self.shared.udp.local_addr().ok().map(|a| a.port())
    }

    /// Adds a peer, or replaces the one with that key (a new session: a short blip).
    pub fn add_peer(&self, peer: &Peer) {
        self.shared.add_peer(peer);
        self.shared.initiate(false);
    }

    /// Starts a new handshake with every peer that has an endpoint, sessions or not: for
    /// a peer that lost its side of the session (a restarted hub), so the tunnel is
    /// back now rather than when the session's timers give up on it.
    pub fn rehandshake(&self) {
        self.shared.initiate(true);
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
                    endpoint: p.endpoint.lock().unwrap_or_else(|e| e.into_inner()).addr,
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
            endpoint: Mutex::new(Endpoint {
                addr: peer.endpoint,
                link: None,
            }),
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
        let link = old
            .endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .link
            .take();
        if let Some(link) = link {
            // Closed (and out of the epoll set) once the pump lets go of it too.
            table.links.remove(&link.token);
        }
        true
    }

    /// Notes that a packet from `from` authenticated as `peer`'s: that is where its
    /// packets go now (it may have roamed), through a link to there.
    fn authenticated(&self, peer: &Arc<PeerState>, from: SocketAddr) {
        let links = self.links.load(Ordering::Relaxed);
        let stale = {
            let mut endpoint = peer.endpoint.lock().unwrap_or_else(|e| e.into_inner());
            if endpoint.addr == Some(from) && (endpoint.link.is_some() || !links) {
                return;
            }
            // Past the check above, a link is one to where the peer was: no good for
            // where it is.
            endpoint.addr = Some(from);
            endpoint.link.take()
        };
        let link = links.then(|| self.open_link(from)).flatten();
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(stale) = stale {
            table.links.remove(&stale.token);
        }
        let Some(link) = link else {
            return;
        };
        // A peer removed (or replaced) meanwhile gets no link.
        if !table
            .by_key
            .get(&peer.key)
            .is_some_and(|p| Arc::ptr_eq(p, peer))
        {
            return;
        }
        let mut endpoint = peer.endpoint.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = endpoint.link.replace(link.clone()) {
            table.links.remove(&old.token);
        }
        table.links.insert(link.token, link);
    }

    /// A link to `to` in the epoll set; none when it cannot be had, and then no more
    /// links are tried (peers without one use the shared socket).
    fn open_link(&self, to: SocketAddr) -> Option<Arc<Link>> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let link = Link::open(&self.udp, to, token).and_then(|link| {
            self.epoll
                .add(&link.socket, EpollEvent::new(EpollFlags::EPOLLIN, token))?;
            Ok(Arc::new(link))
        });
        match link {
            Ok(link) => Some(link),
            Err(e) => {
                tracing::warn!(
                    "no connected UDP socket for {to} ({e}): peers without one use the shared socket"
                );
                self.links.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    fn peer_by_index(&self, receiver_idx: u32) -> Option<Arc<PeerState>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.by_index.get(&(receiver_idx >> 8)).cloned()
    }

    /// Sends a handshake initiation to every peer that has an endpoint and no session
    /// (or, with `force`, to every peer that has an endpoint).
    fn initiate(&self, force: bool) {
        let peers: Vec<Arc<PeerState>> = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table.by_key.values().cloned().collect()
        };
        let mut buf = vec![0u8; 256];
        for p in peers {
            let Some(endpoint) = p.endpoint.lock().unwrap_or_else(|e| e.into_inner()).addr else {
                continue;
            };
            let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
            if !force && t.time_since_last_handshake().is_some() {
                continue;
            }
            if let TunnResult::WriteToNetwork(pkt) = t.format_handshake_initiation(&mut buf, force)
            {
                let _ = self.udp.send_to(pkt, endpoint);
            }
        }
    }

    /// Encrypts `packet` for `peer` into `out`; where to send how many bytes of it.
    fn encrypt(&self, peer: &PeerState, packet: &[u8], out: &mut [u8]) -> Option<Encrypted> {
        let (to, link) = {
            let endpoint = peer.endpoint.lock().unwrap_or_else(|e| e.into_inner());
            (endpoint.addr?, endpoint.link.clone())
        };
        let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
        match t.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(wire) => {
                // boringtun writes from the start of `out`.
                Some(Encrypted {
                    to,
                    link,
                    len: wire.len(),
                })
            }
            TunnResult::Err(e) => {
                tracing::debug!("encapsulate for {}: {e:?}", peer.key);
                None
            }
            _ => None,
        }
    }
}

/// A ciphertext's length and where it goes.
struct Encrypted {
    to: SocketAddr,
    link: Option<Arc<Link>>,
    len: usize,
}

fn destination(packet: &[u8]) -> Option<Ipv4Addr> {
    match Tunn::dst_address(packet)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// The pump's buffers, allocated once (untouched pages cost no memory).
struct Buffers {
    /// One read from the TUN device: a virtio header and a packet or superpacket.
    tun_read: Vec<u8>,
    /// Its packets, split.
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Their ciphertexts.
    queue: SendQueue,
    receiver: Receiver,
    decrypted: Vec<u8>,
    relay: Vec<u8>,
    /// Decrypted packets bound for the TUN device, each after room for a virtio header.
    to_tun: Vec<Vec<u8>>,
    gro: tun_rs::GROTable,
}

impl Buffers {
    fn new() -> Buffers {
        let big = || vec![0u8; BUFFER];
        Buffers {
            tun_read: vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + BUFFER],
            segments: (0..BATCH).map(|_| big()).collect(),
            sizes: vec![0; BATCH],
            queue: SendQueue::new(BATCH * 2048 + BUFFER),
            receiver: Receiver::new(),
            decrypted: big(),
            relay: big(),
            // Coalescing appends to a packet only within its capacity.
            to_tun: (0..BATCH)
                .map(|_| Vec::with_capacity(2 * tun_rs::VIRTIO_NET_HDR_LEN + BUFFER))
                .collect(),
            gro: tun_rs::GROTable::default(),
        }
    }
}

/// The data plane's one thread.
fn pump(shared: &Shared) {
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    let mut bufs = Buffers::new();
    let mut timer_buf = vec![0u8; BUFFER];
    // The timers tick through a timerfd, so a wait arms no timeout and a turn reads
    // no clock.
    let tick = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )
    .and_then(|tick| {
        tick.set(
            Expiration::Interval(TIMER_TICK.into()),
            TimerSetTimeFlags::empty(),
        )?;
        shared
            .epoll
            .add(&tick, EpollEvent::new(EpollFlags::EPOLLIN, TICK))?;
        Ok(tick)
    });
    let tick = match tick {
        Ok(tick) => tick,
        Err(e) => {
            tracing::error!("the data plane cannot run its timers: {e}");
            return;
        }
    };
    let mut events = [EpollEvent::empty(); 16];
    let mut ticks: u64 = 0;
    loop {
        let ready = shared
            .epoll
            .wait(&mut events, EpollTimeout::NONE)
            .unwrap_or(0);
        for event in &events[..ready] {
            match event.data() {
                TUN => from_tun(shared, &mut bufs),
                UDP => from_udp(shared, &mut bufs, &shared.udp),
                TICK => {
                    // Reading clears the timerfd's readiness; what it says (how many
                    // ticks passed) does not matter, the timers look at the clock.
                    let _ = tick.wait();
                    ticks += 1;
                    if ticks.is_multiple_of(TICKS_PER_LIMITER_RESET) {
                        shared.limiter.reset_count();
                    }
                    run_timers(shared, &mut timer_buf);
                }
                token => {
                    let link = shared
                        .table
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .links
                        .get(&token)
                        .cloned();
                    // None: closed since the wait.
                    if let Some(link) = link {
                        from_udp(shared, &mut bufs, &link.socket);
                    }
                }
            }
        }
    }
}

/// The first byte of a WireGuard cookie reply (its message type).
const COOKIE_REPLY: u8 = 3;

/// What WireGuard adds to a packet: a 16-byte header, padding to 16 bytes, a 16-byte tag.
const OVERHEAD: usize = 16 + 15 + 16;

/// One read from the TUN device (a packet, or a superpacket split into its packets):
/// encrypts each packet for its peer and sends them together, a superpacket's in one
/// send.
fn from_tun(shared: &Shared, bufs: &mut Buffers) {
    let read = shared
        .tun
        .recv_multiple(&mut bufs.tun_read, &mut bufs.segments, &mut bufs.sizes, 0);
    let n = match read {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        Err(e) => {
            tracing::warn!("reading the TUN device: {e}");
            return;
        }
    };
    for k in 0..n {
        let packet = &bufs.segments[k][..bufs.sizes[k]];
        let Some(dst) = destination(packet) else {
            continue;
        };
        let peer = shared
            .table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .route(dst);
        if let Some(peer) = peer {
            let space = bufs.queue.space(&shared.udp, packet.len() + OVERHEAD);
            if let Some(sealed) = shared.encrypt(&peer, packet, space) {
                bufs.queue.push(sealed.to, sealed.link, sealed.len);
            }
        }
    }
    bufs.queue.flush(&shared.udp);
}

/// One read from `udp` (the shared socket or a link; the kernel hands a sender's
/// datagrams over coalesced): handles each datagram and writes the packets for this
/// host to the TUN device together (coalesced again).
fn from_udp(shared: &Shared, bufs: &mut Buffers, udp: &std::net::UdpSocket) {
    let received = match bufs.receiver.recv(udp) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        // A link's peer that is not listening (an ICMP error came back): its
        // handshakes and keepalives retry on their own.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::debug!("reading the UDP socket: {e}");
            return;
        }
        Err(e) => {
            tracing::warn!("reading the UDP socket: {e}");
            return;
        }
    };
    let mut count = 0;
    let bytes = bufs.receiver.bytes(&received);
    for datagram in bytes.chunks(received.segment) {
        let local = handle_datagram(
            shared,
            datagram,
            received.from,
            &mut bufs.decrypted,
            &mut bufs.relay,
        );
        let Some(len) = local else {
            continue;
        };
        if count == bufs.to_tun.len() {
            write_to_tun(shared, &mut bufs.to_tun, &mut bufs.gro);
            count = 0;
        }
        let packet = &mut bufs.to_tun[count];
        packet.clear();
        packet.resize(tun_rs::VIRTIO_NET_HDR_LEN, 0);
        packet.extend_from_slice(&bufs.decrypted[..len]);
        count += 1;
    }
    write_to_tun(shared, &mut bufs.to_tun[..count], &mut bufs.gro);
}

/// Writes `packets` (each after room for a virtio header) to the TUN device.
fn write_to_tun(shared: &Shared, packets: &mut [Vec<u8>], gro: &mut tun_rs::GROTable) {
    if packets.is_empty() {
        return;
    }
    if let Err(e) = shared
        .tun
        .send_multiple(gro, packets, tun_rs::VIRTIO_NET_HDR_LEN)
    {
        tracing::debug!("writing to the TUN device: {e}");
    }
}

/// Handles one datagram: answers handshakes, relays packets for other peers, and
/// returns the length of the decrypted packet in `out` when it is for this host.
fn handle_datagram(
    shared: &Shared,
    datagram: &[u8],
    from: SocketAddr,
    out: &mut [u8],
    relay: &mut [u8],
) -> Option<usize> {
    let peer = match Tunn::parse_incoming_packet(datagram) {
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
    let peer = peer?;
    let mut forward: Option<(Arc<PeerState>, usize)> = None;
    let mut local = None;
    let mut authenticated = false;
    {
        let mut t = peer.tunn.lock().unwrap_or_else(|e| e.into_inner());
        let mut result = t.decapsulate(Some(from.ip()), datagram, out);
        loop {
            match result {
                TunnResult::WriteToNetwork(p) => {
                    // A cookie reply (under load) answers a packet checked only
                    // against public keys: it proves nothing about where the peer is.
                    authenticated |= p.first() != Some(&COOKIE_REPLY);
                    let _ = shared.udp.send_to(p, from);
                    // Packets queued during the handshake go out now.
                    result = t.decapsulate(None, &[], out);
                }
                TunnResult::WriteToTunnelV4(p, source) => {
                    authenticated = true;
                    // Cryptokey routing: the source must be an address that routes
                    // back to this very peer (one claimed since by another is not).
                    let (back, next) = {
                        let table = shared.table.read().unwrap_or_else(|e| e.into_inner());
                        let back = table.route(source).is_some_and(|b| b.key == peer.key);
                        (back, destination(p).and_then(|dst| table.route(dst)))
                    };
                    if back {
                        match next {
                            // For another peer: on through its tunnel (below, once
                            // this peer's lock is let go).
                            Some(other) if other.key != peer.key => {
                                forward = Some((other, p.len()))
                            }
                            _ => local = Some(p.len()),
                        }
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
    if authenticated {
        shared.authenticated(&peer, from);
    }
    if let Some((other, len)) = forward {
        if let Some(sealed) = shared.encrypt(&other, &out[..len], relay) {
            send_one(
                &shared.udp,
                sealed.link.as_deref(),
                sealed.to,
                &relay[..sealed.len],
            );
        }
    }
    local
}

fn run_timers(shared: &Shared, buf: &mut [u8]) {
    let peers: Vec<Arc<PeerState>> = {
        let table = shared.table.read().unwrap_or_else(|e| e.into_inner());
        table.by_key.values().cloned().collect()
    };
    for p in peers {
        let endpoint = p.endpoint.lock().unwrap_or_else(|e| e.into_inner()).addr;
        let mut t = p.tunn.lock().unwrap_or_else(|e| e.into_inner());
        if let TunnResult::WriteToNetwork(pkt) = t.update_timers(buf) {
            if let Some(endpoint) = endpoint {
                let _ = shared.udp.send_to(pkt, endpoint);
            }
        }
    }
}
