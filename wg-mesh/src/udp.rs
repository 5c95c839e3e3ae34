//! The UDP side of the data plane, with the kernel's segmentation offloads: a run of
//! same-sized ciphertexts for one peer goes down as one `sendmsg` with `UDP_SEGMENT`
//! (the kernel splits it as late as it can), and datagrams from one sender come up
//! coalesced (`UDP_GRO`), so the UDP stack is crossed once per run rather than once
//! per packet. Where the kernel has no such offload, datagrams go one at a time.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn, SockaddrStorage,
};

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

    /// Queues the `len` bytes just written to [`SendQueue::space`] for `to`.
    pub(crate) fn push(&mut self, to: SocketAddr, len: usize) {
        let start = self.used;
        self.used += len;
        if let Some(run) = self.runs.last_mut() {
            let fits = run.to == to
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
            if self.gso && run.segments() > 1 {
                match send_segmented(udp, bytes, run.segment, run.to) {
                    Ok(()) => continue,
                    Err(nix::errno::Errno::EAGAIN) => continue,
                    Err(e) => {
                        // EIO, EINVAL, ENOPROTOOPT: no UDP segmentation here.
                        tracing::debug!(
                            "UDP segmentation offload unavailable ({e}); one datagram at a time"
                        );
                        self.gso = false;
                    }
                }
            }
            for datagram in bytes.chunks(run.segment) {
                let _ = udp.send_to(datagram, run.to);
            }
        }
        self.runs.clear();
        self.used = 0;
    }
}

fn send_segmented(
    udp: &UdpSocket,
    bytes: &[u8],
    segment: usize,
    to: SocketAddr,
) -> nix::Result<()> {
    let SocketAddr::V4(to) = to else {
        return Err(nix::errno::Errno::EAFNOSUPPORT);
    };
    let segment = u16::try_from(segment).map_err(|_| nix::errno::Errno::EMSGSIZE)?;
    sendmsg(
        udp.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::empty(),
        Some(&SockaddrIn::from(to)),
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
    /// Asks the kernel to coalesce datagrams on `udp` (where it cannot, they come one
    /// at a time, which reads the same).
    pub(crate) fn new(udp: &UdpSocket) -> Receiver {
        if let Err(e) = setsockopt(udp, sockopt::UdpGroSegment, &true) {
            tracing::debug!("UDP receive offload unavailable ({e})");
        }
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
        q.push(to, datagram.len());
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
        let (a, b) = pair();
        let mut receiver = Receiver::new(&b);
        let mut q = SendQueue::new(1 << 20);
        for d in sample() {
            queue(&mut q, &a, b.local_addr().unwrap(), &d);
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
}
