//! SSH to LAN and remote hosts, on ssh2 (libssh2).
//!
//! libssh2 is blocking and a session is one mutex: every call, a channel read
//! included, holds it. So each host gets one [`SshHost`]: a dedicated thread that owns
//! the host's one session and runs jobs (commands, uploads) one after another, never
//! on the executor. Callers await the job's answer on a channel. Files travel as a
//! command's standard input, streamed ([`SshHost::exec_with_input`]). The session is made
//! on first use, kept alive by keepalives while idle, and made again on the next job
//! after any transport error, so a host that went away and came back just works.
//!
//! Host keys are checked strictly against the known_hosts files given; an unknown
//! key is accepted only with [`HostKeyPolicy::AcceptNew`], which records it in the
//! daemon's own known_hosts file (never the user's).

mod connect;
mod forward;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ssh2::{ErrorCode, Session};

pub use connect::HostKeyPolicy;
pub use forward::SocketForward;

use crate::DeployError;

/// How long after a failed connect jobs fail at once instead of connecting again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// How often an idle session sends a keepalive.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// How to reach a host over SSH.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SshTarget {
    /// Host name or address.
    pub address: String,
    /// SSH port.
    pub port: u16,
    /// User to log in as.
    pub user: String,
    /// Private key file; without one, the agent (`SSH_AUTH_SOCK`) and then the
    /// default keys in `~/.ssh` are tried.
    pub key: Option<PathBuf>,
    /// known_hosts files to check the host key against, in order.
    pub known_hosts: Vec<PathBuf>,
    /// What to do with a host whose key no file knows.
    pub policy: HostKeyPolicy,
    /// The daemon's own known_hosts file: read too, and where `AcceptNew` writes.
    pub own_known_hosts: PathBuf,
    /// Connect and handshake timeout.
    pub connect_timeout: Duration,
}

impl SshTarget {
    /// `user@address:port`, for messages.
    pub fn describe(&self) -> String {
        format!("{}@{}:{}", self.user, self.address, self.port)
    }
}

/// What a remote command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit status (-1 when the remote side did not say).
    pub status: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

impl CommandOutput {
    /// Standard error (or output, when error is empty) as text, trimmed, for messages.
    pub fn message(&self) -> String {
        let text = if self.stderr.iter().all(u8::is_ascii_whitespace) {
            &self.stdout
        } else {
            &self.stderr
        };
        String::from_utf8_lossy(text).trim().to_owned()
    }
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// One host's SSH session, owned by a thread of its own. Cheap to clone; the thread
/// ends when the last clone is dropped.
#[derive(Clone)]
pub struct SshHost {
    target: SshTarget,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for SshHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshHost")
            .field("target", &self.target)
            .finish()
    }
}

/// The worker thread's state: the target and, while connected, the session.
struct Connection {
    target: SshTarget,
    live: Option<Live>,
    /// After a failed connect: until when jobs fail at once with that error, so the
    /// pollers of an unreachable host do not queue up behind connect timeouts.
    failed: Option<(Instant, String)>,
}

struct Live {
    session: Session,
    /// A duplicate of the session's socket, to poll for readiness.
    socket: TcpStream,
}

impl SshHost {
    /// Starts the host's worker thread; nothing connects until the first job.
    pub fn new(target: SshTarget) -> SshHost {
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut conn = Connection {
            target: target.clone(),
            live: None,
            failed: None,
        };
        let name = format!("ssh {}", target.address);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || loop {
                match queue.recv_timeout(KEEPALIVE) {
                    Ok(job) => job(&mut conn),
                    Err(mpsc::RecvTimeoutError::Timeout) => conn.keepalive(),
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            })
            .expect("spawn an ssh thread");
        SshHost { target, jobs }
    }

