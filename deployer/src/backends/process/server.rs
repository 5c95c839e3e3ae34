//! The shim server: one small, single-threaded process per daemon that forks a shim
//! for each service start.
//!
//! Exec'ing the shim binary for every service cost more CPU than the service's own
//! start (dynamic loading, the Rust runtime's start-up: about 2.2 ms against busybox's
//! 1.4 ms here). A fork of this small process costs a fraction of that, and the forked
//! shim is the same supervisor: the service's parent, in a process group of its own,
//! outliving the daemon (and the server).
//!
//! Protocol, on a Unix stream socket that is the server's stdin: the daemon sends one
//! byte with a socket of a fresh pair attached (`SCM_RIGHTS`), and nothing comes back
//! on the control socket, so requests never wait for each other's answers. The server
//! forks, and the forked shim writes its pid (an `i32`) on that socket first, then
//! reads its [`ProcessSpec`](super::ProcessSpec) from it and reports on it
//! ([`super::shim::run_shim`]). When the fork fails, the server writes `-errno` there
//! instead; when the socket did not come through (out of file descriptors), or the
//! server died before forking, the daemon reads end of file. The server reaps its
//! shims (woken by `SIGCHLD` through a signalfd) and exits when the daemon's end of the
//! control socket closes.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::{future, AsyncReadExt, AsyncWriteExt};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::process::{WaitId, WaitIdOptions};

use super::INSTANCE_VAR;
use crate::DeployError;

/// The daemon's handle on its shim server, started on first use and again when it
/// has died.
pub struct ShimServer {
    exe: PathBuf,
    instance: String,
    running: async_lock::Mutex<Option<Running>>,
    start_timeout: Duration,
    /// Servers started so far: each one's number tells it from its successors (a
    /// pid, once reaped, may be taken by one of them).
    started: AtomicU64,
}

struct Running {
    process: Child,
    control: Async<UnixStream>,
    number: u64,
}

