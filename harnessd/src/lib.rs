//! harnessd: the harness daemon.
//!
//! It keeps the registry of stacks and services (the `registry` crate), runs services
//! through the `deployer` backends, health-checks and restarts them, and serves clients
//! over JSON on TLS WebSockets.
//!
//! # Implementation
//! [`run`] is the whole daemon as a library function: it takes the state-directory lock,
//! opens the registry, makes or loads the PKI, re-adopts running services (the reconcile
//! pass), binds the listener, writes `daemon.json` and serves until `daemon.shutdown`.
//! Everything runs on one smol [`smol::Executor`] driven by a couple of threads; blocking
//! file I/O (registry saves, journal appends) runs on `smol::unblock` threads. Shared
//! state lives in [`core::Core`] behind one mutex that is never held across an `.await`.
#![warn(missing_docs)]

mod containers;
pub mod core;
mod discovery;
mod dispatch;
mod env;
mod events;
mod exec;
mod health;
mod http1;
mod logins;
mod mesh;
mod network;
mod notify;
mod orchestrator;
mod persist;
pub mod pki;
mod remote;
pub mod run;
mod server;
mod ui;

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options of one daemon run.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    /// State directory (registry, logs, PKI, daemon.json).
    pub state_dir: PathBuf,
    /// Address to listen on; `None` picks 127.0.0.1 with the default port for the
    /// default state directory and port 0 otherwise.
    pub listen: Option<std::net::SocketAddr>,
    /// Whether `state_dir` is the default one (decides the default port).
    pub default_state_dir: bool,
    /// Program that runs the shim server (`<exe> shim-server-2`), which forks each
    /// local service's supervisor: `harness-shim`, or harnessd itself.
    pub shim_exe: PathBuf,
    /// CA (PEM) whose certificates clients on other machines must present (mutual
    /// TLS); without it only loopback is served.
    pub client_ca: Option<PathBuf>,
    /// Names (DNS or IP) remote clients reach the daemon by, added to its server
    /// certificate beside localhost and the listen address.
    pub server_names: Vec<String>,
}

/// Errors of the daemon library.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The registry could not be opened or saved.
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The PKI could not be made or loaded.
    #[error("{path}: {message}")]
    Pki {
        /// File involved.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The listen address is taken or not allowed.
    #[error("cannot listen on {addr}: {message}")]
    Listen {
        /// Address asked for.
        addr: std::net::SocketAddr,
        /// Cause and what to do.
        message: String,
    },
}

/// Runs the daemon until it is told to shut down.
pub fn run(opts: DaemonOpts) -> Result<(), DaemonError> {
    let ex = Arc::new(smol::Executor::new());
    // One extra executor thread: health checks and connections progress while the main
    // thread is busy serialising a large response.
    let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
    let worker = {
        let ex = ex.clone();
        std::thread::Builder::new()
            .name("harnessd-worker".into())
            .spawn(move || smol::block_on(ex.run(stop_rx.recv())))
            .map_err(|e| DaemonError::Io {
                path: PathBuf::from("thread"),
                source: e,
            })?
    };
    let result = smol::block_on(ex.run(server::serve(ex.clone(), opts)));
    drop(stop_tx);
    let _ = worker.join();
    result
}

/// Path of `daemon.json` in a state directory.
pub fn daemon_file_path(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon.json")
}