    /// The host this session reaches.
    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Runs `f` on the host's thread with a connected session.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Live, &SshTarget) -> Result<T, DeployError> + Send + 'static,
    ) -> Result<T, DeployError> {
        let (tx, rx) = async_channel::bounded(1);
        let job: Job = Box::new(move |conn: &mut Connection| {
            let target = conn.target.clone();
            let result = conn.live().and_then(|live| f(live, &target));
            if result.as_ref().is_err_and(DeployError::is_transport) {
                // The session may be broken: make a new one for the next job.
                if let Some(live) = conn.live.take() {
                    live.ready_to_drop();
                }
            }
            let _ = tx.send_blocking(result);
        });
        self.jobs.send(job).map_err(|_| self.gone())?;
        rx.recv().await.map_err(|_| self.gone())?
    }

    fn gone(&self) -> DeployError {
        ssh_error(&self.target, "use the session", "its thread has ended")
    }

    /// Checks that the host answers and accepts us (connects when not connected).
    pub async fn connect(&self) -> Result<(), DeployError> {
        self.run(|_, _| Ok(())).await
    }

    /// Runs `command` (through the user's shell) with `stdin` as its input; fails only
    /// when the command could not be run or did not end within `timeout`, not when it
    /// exits non-zero.
    pub async fn exec(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<CommandOutput, DeployError> {
        let (command, stdin) = (command.to_owned(), stdin.to_vec());
        self.run(move |live, target| live.exec(target, &command, &stdin, timeout))
            .await
    }

    /// Like [`exec`](Self::exec), but a non-zero exit is an error that names `what`
    /// and carries the command's own message.
    pub async fn check(
        &self,
        what: &str,
        command: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<CommandOutput, DeployError> {
        let out = self.exec(command, stdin, timeout).await?;
        if out.status == 0 {
            Ok(out)
        } else {
            Err(DeployError::RemoteCommand {
                host: self.target.address.clone(),
                what: what.to_owned(),
                status: out.status,
                message: out.message(),
            })
        }
    }

    /// Runs `command` with what `input` writes as its standard input, streamed as it
    /// is written (nothing is staged in a file on either side). Returns the output and
    /// the bytes `input` wrote.
    pub async fn exec_with_input(
        &self,
        command: &str,
        input: impl FnOnce(&mut dyn Write) -> Result<u64, DeployError> + Send + 'static,
        timeout: Duration,
    ) -> Result<(CommandOutput, u64), DeployError> {
        let command = command.to_owned();
        self.run(move |live, target| {
            let mut sent = 0;
            let out = live.exec_feeding(target, &command, timeout, |channel| {
                sent = input(channel)?;
                Ok(())
            })?;
            Ok((out, sent))
        })
        .await
    }
}

impl Connection {
    fn live(&mut self) -> Result<&Live, DeployError> {
        if self.live.is_none() {
            if let Some((until, why)) = &self.failed {
                if Instant::now() < *until {
                    return Err(ssh_error(
                        &self.target,
                        "connect",
                        format!("{why} (a moment ago)"),
                    ));
                }
            }
            match connect::open(&self.target) {
                Ok((session, socket)) => {
                    self.live = Some(Live { session, socket });
                    self.failed = None;
                }
                Err(e) => {
                    if let DeployError::Ssh { detail, .. } = &e {
                        self.failed = Some((Instant::now() + RECONNECT_PAUSE, detail.clone()));
                    }
                    return Err(e);
                }
            }
        }
        Ok(self.live.as_ref().expect("connected just above"))
    }

    fn keepalive(&mut self) {
        if let Some(live) = &self.live {
            if live.session.keepalive_send().is_err() {
                self.live = None;
            }
        }
    }
}

/// A transport-level SSH error.
pub(crate) fn ssh_error(target: &SshTarget, action: &str, detail: impl ToString) -> DeployError {
    DeployError::Ssh {
        host: target.describe(),
        action: action.to_owned(),
        detail: detail.to_string(),
    }
}

fn is_timeout(e: &ssh2::Error) -> bool {
    e.code() == ErrorCode::Session(-9) // LIBSSH2_ERROR_TIMEOUT
}

/// A command's input: once a write fails, every later write and flush fails at once.
/// libssh2 keeps a packet it could not send and tries it again on each call, each
/// waiting up to the session's timeout, and a writer's drop (tar's trailer, a
/// `BufWriter`'s flush) would write again.
struct Input<'a> {
    channel: &'a mut ssh2::Channel,
    failed: Option<std::io::ErrorKind>,
}

