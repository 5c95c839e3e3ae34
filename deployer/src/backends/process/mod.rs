//! The process backend: local services, each under its own supervisor shim.
//!
//! [`spawn`] has the daemon's [`ShimServer`] fork a shim ([`run_shim`] is its main),
//! which starts the service and stays its parent. The daemon keeps a
//! [`ProcessRecord`] of the pair and, after a restart of its own, finds them again
//! with [`adopt`].

mod procfs;
mod server;
mod shim;

pub use procfs::tcp_listeners;
pub use server::{serve as serve_shims, server_instance, ShimServer, SHIM_SERVER_COMMAND};

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::{future, AsyncBufReadExt};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use serde::{Deserialize, Serialize};

use crate::DeployError;

pub use shim::run_shim;

/// The environment variable that marks every shim and service with its owner:
/// `<daemon id>/<stack>/<service>`.
pub const INSTANCE_VAR: &str = "HARNESS_INSTANCE";

/// Default [`ProcessSpec::log_max_bytes`]: 10 MiB.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 10 << 20;

/// Default [`ProcessSpec::log_keep`]: 3 rotated files.
pub const DEFAULT_LOG_KEEP: usize = 3;

const SHIM_FILE: &str = "shim.json";
const EXIT_FILE: &str = "exit.json";

/// What to run. Sent to the shim on its channel (never written to a file: the
/// environment may hold secrets).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ProcessSpec {
    /// `<daemon id>/<stack>/<service>`, set as `HARNESS_INSTANCE` for the service
    /// (the shim, a fork of the shim server, carries the server's).
    pub instance: String,
    /// The program; looked up in the `PATH` of `env` when it has no '/', taken
    /// relative to `working_dir` when it is a relative path.
    pub binary: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The service's whole environment (plus `HARNESS_INSTANCE`); nothing is
    /// inherited from the daemon.
    pub env: BTreeMap<String, String>,
    /// The service's working directory.
    pub working_dir: PathBuf,
    /// The service's own directory for shim.json and exit.json; made by the shim.
    pub run_dir: PathBuf,
    /// The log file, e.g. `<state>/logs/<stack>/<service>.log`; its directory is
    /// created by the shim.
    pub log_path: PathBuf,
    /// Rotate the log when a line would make it bigger than this (default 10 MiB).
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    /// Rotated files kept, `.1` (newest) to `.N` (default 3; 0 keeps none).
    #[serde(default = "default_log_keep")]
    pub log_keep: usize,
    /// Files the shim writes (in place, 0600) before it starts the service, such as
    /// the daemon's env file of the service; their directories are made if missing.
    #[serde(default)]
    pub private_files: Vec<PrivateFile>,
}

/// A file only its owner may read, with what it holds.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PrivateFile {
    /// Where it goes.
    pub path: PathBuf,
    /// What it holds (values may be secrets).
    pub text: String,
}

fn default_log_max_bytes() -> u64 {
    DEFAULT_LOG_MAX_BYTES
}

fn default_log_keep() -> usize {
    DEFAULT_LOG_KEEP
}

/// What the daemon persists to find a running service again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProcessRecord {
    /// The shim's pid.
    pub shim_pid: u32,
    /// The shim's start time (`/proc/<pid>/stat` field 22), so a reused pid is never
    /// taken for the shim.
    pub shim_start: u64,
    /// The service's pid, also its process group id.
    pub pid: u32,
    /// The service's start time.
    pub start: u64,
    /// The run directory (absolute), where exit.json appears.
    pub run_dir: PathBuf,
}

/// How a service ended. The shim writes it as `<run_dir>/exit.json`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// Why it never ran, e.g. "cannot run /x/y: No such file or directory (os error 2)".
    pub error: Option<String>,
}

/// What [`adopt`] found for a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// The shim still runs: supervise it again with [`wait_exit`].
    Alive,
    /// The service exited while nobody watched; this is how.
    Exited(ExitStatus),
    /// Neither the processes nor their exit status exist any more.
    Gone,
}

/// The shim's one-line report to [`spawn`] on its channel.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Ready {
    Running(ProcessRecord),
    Failed(String),
}

/// exit.json: the status plus the shim it came from, so a stale file from another
/// run is never taken for this run's.
#[derive(Serialize, Deserialize)]
struct ExitFile {
    shim_pid: u32,
    shim_start: u64,
    #[serde(flatten)]
    status: ExitStatus,
}

