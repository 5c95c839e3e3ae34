//! The dns strategy: SRV records, asked of the servers given (else the system's
//! `nameserver` lines), with hickory-resolver.
//!
//! hickory runs on tokio: every future of it is polled inside `async_compat::Compat`,
//! which supplies a tokio context (the same bridge the docker backend uses for
//! bollard). No search domains, no hosts file, no cache: exactly the name asked.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::Resolver;
use protocol::methods::DiscoveredService;

/// Looks up the SRV records of `name`; each target becomes a service at its address
/// (or its host name when the server gives no address for it).
pub async fn srv(
    servers: &[String],
    name: &str,
    timeout: Duration,
) -> Result<Vec<DiscoveredService>, String> {
    let servers = name_servers(servers)?;
    let name = name.to_owned();
    async_compat::Compat::new(async move { lookup(&servers, &name, timeout).await }).await
}

/// The servers given (`ip` or `ip:port`), else those of /etc/resolv.conf.
fn name_servers(given: &[String]) -> Result<Vec<SocketAddr>, String> {
    if !given.is_empty() {
        return given
            .iter()
            .map(|s| {
                protocol::config::dns_server_address(s).ok_or_else(|| {
                    format!("bad DNS server {s:?}: expected an IP address or ip:port")
                })
            })
            .collect();
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let system: Vec<SocketAddr> = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if system.is_empty() {
        return Err(
            "no DNS server given (--dns-server IP[:PORT]) and none in /etc/resolv.conf".into(),
        );
    }
    Ok(system)
}

async fn lookup(
    servers: &[SocketAddr],
    name: &str,
    timeout: Duration,
) -> Result<Vec<DiscoveredService>, String> {
    let ns = servers
        .iter()
        .map(|sa| {
            let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
            (udp.port, tcp.port) = (sa.port(), sa.port());
            // UDP first; TCP when an answer comes back truncated.
            NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
        })
        .collect();
    let config = ResolverConfig::from_parts(None, vec![], ns);
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    // `attempts` counts retries: 0 bounds a silent server to one timeout.
    opts.attempts = 0;
    opts.ndots = 0;
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.try_tcp_on_error = true;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    let resolver = Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("DNS resolver: {e}"))?;
    let mut qname = Name::from_utf8(name).map_err(|e| format!("bad SRV name {name:?}: {e}"))?;
    qname.set_fqdn(true);
    let answer = resolver
        .srv_lookup(qname)
        .await
        .map_err(|e| format!("SRV {name}: {}", describe(&e)))?;
    let kind = super::kind_of_service_name(name);
    let mut out = Vec::new();
    for rec in answer.answers() {
        let RData::SRV(srv) = &rec.data else {
            continue;
        };
        let target = srv.target.clone();
        let mut addrs: Vec<IpAddr> = answer
            .additionals()
            .iter()
            .filter(|r| r.name == target)
            .filter_map(|r| r.data.ip_addr())
            .collect();
        if addrs.is_empty() && !target.is_root() {
            match resolver.lookup_ip(target.clone()).await {
                Ok(ips) => addrs.extend(ips.iter()),
                Err(e) if e.is_no_records_found() => {}
                Err(e) => return Err(format!("addresses of {target}: {}", describe(&e))),
            }
        }
        addrs.sort();
        addrs.dedup();
        let shown_target = target.to_utf8();
        let detail = format!(
            "SRV {name} -> {shown_target}:{} (priority {}, weight {})",
            srv.port, srv.priority, srv.weight
        );
        let hosts: Vec<String> = if addrs.is_empty() {
            vec![shown_target.trim_end_matches('.').to_owned()]
        } else {
            addrs.iter().map(IpAddr::to_string).collect()
        };
        for host in hosts {
            let address = match host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, srv.port).to_string(),
                Err(_) => format!("{host}:{}", srv.port),
            };
            out.push(DiscoveredService {
                kind: kind.to_owned(),
                address,
                found_by: "dns".into(),
                detail: Some(detail.clone()),
            });
        }
    }
    Ok(out)
}

/// NXDOMAIN, no records, a refusal and silence each read differently.
fn describe(e: &NetError) -> String {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(_)) if e.is_nx_domain() => {
            "no such name (NXDOMAIN)".into()
        }
        NetError::Dns(DnsError::NoRecordsFound(nr)) => {
            format!("no records ({})", nr.response_code)
        }
        NetError::Dns(DnsError::ResponseCode(rc)) => format!("the server answered {rc}"),
        NetError::Timeout => "no server answered".into(),
        other => other.to_string(),
    }
}
