//! A unix socket on a host (its Docker engine's) made reachable as a local unix socket,
//! each local connection carried by a `direct-streamlocal@openssh.com` channel.
//!
//! The forward has a session of its own, in libssh2's non-blocking mode, pumped by one
//! thread: a connection through it (a log follow, a wait for an exit) lasts as long as
//! the container does, and the host's command session (one job at a time, see the
//! module above) must never queue behind it. The thread polls the SSH socket and every
//! local socket, so an idle forward costs nothing but its keepalives.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use ssh2::{BlockDirections, Channel, ErrorCode, Session};

use super::{connect, ssh_error, SshTarget, KEEPALIVE};
use crate::DeployError;

/// libssh2's "would block".
const EAGAIN: ErrorCode = ErrorCode::Session(-37);

/// Longest sleep of the pump between checks of its stop flag.
const TICK: Duration = Duration::from_millis(100);

/// A running forward; dropping it closes the local socket and every connection.
pub struct SocketForward {
    local: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for SocketForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketForward")
            .field("local", &self.local)
            .finish()
    }
}

impl SocketForward {
    /// Logs in to `target` and listens on `local` (mode 0600); each connection there
    /// reaches `remote` on the host. Fails when the host cannot be reached or the
    /// socket cannot be made; a `remote` that does not exist fails each connection.
    pub fn start(
        target: &SshTarget,
        remote: &str,
        local: &Path,
    ) -> Result<SocketForward, DeployError> {
        let (session, socket) = connect::open(target)?;
        let _ = std::fs::remove_file(local);
        let listener = UnixListener::bind(local).map_err(|e| DeployError::WriteFile {
            path: local.to_owned(),
            source: e,
        })?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(local, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            DeployError::WriteFile {
                path: local.to_owned(),
                source: e,
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ssh_error(target, "forward a socket", e))?;
        session.set_blocking(false);
        let stop = Arc::new(AtomicBool::new(false));
        let mut pump = Pump {
            target: target.clone(),
            remote: remote.to_owned(),
            session,
            socket,
            listener,
            waiting: Vec::new(),
            pipes: Vec::new(),
            last_keepalive: Instant::now(),
        };
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ssh forward {}", target.address))
            .spawn(move || pump.run(&flag))
            .map_err(|e| ssh_error(target, "forward a socket", e))?;
        Ok(SocketForward {
            local: local.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// Whether it still carries connections: false once its session ended (sshd
    /// went away, the link was cut); a new forward is needed then.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// libssh2's errors that mean the session's transport is gone.
fn transport_lost(e: &ssh2::Error) -> bool {
    matches!(
        e.code(),
        // SOCKET_SEND, SOCKET_DISCONNECT, SOCKET_TIMEOUT, SOCKET_RECV
        ErrorCode::Session(-7 | -13 | -30 | -43)
    )
}

impl Drop for SocketForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.local);
    }
}

/// One local connection and its channel, with what is on its way each direction.
struct Pipe {
    local: UnixStream,
    channel: Channel,
    to_remote: Vec<u8>,
    to_local: Vec<u8>,
    local_done: bool,
    eof_sent: bool,
    remote_done: bool,
    local_shut: bool,
}

struct Pump {
    target: SshTarget,
    remote: String,
    session: Session,
    socket: TcpStream,
    listener: UnixListener,
    /// Accepted connections whose channel is still being opened.
    waiting: Vec<UnixStream>,
    pipes: Vec<Pipe>,
    last_keepalive: Instant,
}

impl Pump {
    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let opened = match self.open_channels() {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::warn!(
                        "{}: the forward's session ended: {e}",
                        self.target.describe()
                    );
                    return;
                }
            };
            let moved = self.accept() | opened | self.move_data();
            if self.last_keepalive.elapsed() >= KEEPALIVE {
                self.last_keepalive = Instant::now();
                if let Err(e) = self.session.keepalive_send() {
                    if e.code() != EAGAIN {
                        tracing::warn!(
                            "{}: the forward's session ended: {e}",
                            self.target.describe()
                        );
                        return;
                    }
                }
            }
            if !moved && !self.wait() {
                tracing::warn!(
                    "{}: the forward's connection closed",
                    self.target.describe()
                );
                return;
            }
        }
    }

    fn accept(&mut self) -> bool {
        let mut any = false;
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_ok() {
                self.waiting.push(stream);
                any = true;
            }
        }
        any
    }

    /// Opens the channels of accepted connections; an error when the session is gone.
    fn open_channels(&mut self) -> Result<bool, ssh2::Error> {
        let mut any = false;
        let mut still = Vec::new();
        for stream in std::mem::take(&mut self.waiting) {
            match self.session.channel_direct_streamlocal(&self.remote, None) {
                Ok(channel) => {
                    any = true;
                    self.pipes.push(Pipe {
                        local: stream,
                        channel,
                        to_remote: Vec::new(),
                        to_local: Vec::new(),
                        local_done: false,
                        eof_sent: false,
                        remote_done: false,
                        local_shut: false,
                    });
                }
                Err(e) if e.code() == EAGAIN => still.push(stream),
                Err(e) if transport_lost(&e) => return Err(e),
                // The host refused (no such socket, forwarding not allowed): this
                // connection ends; the engine client sees it closed.
                Err(e) => {
                    tracing::warn!(
                        "{}: cannot reach {} on the host: {e}",
                        self.target.describe(),
                        self.remote
                    );
                    any = true;
                }
            }
        }
        self.waiting = still;
        Ok(any)
    }

    fn move_data(&mut self) -> bool {
        let mut any = false;
        let mut buf = vec![0u8; 64 * 1024];
        for pipe in &mut self.pipes {
            any |= pipe.step(&mut buf);
        }
        let before = self.pipes.len();
        self.pipes.retain_mut(|p| !p.finished());
        any || self.pipes.len() != before
    }

    /// Sleeps until the SSH socket or a local socket is ready, at most [`TICK`];
    /// false when the SSH socket was closed.
    fn wait(&self) -> bool {
        let ssh_flags = match self.session.block_directions() {
            BlockDirections::Outbound => PollFlags::IN | PollFlags::OUT | PollFlags::RDHUP,
            _ => PollFlags::IN | PollFlags::RDHUP,
        };
        let mut fds = vec![
            PollFd::from_borrowed_fd(self.socket.as_fd(), ssh_flags),
            PollFd::from_borrowed_fd(self.listener.as_fd(), PollFlags::IN),
        ];
        for p in &self.pipes {
            let mut flags = PollFlags::empty();
            if p.to_remote.is_empty() && !p.local_done {
                flags |= PollFlags::IN;
            }
            if !p.to_local.is_empty() {
                flags |= PollFlags::OUT;
            }
            fds.push(PollFd::from_borrowed_fd(p.local.as_fd(), flags));
        }
        // Channels still being opened wait for the SSH socket, already polled.
        let tick = if self.waiting.is_empty() {
            TICK
        } else {
            Duration::from_millis(5)
        };
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: i64::from(tick.subsec_nanos()),
        };
        let _ = poll(&mut fds, Some(&timeout));
        !fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::RDHUP)
    }
}

