//! What a service is given: its environment and arguments with `${svc.addr}`-style
//! references resolved for where it runs.
//!
//! Precedence, lowest first (a later source overrides an earlier one):
//! 1. the daemon's own environment (PATH, HOME...),
//! 2. injected addresses: `DEP_ADDR`, `DEP_HOST`, `DEP_PORT` for each dependency, and
//!    `HARNESS_STACK`, `HARNESS_SERVICE`, `HARNESS_ENV_FILE`,
//! 3. the service's `env_file`,
//! 4. the target's `env` (e.g. `target.process.env`),
//! 5. the service's `env`.
//!
//! The address a caller is given for a service depends on where the caller runs
//! ([`Place`]), as DESIGN.md's network model says: a host process reaches a process at
//! 127.0.0.1 and a container at its published port; a container reaches a process
//! through its network's gateway and another container at its bridge address; a LAN
//! host reaches the harness host at the address the kernel uses towards it, and a
//! LAN service at its host's address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protocol::config::{template, ServiceConfig, StackConfig, Target};
use registry::StackRecord;

use crate::containers;
use crate::core::State;

/// Where a caller runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A process on the harness host.
    Host,
    /// A container on its stack's network; `gateway` is the host as seen from it.
    Container {
        /// The network's gateway address.
        gateway: String,
    },
    /// A host on the LAN, reached over SSH; `hub` is the harness host's address as
    /// that host sees it.
    Lan {
        /// The harness host's address towards that host.
        hub: String,
    },
    /// A node of the WireGuard mesh: it reaches the harness host at the hub's mesh
    /// address, and everything else through it.
    Mesh {
        /// The hub's mesh address.
        hub: String,
    },
    /// The daemon's own health checks, which reach containers at their bridge
    /// address (a published port is accepted by docker-proxy before the app listens,
    /// so a check there would prove nothing).
    Probe,
}

/// Where service `name` of `stack` runs, as a caller of others.
pub fn place_of(st: &State, stack: &str, name: &str) -> Place {
    let Some(stack_rec) = st.stack(stack) else {
        return Place::Host;
    };
    match stack_rec.config.services.get(name).map(|s| &s.target) {
        // On an SSH host's engine it calls others from that host's LAN.
        Some(Target::Docker(t)) if t.host.is_some() => {
            let host = t.host.as_deref().unwrap_or_default();
            let address = crate::remote::host_config(&stack_rec.config, host).address;
            Place::Lan {
                hub: crate::remote::hub_address_towards(&address)
                    .unwrap_or_else(|| "127.0.0.1".to_owned()),
            }
        }
        Some(Target::Docker(_)) => Place::Container {
            gateway: stack_rec
                .services
                .get(name)
                .and_then(containers::record_of)
                .and_then(|c| c.gateway)
                .unwrap_or_else(|| "host-gateway".to_owned()),
        },
        Some(Target::RemoteLan(_)) => {
            crate::remote::lan_place(&stack_rec.config, name).unwrap_or(Place::Host)
        }
        Some(Target::Wireguard(_)) => match crate::mesh::hub_address(&stack_rec.config) {
            Some(hub) => Place::Mesh {
                hub: hub.to_string(),
            },
            None => Place::Host,
        },
        _ => Place::Host,
    }
}

/// Bind address a host process should listen on (`${self.bind}`): loopback while every
/// service of the stack is a local process, all interfaces once anything else needs to
/// reach it.
fn bind_address(config: &StackConfig) -> &'static str {
    if config
        .services
        .values()
        .all(|s| matches!(s.target, Target::Process(_)))
    {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    }
}

