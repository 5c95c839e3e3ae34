//! Backends that run services for harnessd: local processes under a supervisor shim,
//! and their log files.
//!
//! A local service runs under a shim, a small supervisor that is the service's
//! parent, writes its output to timestamped, rotated log files ([`logs`]), records
//! its exit status, and keeps running when harnessd dies, so a restarted harnessd
//! adopts it again ([`process::adopt`]). The shim is not a binary of its own:
//! harnessd runs itself as `harnessd shim <spec.json>` and calls
//! [`process::run_shim`].
//!
//! # Implementation
//!
//! - Files in the service's run directory: `spec.json` (written by
//!   [`process::spawn`], read by the shim), `shim.json` (the pids and start times,
//!   written by the shim once the service runs) and `exit.json` (written by the shim
//!   just before it exits). All are written to a temporary file and renamed.
//! - Readiness: the shim's stdout is a pipe to the spawner; the shim writes one JSON
//!   line on it (the [`process::ProcessRecord`], or why the service could not start)
//!   after shim.json exists, then points its stdout at /dev/null. The spawner awaits
//!   that line on the smol reactor, so starting many services costs no polling.
//! - Threads in the shim: the main thread waits for the service; one thread per pipe
//!   (stdout, stderr) splits the output into lines and appends them to the log
//!   through one mutex-guarded writer, which numbers and rotates.
//! - Exit: [`process::wait_exit`] awaits a pidfd of the shim (readable when it
//!   exits, also for shims adopted from a previous daemon), reaps the shim with
//!   `waitid(P_PIDFD)` when it is our child, and reads exit.json.
//! - Identity: a pid is trusted only together with its start time from
//!   `/proc/<pid>/stat`, so a reused pid is never signalled or adopted.
//! - Strays: every shim and service carries `HARNESS_INSTANCE` in its environment;
//!   [`process::find_instances`] scans /proc for it.

#![warn(missing_docs)]

mod backends;
pub mod build;
mod error;
pub mod logs;
pub mod package;

pub use backends::{docker, process, release, remote, ssh};
pub use error::DeployError;