impl Input<'_> {
    fn check(&self) -> std::io::Result<()> {
        match self.failed {
            Some(kind) => Err(std::io::Error::new(
                kind,
                "an earlier write to the channel failed",
            )),
            None => Ok(()),
        }
    }
}

impl Write for Input<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        self.channel
            .write(buf)
            .inspect_err(|e| self.failed = Some(e.kind()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.check()?;
        self.channel
            .flush()
            .inspect_err(|e| self.failed = Some(e.kind()))
    }
}

/// A failed write of `command`'s input: its timeout, or a transport error.
fn input_error(
    target: &SshTarget,
    command: &str,
    timeout: Duration,
    e: std::io::Error,
) -> DeployError {
    if e.kind() == std::io::ErrorKind::TimedOut {
        timed_out(target, command, timeout)
    } else {
        ssh_error(target, "write a command's input", e)
    }
}

/// `command` did not end within `timeout`.
fn timed_out(target: &SshTarget, command: &str, timeout: Duration) -> DeployError {
    DeployError::SshTimeout {
        host: target.describe(),
        what: short(command),
        timeout,
    }
}

/// A libssh2 failure while running `command`: its timeout or a transport error.
fn failure(
    target: &SshTarget,
    command: &str,
    timeout: Duration,
    action: &str,
    e: ssh2::Error,
) -> DeployError {
    if is_timeout(&e) {
        timed_out(target, command, timeout)
    } else {
        ssh_error(target, action, e)
    }
}

impl Live {
    fn exec(
        &self,
        target: &SshTarget,
        command: &str,
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<CommandOutput, DeployError> {
        self.exec_feeding(target, command, timeout, |channel| {
            if !stdin.is_empty() {
                channel
                    .write_all(stdin)
                    .map_err(|e| input_error(target, command, timeout, e))?;
            }
            Ok(())
        })
    }

    /// Runs `command`, lets `feed` write its standard input (blocking, with the
    /// channel's flow control), then collects its output.
    fn exec_feeding(
        &self,
        target: &SshTarget,
        command: &str,
        timeout: Duration,
        feed: impl FnOnce(&mut dyn Write) -> Result<(), DeployError>,
    ) -> Result<CommandOutput, DeployError> {
        let deadline = Instant::now() + timeout;
        let session = &self.session;
        session.set_blocking(true);
        session.set_timeout(timeout.as_millis().min(u32::MAX as u128) as u32);
        let mut channel = session
            .channel_session()
            .map_err(|e| failure(target, command, timeout, "open a channel", e))?;
        let result = self.run_on(&mut channel, target, command, (deadline, timeout), feed);
        if result.as_ref().is_err_and(DeployError::is_transport) {
            // Before the channel's drop closes it; the caller discards the session.
            self.ready_to_drop();
        }
        result
    }

    /// Readies the session for its drop after a transport failure. A connection that
    /// broke in the middle of a packet leaves libssh2 with the rest of that packet to
    /// send, and it sends nothing else first: closing a channel in blocking mode (on
    /// its drop, and again when the session is freed) would spin at full CPU until
    /// the session's timeout. So a dead connection is left non-blocking, where those
    /// drops give up at once (libssh2 then keeps that session's memory). A live one
    /// (a command that ran out of time) stays blocking: its channel closes properly
    /// once the command ends, within the session's timeout.
    fn ready_to_drop(&self) {
        use rustix::event::PollFlags;
        let seen = self.poll_socket(PollFlags::RDHUP, Duration::ZERO);
        if seen.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::RDHUP) {
            self.session.set_blocking(false);
        }
    }

