//! One run of a service, whichever backend runs it: what the registry records about
//! it, how to wait for its end and how to stop it.

use std::time::Duration;

use deployer::docker::ContainerRecord;
use deployer::process::{self, ExitStatus, ProcessRecord};
use registry::ServiceRecord;
use serde::{Deserialize, Serialize};

use crate::core::Core;
use crate::remote::RemoteRun;

/// A running service: a process under its shim, or a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Untagged: the two records have no field in common, and process records saved before
// containers existed still load.
#[serde(untagged)]
pub enum Run {
    /// A local process.
    Process(ProcessRecord),
    /// A container.
    Container(ContainerRecord),
    /// A process on an SSH host.
    Remote(RemoteRun),
    /// An instance the harness found running and uses (`reuse_if_running`); it was
    /// not started by the harness and is never stopped by it.
    Reused(ReusedRecord),
    /// A service found by discovery (a `discovered` target); not the harness's to
    /// stop either.
    Discovered(DiscoveredRecord),
}

/// Where discovery found a `discovered` service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveredRecord {
    /// `host:port` it answered at.
    pub discovered_at: String,
    /// What identified it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What is known of a reused instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReusedRecord {
    /// The address it answered at.
    pub reused_at: String,
}

impl Run {
    /// The run recorded for a service, if any.
    pub fn of(rec: &ServiceRecord) -> Option<Run> {
        serde_json::from_value(rec.process.clone()?).ok()
    }

    /// What the registry stores.
    pub fn to_value(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()
    }

    /// The main process's pid, as its host sees it.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Run::Process(p) => Some(p.pid),
            Run::Container(c) => c.pid,
            Run::Remote(r) => Some(r.record.remote_pid),
            Run::Reused(_) | Run::Discovered(_) => None,
        }
    }

    /// Waits until the run ends; returns how.
    pub async fn wait_exit(&self, core: &Core, stack: &str) -> ExitStatus {
        let lost = |e: String| ExitStatus {
            code: None,
            signal: None,
            error: Some(e),
        };
        match self {
            Run::Process(p) => process::wait_exit(p)
                .await
                .unwrap_or_else(|e| lost(e.to_string())),
            Run::Container(c) => wait_container(core, stack, c).await,
            Run::Remote(r) => match core.ssh_for_run(r) {
                Ok(ssh) => deployer::remote::wait_exit(&ssh, &r.record, REMOTE_POLL).await,
                Err(e) => lost(e),
            },
            // Not ours to watch: its health check tells how it does.
            Run::Reused(_) | Run::Discovered(_) => std::future::pending().await,
        }
    }

    /// Stops the run: `signal` (containers use the stop signal they were made with),
    /// then SIGKILL after `timeout`. Returns how it ended when that is known. A reused
    /// instance is left running.
    pub async fn stop(
        &self,
        core: &Core,
        stack: &str,
        signal: &str,
        timeout: Duration,
    ) -> Option<ExitStatus> {
        match self {
            Run::Process(p) => process::stop(p, signal, timeout).await.ok(),
            Run::Container(c) => {
                let engine = core
                    .engine_for(stack, c.engine_host.as_deref())
                    .await
                    .ok()?;
                match engine.stop(&c.container_id, timeout).await {
                    Ok(status) => status,
                    Err(e) => {
                        tracing::warn!("{}: {e}", c.container_name);
                        None
                    }
                }
            }
            Run::Remote(r) => {
                let ssh = core.ssh_for_run(r).ok()?;
                if let Err(e) = deployer::remote::stop(&ssh, &r.record, signal, timeout).await {
                    tracing::warn!("{}: {e}", r.remote_service);
                }
                if r.mesh.is_some() {
                    core.leave_mesh(&ssh, r, "its service stopped").await;
                }
                None
            }
            Run::Reused(_) | Run::Discovered(_) => None,
        }
    }

    /// A run the harness did not start and never stops (reused or discovered).
    pub fn is_borrowed(&self) -> bool {
        matches!(self, Run::Reused(_) | Run::Discovered(_))
    }
}

/// Waits until a container stops. A wait that ends without an exit (the engine's
/// connection went away: an SSH host's link or sshd, a restarted dockerd) is not an
/// exit: the container is looked at again, and waited for again while it runs.
async fn wait_container(core: &Core, stack: &str, c: &ContainerRecord) -> ExitStatus {
    loop {
        if let Ok(engine) = core.engine_for(stack, c.engine_host.as_deref()).await {
            let status = engine.wait_exit(&c.container_id).await;
            if status.error.is_none() {
                return status;
            }
            match engine.state(&c.container_id).await {
                Ok(deployer::docker::ContainerState::Running) => continue,
                Ok(deployer::docker::ContainerState::Exited(status)) => return status,
                Ok(deployer::docker::ContainerState::Gone) => return status,
                Err(e) => tracing::debug!("{}: {e}; looking again", c.container_name),
            }
        }
        smol::Timer::after(ENGINE_RETRY).await;
    }
}

/// How long to wait before reaching for an engine that did not answer again.
const ENGINE_RETRY: Duration = Duration::from_secs(1);

/// How often the state of a run on an SSH host is polled.
const REMOTE_POLL: Duration = Duration::from_secs(1);