/// Starts `spec`'s service under a shim forked by `shims` and returns once it runs,
/// or with the reason it could not be started.
///
/// The shim is in a process group of its own, its stdio /dev/null. It reads the spec
/// from a socket of its own (paths made absolute, as the shim runs in /), and reports
/// on it one line once shim.json is written; that line is all this function waits for
/// (no polling).
pub async fn spawn(spec: &ProcessSpec, shims: &ShimServer) -> Result<ProcessRecord, DeployError> {
    // No file is touched here (the shim makes the run directory), so nothing waits
    // for a blocking thread: each hop to one was scheduling delay in a busy `up`.
    let json = prepare(spec.clone())?;
    let (mut ours, shim_pid) = shims.fork_shim(&json).await?;
    // For the kill on a timeout below, taken while the shim is still its pid's owner:
    // a shim that times out kept its channel open, so it was alive all along. One
    // syscall, where reading its start time from /proc cost 6% of the daemon's CPU in
    // an `up`.
    let shim = Pid::from_raw(shim_pid as i32)
        .and_then(|pid| rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok());
    let report = future::or(async { Ok(read_report(&mut ours).await) }, async {
        Timer::after(shims.start_timeout()).await;
        Err(())
    });
    match report.await {
        Ok(Some(Ready::Running(record))) => Ok(record),
        Ok(Some(Ready::Failed(reason))) => Err(DeployError::Spawn { reason }),
        Ok(None) => Err(DeployError::ShimDied { shim_pid }),
        Err(()) => {
            if let Some(shim) = shim {
                end_late_shim(&shim, shim_pid, [spec.instance.as_str(), shims.instance()]).await;
            }
            Err(DeployError::ShimTimeout {
                shim_pid,
                timeout: shims.start_timeout(),
            })
        }
    }
}

/// Ends a shim that did not report in time, with the service it may have started
/// already (a shim stuck writing its run files has one, and nothing else would stop
/// it). Only the shim that was forked for us: its pidfd never stands for a process
/// that took the pid since.
///
/// The shim is stopped first, and its children are killed (with their process groups)
/// only once it is: a stopped shim reaps none of them, so their pids stay theirs. A
/// child must carry one of `instances` (the service's, or the shim's before the
/// service's exec). Where /proc cannot list children (a kernel without
/// CONFIG_PROC_CHILDREN), the service is found by its instance. Then the shim is
/// killed.
async fn end_late_shim(shim: &OwnedFd, shim_pid: u32, instances: [&str; 2]) {
    if rustix::process::pidfd_send_signal(shim, Signal::STOP).is_ok() {
        let mut waited = Duration::ZERO;
        while procfs::stat(shim_pid).is_some_and(|s| !matches!(s.state, 'T' | 't'))
            && waited < STOP_WAIT
        {
            Timer::after(Duration::from_millis(1)).await;
            waited += Duration::from_millis(1);
        }
        let children = procfs::children(shim_pid).unwrap_or_else(|| {
            find_instances(instances[0])
                .into_iter()
                .filter(|(_, instance)| instance == instances[0])
                .map(|(pid, _)| pid)
                .collect()
        });
        for child in children {
            if procfs::instance_of(child).is_some_and(|i| instances.contains(&i.as_str())) {
                kill_stray(child);
            }
        }
    }
    let _ = rustix::process::pidfd_send_signal(shim, Signal::KILL);
}

/// How long [`end_late_shim`] waits for a shim to stop (one in uninterruptible sleep
/// stops when that ends).
const STOP_WAIT: Duration = Duration::from_millis(200);

/// The shim's report line; `None` when it closed its channel without one.
async fn read_report(channel: &mut Async<UnixStream>) -> Option<Ready> {
    let mut reader = futures_lite::io::BufReader::new(channel);
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    serde_json::from_str(&line).ok()
}

/// Makes the spec's paths absolute and serializes it.
fn prepare(mut spec: ProcessSpec) -> Result<Vec<u8>, DeployError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DeployError::WriteFile { path, source }
    };
    let files = spec.private_files.iter_mut().map(|f| &mut f.path);
    for path in [&mut spec.working_dir, &mut spec.run_dir, &mut spec.log_path]
        .into_iter()
        .chain(files)
    {
        *path = std::path::absolute(&*path).map_err(write_err(path))?;
    }
    serde_json::to_vec(&spec).map_err(|e| write_err(&spec.run_dir)(e.into()))
}

/// Writes `text` to `path` in place, its directory made if missing, readable by its
/// owner only (0600, also when the file was there with another mode). In place: the
/// daemon's env files are mounted into containers.
pub fn write_private(path: &Path, text: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_in_place(path, text.as_bytes(), Some(0o600))
}

