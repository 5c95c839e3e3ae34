//! The crate's one error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a deployer operation failed. Each variant names the step that failed and
/// carries the path or pid it was working on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// Writing a file of a start (shim.json, exit.json, a private file such as the
    /// env file) failed.
    #[error("cannot write {path}: {source}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Reading or parsing a file of the run directory failed.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The cause (parse errors are wrapped as `InvalidData`).
        source: io::Error,
    },
    /// The shim server could not be started.
    #[error("cannot start the shim server {exe}: {source}")]
    StartShim {
        /// Its executable.
        exe: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The shim server forked no shim, also after it was started again.
    #[error("the shim server {exe} failed: {source}")]
    ShimServer {
        /// Its executable.
        exe: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The shim server could not fork a shim.
    #[error("cannot fork a shim: {0}")]
    Fork(io::Error),
    /// The socket between the daemon and a new shim could not be made.
    #[error("cannot make the socket to a new shim: {0}")]
    Channel(io::Error),
    /// The shim could not start the service; the reason is the shim's own words,
    /// e.g. "cannot run /x/y: No such file or directory (os error 2)".
    #[error("{reason}")]
    Spawn {
        /// What went wrong.
        reason: String,
    },
    /// The shim exited (or closed its report pipe) without saying whether the
    /// service started.
    #[error("the shim (pid {shim_pid}) exited before reporting whether the service started")]
    ShimDied {
        /// The shim's pid.
        shim_pid: u32,
    },
    /// The shim did not report within the start timeout; it was killed, and so was the
    /// service if it had started one.
    #[error("the shim (pid {shim_pid}) did not start the service within {timeout:?}")]
    ShimTimeout {
        /// The shim's pid.
        shim_pid: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// Watching the shim for its exit (pidfd) failed.
    #[error("cannot watch the shim (pid {shim_pid}): {source}")]
    Watch {
        /// The shim's pid.
        shim_pid: u32,
        /// The cause.
        source: io::Error,
    },
    /// The shim is gone but left no exit status for this run (it was killed, or the
    /// record does not belong to it).
    #[error("the shim (pid {shim_pid}) is gone and left no exit status in {path}")]
    ExitUnknown {
        /// The shim's pid.
        shim_pid: u32,
        /// Where the exit status was looked for.
        path: PathBuf,
    },
    /// A stop signal name that is not a signal.
    #[error("unknown signal {name:?} (use a name like TERM, SIGINT, KILL or a number)")]
    UnknownSignal {
        /// The name as given.
        name: String,
    },
    /// Sending a signal to the service's process group failed.
    #[error("cannot signal process group {pgid}: {source}")]
    Signal {
        /// The process group (the service's pid).
        pgid: u32,
        /// The cause.
        source: io::Error,
    },
    /// Opening or writing a log file failed.
    #[error("cannot write log {path}: {source}")]
    WriteLog {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// No Docker engine answers.
    #[error("no Docker engine answers at {host} ({detail}); start one (`sudo systemctl start docker`, or `sudo dockerd &`) or point DOCKER_HOST at one")]
    NoEngine {
        /// Where it was looked for.
        host: String,
        /// What the connection attempt said.
        detail: String,
    },
    /// The Docker engine refused or failed a request.
    #[error("cannot {action}: {detail}")]
    Docker {
        /// What was attempted, e.g. "start container harness-shop-db".
        action: String,
        /// The engine's message.
        detail: String,
    },
    /// Reading a log file failed.
    #[error("cannot read log {path}: {source}")]
    ReadLog {
        /// The log file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An SSH connection or transfer failed.
    #[error("ssh {host}: cannot {action}: {detail}")]
    Ssh {
        /// `user@address:port`.
        host: String,
        /// What was attempted.
        action: String,
        /// libssh2's message.
        detail: String,
    },
    /// A remote command did not end in time.
    #[error("ssh {host}: `{what}` did not finish within {timeout:?}")]
    SshTimeout {
        /// `user@address:port`.
        host: String,
        /// The command.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// No known_hosts file knows the host's key.
    #[error("ssh {host}: unknown host key {fingerprint} (not in {files}); check it and add it (`ssh-keyscan` the host into one of those files), or set `host_key_checking: accept-new` on the host")]
    HostKeyUnknown {
        /// `user@address:port`.
        host: String,
        /// The key's SHA256 fingerprint.
        fingerprint: String,
        /// The files looked in.
        files: String,
    },
    /// The host's key differs from the recorded one.
    #[error("ssh {host}: HOST KEY MISMATCH: the host offered {fingerprint}, which differs from the key recorded in {files}; someone may be intercepting the connection, or the host was reinstalled (then remove its old line)")]
    HostKeyMismatch {
        /// `user@address:port`.
        host: String,
        /// The offered key's SHA256 fingerprint.
        fingerprint: String,
        /// The files looked in.
        files: String,
    },
    /// The host refused every key.
    #[error("ssh {host}: authentication failed: {detail}")]
    SshAuth {
        /// `user@address:port`.
        host: String,
        /// What was tried and what each said.
        detail: String,
    },
    /// A remote command exited non-zero.
    #[error("{host}: {what} failed (exit {status}): {message}")]
    RemoteCommand {
        /// The host's address.
        host: String,
        /// What the command was for.
        what: String,
        /// Its exit status.
        status: i32,
        /// Its error output.
        message: String,
    },
    /// A package is malformed or unsafe; nothing of it was installed.
    #[error("package {path}: {reason}")]
    BadPackage {
        /// The package (file or directory).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Building the program of a package failed.
    #[error("build failed: {what}: {detail}")]
    Build {
        /// The command.
        what: String,
        /// Its exit status and the end of its error output.
        detail: String,
    },
}

impl DeployError {
    /// Whether this failed on the SSH connection (broken, or a command's time ran out)
    /// rather than on what was asked: the session is not used again, and the step may
    /// be tried again on a new one.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            DeployError::Ssh { .. } | DeployError::SshTimeout { .. }
        )
    }
}
