//! `network.list`, `network.show` and `network.test`: a stack's networks, the address
//! table of DESIGN.md's network model with the real addresses (each service as each
//! place of caller reaches it), and connects that try them from where callers run.

use std::sync::Arc;
use std::time::Duration;

use protocol::config::Target;
use protocol::methods::{AddressRow, NetworkInfo, ReachCheck};
use registry::StackRecord;

use crate::core::Core;
use crate::env::{self, Place};

/// How long one reachability connect may take.
const CONNECT: Duration = Duration::from_secs(3);

/// Where a service runs, in words.
fn runs_on(target: &Target) -> String {
    match target {
        Target::Process(_) => "host process".into(),
        Target::Docker(t) => match &t.host {
            Some(h) => format!("container on {h}"),
            None => "host container".into(),
        },
        Target::RemoteLan(t) => format!("lan {}", t.host.as_deref().unwrap_or("?")),
        Target::Wireguard(t) => format!("mesh {}", t.host.as_deref().unwrap_or("?")),
        Target::External(_) => "external".into(),
        Target::Discovered(_) => "discovered".into(),
    }
}

/// The places callers of this stack can be at (the ones it has services at).
struct Places {
    container: Option<Place>,
    lan: Option<Place>,
    mesh: Option<Place>,
}

fn places(rec: &StackRecord) -> Places {
    let config = &rec.config;
    let has = |f: &dyn Fn(&Target) -> bool| config.services.values().any(|s| f(&s.target));
    let container = has(&|t| matches!(t, Target::Docker(d) if d.host.is_none())).then(|| {
        let gateway = rec
            .services
            .values()
            .find_map(|s| crate::containers::record_of(s)?.gateway)
            .unwrap_or_else(|| "host-gateway".to_owned());
        Place::Container { gateway }
    });
    let lan = config
        .services
        .keys()
        .find(|n| matches!(config.services[*n].target, Target::RemoteLan(_)))
        .and_then(|n| crate::remote::lan_place(config, n));
    let mesh = has(&|t| matches!(t, Target::Wireguard(_)))
        .then(|| crate::mesh::hub_address(config))
        .flatten()
        .map(|hub| Place::Mesh {
            hub: hub.to_string(),
        });
    Places {
        container,
        lan,
        mesh,
    }
}

fn shown(rec: &StackRecord, name: &str, place: &Place) -> Option<String> {
    env::endpoint(rec, name, place).map(|(h, p)| format!("{h}:{p}"))
}

impl Core {
    /// `network.list`.
    pub fn network_list(&self, stack: &str) -> Result<Vec<NetworkInfo>, String> {
        self.read(|st| {
            let rec = st
                .stack(stack)
                .ok_or_else(|| format!("no stack named {stack}"))?;
            let config = &rec.config;
            let of = |f: &dyn Fn(&Target) -> bool| -> Vec<String> {
                config
                    .services
                    .iter()
                    .filter(|(_, s)| f(&s.target))
                    .map(|(n, _)| n.clone())
                    .collect()
            };
            let mut out = vec![NetworkInfo {
                kind: "host".into(),
                name: "host".into(),
                detail: "127.0.0.1 for the harness host's own callers".into(),
                services: of(&|t| matches!(t, Target::Process(_))),
            }];
            let containers = of(&|t| matches!(t, Target::Docker(d) if d.host.is_none()));
            if !containers.is_empty() {
                let p = places(rec);
                let gateway = match p.container {
                    Some(Place::Container { gateway }) => gateway,
                    _ => String::new(),
                };
                out.push(NetworkInfo {
                    kind: "docker".into(),
                    name: crate::containers::network_name(&self.instance, stack),
                    detail: format!("gateway {gateway}"),
                    services: containers,
                });
            }
            for (host, h) in &config.hosts {
                let on_host = of(&|t| match t {
                    Target::RemoteLan(r) | Target::Wireguard(r) => {
                        r.host.as_deref() == Some(host.as_str())
                    }
                    Target::Docker(d) => d.host.as_deref() == Some(host.as_str()),
                    _ => false,
                });
                if on_host.is_empty() {
                    continue;
                }
                let hub = crate::remote::hub_address_towards(&h.address).unwrap_or_default();
                out.push(NetworkInfo {
                    kind: "lan".into(),
                    name: host.clone(),
                    detail: format!("{} (the harness host is {hub} from there)", h.address),
                    services: on_host,
                });
            }
            let mesh = of(&|t| matches!(t, Target::Wireguard(_)));
            if !mesh.is_empty() {
                let subnet = crate::mesh::subnet_of(config)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let hub = crate::mesh::hub_address(config)
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                out.push(NetworkInfo {
                    kind: "mesh".into(),
                    name: crate::mesh::interface_name(&self.instance),
                    detail: format!(
                        "{subnet}, hub {hub}, UDP port {}",
                        config
                            .network
                            .listen_port
                            .unwrap_or(crate::mesh::DEFAULT_PORT)
                    ),
                    services: mesh,
                });
            }
            Ok(out)
        })
    }

