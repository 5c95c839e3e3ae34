//! The shim: the service's parent, log writer and exit recorder.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

use super::{
    procfs, write_in_place, write_json, write_private, ExitFile, ExitStatus, ProcessRecord,
    ProcessSpec, Ready,
};
use super::{EXIT_FILE, INSTANCE_VAR, SHIM_FILE};
use crate::logs::{LineSplitter, LogWriter, MAX_LINE};
use crate::DeployError;

/// How long the shim keeps copying output after the service exited: processes that
/// left the service's process group may hold its pipes open forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The shim's main, in a process forked by the shim server for [`super::spawn`],
/// which holds the other end of `channel`.
///
/// 1. Reads the spec from `channel` (until the spawner shuts down its writing half),
///    makes the run directory, writes the spec's private files and opens the log.
/// 2. Starts the service (environment cleared, then the spec's `env` and
///    `HARNESS_INSTANCE`; own process group; stdin /dev/null; stdout and stderr piped).
/// 3. Writes shim.json, reports one line on `channel` to the spawner and closes it.
/// 4. Copies both pipes into the log.
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
    // Room for a usual spec at once (read_to_end would start at 32 bytes).
    let mut text = Vec::with_capacity(64 * 1024);
    let spec: ProcessSpec = channel
        .read_to_end(&mut text)
        .and_then(|_| Ok(serde_json::from_slice(&text)?))
        .map_err(|e| (format!("cannot read the service's spec: {e}"), None))?;
    // Files of the previous run stay (a file made soon after many were deleted is
    // slow on ext4): exit.json names its shim, so it is never read as this run's, and
    // shim.json is overwritten in place.
    std::fs::create_dir_all(&spec.run_dir).map_err(|e| (write_failed(&spec.run_dir, e), None))?;
    let fail = |reason: String| (reason, Some(spec.run_dir.clone()));
    for file in &spec.private_files {
        write_private(&file.path, &file.text).map_err(|e| fail(write_failed(&file.path, e)))?;
    }
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
    // In place (see the run directory above): read back only by `super::recover`,
    // which trusts it only while this shim runs.
    let shim_file = spec.run_dir.join(SHIM_FILE);
    let json = serde_json::to_vec(&record).unwrap_or_default();
    write_in_place(&shim_file, &json, None).map_err(|e| fail(write_failed(&shim_file, e)))?;
    Ok((Started { spec, child, log }, record))
}

/// The reason a start failed on writing `path`, as the spawner reports it.
fn write_failed(path: &Path, source: std::io::Error) -> String {
    DeployError::WriteFile {
        path: path.to_owned(),
        source,
    }
    .to_string()
}

