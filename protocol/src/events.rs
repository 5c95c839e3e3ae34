//! Journaled events. Each carries a monotonically increasing `seq` that a client gives
//! back as `since` in `subscribe` to replay what it missed.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::methods::{Health, ServiceState};

/// An event as sent on the wire: `{"event": ..., "seq": ..., "time": ..., "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// Position in the daemon's journal; strictly increasing.
    pub seq: u64,
    /// When the event happened (RFC 3339, UTC).
    pub time: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened, tagged by its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", content = "data")]
#[non_exhaustive]
pub enum EventKind {
    /// A service was added to the registry or its config changed.
    #[serde(rename = "service.registered")]
    ServiceRegistered(ServiceRef),
    /// A service changed state.
    #[serde(rename = "service.state")]
    ServiceState(StateChange),
    /// A health check changed a service's health.
    #[serde(rename = "service.health")]
    ServiceHealth(HealthChange),
    /// A service is being restarted by its restart policy after a backoff.
    #[serde(rename = "service.restarting")]
    ServiceRestarting(Restarting),
    /// A service with a placement list moved on to its next target: the one before did
    /// not come up healthy.
    #[serde(rename = "service.fallback")]
    ServiceFallback(Fallback),
    /// A step of getting a service ready to start: pulling, building or importing its
    /// image.
    #[serde(rename = "service.progress")]
    ServiceProgress(Progress),
    /// A service's process exited.
    #[serde(rename = "service.exited")]
    ServiceExited(Exited),
    /// A service was removed from the registry.
    #[serde(rename = "service.removed")]
    ServiceRemoved(ServiceRef),
    /// A step of deploying a package to a host.
    #[serde(rename = "deploy.step")]
    DeployStep(DeployStep),
    /// Bytes of a package sent to a host so far.
    #[serde(rename = "deploy.progress")]
    DeployProgress(DeployProgress),
    /// A new release failed its health check; the previous one runs again.
    #[serde(rename = "deploy.rollback")]
    DeployRollback(DeployRollback),
    /// The mesh's hub came up (its device and UDP port), with the first mesh service.
    #[serde(rename = "mesh.up")]
    MeshUp(MeshUp),
    /// The mesh's hub went down, with the last mesh service.
    #[serde(rename = "mesh.down")]
    MeshDown(MeshUp),
    /// A node joined the mesh for a service.
    #[serde(rename = "mesh.peer_added")]
    MeshPeerAdded(MeshPeerChange),
    /// A node's peer was removed (its service stopped, or it was revoked): its traffic
    /// no longer passes.
    #[serde(rename = "mesh.peer_removed")]
    MeshPeerRemoved(MeshPeerChange),
    /// The daemon started serving.
    #[serde(rename = "daemon.started")]
    DaemonStarted(DaemonStarted),
    /// The startup reconcile pass made the registry agree with reality.
    #[serde(rename = "daemon.reconciled")]
    DaemonReconciled(Reconciled),
    /// A subscriber fell behind and missed events; it can replay from `missed_from_seq`.
    #[serde(rename = "daemon.lagged")]
    DaemonLagged(Lagged),
}

impl EventKind {
    /// Topic of the event (`service`, `daemon`...), the part of its name before the dot.
    pub fn topic(&self) -> &'static str {
        match self {
            EventKind::ServiceRegistered(_)
            | EventKind::ServiceState(_)
            | EventKind::ServiceHealth(_)
            | EventKind::ServiceRestarting(_)
            | EventKind::ServiceProgress(_)
            | EventKind::ServiceFallback(_)
            | EventKind::ServiceExited(_)
            | EventKind::ServiceRemoved(_) => "service",
            EventKind::DeployStep(_)
            | EventKind::DeployProgress(_)
            | EventKind::DeployRollback(_) => "deploy",
            EventKind::MeshUp(_)
            | EventKind::MeshDown(_)
            | EventKind::MeshPeerAdded(_)
            | EventKind::MeshPeerRemoved(_) => "mesh",
            EventKind::DaemonStarted(_)
            | EventKind::DaemonReconciled(_)
            | EventKind::DaemonLagged(_) => "daemon",
        }
    }

    /// (stack, service) the event is about, if it is about one service.
    pub fn service(&self) -> Option<(&str, &str)> {
        match self {
            EventKind::ServiceRegistered(r) | EventKind::ServiceRemoved(r) => {
                Some((&r.stack, &r.name))
            }
            EventKind::ServiceState(c) => Some((&c.stack, &c.name)),
            EventKind::ServiceHealth(c) => Some((&c.stack, &c.name)),
            EventKind::ServiceFallback(c) => Some((&c.stack, &c.name)),
            EventKind::ServiceRestarting(c) => Some((&c.stack, &c.name)),
            EventKind::ServiceProgress(c) => Some((&c.stack, &c.name)),
            EventKind::ServiceExited(c) => Some((&c.stack, &c.name)),
            EventKind::DeployStep(c) => Some((&c.stack, &c.name)),
            EventKind::DeployRollback(c) => Some((&c.stack, &c.name)),
            EventKind::DeployProgress(c) => Some((&c.stack, &c.name)),
            EventKind::MeshPeerAdded(c) | EventKind::MeshPeerRemoved(c) => {
                Some((&c.stack, &c.name))
            }
            _ => None,
        }
    }

    /// Stack the event is about, if any.
    pub fn stack(&self) -> Option<&str> {
        self.service().map(|(stack, _)| stack)
    }
}

