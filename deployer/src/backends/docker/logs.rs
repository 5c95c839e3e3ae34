//! A container's output, copied from the engine into the service's log file.
//!
//! The engine keeps a container's output, so nothing is lost while nobody copies it:
//! a copier started after a daemon restart asks for the lines since the last one in
//! the file (by the engine's own timestamp) and skips those it already has.

use std::path::Path;
use std::time::SystemTime;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use futures_util::StreamExt;

use super::{engine_error, on_tokio, Engine};
use crate::logs::{tail, LogWriter};
use crate::DeployError;

/// Splits an engine log frame, `"<RFC 3339 nanos> <text>\n"`, into its time and text.
fn split_frame(frame: &[u8]) -> Option<(SystemTime, &[u8])> {
    let frame = frame.strip_suffix(b"\n").unwrap_or(frame);
    let space = frame.iter().position(|b| *b == b' ')?;
    let stamp = std::str::from_utf8(&frame[..space]).ok()?;
    let time = humantime::parse_rfc3339_weak(stamp).ok()?;
    Some((time, &frame[space + 1..]))
}

impl Engine {
    /// Appends a container's output to `log_path` until the container stops (or the
    /// engine goes away), continuing after the newest line already in the file.
    pub async fn copy_logs(
        &self,
        id: &str,
        log_path: &Path,
        max_bytes: u64,
        keep: usize,
    ) -> Result<(), DeployError> {
        let path = log_path.to_owned();
        let (mut writer, newest) = smol::unblock(move || {
            let newest = tail(&path, 1)?
                .pop()
                .and_then(|e| humantime::parse_rfc3339_weak(&e.time).ok());
            Ok::<_, DeployError>((LogWriter::open(&path, max_bytes, keep)?, newest))
        })
        .await?;
        let since = newest
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i32);
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            timestamps: true,
            since,
            ..Default::default()
        };
        let docker = &self.docker;
        on_tokio(async {
            let mut frames = docker.logs(id, Some(options));
            while let Some(frame) = frames.next().await {
                let (stream, bytes) =
                    match frame.map_err(|e| engine_error("follow logs of", id, e))? {
                        LogOutput::StdOut { message } => ("stdout", message),
                        LogOutput::StdErr { message } | LogOutput::Console { message } => {
                            ("stderr", message)
                        }
                        LogOutput::StdIn { .. } => continue,
                    };
                let Some((time, line)) = split_frame(&bytes) else {
                    continue;
                };
                if newest.is_some_and(|n| time <= n) {
                    continue;
                }
                let stamp = humantime::format_rfc3339_nanos(time).to_string();
                writer
                    .write_at(stream, line, stamp)
                    .map_err(|source| DeployError::WriteLog {
                        path: log_path.to_owned(),
                        source,
                    })?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_into_engine_time_and_text() {
        let (time, text) = split_frame(b"2024-05-01T10:00:00.123456789Z hello world\n").unwrap();
        assert_eq!(text, b"hello world");
        assert_eq!(
            humantime::format_rfc3339_nanos(time).to_string(),
            "2024-05-01T10:00:00.123456789Z"
        );
        assert!(split_frame(b"no-timestamp").is_none());
    }
}
