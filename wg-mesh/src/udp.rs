//! The UDP side of the data plane, with the kernel's segmentation offloads: a run of
//! same-sized ciphertexts for one peer goes down as one `sendmsg` with `UDP_SEGMENT`
//! (the kernel splits it as late as it can), and datagrams from one sender come up
//! coalesced (`UDP_GRO`), so the UDP stack is crossed once per run rather than once
//! per packet. Where the kernel has no such offload, datagrams go one at a time.
//!
//! Each peer whose endpoint is known gets a [`Link`]: a socket on the same port
//! (`SO_REUSEPORT`) connected to that endpoint. The kernel hands a connected socket
//! the datagrams of its 4-tuple and routes its sends once, at connect, so a packet
//! on a link skips the route lookups (out and in) that one through the shared,
//! unconnected socket takes. boringtun's own device does the same.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::sys::socket::{
    bind, connect, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrIn, SockaddrStorage,
};

/// A non-blocking UDP socket on `port` of every address (0: one the kernel picks),
/// which links can share.
pub(crate) fn bind_shared(port: u16) -> std::io::Result<UdpSocket> {
    // A plain bind first, so a port that another socket holds (with SO_REUSEPORT or
    // not: another agent, boringtun) is refused as it was before links, instead of
    // being shared with it; and port 0 gets a port nobody holds.
    let port = UdpSocket::bind(("0.0.0.0", port))?.local_addr()?.port();
    let udp = new_socket()?;
    bind(udp.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))?;
    enable_gro(&udp);
    Ok(udp)
}

fn new_socket() -> std::io::Result<UdpSocket> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    Ok(UdpSocket::from(fd))
}

/// Asks the kernel to coalesce datagrams on `udp` (where it cannot, they come one at
/// a time, which reads the same).
fn enable_gro(udp: &UdpSocket) {
    if let Err(e) = setsockopt(udp, sockopt::UdpGroSegment, &true) {
        tracing::debug!("UDP receive offload unavailable ({e})");
    }
}

/// A socket connected to one peer's endpoint, on the shared socket's port.
pub(crate) struct Link {
    /// Its key in the data plane's epoll set.
    pub(crate) token: u64,
    pub(crate) socket: UdpSocket,
}

impl Link {
    /// Opens a link from the shared socket's port to `to`. Until it is connected a
    /// datagram from anyone may land on it, so it is read like the shared socket
    /// (each datagram with its source).
    pub(crate) fn open(shared: &UdpSocket, to: SocketAddr, token: u64) -> std::io::Result<Link> {
        let SocketAddr::V4(v4) = to else {
            return Err(std::io::Error::other("an IPv6 endpoint"));
        };
        let port = shared.local_addr()?.port();
        let socket = new_socket()?;
        bind(socket.as_raw_fd(), &SockaddrIn::new(0, 0, 0, 0, port))?;
        enable_gro(&socket);
        connect(socket.as_raw_fd(), &SockaddrIn::from(v4))?;
        Ok(Link { token, socket })
    }
}

/// Sends one datagram to `to`, through `link` when there is one.
pub(crate) fn send_one(udp: &UdpSocket, link: Option<&Link>, to: SocketAddr, datagram: &[u8]) {
    let _ = match link {
        Some(link) => link.socket.send(datagram),
        None => udp.send_to(datagram, to),
    };
}

/// Largest UDP payload of one send (segments included): an IPv4 datagram's limit.
const MAX_SEND: usize = 65507;

/// Most segments the kernel takes in one send (`UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;

/// Ciphertexts waiting to be sent: contiguous, in runs to one peer.
pub(crate) struct SendQueue {
    buf: Vec<u8>,
    used: usize,
    runs: Vec<Run>,
    /// Whether the kernel takes `UDP_SEGMENT` (until a send says otherwise).
    gso: bool,
}

/// Segments of `segment` bytes (the last may be shorter) to one destination.
struct Run {
    to: SocketAddr,
    link: Option<Arc<Link>>,
    start: usize,
    len: usize,
    segment: usize,
    /// A shorter last segment ends a run.
    closed: bool,
}

impl Run {
    fn segments(&self) -> usize {
        self.len.div_ceil(self.segment)
    }
}

