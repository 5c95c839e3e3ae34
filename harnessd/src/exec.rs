//! Running one-off commands in a service's context: `service.exec` (output streamed) and
//! command/script health checks (output captured), on the host or in a container.

use std::process::Stdio;

use futures_lite::AsyncReadExt;
use protocol::methods::ExecOutput;
use smol::process::Command;

/// Most output a health check keeps.
const CAPTURE_LIMIT: usize = 4096;

fn command(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
) -> Result<Command, String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    Ok(cmd)
}

/// Runs a command inside a running container to completion; returns its exit code
/// and the start of its output.
pub async fn run_in_container_captured(
    engine: &deployer::docker::Engine,
    container: &str,
    argv: &[String],
    env: &[(String, String)],
) -> Result<(Option<i32>, String), String> {
    let (tx, rx) = async_channel::bounded::<ExecOutput>(16);
    let collect = async {
        let mut text = String::new();
        while let Ok(chunk) = rx.recv().await {
            if text.len() < CAPTURE_LIMIT {
                text.push_str(&chunk.data);
            }
        }
        text.truncate(text.floor_char_boundary(CAPTURE_LIMIT));
        text
    };
    let run = async {
        let code = engine.exec(container, argv, env, tx).await;
        code.map_err(|e| e.to_string())
    };
    let (code, text) = futures_lite::future::zip(run, collect).await;
    Ok((code?, text))
}

/// Runs a command to completion; returns its exit code and the start of its output.
pub async fn run_captured(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
) -> Result<(Option<i32>, String), String> {
    let out = command(argv, env, cwd)?
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text.truncate(text.floor_char_boundary(CAPTURE_LIMIT));
    Ok((out.status.code(), text))
}

/// Runs a command, passing each chunk of output to `sink` as it comes; returns the exit
/// code and signal.
pub async fn run_streamed(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    sink: async_channel::Sender<ExecOutput>,
) -> Result<(Option<i32>, Option<i32>), String> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = command(argv, env, cwd)?
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let pump = |mut pipe: Box<dyn futures_lite::AsyncRead + Unpin + Send>, stream: &'static str| {
        let sink = sink.clone();
        async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let data = String::from_utf8_lossy(&buf[..n]).into_owned();
                if sink
                    .send(ExecOutput {
                        stream: stream.to_owned(),
                        data,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    };
    let stdout = child
        .stdout
        .take()
        .map(|p| Box::new(p) as Box<dyn futures_lite::AsyncRead + Unpin + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|p| Box::new(p) as Box<dyn futures_lite::AsyncRead + Unpin + Send>);
    let out_task = async {
        if let Some(p) = stdout {
            pump(p, "stdout").await;
        }
    };
    let err_task = async {
        if let Some(p) = stderr {
            pump(p, "stderr").await;
        }
    };
    futures_lite::future::zip(out_task, err_task).await;
    let status = child
        .status()
        .await
        .map_err(|e| format!("waiting for {}: {e}", argv[0]))?;
    Ok((status.code(), status.signal()))
}