/// (host, port) of service `target` as a caller at `place` reaches it.
pub fn endpoint(stack_rec: &StackRecord, target: &str, place: &Place) -> Option<(String, u16)> {
    let cfg = stack_rec.config.services.get(target)?;
    let rec = stack_rec.services.get(target)?;
    match (&cfg.target, place) {
        // A mesh node reaches what is not on the mesh at its alias on the hub, relayed
        // to where a host process would reach it (see `Core::relay_dependencies`).
        (t, Place::Mesh { .. })
            if !matches!(t, Target::Wireguard(_)) && rec.mesh_alias.is_some() =>
        {
            let (_, port) = endpoint(stack_rec, target, &Place::Host)?;
            Some((rec.mesh_alias.clone()?, port))
        }
        // A container on an SSH host's engine is reached at the host's address and its
        // published port, from everywhere (its bridge is inside that host).
        (Target::Docker(t), _) if t.host.is_some() => {
            let host = t.host.as_deref().unwrap_or_default();
            let address = crate::remote::host_config(&stack_rec.config, host).address;
            Some((address, rec.port?))
        }
        (Target::Docker(_), Place::Container { .. } | Place::Probe) => {
            let port = containers::main_port(cfg)?.container_port;
            // Before its first start a container has no address yet; its name on the
            // stack's network resolves for other containers.
            let host = containers::record_of(rec)
                .and_then(|c| c.ip)
                .unwrap_or_else(|| target.to_owned());
            Some((host, port))
        }
        // A mesh node, at its mesh address (through the hub for everyone); before it
        // joined (its own arguments), at its host's address.
        // A LAN host has no tunnel: it reaches a mesh service through the hub's relay.
        (Target::Wireguard(_), Place::Lan { .. }) if lan_relay(rec).is_some() => {
            let (host, port) = lan_relay(rec)?
                .rsplit_once(':')
                .map(|(h, p)| (h.to_owned(), p.parse().ok()))?;
            Some((host, port?))
        }
        (Target::Wireguard(_), _) if mesh_address(rec).is_some() => {
            Some((mesh_address(rec)?, rec.port?))
        }
        (Target::RemoteLan(_) | Target::Wireguard(_), _) => {
            let (_, _, host) = crate::remote::remote_target(&stack_rec.config, target)?;
            Some((host.address, rec.port?))
        }
        (Target::External(_) | Target::Discovered(_), place) => {
            let (host, port) = borrowed_address(cfg, rec)?;
            // A loopback address is the harness host's; a container reaches that
            // through its gateway.
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            match place {
                Place::Container { gateway } if loopback => Some((gateway.clone(), port)),
                Place::Lan { hub } | Place::Mesh { hub } if loopback => Some((hub.clone(), port)),
                _ => Some((host, port)),
            }
        }
        (_, Place::Container { gateway }) => Some((gateway.clone(), rec.port?)),
        // A process or a container's published port, on the harness host.
        (_, Place::Lan { hub } | Place::Mesh { hub }) => Some((hub.clone(), rec.port?)),
        _ => Some(("127.0.0.1".to_owned(), rec.port?)),
    }
}

/// The hub's LAN relay of a mesh service, when LAN services use one.
fn lan_relay(rec: &registry::ServiceRecord) -> Option<String> {
    match crate::run::Run::of(rec)? {
        crate::run::Run::Remote(r) => r.mesh?.lan_relay,
        _ => None,
    }
}

/// The mesh address of a service whose node joined the mesh.
fn mesh_address(rec: &registry::ServiceRecord) -> Option<String> {
    match crate::run::Run::of(rec)? {
        crate::run::Run::Remote(r) => r.mesh.map(|m| m.mesh_ip),
        _ => None,
    }
}

/// Where an external service is, or where discovery found a discovered one.
fn borrowed_address(
    cfg: &protocol::config::ServiceConfig,
    rec: &registry::ServiceRecord,
) -> Option<(String, u16)> {
    match (&cfg.target, crate::run::Run::of(rec)) {
        (Target::External(t), _) => t.host_port(),
        (Target::Discovered(_), Some(crate::run::Run::Discovered(d))) => {
            protocol::config::ExternalTarget {
                address: d.discovered_at,
            }
            .host_port()
        }
        _ => None,
    }
}

/// The endpoint of the first healthy of `members` (the first one when none is
/// healthy yet).
fn first_healthy(
    stack_rec: &StackRecord,
    members: &[&str],
    place: &Place,
) -> Option<(String, u16)> {
    let healthy = members.iter().find(|m| {
        stack_rec
            .services
            .get(**m)
            .is_some_and(|r| r.health == protocol::methods::Health::Healthy)
    });
    healthy
        .or(members.first())
        .and_then(|m| endpoint(stack_rec, m, place))
}

/// Resolves `${svc.field}` references in `input` for service `me` of `stack`, as seen
/// from `place`.
pub fn expand(
    st: &State,
    stack: &str,
    me: &str,
    place: &Place,
    input: &str,
) -> Result<String, String> {
    let stack_rec = st
        .stack(stack)
        .ok_or_else(|| format!("no stack named {stack}"))?;
    template::expand_service_refs(input, &mut |svc, field| {
        resolve_ref(stack_rec, me, place, svc, field)
    })
    .map_err(|e| format!("service {me}: {e}"))
}

