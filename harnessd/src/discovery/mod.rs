//! Discovery: finds services that already run, so a stack can use them instead of
//! starting its own (`discover`, `discovered` targets).
//!
//! Strategies: `tcp` (a bounded port scan of the ranges given, each open port
//! identified by protocol), `http` (`/health` and `/ready` on the http ports), `dns`
//! (SRV records from the servers given) and `mdns` (browsing on the interfaces given).
//! With no range given only 127.0.0.1 is scanned: a private range is never a default.
//! Results are cached for [`CACHE_TTL`] per set of options.

mod dns;
mod identify;
mod mdns;
mod scan;

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::config::{
    scan_addresses, DiscoveryOptions, DEFAULT_DISCOVERY_CONCURRENCY, DEFAULT_HTTP_PORTS,
    DEFAULT_HTTP_TIMEOUT_MS, DEFAULT_MDNS_TYPES, DEFAULT_MDNS_WAIT_MS, DEFAULT_TCP_PORTS,
    DEFAULT_TCP_TIMEOUT_MS, DISCOVERY_STRATEGIES,
};
use protocol::methods::{DiscoverParams, DiscoverResult, DiscoveredService};

pub use identify::is_kind;

/// How long a search's result is served from the cache.
pub const CACHE_TTL: Duration = Duration::from_secs(30);

/// The range scanned when none is given.
const DEFAULT_RANGE: &str = "127.0.0.1";

/// Results of recent searches, by their options.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<String, (Instant, DiscoverResult)>>,
}

impl Cache {
    /// Runs the `discover` method: a fresh cached result, or a new search.
    pub async fn discover(&self, params: DiscoverParams) -> Result<DiscoverResult, String> {
        let key = serde_json::to_string(&params.options).map_err(|e| e.to_string())?;
        if !params.refresh {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, result)) = entries.get(&key).filter(|(at, _)| at.elapsed() < CACHE_TTL)
            {
                tracing::debug!("discover: cached {} s ago", at.elapsed().as_secs());
                return Ok(DiscoverResult {
                    cached: true,
                    ..result.clone()
                });
            }
        }
        let result = search(&params.options).await?;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        entries.insert(key, (Instant::now(), result.clone()));
        Ok(result)
    }
}

/// The strategies a search runs: those asked for, else tcp and http, plus dns and mdns
/// when they were given something to ask.
fn strategies(o: &DiscoveryOptions) -> Result<Vec<&str>, String> {
    if let Some(bad) = o
        .strategies
        .iter()
        .find(|s| !DISCOVERY_STRATEGIES.contains(&s.as_str()))
    {
        return Err(format!(
            "unknown strategy {bad:?}: expected one of {}",
            DISCOVERY_STRATEGIES.join(", ")
        ));
    }
    if !o.strategies.is_empty() {
        return Ok(o.strategies.iter().map(String::as_str).collect());
    }
    let mut all = vec!["tcp", "http"];
    if !o.srv_names.is_empty() {
        all.push("dns");
    }
    if !o.mdns_interfaces.is_empty() {
        all.push("mdns");
    }
    Ok(all)
}

/// Runs one search.
pub async fn search(o: &DiscoveryOptions) -> Result<DiscoverResult, String> {
    let started = Instant::now();
    let strategies = strategies(o)?;
    let ranges = if o.ranges.is_empty() {
        vec![DEFAULT_RANGE.to_owned()]
    } else {
        o.ranges.clone()
    };
    let addresses = scan_addresses(&ranges)?;
    let timeout = Duration::from_millis(o.tcp_timeout_ms.unwrap_or(DEFAULT_TCP_TIMEOUT_MS));
    let http_timeout = Duration::from_millis(o.http_timeout_ms.unwrap_or(DEFAULT_HTTP_TIMEOUT_MS));
    let concurrency = o
        .concurrency
        .unwrap_or(DEFAULT_DISCOVERY_CONCURRENCY)
        .max(1);
    let mut result = DiscoverResult {
        addresses: addresses.len() as u64,
        ..DiscoverResult::default()
    };
    let wants = |s: &str| strategies.contains(&s);
    // One scan covers the ports of both tcp and http.
    let mut ports: Vec<u16> = Vec::new();
    if wants("tcp") {
        ports.extend(or_default(&o.tcp_ports, &DEFAULT_TCP_PORTS));
    }
    let http_ports = or_default(&o.http_ports, &DEFAULT_HTTP_PORTS);
    if wants("http") {
        ports.extend(
            http_ports
                .iter()
                .filter(|p| !ports.contains(p))
                .collect::<Vec<_>>(),
        );
    }
    if !ports.is_empty() {
        let outcome = scan::scan(&scan::Plan {
            addresses: &addresses,
            ports: &ports,
            timeout,
            concurrency,
            probe_all: o.probe_all,
        })
        .await;
        result.probes = outcome.probes;
        let tcp_ports = or_default(&o.tcp_ports, &DEFAULT_TCP_PORTS);
        let found = outcome.open.iter().map(|at| async {
            let mut out = Vec::new();
            if wants("tcp") && tcp_ports.contains(&at.port()) {
                let id = identify::identify(SocketAddr::V4(*at), timeout).await;
                out.push(service(id.kind, *at, "tcp", id.detail));
            }
            if wants("http") && http_ports.contains(&at.port()) {
                if let Some(detail) = http_endpoints(*at, http_timeout).await {
                    out.push(service("http", *at, "http", Some(detail)));
                }
            }
            out
        });
        for found in futures_util::future::join_all(found).await {
            result.services.extend(found);
        }
    }
    if wants("dns") {
        if o.srv_names.is_empty() {
            result
                .notes
                .push("dns: skipped, no SRV names given (--srv NAME)".into());
        }
        for name in &o.srv_names {
            match dns::srv(&o.dns_servers, name, http_timeout).await {
                Ok(found) => result.services.extend(found),
                Err(e) => result.notes.push(format!("dns: {e}")),
            }
        }
    }
    if wants("mdns") {
        if o.mdns_interfaces.is_empty() {
            result
                .notes
                .push("mdns: skipped, no interface given (--mdns-interface IF)".into());
        } else {
            let types: Vec<String> = if o.mdns_types.is_empty() {
                DEFAULT_MDNS_TYPES.iter().map(|t| (*t).to_owned()).collect()
            } else {
                o.mdns_types.clone()
            };
            let wait = Duration::from_millis(o.mdns_wait_ms.unwrap_or(DEFAULT_MDNS_WAIT_MS));
            match mdns::browse(&o.mdns_interfaces, &types, wait).await {
                Ok(found) => result.services.extend(found),
                Err(e) => result.notes.push(format!("mdns: {e}")),
            }
        }
    }
    result.services.sort();
    result.services.dedup();
    result.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(result)
}