impl Running {
    /// Kills and reaps the server: our own child, so the pid cannot be another's.
    fn end(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The argument that runs the shim server (`<exe> shim-server-2`). It names the
/// protocol's version, so that a daemon of another version (a binary replaced by an
/// upgrade while the daemon runs) gets a usage error and an exit from it at once,
/// never a server that speaks another protocol.
pub const SHIM_SERVER_COMMAND: &str = "shim-server-2";

/// How long a shim may take, by default, from its fork until it reports the service
/// running (see [`ShimServer::with_start_timeout`]).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a shim may take to say its pid before its server counts as dead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl ShimServer {
    /// A server run as `<exe> shim-server-2` for the daemon `daemon_instance`; nothing
    /// starts until the first [`ShimServer::fork_shim`].
    pub fn new(exe: &Path, daemon_instance: &str) -> ShimServer {
        ShimServer {
            exe: exe.to_owned(),
            instance: server_instance(daemon_instance),
            running: async_lock::Mutex::new(None),
            start_timeout: START_TIMEOUT,
            started: AtomicU64::new(0),
        }
    }

    /// The same server, with shims that must report their service running within
    /// `timeout` (else they, and the service if it started, are killed).
    pub fn with_start_timeout(self, timeout: Duration) -> ShimServer {
        ShimServer {
            start_timeout: timeout,
            ..self
        }
    }

    /// How long a shim may take to report its service running.
    pub(crate) fn start_timeout(&self) -> Duration {
        self.start_timeout
    }

    /// The `HARNESS_INSTANCE` of this server and of its shims (forks of it).
    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    /// Has a shim forked and sends it `spec` (the serialized
    /// [`ProcessSpec`](super::ProcessSpec)); returns our end of its channel, where its
    /// report comes next, and its pid.
    ///
    /// Nothing is held while the shim is forked: many starts wait for their shims at
    /// once, where one answer at a time over the control socket made a wave of 20
    /// starts wait about 1 ms for each fork before it.
    pub(crate) async fn fork_shim(
        &self,
        spec: &[u8],
    ) -> Result<(Async<UnixStream>, u32), DeployError> {
        // A server that died (or hangs) is replaced once, then it is an error that
        // tells both failures.
        let mut first: Option<io::Error> = None;
        loop {
            // A fresh pair each round: the old one may still reach a shim that the
            // failed server forked as it was ended; that shim finds our end closed.
            let (ours, theirs) = UnixStream::pair().map_err(DeployError::Channel)?;
            let (server, sent) = match self.send(theirs).await {
                Ok(sent) => sent,
                Err(e) => {
                    return Err(match first {
                        Some(first) => DeployError::ShimServer {
                            exe: self.exe.clone(),
                            source: io::Error::new(
                                first.kind(),
                                format!("{first}; then a new one could not be started: {e}"),
                            ),
                        },
                        None => e,
                    })
                }
            };
            let source = match sent {
                Ok(()) => {
                    let mut ours = Async::new(ours).map_err(DeployError::Channel)?;
                    let answer =
                        future::or(async { Some(first_answer(&mut ours, spec).await) }, async {
                            Timer::after(ANSWER_TIMEOUT).await;
                            None
                        })
                        .await;
                    match answer {
                        Some(Ok(answer)) => {
                            return match u32::try_from(answer) {
                                Ok(pid) if pid > 0 => Ok((ours, pid)),
                                _ => Err(DeployError::Fork(io::Error::from_raw_os_error(
                                    answer.saturating_neg(),
                                ))),
                            };
                        }
                        // End of file, or a reset when the spec was still unread: the
                        // server died, or could not take the socket (out of file
                        // descriptors).
                        Some(Err(e)) => io::Error::new(
                            e.kind(),
                            format!("it closed the request before a shim said its pid ({e})"),
                        ),
                        None => io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no shim said its pid within {ANSWER_TIMEOUT:?}"),
                        ),
                    }
                }
                Err(e) => io::Error::new(e.kind(), format!("it took no request ({e})")),
            };
            let source = match self.end(server).await {
                // 2: the usage error of a binary replaced by another version.
                Some(status) if status.code() == Some(2) => io::Error::new(
                    source.kind(),
                    format!(
                        "{source}; it had exited ({status}): a harness-shim of another \
                         version? restart harnessd after an upgrade"
                    ),
                ),
                Some(status) => {
                    io::Error::new(source.kind(), format!("{source}; it had exited ({status})"))
                }
                None => source,
            };
            match first {
                None => first = Some(source),
                Some(first) => {
                    return Err(DeployError::ShimServer {
                        exe: self.exe.clone(),
                        source: io::Error::new(
                            source.kind(),
                            format!("{first}; then, on a new one: {source}"),
                        ),
                    })
                }
            }
        }
    }

    /// Sends one request (the shim's end of its channel) to the server, started
    /// first if none runs; returns the number of that server and whether it took the
    /// request.
    async fn send(&self, theirs: UnixStream) -> Result<(u64, io::Result<()>), DeployError> {
        let mut running = self.running.lock().await;
        if running.is_none() {
            *running = Some(self.start()?);
        }
        let server = running.as_ref().expect("started above");
        let sent = request(&server.control, &theirs).await;
        Ok((server.number, sent))
    }

    /// Ends the server `number`, unless it was replaced meanwhile (by a start that
    /// failed on it too); returns how it had exited if it had (a usage error from a
    /// binary of another version, say).
    async fn end(&self, number: u64) -> Option<std::process::ExitStatus> {
        let mut running = self.running.lock().await;
        if running.as_ref().is_none_or(|r| r.number != number) {
            return None;
        }
        let mut server = running.take()?;
        let exited = server.process.try_wait().ok().flatten();
        server.end();
        exited
    }

