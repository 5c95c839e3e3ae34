//! Finding the daemon, and starting one in the background when none runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{read_daemon_file, Client, ClientError};

/// How long `ensure_daemon` waits for a daemon it started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The harnessd program: beside this executable when it is there (a build tree or an
/// install), else `harnessd` from PATH.
pub fn harnessd_program() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("harnessd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("harnessd"))
}

/// Connects to the daemon of `state_dir`.
pub async fn connect(state_dir: &Path, client_name: &str) -> Result<Client, ClientError> {
    let info = read_daemon_file(state_dir)?;
    Client::connect(&info, client_name).await
}

/// Connects to the daemon of `state_dir`, starting one in the background first when
/// none answers. Racing callers end up with one daemon: the state-directory lock lets
/// only one start, and the others connect to it.
pub async fn ensure_daemon(
    state_dir: &Path,
    client_name: &str,
    mut progress: impl FnMut(&str),
) -> Result<Client, ClientError> {
    if let Ok(c) = connect(state_dir, client_name).await {
        return Ok(c);
    }
    // A daemon on another machine is not this client's to start.
    if read_daemon_file(state_dir).is_ok_and(|info| info.is_remote()) {
        return connect(state_dir, client_name).await;
    }
    progress(&format!("starting harnessd for {}", state_dir.display()));
    let mut child = spawn_daemon(state_dir)?;
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last_error = None;
    while Instant::now() < deadline {
        match connect(state_dir, client_name).await {
            Ok(c) => return Ok(c),
            Err(e) => last_error = Some(e),
        }
        // If ours exited because another daemon won the lock, keep waiting for the
        // winner's daemon.json; any other failure ends the wait with its log.
        if let Ok(Some(status)) = child.try_wait() {
            let lost_race = status.code() == Some(i32::from(protocol::EXIT_STATE_DIR_LOCKED));
            if !lost_race && read_daemon_file(state_dir).is_err() {
                let log =
                    std::fs::read_to_string(state_dir.join("harnessd.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(ClientError::Connect {
                    url: state_dir.display().to_string(),
                    message: format!(
                        "harnessd exited with {status}: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ),
                });
            }
        }
        smol::Timer::after(Duration::from_millis(20)).await;
    }
    Err(last_error.unwrap_or(ClientError::NoDaemon {
        dir: state_dir.to_owned(),
    }))
}

/// Starts `harnessd --state-dir DIR` detached: its own process group, output appended to
/// `DIR/harnessd.log`.
pub fn spawn_daemon(state_dir: &Path) -> Result<std::process::Child, ClientError> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(state_dir).map_err(|e| ClientError::Io {
        path: state_dir.to_owned(),
        source: e,
    })?;
    let log_path = state_dir.join("harnessd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| ClientError::Io {
            path: log_path.clone(),
            source: e,
        })?;
    let log2 = log.try_clone().map_err(|e| ClientError::Io {
        path: log_path.clone(),
        source: e,
    })?;
    let program = harnessd_program();
    #[allow(clippy::disallowed_methods)] // starting the daemon is the client's one spawn
    let child = Command::new(&program)
        .arg("--state-dir")
        .arg(state_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| ClientError::Io {
            path: program.clone(),
            source: e,
        })?;
    Ok(child)
}
