//! A hosts file (`harness --hosts remote-hosts.yaml …`), in the spirit of the
//! remote-deployment guide's `remote-hosts.yaml`: named hosts with their SSH settings
//! and the services each one runs, kept apart from the stack's file so the same stack
//! can be placed on other machines.
//!
//! ```yaml
//! user: deploy                     # defaults for every host below
//! ssh_key: ~/.ssh/id_ed25519
//! hosts:
//!   thinker.local:                 # address defaults to the name
//!     user: milos
//!     services: [postgres, worker] # remote_lan services placed on this host
//!   pi: { address: 192.168.1.50, port: 2222, services: [worker] }
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ConfigError, HostConfig, StackConfig, Target};

/// Settings shared by every host of the file, and the hosts.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsFile {
    /// Default SSH user (`default_user` as in the guide).
    #[serde(default, alias = "default_user")]
    pub user: Option<String>,
    /// Default private key (`ssh_key_path` as in the guide).
    #[serde(default, alias = "ssh_key_path")]
    pub ssh_key: Option<String>,
    /// Default SSH port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Default known_hosts file.
    #[serde(default)]
    pub known_hosts: Option<String>,
    /// Default install root.
    #[serde(default)]
    pub install_root: Option<String>,
    /// Default for `sudo`.
    #[serde(default)]
    pub sudo: Option<bool>,
    /// Default host key policy.
    #[serde(default)]
    pub host_key_checking: Option<String>,
    /// The hosts by name.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostsFileEntry>,
}

/// One host of a hosts file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsFileEntry {
    /// Address (default: the host's name).
    #[serde(default)]
    pub address: Option<String>,
    /// SSH user.
    #[serde(default)]
    pub user: Option<String>,
    /// SSH port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Private key.
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// known_hosts file.
    #[serde(default)]
    pub known_hosts: Option<String>,
    /// Install root.
    #[serde(default)]
    pub install_root: Option<String>,
    /// Use sudo for the install steps.
    #[serde(default)]
    pub sudo: Option<bool>,
    /// `strict` or `accept-new`.
    #[serde(default)]
    pub host_key_checking: Option<String>,
    /// The Docker engine's socket on the host.
    #[serde(default)]
    pub docker_socket: Option<String>,
    /// The `remote_lan` services this host runs.
    #[serde(default)]
    pub services: Vec<String>,
}

/// Adds the hosts of `text` (file `file`) to `config` and places the services they
/// name on them; every problem is an error naming the file and the host.
pub fn merge_hosts_file(
    config: &mut StackConfig,
    text: &str,
    file: &str,
) -> Result<(), Vec<ConfigError>> {
    let error = |key: String, message: String| ConfigError {
        file: file.to_owned(),
        line: None,
        column: None,
        key,
        message,
    };
    let parsed: HostsFile =
        serde_saphyr::from_str(text).map_err(|e| vec![error(String::new(), e.to_string())])?;
    let mut errors = Vec::new();
    for (name, e) in &parsed.hosts {
        let key = format!("hosts.{name}");
        if config.hosts.contains_key(name) {
            errors.push(error(
                key.clone(),
                format!("host {name} is defined in the stack's file too; keep it in one place"),
            ));
            continue;
        }
        config.hosts.insert(
            name.clone(),
            HostConfig {
                address: e.address.clone().unwrap_or_else(|| name.clone()),
                user: e.user.clone().or_else(|| parsed.user.clone()),
                port: e.port.or(parsed.port),
                ssh_key: e.ssh_key.clone().or_else(|| parsed.ssh_key.clone()),
                known_hosts: e.known_hosts.clone().or_else(|| parsed.known_hosts.clone()),
                sudo: e.sudo.or(parsed.sudo).unwrap_or(false),
                install_root: e
                    .install_root
                    .clone()
                    .or_else(|| parsed.install_root.clone()),
                host_key_checking: e
                    .host_key_checking
                    .clone()
                    .or_else(|| parsed.host_key_checking.clone()),
                connect_timeout_ms: None,
                docker_socket: e.docker_socket.clone(),
            },
        );
        for service in &e.services {
            let place = |t: &mut super::RemoteTarget| {
                match &t.host {
                Some(h) if h != name => Err(format!(
                    "service {service} is placed on {h} by the stack's file; give it `hosts:` there or place it only here"
                )),
                Some(_) => Ok(()),
                None => {
                    if !t.hosts.contains(name) {
                        t.hosts.push(name.clone());
                    }
                    Ok(())
                }
            }
            };
            let placed = match config.services.get_mut(service).map(|s| &mut s.target) {
                Some(Target::RemoteLan(t) | Target::Wireguard(t)) => place(t),
                Some(other) => Err(format!(
                    "service {service} is a {} service; only remote_lan and wireguard services are placed on hosts",
                    other.backend()
                )),
                None => Err(format!("no service named {service} in the stack")),
            };
            if let Err(message) = placed {
                errors.push(error(format!("{key}.services"), message));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_stack_with_hosts;

    const STACK: &str = "services:\n  worker:\n    target: {remote_lan: {binary: /bin/w}}\n  api:\n    target: {process: {binary: x}}\n";

    #[test]
    fn a_hosts_file_adds_hosts_with_defaults_and_places_services() {
        let hosts = "default_user: deploy\nssh_key: ~/.ssh/k\nhosts:\n  lan1: {services: [worker]}\n  lan2: {address: 10.0.0.2, user: pi, port: 2222, services: [worker]}\n";
        let config = parse_stack_with_hosts(STACK, "h.yaml", Some((hosts, "hosts.yaml"))).unwrap();
        let lan1 = &config.hosts["lan1"];
        assert_eq!(
            (
                lan1.address.as_str(),
                lan1.user.as_deref(),
                lan1.ssh_key.as_deref()
            ),
            ("lan1", Some("deploy"), Some("~/.ssh/k"))
        );
        assert_eq!(config.hosts["lan2"].port, Some(2222));
        let Target::RemoteLan(t) = &config.services["worker"].target else {
            panic!("not remote");
        };
        assert_eq!(t.hosts, ["lan1", "lan2"]);
    }

    #[test]
    fn hosts_file_mistakes_are_named() {
        let err = |hosts: &str| {
            parse_stack_with_hosts(STACK, "h.yaml", Some((hosts, "hosts.yaml")))
                .unwrap_err()
                .to_string()
        };
        assert!(err("hosts:\n  a: {services: [api]}\n").contains("only remote_lan"));
        assert!(err("hosts:\n  a: {services: [nope]}\n").contains("no service named nope"));
        assert!(err("hosts:\n  a: {adress: x}\n").contains("adress"));
        // Without the hosts file the stack does not say where worker runs.
        assert!(parse_stack_with_hosts(STACK, "h.yaml", None).is_err());
    }
}