    fn start(&self) -> Result<Running, DeployError> {
        let start_err = |source| DeployError::StartShim {
            exe: self.exe.clone(),
            source,
        };
        let (ours, theirs) = UnixStream::pair().map_err(start_err)?;
        let process = Command::new(&self.exe)
            .arg(SHIM_SERVER_COMMAND)
            .env_clear()
            .env(INSTANCE_VAR, &self.instance)
            .current_dir("/")
            .process_group(0)
            .stdin(OwnedFd::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(start_err)?;
        let control = Async::new(ours).map_err(start_err)?;
        let number = self.started.fetch_add(1, Ordering::Relaxed);
        Ok(Running {
            process,
            control,
            number,
        })
    }
}

/// The `HARNESS_INSTANCE` of a daemon's shim server (and so of the shims it forks,
/// whose initial environment is the server's): not a service's, and never a stray.
pub fn server_instance(daemon_instance: &str) -> String {
    format!("{daemon_instance}/-/shims")
}

/// One request: `channel` to the server.
async fn request(control: &Async<UnixStream>, channel: &UnixStream) -> io::Result<()> {
    control
        .write_with(|socket| {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut ancillary = SendAncillaryBuffer::new(&mut space);
            let fds = [channel.as_fd()];
            ancillary.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(
                socket,
                &[IoSlice::new(&[1])],
                &mut ancillary,
                SendFlags::NOSIGNAL,
            )
            .map(drop)
            .map_err(io::Error::from)
        })
        .await
}

/// Sends the spec on a new channel (the shim reads it once forked; the socket holds
/// it meanwhile) and reads the first answer there: the shim's pid, or `-errno` from
/// the server when the fork failed.
async fn first_answer(channel: &mut Async<UnixStream>, spec: &[u8]) -> io::Result<i32> {
    // A failed write is not the answer: a server whose fork failed has written
    // `-errno` and closed its end, and that is still there to read (a shim that died
    // early leaves end of file, read as before).
    let _ = channel.write_all(spec).await;
    let _ = channel.get_ref().shutdown(std::net::Shutdown::Write);
    let mut answer = [0u8; 4];
    channel.read_exact(&mut answer).await?;
    Ok(i32::from_le_bytes(answer))
}

/// The server's main, run as `<exe> shim-server-2` by [`ShimServer`], with the control
/// socket as stdin. Returns the exit code; in a forked shim it returns the shim's.
pub fn serve() -> i32 {
    let server = match Server::new() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("shim server: {e}");
            return 1;
        }
    };
    loop {
        let channel = match server.next_request() {
            Ok(Some(channel)) => channel,
            // Only shims exited, or the socket did not come through (out of file
            // descriptors): its sender reads end of file.
            Ok(None) => continue,
            // The daemon is gone: the shims keep running without us.
            Err(_) => return 0,
        };
        match fork() {
            Ok(Forked::Child) => {
                // Nothing of the server stays open in the shim, and its signal
                // mask is the usual one again.
                drop(server);
                let mut channel = UnixStream::from(channel);
                let pid = std::process::id() as i32;
                if channel.write_all(&pid.to_le_bytes()).is_err()
                    || child_signals().thread_unblock().is_err()
                    || rustix::process::setpgid(None, None).is_err()
                {
                    return 1;
                }
                return super::shim::run_shim(channel);
            }
            Ok(Forked::Parent) => drop(channel),
            Err(errno) => {
                // Best effort: its sender reads end of file otherwise.
                let _ = UnixStream::from(channel).write_all(&(-(errno as i32)).to_le_bytes());
            }
        }
    }
}

/// The server's side: the control socket, and `SIGCHLD` as a file to reap shims by.
///
/// A signalfd rather than a pidfd per shim: a forked shim would inherit every live
/// shim's pidfd and have to close each, which made a fork cost more with each service
/// of the daemon.
struct Server {
    control: OwnedFd,
    exits: SignalFd,
}

/// `SIGCHLD`, blocked in the server so that it arrives only through its signalfd.
fn child_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set
}

impl Server {
    fn new() -> io::Result<Server> {
        // The control socket moves off fd 0, which becomes /dev/null, so a forked
        // shim (and its service) never holds it.
        let control = io::stdin().as_fd().try_clone_to_owned()?;
        rustix::stdio::dup2_stdin(std::fs::File::open("/dev/null")?)?;
        child_signals().thread_block()?;
        let exits = SignalFd::with_flags(
            &child_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )?;
        Ok(Server { control, exits })
    }