/// A package's config template for service `me`: `${svc.field}` as in [`expand`],
/// `${VAR}` from `vars` (the service's environment).
pub fn expand_config(
    st: &State,
    stack: &str,
    me: &str,
    place: &Place,
    input: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, String> {
    let stack_rec = st
        .stack(stack)
        .ok_or_else(|| format!("no stack named {stack}"))?;
    template::expand_config_template(
        input,
        &mut |svc, field| resolve_ref(stack_rec, me, place, svc, field),
        &|k| vars.get(k).cloned(),
    )
    .map_err(|e| format!("service {me}: {e}"))
}

/// The value of `${svc.field}` for service `me`, as seen from `place`.
fn resolve_ref(
    stack_rec: &StackRecord,
    me: &str,
    place: &Place,
    svc: &str,
    field: &str,
) -> Option<String> {
    let name = if svc == "self" { me } else { svc };
    if field == "bind" {
        let cfg = stack_rec.config.services.get(name)?;
        return Some(match cfg.target {
            Target::Process(_) => bind_address(&stack_rec.config).to_owned(),
            _ => "0.0.0.0".to_owned(),
        });
    }
    let (host, port) = if stack_rec.config.services.contains_key(name) {
        endpoint(stack_rec, name, place)?
    } else {
        // A service on several hosts, named by its own name: its first healthy
        // instance.
        let instances = protocol::config::instances_of(&stack_rec.config, name);
        let members: Vec<&str> = instances.iter().map(String::as_str).collect();
        first_healthy(stack_rec, &members, place)?
    };
    match field {
        "addr" => Some(format!("{host}:{port}")),
        "host" => Some(host),
        "port" => Some(port.to_string()),
        _ => None,
    }
}

/// The variables the harness sets for a service (sources 2 to 5 above), without the
/// daemon's own environment.
pub fn service_env(
    st: &State,
    stack: &str,
    name: &str,
    place: &Place,
    env_file_path: &Path,
) -> Result<BTreeMap<String, String>, String> {
    let stack_rec = st
        .stack(stack)
        .ok_or_else(|| format!("no stack named {stack}"))?;
    let cfg: &ServiceConfig = stack_rec
        .config
        .services
        .get(name)
        .ok_or_else(|| format!("no service named {name} in stack {stack}"))?;
    let mut env = BTreeMap::new();
    env.insert("HARNESS_STACK".to_owned(), stack.to_owned());
    env.insert("HARNESS_SERVICE".to_owned(), name.to_owned());
    env.insert(
        "HARNESS_ENV_FILE".to_owned(),
        env_file_path.display().to_string(),
    );
    // Instances of one service on several hosts are one dependency: `DEP_ADDR` is the
    // first healthy one and `DEP_ADDRS` lists all.
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for dep in cfg.depends_on.keys() {
        let group = stack_rec
            .config
            .services
            .get(dep)
            .and_then(|d| d.instance_of.as_deref())
            .unwrap_or(dep);
        groups.entry(group).or_default().push(dep);
    }
    for (group, members) in groups {
        let addrs: Vec<(String, u16)> = members
            .iter()
            .filter_map(|m| endpoint(stack_rec, m, place))
            .collect();
        let Some((host, port)) = first_healthy(stack_rec, &members, place) else {
            continue;
        };
        let prefix = template::env_var_prefix(group);
        env.insert(format!("{prefix}_ADDR"), format!("{host}:{port}"));
        env.insert(format!("{prefix}_HOST"), host);
        env.insert(format!("{prefix}_PORT"), port.to_string());
        if members.len() > 1 || members[0] != group {
            let all: Vec<String> = addrs.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            env.insert(format!("{prefix}_ADDRS"), all.join(","));
        }
    }
    if let Some(file) = &cfg.env_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("service {name}: env_file {file}: {e}"))?;
        env.extend(parse_env_file(&text));
    }
    let target_env = match &cfg.target {
        Target::Process(p) => Some(&p.env),
        Target::Docker(d) => Some(&d.env),
        Target::RemoteLan(r) | Target::Wireguard(r) => Some(&r.env),
        _ => None,
    };
    for (k, v) in target_env.into_iter().flatten().chain(&cfg.env) {
        env.insert(k.clone(), expand(st, stack, name, place, v)?);
    }
    Ok(env)
}

/// Parses a dotenv-style file: `KEY=value` lines, `export ` prefixes, `#` comments,
/// single or double quotes around the value.
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

/// The env file a service can `source`: one `KEY='value'` line per variable.
pub fn render_env_file(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("{k}='{}'\n", v.replace('\'', r"'\''")))
        .collect()
}

/// Writes a service's env file (0600: values may be secrets), off the executor. Not
/// fsynced: it is rewritten on every launch, so a crash can only lose a file that is
/// made again. Written in place, as containers mount it.
pub async fn save_env_file(path: PathBuf, env: BTreeMap<String, String>) -> Result<(), String> {
    write_private(path, render_env_file(&env)).await
}

/// Writes a file only its owner may read (0600; its directory made when missing), off
/// the executor.
pub async fn write_private(path: PathBuf, text: String) -> Result<(), String> {
    let shown = path.display().to_string();
    smol::unblock(move || deployer::process::write_private(&path, &text))
        .await
        .map_err(|e| format!("cannot write {shown}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_round_trips_through_parse() {
        let mut env = BTreeMap::new();
        env.insert("A".to_owned(), "it's 1".to_owned());
        env.insert("B".to_owned(), "x=y".to_owned());
        let text = render_env_file(&env);
        assert_eq!(text, "A='it'\\''s 1'\nB='x=y'\n");
        let parsed = parse_env_file("# c\nexport A=\"1 2\"\nB='x=y'\n\nC=plain\n");
        assert_eq!(
            parsed,
            vec![
                ("A".to_owned(), "1 2".to_owned()),
                ("B".to_owned(), "x=y".to_owned()),
                ("C".to_owned(), "plain".to_owned())
            ]
        );
    }
}