/// Steps 4–5: copies the output until the service exits, returns how it exited.
///
/// One thread does it all (a poll over both pipes and a pidfd of the service), so a
/// start costs no threads to make (with a thread per pipe, an `up` of 100 took 3.0×
/// its baseline instead of 2.7×).
fn supervise(mut child: Child, mut log: LogWriter) -> ExitStatus {
    let mut pipes: Vec<Pipe> = [
        child.stdout.take().map(|p| Pipe::new("stdout", p.into())),
        child.stderr.take().map(|p| Pipe::new("stderr", p.into())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let leader = Pid::from_child(&child);
    // Our unreaped child: the pidfd is the service's even if it exited already.
    let pidfd = rustix::process::pidfd_open(leader, PidfdFlags::empty()).ok();
    let mut buf = vec![0u8; MAX_LINE];
    // Set once the service has exited: how long its pipes are still read.
    let mut drain_until: Option<Instant> = None;
    loop {
        let left = drain_until.map(|d| d.saturating_duration_since(Instant::now()));
        if pipes.is_empty() || left == Some(Duration::ZERO) {
            if drain_until.is_some() {
                break;
            }
            // No pipe is left to watch: only the exit.
            drain_until = Some(service_exited(leader, pidfd.as_ref()));
            continue;
        }
        let watch_exit = drain_until.is_none();
        // Without a pidfd (a kernel before 5.3), the exit is looked for every 100 ms.
        let timeout = match (watch_exit, &pidfd) {
            (true, None) => Some(NO_PIDFD_CHECK),
            _ => left,
        };
        let timeout = timeout.and_then(|d| Timespec::try_from(d).ok());
        let mut fds: Vec<PollFd<'_>> = pipes
            .iter()
            .map(|p| PollFd::new(&p.fd, PollFlags::IN))
            .collect();
        if let (true, Some(fd)) = (watch_exit, &pidfd) {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => {
                // The pipes cannot be watched (ENOMEM): let them go, so that the
                // service never blocks on a full one, and wait for its exit.
                drop(fds);
                pipes.clear();
                if drain_until.is_none() {
                    service_exited(leader, pidfd.as_ref());
                }
                break;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        let exited = match &pidfd {
            Some(_) => watch_exit && ready[pipes.len()],
            None => watch_exit && has_exited(leader),
        };
        if exited {
            drain_until = Some(service_exited(leader, pidfd.as_ref()));
        }
        let mut ready = ready.into_iter();
        pipes.retain_mut(|pipe| !ready.next().unwrap_or(false) || pipe.copy(&mut buf, &mut log));
    }
    // Pipes still open when the drain ended (a child of the service that left its
    // group holds them): their unfinished last lines.
    for pipe in &mut pipes {
        pipe.finish(&mut log);
    }
    match child.wait() {
        Ok(s) => ExitStatus {
            code: s.code(),
            signal: s.signal(),
            error: None,
        },
        Err(e) => ExitStatus {
            error: Some(format!("cannot wait for pid {}: {e}", leader.as_raw_pid())),
            ..ExitStatus::default()
        },
    }
}

/// How often the exit is looked for when no pidfd could be opened.
const NO_PIDFD_CHECK: Duration = Duration::from_millis(100);

/// Whether the service (`leader`) has exited, without waiting or reaping it.
fn has_exited(leader: Pid) -> bool {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    !matches!(
        rustix::process::waitid(WaitId::Pid(leader), options),
        Ok(None)
    )
}

/// Once the service (`leader`) has exited, without reaping it: while the leader is a
/// zombie its pid, and so the group id, cannot be reused, so killing the rest of the
/// group (processes the service left behind) cannot hit a stranger. Returns until when
/// its pipes are still drained.
fn service_exited(leader: Pid, pidfd: Option<&OwnedFd>) -> Instant {
    let id = || match pidfd {
        Some(fd) => WaitId::PidFd(fd.as_fd()),
        None => WaitId::Pid(leader),
    };
    let exited = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
    while let Err(rustix::io::Errno::INTR) = rustix::process::waitid(id(), exited) {}
    let _ = rustix::process::kill_process_group(leader, Signal::KILL);
    Instant::now() + DRAIN_TIMEOUT
}

/// One of the service's output pipes, split into lines for the log.
struct Pipe {
    stream: &'static str,
    fd: OwnedFd,
    lines: LineSplitter,
}

impl Pipe {
    fn new(stream: &'static str, fd: OwnedFd) -> Pipe {
        Pipe {
            stream,
            fd,
            lines: LineSplitter::default(),
        }
    }

    /// Copies what one read brings into the log; false at end of file. A failing log
    /// write (disk full) drops the line but keeps draining, so the service never
    /// blocks on a full pipe.
    fn copy(&mut self, buf: &mut [u8], log: &mut LogWriter) -> bool {
        loop {
            match rustix::io::read(&self.fd, &mut *buf) {
                Ok(0) => break,
                Ok(n) => {
                    let stream = self.stream;
                    self.lines.feed(&buf[..n], |line| {
                        let _ = log.write(stream, line);
                    });
                    return true;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
        self.finish(log);
        false
    }

    /// Logs the unfinished last line, if any.
    fn finish(&mut self, log: &mut LogWriter) {
        let stream = self.stream;
        self.lines.finish(|line| {
            let _ = log.write(stream, line);
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_seen_without_a_pidfd_and_the_leader_is_not_reaped() {
        let mut child = Command::new("sleep").arg("0.2").spawn().unwrap();
        let leader = Pid::from_child(&child);
        assert!(!has_exited(leader));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_exited(leader) {
            assert!(Instant::now() < deadline, "sleep 0.2 never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Still ours to reap, with its status.
        assert!(child.wait().unwrap().success());
    }
}
