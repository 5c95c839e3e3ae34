//! The tcp strategy's port scan: every address × port, at most `concurrency` connects
//! in flight, each bounded by the connect timeout.
//!
//! Host check: an address's first port is tried before the others. When that connect
//! times out and the kernel's neighbour table shows the address on a local link with no
//! ARP answer, no host is there and its other ports are skipped (a host that drops
//! connects still answers ARP, so it is scanned in full), and so is one the kernel
//! calls unreachable. `probe_all` turns this off.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use async_lock::Semaphore;

/// What one scan covers.
pub struct Plan<'a> {
    /// Addresses, in order.
    pub addresses: &'a [Ipv4Addr],
    /// Ports per address, in order.
    pub ports: &'a [u16],
    /// Connect timeout.
    pub timeout: Duration,
    /// Connects in flight at most.
    pub concurrency: usize,
    /// Try every port even where no host answers ARP.
    pub probe_all: bool,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Open ports, in address then port order.
    pub open: Vec<SocketAddrV4>,
    /// Connects tried.
    pub probes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Open,
    Closed,
    TimedOut,
    /// No route or no host (the kernel said so).
    Unreachable,
}

/// Scans `plan`.
pub async fn scan(plan: &Plan<'_>) -> Outcome {
    if plan.ports.is_empty() {
        return Outcome::default();
    }
    let sem = Semaphore::new(plan.concurrency.max(1));
    let per_host = plan
        .addresses
        .iter()
        .map(|addr| scan_host(*addr, plan, &sem));
    let results = futures_util::future::join_all(per_host).await;
    let mut outcome = Outcome::default();
    for (open, probes) in results {
        outcome.open.extend(open);
        outcome.probes += probes;
    }
    outcome
}

async fn scan_host(addr: Ipv4Addr, plan: &Plan<'_>, sem: &Semaphore) -> (Vec<SocketAddrV4>, u64) {
    let first = probe(SocketAddrV4::new(addr, plan.ports[0]), plan.timeout, sem).await;
    let mut open = Vec::new();
    if first == Probe::Open {
        open.push(SocketAddrV4::new(addr, plan.ports[0]));
    }
    let host_absent = !plan.probe_all
        && match first {
            Probe::Unreachable => true,
            Probe::TimedOut => no_arp_answer(addr).await,
            Probe::Open | Probe::Closed => false,
        };
    if host_absent {
        return (open, 1);
    }
    let rest = plan.ports[1..].iter().map(|port| async move {
        let at = SocketAddrV4::new(addr, *port);
        (at, probe(at, plan.timeout, sem).await)
    });
    for (at, result) in futures_util::future::join_all(rest).await {
        if result == Probe::Open {
            open.push(at);
        }
    }
    (open, plan.ports.len() as u64)
}

async fn probe(at: SocketAddrV4, timeout: Duration, sem: &Semaphore) -> Probe {
    let _permit = sem.acquire().await;
    let connect = async {
        match async_net::TcpStream::connect(SocketAddr::V4(at)).await {
            Ok(_) => Probe::Open,
            Err(e) => match e.kind() {
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                    Probe::Unreachable
                }
                _ => Probe::Closed,
            },
        }
    };
    smol::future::or(connect, async {
        smol::Timer::after(timeout).await;
        Probe::TimedOut
    })
    .await
}

/// Whether the kernel's ARP table holds `addr` without a link-layer address: it asked
/// on a local link and nobody answered. An address that is not on a local link has no
/// entry, and counts as present.
async fn no_arp_answer(addr: Ipv4Addr) -> bool {
    let table =
        smol::unblock(|| std::fs::read_to_string("/proc/net/arp").unwrap_or_default()).await;
    arp_unanswered(&table, addr)
}

/// `/proc/net/arp` columns: IP address, HW type, Flags, HW address, Mask, Device.
/// Flags 0x0 is an incomplete (or failed) entry.
fn arp_unanswered(table: &str, addr: Ipv4Addr) -> bool {
    let wanted = addr.to_string();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 4 && cols[0] == wanted && cols[2] == "0x0"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incomplete_arp_entries_mean_no_host() {
        let table =
            "IP address       HW type     Flags       HW address            Mask     Device\n\
            198.18.0.7       0x1         0x0         00:00:00:00:00:00     *        br0\n\
            198.18.0.2       0x1         0x2         5e:11:22:33:44:55     *        br0\n";
        assert!(arp_unanswered(table, Ipv4Addr::new(198, 18, 0, 7)));
        assert!(!arp_unanswered(table, Ipv4Addr::new(198, 18, 0, 2)));
        assert!(!arp_unanswered(table, Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn loopback_ports_are_found_open_and_closed() {
        smol::block_on(async {
            let listener = async_net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let open = listener.local_addr().unwrap().port();
            let closed = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let addresses = [Ipv4Addr::LOCALHOST];
            let ports = [closed, open];
            let outcome = scan(&Plan {
                addresses: &addresses,
                ports: &ports,
                timeout: Duration::from_millis(500),
                concurrency: 4,
                probe_all: false,
            })
            .await;
            assert_eq!(
                outcome.open,
                vec![SocketAddrV4::new(Ipv4Addr::LOCALHOST, open)]
            );
            assert_eq!(outcome.probes, 2);
        });
    }
}
