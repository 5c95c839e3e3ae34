//! Services on several hosts: `target: {remote_lan: {hosts: [a, b]}}` runs one
//! instance per host, named `svc@a`, `svc@b`.
//!
//! The daemon stores the config with each such service replaced by its instances
//! (each with `host:` set and `instance_of:` naming the service), and a dependency on
//! the service replaced by dependencies on every instance. Dependents still refer to
//! the service by its name (`${svc.addr}`, `SVC_ADDR`): that is the first healthy
//! instance, and `SVC_ADDRS` lists all of them.

use super::{ServiceConfig, StackConfig, Target};

/// `svc@host`.
pub fn instance_name(service: &str, host: &str) -> String {
    format!("{service}@{host}")
}

/// The config with every service on several hosts replaced by its instances.
pub fn expand_instances(config: &StackConfig) -> StackConfig {
    let mut out = config.clone();
    let multi: Vec<(String, Vec<String>)> = config
        .services
        .iter()
        .filter_map(|(name, s)| match &s.target {
            Target::RemoteLan(t) | Target::Wireguard(t) if !t.hosts.is_empty() => {
                Some((name.clone(), t.hosts.clone()))
            }
            _ => None,
        })
        .collect();
    for (name, hosts) in &multi {
        let Some(svc) = out.services.remove(name) else {
            continue;
        };
        for host in hosts {
            let mut instance: ServiceConfig = svc.clone();
            if let Target::RemoteLan(t) | Target::Wireguard(t) = &mut instance.target {
                t.host = Some(host.clone());
                t.hosts.clear();
            }
            instance.instance_of = Some(name.clone());
            out.services.insert(instance_name(name, host), instance);
        }
        for other in out.services.values_mut() {
            if let Some(dep) = other.depends_on.remove(name) {
                for host in hosts {
                    other
                        .depends_on
                        .insert(instance_name(name, host), dep.clone());
                }
            }
        }
    }
    out
}

/// The names of `names` with every multi-host service replaced by its instances
/// (what `up web` means when web runs on several hosts).
pub fn expand_names(config: &StackConfig, names: &[String]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| {
            let instances = instances_of(config, n);
            if instances.is_empty() {
                vec![n.clone()]
            } else {
                instances
            }
        })
        .collect()
}

/// The instances of service `name` (empty when it runs on one host or none).
pub fn instances_of(config: &StackConfig, name: &str) -> Vec<String> {
    config
        .services
        .iter()
        .filter(|(_, s)| s.instance_of.as_deref() == Some(name))
        .map(|(n, _)| n.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_stack;

    #[test]
    fn a_service_on_three_hosts_becomes_three_instances_and_dependents_wait_for_all() {
        let yaml = "services:\n  web:\n    target: {remote_lan: {hosts: [a, b, c], binary: /bin/web}}\n  api:\n    target: {process: {binary: x}}\n    depends_on: {web: {condition: healthy}}\n";
        let config = parse_stack(yaml, "h.yaml").unwrap();
        let expanded = expand_instances(&config);
        let names: Vec<&String> = expanded.services.keys().collect();
        assert_eq!(names, ["api", "web@a", "web@b", "web@c"]);
        let deps: Vec<&String> = expanded.services["api"].depends_on.keys().collect();
        assert_eq!(deps, ["web@a", "web@b", "web@c"]);
        let Target::RemoteLan(t) = &expanded.services["web@b"].target else {
            panic!("not remote");
        };
        assert_eq!((t.host.as_deref(), t.hosts.len()), (Some("b"), 0));
        assert_eq!(expand_names(&expanded, &["web".into()]).len(), 3);
        assert_eq!(expand_names(&expanded, &["api".into()]), ["api"]);
        // Expanding twice changes nothing.
        assert_eq!(expand_instances(&expanded), expanded);
    }
}