/// Names a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceRef {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
}

/// `service.state` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateChange {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Previous state.
    pub from: ServiceState,
    /// New state.
    pub to: ServiceState,
    /// Why, when the change was not asked for (crash, failed dependency...).
    pub reason: Option<String>,
}

/// `service.health` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HealthChange {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// New health.
    pub status: Health,
    /// The check that ran (`tcp 127.0.0.1:8080`, `http ...`).
    pub check: String,
    /// What the check saw (truncated).
    pub output: String,
}

/// `service.restarting` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Restarting {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Restart attempt since the service was last healthy, from 1.
    pub attempt: u32,
    /// Wait before the restart.
    pub backoff_ms: u64,
}

/// `service.fallback` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Fallback {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Backend of the target given up (`discovered`, `remote_lan`...).
    pub from: String,
    /// Backend of the target tried next.
    pub to: String,
    /// Position of the target tried next in the placement list, from 1.
    pub position: usize,
    /// Why the one before was given up.
    pub reason: String,
}

/// `mesh.up` and `mesh.down` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MeshUp {
    /// The mesh subnet.
    pub subnet: String,
    /// The hub's interface.
    pub interface: String,
    /// The hub's UDP port.
    pub port: u16,
}

/// `mesh.peer_added` and `mesh.peer_removed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MeshPeerChange {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// The node (its name in `hosts:`).
    pub node: String,
    /// The node's mesh address.
    pub mesh_ip: String,
    /// The node's public key.
    pub public_key: String,
    /// Why it was removed (`peer_removed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `service.progress` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Progress {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// What happens, e.g. "pulling postgres:14" or "a1b2c3: Download complete".
    pub message: String,
}

/// `deploy.step` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployStep {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// The host deployed to.
    pub host: String,
    /// The step: `check`, `upload`, `extract`, `requires`, `switch`, `start`, `health`.
    pub step: String,
    /// `started`, `done`, `skipped` or `failed`.
    pub status: String,
    /// What was done or went wrong (bytes sent, the release, the error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `deploy.progress` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployProgress {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// The host.
    pub host: String,
    /// Bytes sent so far.
    pub bytes: u64,
    /// Bytes to send.
    pub total: u64,
}

/// `deploy.rollback` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeployRollback {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// The host.
    pub host: String,
    /// The release that failed.
    pub from: String,
    /// The release that runs again.
    pub to: String,
    /// Why the new release was given up.
    pub reason: String,
}

/// `service.exited` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Exited {
    /// Stack of the service.
    pub stack: String,
    /// Service name.
    pub name: String,
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal that ended it, when killed.
    pub signal: Option<i32>,
}

/// `daemon.started` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DaemonStarted {
    /// Daemon instance id (stable for a state directory).
    pub instance: String,
    /// Process id of harnessd.
    pub pid: u32,
    /// Services re-adopted from a previous run.
    pub adopted: Vec<ServiceRef>,
}

/// `daemon.reconciled` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Reconciled {
    /// Each difference between the registry and reality that was fixed, in words.
    pub fixes: Vec<String>,
}

/// `daemon.lagged` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Lagged {
    /// First `seq` the subscriber did not get; pass it as `since` to replay.
    pub missed_from_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_wire_shape() {
        let e = Event {
            seq: 3,
            time: "2026-11-23T10:00:00.000Z".into(),
            kind: EventKind::ServiceExited(Exited {
                stack: "s".into(),
                name: "a".into(),
                code: Some(1),
                signal: None,
            }),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "service.exited");
        assert_eq!(v["data"]["code"], 1);
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
        assert_eq!(e.kind.topic(), "service");
    }
}
