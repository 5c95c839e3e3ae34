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
    pub async fn wait_exit(&self, core: &Core) -> ExitStatus {
        let lost = |e: String| ExitStatus {
            code: None,
            signal: None,
            error: Some(e),
        };
        match self {
            Run::Process(p) => process::wait_exit(p)
                .await
                .unwrap_or_else(|e| lost(e.to_string())),
            Run::Container(c) => match core.engine().await {
                Ok(engine) => engine.wait_exit(&c.container_id).await,
                Err(e) => lost(e),
            },
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
    pub async fn stop(&self, core: &Core, signal: &str, timeout: Duration) -> Option<ExitStatus> {
        match self {
            Run::Process(p) => process::stop(p, signal, timeout).await.ok(),
            Run::Container(c) => {
                let engine = core.engine().await.ok()?;
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

/// How often the state of a run on an SSH host is polled.
const REMOTE_POLL: Duration = Duration::from_secs(1);