    /// `network.show`.
    pub fn network_show(&self, stack: &str) -> Result<Vec<AddressRow>, String> {
        self.read(|st| {
            let rec = st
                .stack(stack)
                .ok_or_else(|| format!("no stack named {stack}"))?;
            let p = places(rec);
            Ok(rec
                .config
                .services
                .iter()
                .map(|(name, cfg)| AddressRow {
                    name: name.clone(),
                    runs_on: runs_on(&cfg.target),
                    from_host: shown(rec, name, &Place::Host),
                    from_container: p.container.as_ref().and_then(|pl| shown(rec, name, pl)),
                    from_lan: p.lan.as_ref().and_then(|pl| shown(rec, name, pl)),
                    from_mesh: p.mesh.as_ref().and_then(|pl| shown(rec, name, pl)),
                })
                .collect())
        })
    }

    /// `network.test`: a TCP connect from the harness host to every running service,
    /// and from every running LAN or mesh service's host (over SSH) to each of its
    /// dependencies, at the addresses they were given.
    pub async fn network_test(self: &Arc<Self>, stack: &str) -> Result<Vec<ReachCheck>, String> {
        let (from_host, from_nodes) = self.read(|st| {
            let rec = st
                .stack(stack)
                .ok_or_else(|| format!("no stack named {stack}"))?;
            let active = |n: &str| rec.services.get(n).is_some_and(|s| s.state.is_active());
            let from_host: Vec<(String, String)> = rec
                .config
                .services
                .keys()
                .filter(|n| active(n))
                .filter_map(|n| Some((n.clone(), shown(rec, n, &Place::Host)?)))
                .collect();
            let mut from_nodes = Vec::new();
            for (name, cfg) in &rec.config.services {
                let (Target::RemoteLan(_) | Target::Wireguard(_)) = &cfg.target else {
                    continue;
                };
                let Some(crate::run::Run::Remote(run)) =
                    rec.services.get(name).and_then(crate::run::Run::of)
                else {
                    continue;
                };
                let place = env::place_of(st, stack, name);
                for dep in cfg.depends_on.keys().filter(|d| active(d)) {
                    if let Some(addr) = shown(rec, dep, &place) {
                        from_nodes.push((run.clone(), dep.clone(), addr));
                    }
                }
            }
            Ok::<_, String>((from_host, from_nodes))
        })?;
        let mut out = Vec::new();
        for (to, address) in from_host {
            let connect = async_net::TcpStream::connect(address.as_str());
            let result = smol::future::or(async { Some(connect.await) }, async {
                smol::Timer::after(CONNECT).await;
                None
            })
            .await;
            let (ok, detail) = match result {
                Some(Ok(_)) => (true, "connected".to_owned()),
                Some(Err(e)) => (false, e.to_string()),
                None => (false, format!("no answer within {} s", CONNECT.as_secs())),
            };
            out.push(ReachCheck {
                from: "host".into(),
                to,
                address,
                ok,
                detail,
            });
        }
        for (run, to, address) in from_nodes {
            let Some((host, port)) = address.rsplit_once(':') else {
                continue;
            };
            let command = format!(
                "timeout {} bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>&1",
                CONNECT.as_secs()
            );
            let (ok, detail) = match self.ssh_for_run(&run) {
                Ok(ssh) => match ssh.exec(&command, b"", CONNECT * 2).await {
                    Ok(o) if o.status == 0 => (true, "connected".to_owned()),
                    Ok(o) => (false, format!("exit {}: {}", o.status, o.message())),
                    Err(e) => (false, e.to_string()),
                },
                Err(e) => (false, e),
            };
            out.push(ReachCheck {
                from: run.record.host.clone(),
                to,
                address,
                ok,
                detail,
            });
        }
        Ok(out)
    }
}
