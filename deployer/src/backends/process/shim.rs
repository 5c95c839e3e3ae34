//! The shim: the service's parent, log writer and exit recorder.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

use super::{procfs, write_json, ExitFile, ExitStatus, ProcessRecord, ProcessSpec, Ready};
use super::{EXIT_FILE, INSTANCE_VAR, SHIM_FILE};
use crate::logs::{split_lines, LogWriter};
use crate::DeployError;

/// How long the shim keeps copying output after the service exited: processes that
/// left the service's process group may hold its pipes open forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The shim's main, in a process forked by the shim server for [`super::spawn`],
/// which holds the other end of `channel`.
///
/// 1. Reads the spec from `channel` (until the spawner shuts down its writing half)
///    and opens the log.
/// 2. Starts the service (environment cleared, then the spec's `env` and
///    `HARNESS_INSTANCE`; own process group; stdin /dev/null; stdout and stderr piped).
/// 3. Writes shim.json, reports one line on `channel` to the spawner and closes it.
/// 4. Copies both pipes into the log, one thread per pipe.
/// 5. When the service exits, kills what is left of its process group, drains the
///    pipes (at most 2 s) and writes exit.json.
///
/// Returns the shim's exit code: 0 when the service ran (whatever its own status),
/// 1 when it could not be started.
pub fn run_shim(mut channel: UnixStream) -> i32 {
    let started = start(&mut channel);
    let ready = match &started {
        Ok((_, record)) => Ready::Running(record.clone()),
        Err((reason, _)) => Ready::Failed(reason.clone()),
    };
    // Best effort: a spawner that is gone learns nothing either way.
    let mut line = serde_json::to_vec(&ready).unwrap_or_default();
    line.push(b'\n');
    let _ = channel.write_all(&line);
    drop(channel);
    let started = match started {
        Ok((started, _)) => started,
        Err((reason, run_dir)) => {
            if let Some(run_dir) = run_dir {
                // Best effort: the spawner learns the reason from the report anyway.
                let _ = write_exit(
                    &run_dir,
                    ExitStatus {
                        error: Some(reason),
                        ..ExitStatus::default()
                    },
                );
            }
            return 1;
        }
    };
    let Started { spec, child, log } = started;
    let status = supervise(child, log);
    match write_exit(&spec.run_dir, status) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

struct Started {
    spec: ProcessSpec,
    child: Child,
    log: LogWriter,
}

/// Steps 1–3 but the report. On failure: the reason, and the run directory once it
/// is known.
fn start(channel: &mut UnixStream) -> Result<(Started, ProcessRecord), (String, Option<PathBuf>)> {
    let mut text = Vec::new();
    let spec: ProcessSpec = channel
        .read_to_end(&mut text)
        .and_then(|_| Ok(serde_json::from_slice(&text)?))
        .map_err(|e| (format!("cannot read the service's spec: {e}"), None))?;
    let fail = |reason: String| (reason, Some(spec.run_dir.clone()));
    let log = LogWriter::open(&spec.log_path, spec.log_max_bytes, spec.log_keep)
        .map_err(|e| fail(e.to_string()))?;
    if !spec.working_dir.is_dir() {
        return Err(fail(format!(
            "working directory {} is not a directory",
            spec.working_dir.display()
        )));
    }
    let program = if spec.binary.contains('/') {
        spec.working_dir.join(&spec.binary)
    } else {
        spec.binary.clone().into()
    };
    let child = Command::new(&program)
        .args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .env(INSTANCE_VAR, &spec.instance)
        .current_dir(&spec.working_dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", program.display())))?;
    // The child is ours and unreaped, so its /proc entry exists even if it already
    // exited.
    let record = ProcessRecord {
        shim_pid: std::process::id(),
        shim_start: procfs::start_time(std::process::id()).unwrap_or_default(),
        pid: child.id(),
        start: procfs::start_time(child.id()).unwrap_or_default(),
        run_dir: spec.run_dir.clone(),
    };
    // In place (see `start_shim`): informational, never read back by harness.
    let shim_file = spec.run_dir.join(SHIM_FILE);
    let json = serde_json::to_vec(&record).unwrap_or_default();
    if let Err(e) = std::fs::write(&shim_file, json) {
        let e = DeployError::WriteFile {
            path: shim_file,
            source: e,
        };
        return Err(fail(e.to_string()));
    }
    Ok((Started { spec, child, log }, record))
}

/// Steps 4–5: copies the output until the service exits, returns how it exited.
fn supervise(mut child: Child, log: LogWriter) -> ExitStatus {
    let log = Arc::new(Mutex::new(log));
    let (done_tx, done_rx) = mpsc::channel();
    let mut readers = 0;
    if let Some(pipe) = child.stdout.take() {
        copy_to_log("stdout", pipe, log.clone(), done_tx.clone());
        readers += 1;
    }
    if let Some(pipe) = child.stderr.take() {
        copy_to_log("stderr", pipe, log, done_tx);
        readers += 1;
    }
    let pid = child.id();
    if let Some(leader) = Pid::from_raw(pid as i32) {
        // Wait without reaping: while the leader is a zombie its pid, and so the
        // group id, cannot be reused, so killing the rest of the group (processes
        // the service left behind) cannot hit a stranger.
        let exited = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
        while let Err(rustix::io::Errno::INTR) =
            rustix::process::waitid(WaitId::Pid(leader), exited)
        {}
        let _ = rustix::process::kill_process_group(leader, Signal::KILL);
    }
    let status = match child.wait() {
        Ok(s) => ExitStatus {
            code: s.code(),
            signal: s.signal(),
            error: None,
        },
        Err(e) => ExitStatus {
            error: Some(format!("cannot wait for pid {pid}: {e}")),
            ..ExitStatus::default()
        },
    };
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    for _ in 0..readers {
        if done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
    status
}

/// Starts the thread that copies one pipe into the log and reports on `done` at
/// end of file.
fn copy_to_log(
    stream: &'static str,
    pipe: impl Read + Send + 'static,
    log: Arc<Mutex<LogWriter>>,
    done: mpsc::Sender<()>,
) {
    thread::spawn(move || {
        // A failing log write (disk full) drops the line but keeps draining, so the
        // service never blocks on a full pipe.
        let _ = split_lines(pipe, |line| {
            let _ = log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(stream, line);
        });
        let _ = done.send(());
    });
}

fn write_exit(run_dir: &Path, status: ExitStatus) -> Result<(), DeployError> {
    let shim_pid = std::process::id();
    let file = ExitFile {
        shim_pid,
        shim_start: procfs::start_time(shim_pid).unwrap_or_default(),
        status,
    };
    write_json(&run_dir.join(EXIT_FILE), &file)
}