impl SendQueue {
    /// A queue of `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> SendQueue {
        SendQueue {
            buf: vec![0; capacity],
            used: 0,
            runs: Vec::new(),
            gso: true,
        }
    }

    /// Room for one datagram of up to `max` bytes (sending what is queued first when
    /// it does not fit); [`SendQueue::push`] then queues what was written there.
    pub(crate) fn space(&mut self, udp: &UdpSocket, max: usize) -> &mut [u8] {
        if self.buf.len() - self.used < max {
            self.flush(udp);
        }
        &mut self.buf[self.used..]
    }

    /// Queues the `len` bytes just written to [`SendQueue::space`] for `to`, to go
    /// through `link` when there is one.
    pub(crate) fn push(&mut self, to: SocketAddr, link: Option<Arc<Link>>, len: usize) {
        let start = self.used;
        self.used += len;
        if let Some(run) = self.runs.last_mut() {
            let same_link = match (&run.link, &link) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            let fits = run.to == to
                && same_link
                && !run.closed
                && len <= run.segment
                && run.len + len <= MAX_SEND
                && run.segments() < MAX_SEGMENTS;
            if fits {
                run.len += len;
                run.closed = len < run.segment;
                return;
            }
        }
        self.runs.push(Run {
            to,
            link,
            start,
            len,
            segment: len,
            closed: false,
        });
    }

    /// Sends everything queued. A full socket buffer drops the rest, as a router would.
    pub(crate) fn flush(&mut self, udp: &UdpSocket) {
        for run in &self.runs {
            let bytes = &self.buf[run.start..run.start + run.len];
            let link = run.link.as_deref();
            if self.gso && run.segments() > 1 {
                let sent = match link {
                    Some(link) => send_segmented(&link.socket, bytes, run.segment, None),
                    None => send_segmented(udp, bytes, run.segment, Some(run.to)),
                };
                use nix::errno::Errno;
                match sent {
                    // What the kernel says when it has no UDP segmentation.
                    Err(
                        e @ (Errno::EIO | Errno::EINVAL | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP),
                    ) => {
                        tracing::debug!(
                            "UDP segmentation offload unavailable ({e}); one datagram at a time"
                        );
                        self.gso = false;
                    }
                    // Sent, or lost as a router would lose it: a full buffer, or an
                    // ICMP error that a link's peer sent back for an earlier datagram.
                    _ => continue,
                }
            }
            for datagram in bytes.chunks(run.segment) {
                send_one(udp, link, run.to, datagram);
            }
        }
        self.runs.clear();
        self.used = 0;
    }
}

/// One `sendmsg` of `bytes` in datagrams of `segment` bytes, to `to` (or to where
/// `udp` is connected).
fn send_segmented(
    udp: &UdpSocket,
    bytes: &[u8],
    segment: usize,
    to: Option<SocketAddr>,
) -> nix::Result<()> {
    let to: Option<SockaddrIn> = match to {
        Some(SocketAddr::V4(to)) => Some(SocketAddrV4::into(to)),
        Some(SocketAddr::V6(_)) => return Err(nix::errno::Errno::EAFNOSUPPORT),
        None => None,
    };
    let segment = u16::try_from(segment).map_err(|_| nix::errno::Errno::EMSGSIZE)?;
    sendmsg(
        udp.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::empty(),
        to.as_ref(),
    )?;
    Ok(())
}

/// Reads datagrams, coalesced by the kernel where it can.
pub(crate) struct Receiver {
    buf: Vec<u8>,
    control: Vec<u8>,
}

/// What one read brought: `len` bytes from `from`, datagrams of `segment` bytes each
/// (the last may be shorter).
pub(crate) struct Received {
    pub(crate) from: SocketAddr,
    pub(crate) len: usize,
    pub(crate) segment: usize,
}

impl Receiver {
    /// A receiver for sockets from [`bind_shared`] and [`Link::open`] (which ask the
    /// kernel to coalesce).
    pub(crate) fn new() -> Receiver {
        Receiver {
            buf: vec![0; 65536],
            control: nix::cmsg_space!(nix::libc::c_int),
        }
    }

    /// The bytes of the last read.
    pub(crate) fn bytes(&self, received: &Received) -> &[u8] {
        &self.buf[..received.len]
    }

