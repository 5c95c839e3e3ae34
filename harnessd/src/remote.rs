//! Services on LAN hosts over SSH (`remote_lan`): which host, which session, where
//! their files go, and starting them.
//!
//! Sessions are kept per SSH target (address, port, user, key, known_hosts) for the
//! daemon's life, so every service and check on a host shares one session.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use deployer::remote::{self, RemoteRecord, RemoteSpec};
use deployer::ssh::{HostKeyPolicy, SshHost, SshTarget};
use protocol::config::{HostConfig, RemoteTarget, StackConfig, Target};
use serde::{Deserialize, Serialize};

use crate::core::{Core, State};
use crate::env::{self, Place};

/// Where releases and runs go on a host unless it says otherwise.
pub const DEFAULT_INSTALL_ROOT: &str = "/opt/harness";

/// How long connecting to a host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A service run on an SSH host, as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRun {
    /// Its stack (to find the host's settings again after a daemon restart).
    pub remote_stack: String,
    /// Its service.
    pub remote_service: String,
    /// The run on the host.
    #[serde(flatten)]
    pub record: RemoteRecord,
}

/// A host reference (`host: lan1`) as settings: the entry of `hosts:` of that name, or
/// an address given directly.
pub fn host_config(config: &StackConfig, reference: &str) -> HostConfig {
    config
        .hosts
        .get(reference)
        .cloned()
        .unwrap_or_else(|| HostConfig {
            address: reference.to_owned(),
            ..HostConfig::default()
        })
}

/// The remote target of a service and the host it runs on.
pub fn remote_target<'a>(
    config: &'a StackConfig,
    name: &str,
) -> Option<(&'a RemoteTarget, String, HostConfig)> {
    let Target::RemoteLan(t) = &config.services.get(name)?.target else {
        return None;
    };
    let host = t.host.clone().or_else(|| t.hosts.first().cloned())?;
    let settings = host_config(config, &host);
    Some((t, host, settings))
}

/// The address of the harness host as `address` sees it: the source address the
/// kernel picks towards it (a UDP connect sends nothing).
pub fn hub_address_towards(address: &str) -> Option<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect((address, 9)).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

impl Core {
    /// The session to `host` (settings `h`) for target `t`, made on first use.
    pub fn ssh_host(&self, h: &HostConfig, t: Option<&RemoteTarget>) -> Result<SshHost, String> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let user = t
            .and_then(|t| t.user.clone())
            .or_else(|| h.user.clone())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "root".to_owned());
        let key = t
            .and_then(|t| t.ssh_key.clone())
            .or_else(|| h.ssh_key.clone())
            .map(PathBuf::from);
        let known_hosts = match &h.known_hosts {
            Some(file) => vec![PathBuf::from(file)],
            None => home
                .map(|h| h.join(".ssh").join("known_hosts"))
                .into_iter()
                .collect(),
        };
        let policy = match h.host_key_checking.as_deref() {
            Some("accept-new") => HostKeyPolicy::AcceptNew,
            _ => HostKeyPolicy::Strict,
        };
        let target = SshTarget {
            address: h.address.clone(),
            port: h.port.unwrap_or(22),
            user,
            key,
            known_hosts,
            policy,
            own_known_hosts: self.state_dir.join("known_hosts"),
            connect_timeout: CONNECT_TIMEOUT,
        };
        let mut hosts = self.ssh.lock().unwrap_or_else(|e| e.into_inner());
        Ok(hosts
            .entry(target.clone())
            .or_insert_with(|| SshHost::new(target))
            .clone())
    }

    /// The session of a recorded run (after a daemon restart too).
    pub fn ssh_for_run(&self, run: &RemoteRun) -> Result<SshHost, String> {
        let (h, t) = self
            .read(|st| {
                let config = &st.stack(&run.remote_stack)?.config;
                let t = match &config.services.get(&run.remote_service)?.target {
                    Target::RemoteLan(t) => Some(t.clone()),
                    _ => None,
                };
                Some((host_config(config, &run.record.host), t))
            })
            .ok_or_else(|| {
                format!(
                    "{}/{}: its stack or service is no longer registered",
                    run.remote_stack, run.remote_service
                )
            })?;
        self.ssh_host(&h, t.as_ref())
    }

    /// The run directory of a service on its host.
    fn remote_dir(&self, h: &HostConfig, stack: &str, name: &str) -> String {
        let root = h.install_root.as_deref().unwrap_or(DEFAULT_INSTALL_ROOT);
        let instance: String = self.instance.chars().take(8).collect();
        format!(
            "{}/{name}/run/{stack}-{instance}",
            root.trim_end_matches('/')
        )
    }

    /// Starts a `remote_lan` service with `binary:` on its host.
    pub async fn launch_remote(&self, stack: &str, name: &str) -> Result<RemoteRun, String> {
        let (spec, ssh, host) = self.read(|st| self.remote_spec(st, stack, name))?;
        remote::reset_copied(&self.log_path(stack, name));
        let record = remote::launch(&ssh, &host, &spec)
            .await
            .map_err(|e| e.to_string())?;
        Ok(RemoteRun {
            remote_stack: stack.to_owned(),
            remote_service: name.to_owned(),
            record,
        })
    }

    fn remote_spec(
        &self,
        st: &State,
        stack: &str,
        name: &str,
    ) -> Result<(RemoteSpec, SshHost, String), String> {
        let config = &st.stack(stack).ok_or("stack was removed")?.config;
        let (t, host, h) = remote_target(config, name)
            .ok_or_else(|| format!("service {name}: not a remote_lan service"))?;
        let Some(binary) = &t.binary else {
            return Err(format!(
                "service {name}: deploying packages is not available in this build yet; give `binary:` (a program already on the host)"
            ));
        };
        let place = env::place_of(st, stack, name);
        let dir = self.remote_dir(&h, stack, name);
        let vars: BTreeMap<String, String> = env::service_env(
            st,
            stack,
            name,
            &place,
            &PathBuf::from(format!("{dir}/env")),
        )?;
        let mut argv = vec![env::expand(st, stack, name, &place, binary)?];
        for a in &t.args {
            argv.push(env::expand(st, stack, name, &place, a)?);
        }
        let ssh = self.ssh_host(&h, Some(t))?;
        let spec = RemoteSpec {
            dir,
            argv,
            env: vars,
            cwd: None,
            instance: format!("{}/{stack}/{name}", self.instance),
            stop_script: None,
        };
        Ok((spec, ssh, host))
    }
}

/// Where a `remote_lan` service runs, as a caller of others: its host, which reaches
/// the harness host at `hub`.
pub fn lan_place(config: &StackConfig, name: &str) -> Option<Place> {
    let (_, _, h) = remote_target(config, name)?;
    Some(Place::Lan {
        hub: hub_address_towards(&h.address).unwrap_or_else(|| "127.0.0.1".to_owned()),
    })
}