fn or_default(given: &[u16], default: &[u16]) -> Vec<u16> {
    if given.is_empty() {
        default.to_vec()
    } else {
        given.to_vec()
    }
}

fn service(
    kind: &str,
    at: SocketAddrV4,
    found_by: &str,
    detail: Option<String>,
) -> DiscoveredService {
    DiscoveredService {
        kind: kind.to_owned(),
        address: at.to_string(),
        found_by: found_by.to_owned(),
        detail,
    }
}

/// `/health` and `/ready` of an HTTP service at `at`: their statuses (and the
/// `Server` header), or `None` when it does not speak HTTP.
async fn http_endpoints(at: SocketAddrV4, timeout: Duration) -> Option<String> {
    let addr = at.to_string();
    let mut parts = Vec::new();
    let mut server = None;
    for path in ["/health", "/ready"] {
        let get = crate::http1::get(&addr, &addr, path, &addr);
        let head = smol::future::or(get, async {
            smol::Timer::after(timeout).await;
            Err("timed out".into())
        })
        .await
        .ok()?;
        parts.push(format!("{path} {}", head.code));
        server = server.or(head.server);
    }
    if let Some(s) = server {
        parts.push(format!("Server: {s}"));
    }
    Some(parts.join(", "))
}

/// The kind a DNS-SD service name stands for (`_postgresql._tcp...` is postgresql).
fn kind_of_service_name(name: &str) -> &'static str {
    let label = name.trim_start_matches('_');
    let label = label
        .split('.')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match label.as_str() {
        "postgresql" | "postgres" | "pg" => "postgresql",
        "redis" => "redis",
        "http" | "https" => "http",
        "ssh" | "sftp-ssh" => "ssh",
        _ => "unknown",
    }
}

/// The usual ports of a kind, tried by a `discovered` target that names none.
fn usual_ports(kind: &str) -> &'static [u16] {
    match kind {
        "postgresql" => &[5432],
        "redis" => &[6379],
        "http" => &[80, 8080],
        "ssh" => &[22],
        _ => &[],
    }
}

/// Finds a running service of `kind` for a `discovered` target: the lowest address in
/// `ranges` (127.0.0.1 when empty) where one of `ports` (the kind's usual ports when
/// empty) answers as that kind.
pub async fn find(
    kind: &str,
    ranges: &[String],
    ports: &[u16],
    timeout: Duration,
) -> Result<DiscoveredService, String> {
    let ranges = if ranges.is_empty() {
        vec![DEFAULT_RANGE.to_owned()]
    } else {
        ranges.to_vec()
    };
    let addresses = scan_addresses(&ranges)?;
    let ports = if ports.is_empty() {
        usual_ports(kind).to_vec()
    } else {
        ports.to_vec()
    };
    let outcome = scan::scan(&scan::Plan {
        addresses: &addresses,
        ports: &ports,
        timeout,
        concurrency: DEFAULT_DISCOVERY_CONCURRENCY,
        probe_all: false,
    })
    .await;
    let mut others = Vec::new();
    for at in &outcome.open {
        match is_kind(SocketAddr::V4(*at), kind, timeout).await {
            Ok(detail) => return Ok(service(kind, *at, "tcp", Some(detail))),
            Err(e) => others.push(e),
        }
    }
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut message = format!(
        "no {kind} service found in {} on port {}",
        ranges.join(", "),
        ports.join(", ")
    );
    if !others.is_empty() {
        message.push_str(&format!(" ({})", others.join("; ")));
    }
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_strategies_need_something_to_ask() {
        let mut o = DiscoveryOptions::default();
        assert_eq!(strategies(&o).unwrap(), ["tcp", "http"]);
        o.srv_names = vec!["_redis._tcp.x".into()];
        o.mdns_interfaces = vec!["br0".into()];
        assert_eq!(strategies(&o).unwrap(), ["tcp", "http", "dns", "mdns"]);
        o.strategies = vec!["mdns".into()];
        assert_eq!(strategies(&o).unwrap(), ["mdns"]);
        o.strategies = vec!["ping".into()];
        assert!(strategies(&o).unwrap_err().contains("unknown strategy"));
    }

    #[test]
    fn service_names_tell_the_kind() {
        assert_eq!(
            kind_of_service_name("_postgresql._tcp.test.internal"),
            "postgresql"
        );
        assert_eq!(kind_of_service_name("_redis._tcp.local."), "redis");
        assert_eq!(kind_of_service_name("_ipp._tcp.local."), "unknown");
    }
}
