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
//! byte with a socket of a fresh pair attached (`SCM_RIGHTS`); the server forks, and
//! answers with the shim's pid as an `i32` (negative: an errno, the fork's, or EMFILE
//! when the socket did not come through). The forked shim reads its
//! [`ProcessSpec`](super::ProcessSpec) from that socket and reports on it
//! ([`super::shim::run_shim`]). The server reaps its shims (woken by a pidfd each) and
//! exits when the daemon's end of the control socket closes.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_io::{Async, Timer};
use futures_lite::{future, AsyncReadExt};
use rustix::event::epoll;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::process::{Pid, PidfdFlags, WaitId, WaitIdOptions};

use super::INSTANCE_VAR;
use crate::DeployError;

/// The daemon's handle on its shim server, started on first use and again when it
/// has died.
pub struct ShimServer {
    exe: PathBuf,
    instance: String,
    running: async_lock::Mutex<Option<Running>>,
}

struct Running {
    process: Child,
    control: Async<UnixStream>,
}

impl Running {
    /// Kills and reaps the server: our own child, so the pid cannot be another's.
    fn end(mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// How long the server may take to answer before it counts as dead.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A request on the control socket. Dropped unanswered (the spawn was cancelled, or
/// the server failed), its answer may still come and would be read as the next
/// request's, so the server is ended instead; the next request starts another.
struct Pending<'a> {
    slot: &'a mut Option<Running>,
    answered: bool,
}

impl Pending<'_> {
    fn control(&self) -> &Async<UnixStream> {
        &self
            .slot
            .as_ref()
            .expect("a server is started before each request")
            .control
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.answered {
            if let Some(server) = self.slot.take() {
                server.end();
            }
        }
    }
}

impl ShimServer {
    /// A server run as `<exe> shim-server` for the daemon `daemon_instance`; nothing
    /// starts until the first [`ShimServer::fork_shim`].
    pub fn new(exe: &Path, daemon_instance: &str) -> ShimServer {
        ShimServer {
            exe: exe.to_owned(),
            instance: server_instance(daemon_instance),
            running: async_lock::Mutex::new(None),
        }
    }

    /// Has a shim forked; returns our end of its channel and its pid.
    pub(crate) async fn fork_shim(&self) -> Result<(UnixStream, u32), DeployError> {
        let mut running = self.running.lock().await;
        // A server that died (or hangs) is replaced once, then it is an error.
        for retry in [true, false] {
            if running.is_none() {
                *running = Some(self.start()?);
            }
            // A fresh pair each round: a server that forked and died before it
            // answered leaves a shim on the old pair, which reads end of file and exits.
            let (ours, theirs) = UnixStream::pair().map_err(DeployError::Channel)?;
            let mut pending = Pending {
                slot: &mut running,
                answered: false,
            };
            let answer = future::or(
                async { Some(request(pending.control(), &theirs).await) },
                async {
                    Timer::after(ANSWER_TIMEOUT).await;
                    None
                },
            )
            .await;
            let source = match answer {
                Some(Ok(answer)) => {
                    pending.answered = true;
                    return match u32::try_from(answer) {
                        Ok(pid) if pid > 0 => Ok((ours, pid)),
                        _ => Err(DeployError::Fork(io::Error::from_raw_os_error(
                            answer.saturating_neg(),
                        ))),
                    };
                }
                Some(Err(e)) => e,
                None => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {ANSWER_TIMEOUT:?}"),
                ),
            };
            // `pending` ends the server here.
            drop(pending);
            if !retry {
                return Err(DeployError::ShimServer {
                    exe: self.exe.clone(),
                    source,
                });
            }
        }
        unreachable!("the loop returns on its last round")
    }

    fn start(&self) -> Result<Running, DeployError> {
        let start_err = |source| DeployError::StartShim {
            exe: self.exe.clone(),
            source,
        };
        let (ours, theirs) = UnixStream::pair().map_err(start_err)?;
        let process = Command::new(&self.exe)
            .arg("shim-server")
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
        Ok(Running { process, control })
    }
}

/// The `HARNESS_INSTANCE` of a daemon's shim server (and so of the shims it forks,
/// whose initial environment is the server's): not a service's, and never a stray.
pub fn server_instance(daemon_instance: &str) -> String {
    format!("{daemon_instance}/-/shims")
}

/// One request: `channel` to the server, the pid (or -errno) back.
async fn request(control: &Async<UnixStream>, channel: &UnixStream) -> io::Result<i32> {
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
            .map_err(io::Error::from)
        })
        .await?;
    let mut answer = [0u8; 4];
    (&*control).read_exact(&mut answer).await?;
    Ok(i32::from_le_bytes(answer))
}