impl Pipe {
    /// Moves what it can both ways without blocking; true when anything moved.
    fn step(&mut self, buf: &mut [u8]) -> bool {
        let mut moved = false;
        // Local to remote.
        if self.to_remote.is_empty() && !self.local_done {
            match self.local.read(buf) {
                Ok(0) => {
                    self.local_done = true;
                    moved = true;
                }
                Ok(n) => {
                    self.to_remote.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => self.local_done = true,
            }
        }
        if !self.to_remote.is_empty() {
            match self.channel.write(&self.to_remote) {
                Ok(n) => {
                    self.to_remote.drain(..n);
                    moved |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => self.fail(),
            }
        }
        if self.local_done && self.to_remote.is_empty() && !self.eof_sent {
            match self.channel.send_eof() {
                Ok(()) => {
                    self.eof_sent = true;
                    moved = true;
                }
                Err(e) if e.code() == EAGAIN => {}
                Err(_) => self.fail(),
            }
        }
        // Remote to local.
        if self.to_local.is_empty() && !self.remote_done {
            match self.channel.read(buf) {
                Ok(0) => {
                    if self.channel.eof() {
                        self.remote_done = true;
                        moved = true;
                    }
                }
                Ok(n) => {
                    self.to_local.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => self.fail(),
            }
        }
        if !self.to_local.is_empty() {
            match self.local.write(&self.to_local) {
                Ok(n) => {
                    self.to_local.drain(..n);
                    moved |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    // The local client went away: nothing more to deliver.
                    self.to_local.clear();
                    self.remote_done = true;
                    self.local_done = true;
                }
            }
        }
        if self.remote_done && self.to_local.is_empty() && !self.local_shut {
            let _ = self.local.shutdown(std::net::Shutdown::Write);
            self.local_shut = true;
            moved = true;
        }
        moved
    }

    fn fail(&mut self) {
        self.to_remote.clear();
        self.to_local.clear();
        self.local_done = true;
        self.eof_sent = true;
        self.remote_done = true;
    }

    /// Both directions are over; the channel is closed (best effort) as it goes.
    fn finished(&mut self) -> bool {
        let done = self.local_shut && self.eof_sent;
        if done {
            let _ = self.channel.close();
        }
        done
    }
}