    /// [`Live::exec_feeding`] on its open channel.
    fn run_on(
        &self,
        channel: &mut ssh2::Channel,
        target: &SshTarget,
        command: &str,
        (deadline, timeout): (Instant, Duration),
        feed: impl FnOnce(&mut dyn Write) -> Result<(), DeployError>,
    ) -> Result<CommandOutput, DeployError> {
        let out_of_time = || timed_out(target, command, timeout);
        let fail = |action: &str, e| failure(target, command, timeout, action, e);
        let session = &self.session;
        channel
            .exec(command)
            .map_err(|e| fail("run a command", e))?;
        let mut input = Input {
            channel,
            failed: None,
        };
        feed(&mut input).map_err(|e| match e {
            // The input's writer reports the channel's failure as a write error.
            DeployError::WriteFile { source, .. } => input_error(target, command, timeout, source),
            other => other,
        })?;
        channel
            .send_eof()
            .map_err(|e| fail("end a command's input", e))?;
        // Read both streams as data arrives: reading one to its end first could fill
        // the other's window and stall the command.
        session.set_blocking(false);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut buf = vec![0; 32 * 1024];
        let read = 'read: loop {
            let mut progressed = false;
            for (stream, out) in [(0, &mut stdout), (1, &mut stderr)] {
                match channel.stream(stream).read(&mut buf) {
                    Ok(0) => {}
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        progressed = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => break 'read Err(ssh_error(target, "read a command's output", e)),
                }
            }
            if channel.eof() {
                break Ok(());
            }
            if progressed {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(out_of_time());
            }
            self.wait_ready(left);
        };
        session.set_blocking(true);
        read?;
        channel
            .wait_close()
            .map_err(|e| fail("close a channel", e))?;
        let status = channel.exit_status().unwrap_or(-1);
        Ok(CommandOutput {
            status,
            stdout,
            stderr,
        })
    }

    /// Waits until the socket is ready in the direction libssh2 is blocked on, at
    /// most `left`.
    fn wait_ready(&self, left: Duration) {
        use rustix::event::PollFlags;
        use ssh2::BlockDirections;
        let flags = match self.session.block_directions() {
            BlockDirections::Inbound => PollFlags::IN,
            BlockDirections::Outbound => PollFlags::OUT,
            BlockDirections::Both | BlockDirections::None => PollFlags::IN | PollFlags::OUT,
        };
        self.poll_socket(flags, left.min(Duration::from_millis(500)));
    }

    /// Waits at most `wait` for `flags` on the session's socket; what it saw (empty
    /// when nothing or the poll failed; HUP and ERR are always reported).
    fn poll_socket(
        &self,
        flags: rustix::event::PollFlags,
        wait: Duration,
    ) -> rustix::event::PollFlags {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::from_borrowed_fd(self.socket.as_fd(), flags)];
        let timeout = Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(ready) if ready > 0 => fds[0].revents(),
            _ => PollFlags::empty(),
        }
    }
}

/// A command's first line, cut short, for messages.
fn short(command: &str) -> String {
    let first = command.lines().next().unwrap_or_default();
    let lines = command.lines().count();
    if first.chars().count() > 60 || lines > 1 {
        format!("{}…", first.chars().take(60).collect::<String>())
    } else {
        first.to_owned()
    }
}

/// Quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    // Only a NUL byte makes try_quote fail, and no path or argument holds one.
    shlex::try_quote(s).map_or_else(|_| "''".to_owned(), |q| q.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_plain_words_and_wraps_the_rest() {
        assert_eq!(quote("/opt/x-1.2/bin"), "/opt/x-1.2/bin");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert!(quote("it's").contains("it"));
    }
}