    /// Waits for a request (reaping shims that exited meanwhile): its socket;
    /// `Ok(None)` when only shims exited or the socket did not come through; an error
    /// when the daemon's end is closed.
    fn next_request(&self) -> io::Result<Option<OwnedFd>> {
        let mut fds = [
            PollFd::new(&self.control, PollFlags::IN),
            PollFd::new(&self.exits, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let request = !fds[0].revents().is_empty();
        if !fds[1].revents().is_empty() {
            // Signals of one kind merge while pending, so one read may stand for
            // many exits: the sweep below reaps them all.
            while let Ok(Some(_)) = self.exits.read_signal() {}
            while let Ok(Some(_)) =
                rustix::process::waitid(WaitId::All, WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
            {
            }
        }
        if request {
            return self.receive();
        }
        Ok(None)
    }

    /// Reads one request: a byte carrying a socket (`None` when the socket did not
    /// come through).
    fn receive(&self) -> io::Result<Option<OwnedFd>> {
        let mut byte = [0u8; 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut ancillary = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            &self.control,
            &mut [IoSliceMut::new(&mut byte)],
            &mut ancillary,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        if msg.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(ancillary.drain().find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        }))
    }
}

enum Forked {
    Parent,
    Child,
}

/// `fork(2)`, the one unsafe call of the workspace.
#[allow(unsafe_code)]
fn fork() -> nix::Result<Forked> {
    // SAFETY: the shim server is single-threaded (it starts no thread and runs no
    // async runtime), so no other thread can hold a lock (of the allocator, of stdio)
    // at the moment of the fork, and the child may do anything the server could.
    Ok(match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { .. } => Forked::Parent,
        nix::unistd::ForkResult::Child => Forked::Child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a server that takes each request and forks nothing (a read
    /// drops the socket that came with the byte); it counts its starts in `starts`.
    fn dropping_server(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("dropping-server");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho started >> {}\nexec cat >/dev/null\n",
                dir.join("starts").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_server_that_cannot_be_started_again_is_named_with_the_first_failure() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("once-server");
        // Takes one request (forking nothing) and removes itself first.
        std::fs::write(&exe, "#!/bin/sh\nrm -f \"$0\"\nexec cat >/dev/null\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let shims = ShimServer::new(&exe, "test");
        match smol::block_on(shims.fork_shim(b"{}")).unwrap_err() {
            DeployError::ShimServer { source, .. } => {
                let text = source.to_string();
                assert!(text.contains("before a shim said its pid"), "{text}");
                assert!(
                    text.contains("then a new one could not be started"),
                    "{text}"
                );
            }
            other => panic!("unexpected error: {other}"),
        }
    }

    #[test]
    fn a_request_that_forks_nothing_is_retried_on_a_new_server_then_named() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dropping_server(dir.path());
        let shims = ShimServer::new(&exe, "test");
        let started = std::time::Instant::now();
        let err = smol::block_on(shims.fork_shim(b"{}")).unwrap_err();
        // End of file on the channel, not the answer timeout.
        assert!(
            started.elapsed() < ANSWER_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        match &err {
            DeployError::ShimServer { exe: named, source } => {
                assert_eq!(named, &exe);
                // Both attempts are told.
                let text = source.to_string();
                assert_eq!(
                    text.matches("before a shim said its pid").count(),
                    2,
                    "{text}"
                );
                assert!(text.contains("then, on a new one"), "{text}");
            }
            other => panic!("unexpected error: {other}"),
        }
        let starts = std::fs::read_to_string(dir.path().join("starts")).unwrap();
        assert_eq!(
            starts.lines().count(),
            2,
            "one server, then one replacement"
        );
        assert!(
            smol::block_on(shims.running.lock()).is_none(),
            "the failed one ended"
        );
    }
}
