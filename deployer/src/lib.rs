//! Backends that run services for harnessd: local processes under a supervisor shim,
//! and their log files.
//!
//! A local service runs under a shim, a small supervisor that is the service's
//! parent, writes its output to timestamped, rotated log files ([`logs`]), records
//! its exit status, and keeps running when harnessd dies, so a restarted harnessd
//! adopts it again ([`process::adopt`]). Shims are forked by the daemon's shim server
//! ([`process::ShimServer`], `harness-shim shim-server-2`), not exec'd one by one.
//!
//! # Implementation
//!
//! - The spec travels to the shim over a socket of its own, never through a file.
//!   Files in the service's run directory: `shim.json` (the pids and start times,
//!   written by the shim once the service runs, in place) and `exit.json` (written by
//!   the shim just before it exits, to a temporary file and renamed).
//! - Readiness: the shim writes one JSON line on its socket (the
//!   [`process::ProcessRecord`], or why the service could not start) after shim.json
//!   exists, then closes it. The spawner awaits that line on the smol reactor, so
//!   starting many services costs no polling.
//! - One thread in the shim: it polls the service's stdout and stderr pipes and a
//!   pidfd of the service, splits the output into lines and appends them to the log
//!   through one writer, which numbers and rotates.
//! - Exit: [`process::wait_exit`] awaits a pidfd of the shim (readable when it exits,
//!   also for shims adopted from a previous daemon; the shim server reaps it) and reads
//!   exit.json.
//! - Identity: a pid is trusted only together with its start time from
//!   `/proc/<pid>/stat`, so a reused pid is never signalled or adopted.
//! - Strays: every service carries `HARNESS_INSTANCE` in its environment (shims carry
//!   the server's); [`process::find_instances`] scans /proc for it.

#![warn(missing_docs)]

mod backends;
pub mod build;
mod error;
pub mod logs;
pub mod package;

pub use backends::{docker, process, release, remote, ssh};
pub use error::DeployError;