/// Replaces the content of `path` (made when missing) with `bytes`, in place: the
/// same inode. With `mode`, the file has exactly that mode, also when it was there
/// with another. Not truncated first: on ext4, truncating a file frees its blocks in
/// a journal transaction that costs more than the write, and a file whose length
/// stays the same (a service's env file on its next start) needs none.
pub(crate) fn write_in_place(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(mode.unwrap_or(0o666))
        .open(path)?;
    let was = out.metadata()?;
    if let Some(mode) = mode {
        if was.permissions().mode() & 0o7777 != mode {
            out.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
    }
    out.write_all(bytes)?;
    if was.len() > bytes.len() as u64 {
        out.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

/// Writes `value` as JSON to `path` atomically (temporary file, then rename).
fn write_json(path: &Path, value: &impl Serialize) -> Result<(), DeployError> {
    let err = |source| DeployError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let json = serde_json::to_vec_pretty(value).map_err(|e| err(e.into()))?;
    std::fs::write(&tmp, json).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Reads the exit status the record's shim left, if it is that shim's.
fn read_exit(record: &ProcessRecord) -> Result<ExitStatus, DeployError> {
    let path = record.run_dir.join(EXIT_FILE);
    let unknown = || DeployError::ExitUnknown {
        shim_pid: record.shim_pid,
        path: path.clone(),
    };
    let text = std::fs::read(&path).map_err(|_| unknown())?;
    let file: ExitFile = serde_json::from_slice(&text).map_err(|e| DeployError::ReadFile {
        path: path.clone(),
        source: e.into(),
    })?;
    if (file.shim_pid, file.shim_start) != (record.shim_pid, record.shim_start) {
        return Err(unknown());
    }
    Ok(file.status)
}

/// Removes what harness before the shim server left in a run directory: spec.json,
/// which held the service's environment.
pub fn remove_legacy_files(run_dir: &Path) {
    let _ = std::fs::remove_file(run_dir.join("spec.json"));
}

/// The record the shim of `run_dir` wrote when it started its service (shim.json), for
/// a daemon that died between the spawn and saving the record. Check it with
/// [`adopt`] before trusting it: it may be an earlier run's.
pub fn recover(run_dir: &Path) -> Option<ProcessRecord> {
    let text = std::fs::read(run_dir.join(SHIM_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Checks a record against the running system, e.g. after a daemon restart.
///
/// The shim decides: while the shim with the recorded pid and start time runs, the
/// run is [`Adoption::Alive`] (the shim outlives its service only by the moment it
/// takes to record the exit, which [`wait_exit`] then returns). A pid that now
/// belongs to another process never counts. Otherwise the shim's exit.json says how
/// the service ended, or the run is [`Adoption::Gone`].
pub fn adopt(record: &ProcessRecord) -> Adoption {
    if procfs::is_running(record.shim_pid, record.shim_start) {
        return Adoption::Alive;
    }
    match read_exit(record) {
        Ok(status) => Adoption::Exited(status),
        Err(_) => Adoption::Gone,
    }
}

/// Waits until the service has exited and returns how. Works for shims started by
/// this process and for adopted ones.
///
/// Waits on a pidfd of the shim (no polling; its parent, the shim server or init,
/// reaps it), then reads the exit.json the shim wrote before exiting.
pub async fn wait_exit(record: &ProcessRecord) -> Result<ExitStatus, DeployError> {
    let shim_pid = record.shim_pid;
    let watch_err = |source: io::Error| DeployError::Watch { shim_pid, source };
    let pid = Pid::from_raw(shim_pid as i32)
        .ok_or_else(|| watch_err(io::ErrorKind::InvalidInput.into()))?;
    match rustix::process::pidfd_open(pid, PidfdFlags::NONBLOCK) {
        // Checked after opening: if the start time still matches, the pidfd refers
        // to our shim and not to a process that reused its pid.
        Ok(fd) if procfs::start_time(shim_pid) == Some(record.shim_start) => {
            let fd = Async::new_nonblocking(fd).map_err(watch_err)?;
            fd.readable().await.map_err(watch_err)?;
            // Its parent reaps it, unless that is us: a harnessd that is PID 1 (in a
            // container) inherits the shims of a shim server that died. Elsewhere
            // this fails with ECHILD.
            let _ = rustix::process::waitid(
                WaitId::PidFd(fd.get_ref().as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            );
        }
        Ok(_) => {}
        Err(e) if e == rustix::io::Errno::SRCH => {}
        Err(e) => return Err(watch_err(e.into())),
    }
    let record = record.clone();
    smol::unblock(move || read_exit(&record)).await
}

/// Stops the service: sends `signal` (a name like "TERM", "SIGINT", "KILL", or a
/// number; default in the daemon is TERM) to its process group, waits up to
/// `timeout`, then sends SIGKILL to the group, and returns the exit status.
///
/// Signals go only to a process group whose leader still has the recorded start
/// time. (The shim kills what is left of the group when the leader exits.)
pub async fn stop(
    record: &ProcessRecord,
    signal: &str,
    timeout: Duration,
) -> Result<ExitStatus, DeployError> {
    let signal = parse_signal(signal)?;
    signal_group(record, signal)?;
    let graceful = future::or(async { Some(wait_exit(record).await) }, async {
        Timer::after(timeout).await;
        None
    });
    if let Some(status) = graceful.await {
        return status;
    }
    signal_group(record, Signal::KILL)?;
    wait_exit(record).await
}

fn signal_group(record: &ProcessRecord, signal: Signal) -> Result<(), DeployError> {
    let err = |source: io::Error| DeployError::Signal {
        pgid: record.pid,
        source,
    };
    // Zombie leaders count: until the shim reaps the leader, its pid (and so the
    // group id) cannot be reused.
    if procfs::start_time(record.pid) != Some(record.start) {
        return Ok(());
    }
    let pgid =
        Pid::from_raw(record.pid as i32).ok_or_else(|| err(io::ErrorKind::InvalidInput.into()))?;
    match rustix::process::kill_process_group(pgid, signal) {
        Err(e) if e != rustix::io::Errno::SRCH => Err(err(e.into())),
        _ => Ok(()),
    }
}

/// Parses "TERM", "SIGTERM", "sigterm" or "15" (the names config validation accepts).
fn parse_signal(name: &str) -> Result<Signal, DeployError> {
    protocol::config::signal_number(name)
        .and_then(Signal::from_named_raw)
        .ok_or_else(|| DeployError::UnknownSignal {
            name: name.to_owned(),
        })
}

/// Every process whose environment carries a `HARNESS_INSTANCE` starting with
/// `prefix` (e.g. `"<daemon id>/"`), as (pid, instance), by pid. Shims, services and
/// the services' own children all carry it. Processes of other users are skipped
/// (their environment is not readable).
pub fn find_instances(prefix: &str) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, String)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(|pid| Some(pid).zip(procfs::instance_of(pid)))
        .filter(|(_, instance)| instance.starts_with(prefix))
        .collect();
    found.sort();
    found
}

/// Kills a stray found by [`find_instances`]: SIGKILL to its process group when it
/// leads one (a service or a shim), else to the process. Checks again that the pid
/// still carries a `HARNESS_INSTANCE`, so a pid reused since the scan is left alone.
/// Returns whether a signal was sent.
pub fn kill_stray(pid: u32) -> bool {
    let Some(target) = Pid::from_raw(pid as i32) else {
        return false;
    };
    if procfs::instance_of(pid).is_none() {
        return false;
    }
    if rustix::process::getpgid(Some(target)) == Ok(target) {
        rustix::process::kill_process_group(target, Signal::KILL).is_ok()
    } else {
        rustix::process::kill_process(target, Signal::KILL).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        for (name, signal) in [
            ("TERM", Signal::TERM),
            ("SIGINT", Signal::INT),
            ("kill", Signal::KILL),
            ("9", Signal::KILL),
        ] {
            assert_eq!(parse_signal(name).unwrap(), signal, "{name}");
        }
        for bad in ["", "SIG", "TERMINATE", "0", "-1", "999"] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spec_defaults() {
        let spec: ProcessSpec = serde_json::from_str(
            r#"{"instance":"d/s/x","binary":"x","args":[],"env":{},"working_dir":"/",
                "run_dir":"/r","log_path":"/l"}"#,
        )
        .unwrap();
        assert_eq!((spec.log_max_bytes, spec.log_keep), (10 << 20, 3));
    }

    #[test]
    fn files_rewritten_in_place_keep_their_inode_and_lose_their_old_tail() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/service.env");
        write_private(&path, "A=a much longer first value\nB=2\n").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        for text in [
            "A=short\n",
            "A=short\n",
            "A=a value that is longer again\n",
            "",
        ] {
            write_private(&path, text).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
            assert_eq!(
                (meta.ino(), meta.mode() & 0o7777),
                (inode, 0o600),
                "{text:?}"
            );
        }
        // Without a mode, the file keeps the one it has.
        let plain = dir.path().join("shim.json");
        write_in_place(&plain, b"{\"pid\":12345}", None).unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_in_place(&plain, b"{\"pid\":1}", None).unwrap();
        let meta = std::fs::metadata(&plain).unwrap();
        assert_eq!(std::fs::read(&plain).unwrap(), b"{\"pid\":1}");
        assert_eq!(meta.mode() & 0o7777, 0o640);
    }
}
