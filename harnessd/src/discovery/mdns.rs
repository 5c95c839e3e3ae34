//! The mdns strategy: DNS-SD browsing with mdns-sd, only on the interfaces given.
//!
//! mdns-sd runs its own thread and hands results over flume channels, which are
//! awaited here with smol timers; the daemon thread is shut down after each browse.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
use protocol::methods::DiscoveredService;

/// Browses `types` (e.g. `_postgresql._tcp.local.`) on `interfaces` for `wait`.
pub async fn browse(
    interfaces: &[String],
    types: &[String],
    wait: Duration,
) -> Result<Vec<DiscoveredService>, String> {
    let daemon = ServiceDaemon::new().map_err(|e| format!("cannot start mDNS: {e}"))?;
    let found = browse_on(&daemon, interfaces, types, wait).await;
    // ServiceDaemon has no Drop: stop its thread and wait (bounded) for it to say so.
    if let Ok(status) = daemon.shutdown() {
        let ack = async {
            let _ = status.recv_async().await;
        };
        let give_up = async {
            smol::Timer::after(Duration::from_secs(2)).await;
        };
        smol::future::or(ack, give_up).await;
    }
    found
}

async fn browse_on(
    daemon: &ServiceDaemon,
    interfaces: &[String],
    types: &[String],
    wait: Duration,
) -> Result<Vec<DiscoveredService>, String> {
    // Selections apply in order: none at all (loopback included), then those given.
    daemon
        .disable_interface(IfKind::All)
        .map_err(|e| format!("mDNS interfaces: {e}"))?;
    let named: Vec<IfKind> = interfaces.iter().map(|n| IfKind::Name(n.clone())).collect();
    daemon
        .enable_interface(named)
        .map_err(|e| format!("mDNS interfaces: {e}"))?;
    let mut receivers = Vec::new();
    for t in types {
        if !(t.ends_with("._tcp.local.") || t.ends_with("._udp.local.")) {
            return Err(format!(
                "bad mDNS type {t:?}: expected a name such as _postgresql._tcp.local."
            ));
        }
        let rx = daemon
            .browse(t)
            .map_err(|e| format!("mDNS browse {t}: {e}"))?;
        receivers.push((t.clone(), rx));
    }
    let deadline = Instant::now() + wait;
    let mut found: BTreeMap<(String, String), DiscoveredService> = BTreeMap::new();
    let listen = receivers.iter().map(|(t, rx)| async {
        let mut out = Vec::new();
        loop {
            let event = async { rx.recv_async().await.ok() };
            let timer = async {
                smol::Timer::at(deadline).await;
                None
            };
            match smol::future::or(event, timer).await {
                None => break,
                Some(ServiceEvent::ServiceResolved(info)) => {
                    for ip in info.addresses.iter().map(|a| a.to_ip_addr()) {
                        out.push(DiscoveredService {
                            kind: super::kind_of_service_name(t).to_owned(),
                            address: SocketAddr::new(ip, info.port).to_string(),
                            found_by: "mdns".into(),
                            detail: Some(format!("mDNS {} on {}", info.fullname, info.host)),
                        });
                    }
                }
                Some(_) => {}
            }
        }
        out
    });
    for services in futures_util::future::join_all(listen).await {
        for s in services {
            found.insert((s.address.clone(), s.detail.clone().unwrap_or_default()), s);
        }
    }
    for (t, _) in &receivers {
        let _ = daemon.stop_browse(t);
    }
    Ok(found.into_values().collect())
}