    /// Reads what is there (`WouldBlock` when nothing is).
    pub(crate) fn recv(&mut self, udp: &UdpSocket) -> std::io::Result<Received> {
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let msg = recvmsg::<SockaddrStorage>(
            udp.as_raw_fd(),
            &mut iov,
            Some(&mut self.control),
            MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        let from = msg
            .address
            .and_then(|a| a.as_sockaddr_in().copied())
            .map(SocketAddr::from)
            .ok_or_else(|| std::io::Error::other("a datagram without an IPv4 source"))?;
        let len = msg.bytes;
        let segment = msg
            .cmsgs()
            .ok()
            .and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::UdpGroSegments(size) => usize::try_from(size).ok(),
                    _ => None,
                })
            })
            .filter(|&s| s > 0)
            .unwrap_or(len.max(1));
        Ok(Received { from, len, segment })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        (a, b)
    }

    fn queue(q: &mut SendQueue, udp: &UdpSocket, to: SocketAddr, datagram: &[u8]) {
        q.space(udp, datagram.len())[..datagram.len()].copy_from_slice(datagram);
        q.push(to, None, datagram.len());
    }

    /// A socket from [`bind_shared`], blocking for the test, and its loopback address.
    fn shared_socket() -> (UdpSocket, SocketAddr) {
        let udp = bind_shared(0).unwrap();
        udp.set_nonblocking(false).unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = udp.local_addr().unwrap().port();
        (udp, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// What was queued, in order and with its boundaries: 5 same-sized datagrams and a
    /// shorter one make one run; what follows the shorter one starts another.
    fn sample() -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000]).collect();
        out.push(vec![5; 300]);
        out.push(vec![6; 1000]);
        out.push(vec![7; 40]);
        out
    }

    /// `b` (a plain socket) reads the sample's datagrams, each whole, in order.
    fn assert_arrive_whole(b: &UdpSocket) {
        let mut buf = [0u8; 2048];
        for want in sample() {
            let n = b.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &want[..]);
        }
    }

    #[test]
    fn queued_datagrams_arrive_whole_and_in_order() {
        let (a, b) = pair();
        let mut q = SendQueue::new(1 << 20);
        for d in sample() {
            queue(&mut q, &a, b.local_addr().unwrap(), &d);
        }
        assert_eq!(
            q.runs.len(),
            2,
            "equal sizes share a run; a shorter one ends it"
        );
        q.flush(&a);
        assert!(q.gso, "loopback takes UDP_SEGMENT");
        assert_arrive_whole(&b);
    }

    #[test]
    fn without_segmentation_offload_datagrams_go_one_at_a_time() {
        let (a, b) = pair();
        let mut q = SendQueue::new(1 << 20);
        q.gso = false;
        for d in sample() {
            queue(&mut q, &a, b.local_addr().unwrap(), &d);
        }
        q.flush(&a);
        assert_arrive_whole(&b);
    }

    #[test]
    fn a_run_stops_at_the_kernel_s_segment_limit() {
        let (a, b) = pair();
        let mut q = SendQueue::new(1 << 20);
        for _ in 0..MAX_SEGMENTS + 1 {
            queue(&mut q, &a, b.local_addr().unwrap(), &[1; 100]);
        }
        assert_eq!(q.runs.len(), 2);
        assert_eq!(q.runs[0].segments(), MAX_SEGMENTS);
    }

    #[test]
    fn coalesced_reads_split_back_into_the_datagrams_sent() {
        let (a, _) = pair();
        let (b, b_addr) = shared_socket();
        let mut receiver = Receiver::new();
        let mut q = SendQueue::new(1 << 20);
        for d in sample() {
            queue(&mut q, &a, b_addr, &d);
        }
        q.flush(&a);
        let (mut got, mut reads) = (Vec::new(), 0);
        while got.len() < sample().len() {
            reads += 1;
            let r = receiver.recv(&b).unwrap();
            assert_eq!(r.from, a.local_addr().unwrap());
            got.extend(receiver.bytes(&r).chunks(r.segment).map(<[u8]>::to_vec));
        }
        assert_eq!(got, sample());
        assert!(reads < got.len(), "{reads} reads: nothing came coalesced");
    }

    /// A link takes its endpoint's datagrams (the shared socket no longer sees them)
    /// and sends from the shared port, in runs too; others still reach the shared
    /// socket.
    #[test]
    fn a_link_takes_its_endpoint_s_datagrams_and_sends_from_the_shared_port() {
        let (shared, shared_addr) = shared_socket();
        let (peer, other) = pair();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let link = Arc::new(Link::open(&shared, peer.local_addr().unwrap(), 7).unwrap());
        link.socket.set_nonblocking(false).unwrap();
        link.socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();

        peer.send_to(b"to the link", shared_addr).unwrap();
        other.send_to(b"to the shared socket", shared_addr).unwrap();
        let mut buf = [0u8; 64];
        let n = link.socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"to the link");
        let (n, from) = shared.recv_from(&mut buf).unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"to the shared socket"[..], other.local_addr().unwrap())
        );

        let mut q = SendQueue::new(1 << 20);
        for d in sample() {
            let len = d.len();
            q.space(&shared, len)[..len].copy_from_slice(&d);
            q.push(peer.local_addr().unwrap(), Some(link.clone()), len);
        }
        q.flush(&shared);
        assert!(q.gso, "a connected socket takes UDP_SEGMENT too");
        let mut buf = [0u8; 2048];
        for want in sample() {
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &want[..]);
            assert_eq!(from.port(), shared_addr.port());
        }
    }

    /// A link whose peer is gone gets the ICMP error back on its next send; that
    /// loses the run, not the offload.
    #[test]
    fn a_link_s_peer_gone_does_not_turn_segmentation_off() {
        let (shared, _) = shared_socket();
        let gone = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = gone.local_addr().unwrap();
        let link = Arc::new(Link::open(&shared, to, 7).unwrap());
        drop(gone);
        // Loopback answers with a port unreachable at once; the socket keeps it as
        // its pending error.
        link.socket.send(b"anyone?").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut q = SendQueue::new(1 << 20);
        for d in sample() {
            let len = d.len();
            q.space(&shared, len)[..len].copy_from_slice(&d);
            q.push(to, Some(link.clone()), len);
        }
        q.flush(&shared);
        assert!(q.gso, "an error from the peer turned UDP segmentation off");
    }

    /// The shared socket's port is its own: a second one on it is refused, as a
    /// plain bind would be.
    #[test]
    fn a_taken_port_is_refused() {
        let (first, _) = shared_socket();
        let port = first.local_addr().unwrap().port();
        assert!(bind_shared(port).is_err(), "port {port} was shared");
    }
}