/// The server's main, run as `<exe> shim-server` by [`ShimServer`], with the control
/// socket as stdin. Returns the exit code; in a forked shim it returns the shim's.
pub fn serve() -> i32 {
    let mut server = match Server::new() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("shim server: {e}");
            return 1;
        }
    };
    loop {
        let channel = match server.next_request() {
            Ok(Some(Some(channel))) => channel,
            // A request whose socket did not come through (out of file descriptors).
            Ok(Some(None)) => {
                if server
                    .answer(-rustix::io::Errno::MFILE.raw_os_error())
                    .is_err()
                {
                    return 0;
                }
                continue;
            }
            Ok(None) => continue,
            // The daemon is gone: the shims keep running without us.
            Err(_) => return 0,
        };
        match fork() {
            Ok(Forked::Child) => {
                // Nothing of the server stays open in the shim.
                drop(server);
                if rustix::process::setpgid(None, None).is_err() {
                    return 1;
                }
                return super::shim::run_shim(UnixStream::from(channel));
            }
            Ok(Forked::Parent(pid)) => {
                drop(channel);
                if server.answer(pid as i32).is_err() {
                    return 0;
                }
                server.watch(pid);
            }
            Err(errno) => {
                drop(channel);
                if server.answer(-(errno as i32)).is_err() {
                    return 0;
                }
            }
        }
    }
}

/// The server's side: the control socket, and a pidfd per live shim to reap it.
struct Server {
    control: OwnedFd,
    epoll: OwnedFd,
    shims: HashMap<u64, OwnedFd>,
}

/// The epoll key of the control socket (the shims' are their pids, never 0).
const CONTROL: u64 = 0;

impl Server {
    fn new() -> io::Result<Server> {
        // The control socket moves off fd 0, which becomes /dev/null, so a forked
        // shim (and its service) never holds it.
        let control = io::stdin().as_fd().try_clone_to_owned()?;
        rustix::stdio::dup2_stdin(std::fs::File::open("/dev/null")?)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            &control,
            epoll::EventData::new_u64(CONTROL),
            epoll::EventFlags::IN,
        )?;
        Ok(Server {
            control,
            epoll,
            shims: HashMap::new(),
        })
    }

    /// Waits for a request (reaping shims that exited meanwhile): its socket, if it
    /// came through; `Ok(None)` when only shims exited; an error when the daemon's end
    /// is closed.
    fn next_request(&mut self) -> io::Result<Option<Option<OwnedFd>>> {
        let mut events = Vec::with_capacity(16);
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut events),
            None,
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut request = false;
        for event in events {
            match event.data.u64() {
                CONTROL => request = true,
                pid => self.forget(pid),
            }
        }
        // Every exited shim, also one whose pidfd could not be watched.
        while let Ok(Some(_)) =
            rustix::process::waitid(WaitId::All, WaitIdOptions::EXITED | WaitIdOptions::NOHANG)
        {
        }
        if request {
            return self.receive().map(Some);
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

    fn answer(&self, value: i32) -> io::Result<()> {
        rustix::net::send(&self.control, &value.to_le_bytes(), SendFlags::NOSIGNAL)?;
        Ok(())
    }

    /// Watches a new shim's pidfd, to be woken (and reap it) when it exits.
    fn watch(&mut self, pid: u32) {
        let Some(p) = Pid::from_raw(pid as i32) else {
            return;
        };
        // Our unreaped child: the pid is still ours even if it exited already.
        let Ok(fd) = rustix::process::pidfd_open(p, PidfdFlags::empty()) else {
            return;
        };
        let key = u64::from(pid);
        if epoll::add(
            &self.epoll,
            &fd,
            epoll::EventData::new_u64(key),
            epoll::EventFlags::IN,
        )
        .is_ok()
        {
            self.shims.insert(key, fd);
        }
    }

    /// Stops watching a shim that exited (the sweep in `next_request` reaps it).
    fn forget(&mut self, key: u64) {
        if let Some(fd) = self.shims.remove(&key) {
            let _ = epoll::delete(&self.epoll, &fd);
        }
    }
}

enum Forked {
    Parent(u32),
    Child,
}

/// `fork(2)`, the one unsafe call of the workspace.
#[allow(unsafe_code)]
fn fork() -> nix::Result<Forked> {
    // SAFETY: the shim server is single-threaded (it starts no thread and runs no
    // async runtime), so no other thread can hold a lock (of the allocator, of stdio)
    // at the moment of the fork, and the child may do anything the server could.
    Ok(match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Forked::Parent(child.as_raw() as u32),
        nix::unistd::ForkResult::Child => Forked::Child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the server that answers each request with pid 42, 300 ms late.
    fn slow_server(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("slow-server");
        std::fs::write(
            &path,
            "#!/bin/sh\nwhile [ \"$(head -c 1 | wc -c)\" = 1 ]; do sleep 0.3; printf '\\052\\000\\000\\000' >&0; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_request_dropped_before_its_answer_ends_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let shims = ShimServer::new(&slow_server(dir.path()), "test");
        smol::block_on(async {
            // Sent, then dropped while the answer is on its way.
            assert!(future::poll_once(shims.fork_shim()).await.is_none());
            assert!(
                shims.running.lock().await.is_none(),
                "the server was kept with an answer in flight"
            );
            // The next request has a server of its own, and its own answer.
            let (_, pid) = shims.fork_shim().await.unwrap();
            assert_eq!(pid, 42);
            if let Some(server) = shims.running.lock().await.take() {
                server.end();
            }
        });
    }
}
