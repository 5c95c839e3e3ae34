//! Services on SSH hosts: started detached, watched, stopped and their output copied,
//! all through short commands on the host's one session ([`SshHost`]).
//!
//! A run lives in a directory of its own on the host (`dir`): `env` (the environment,
//! 0600), `pid` (the run's process group), `out.log` and `err.log` (its output, kept
//! across runs so that what a stop script printed is copied by the next copier) and
//! `exit` (its exit status, written when it ends on its own). The service runs under
//! `setsid sh -c …`, so it survives the SSH session and the daemon, and its process
//! group is its session: stopping signals the whole group. The wrapper shell carries
//! `HARNESS_INSTANCE` in its environment, so a recycled pid is never mistaken for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::process::ExitStatus;
use super::ssh::{quote, SshHost};
use crate::logs::LogWriter;
use crate::DeployError;

/// How long a short remote command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of each stream copied per poll.
const CHUNK: u64 = 256 * 1024;

/// How often output is copied while the service is quiet.
const LOG_POLL: Duration = Duration::from_millis(500);

/// The shell that runs a service: loads its environment, runs it with its output in
/// the run directory and records how it ended. `$0` is the working directory.
const WRAPPER: &str = r#"d="$HARNESS_RUN_DIR"; set -a; . "$d/env"; set +a; cd "$0" || exit 126; "$@" >>"$d/out.log" 2>>"$d/err.log" </dev/null; echo $? > "$d/exit.tmp"; mv "$d/exit.tmp" "$d/exit""#;

/// What to start on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpec {
    /// The run's directory on the host.
    pub dir: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment (written to `dir/env`, 0600).
    pub env: BTreeMap<String, String>,
    /// Working directory (default `dir`).
    pub cwd: Option<String>,
    /// `HARNESS_INSTANCE` marker of the run.
    pub instance: String,
    /// A command run first when stopping (a package's `stop.sh`).
    pub stop_script: Option<String>,
    /// Lifecycle `systemd`: the unit's name. The unit is written to the run directory
    /// and checked with `systemd-analyze verify`; where systemd runs the host
    /// (/run/systemd/system), it is installed and started with `systemctl`; elsewhere
    /// the run falls back to the harness's own supervision.
    pub systemd_unit: Option<String>,
}

/// A service started on a host: what the registry records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRecord {
    /// The host's name in the config (or its address when given directly).
    pub host: String,
    /// The host's address.
    pub address: String,
    /// The run's directory on the host.
    pub remote_dir: String,
    /// The pid of the run's wrapper shell, which leads its process group.
    pub remote_pid: u32,
    /// `HARNESS_INSTANCE` marker of the run.
    pub instance: String,
    /// A command run first when stopping (a package's `stop.sh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_script: Option<String>,
    /// The systemd unit that runs it, when systemd does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// What a run is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteState {
    /// It runs.
    Running,
    /// It ended on its own.
    Exited(ExitStatus),
    /// It is gone without a status (killed, or the host was reset).
    Gone,
}

/// The shell script that starts `spec` detached (its environment file comes on
/// standard input); it prints the run's pid.
pub fn launch_script(spec: &RemoteSpec) -> String {
    let dir = quote(&spec.dir);
    let program = spec.argv.first().map(String::as_str).unwrap_or_default();
    let argv: Vec<String> = spec.argv.iter().map(|a| quote(a)).collect();
    let cwd = quote(spec.cwd.as_deref().unwrap_or(&spec.dir));
    // The program is looked up first so a missing one is an error of `up`, not an
    // exit a moment later. The script returns once the wrapper carries its marker:
    // until the forked shell has exec'd, /proc shows the parent's environment, and a
    // state check in that moment would take the run for gone.
    let systemd = match &spec.systemd_unit {
        Some(unit) => format!(
            "cat > {u} <<'HARNESS_UNIT_END'\n{text}HARNESS_UNIT_END\n\
             if command -v systemd-analyze >/dev/null 2>&1; then\n\
               out=$(systemd-analyze verify \"$PWD\"/{u} 2>&1) || {{ echo \"systemd-analyze verify {u}: $out\" >&2; exit 1; }}\n\
               [ -z \"$out\" ] || {{ echo \"systemd-analyze verify {u}: $out\" >&2; exit 1; }}\n\
             fi\n\
             if [ -d /run/systemd/system ]; then\n\
               cp {u} /etc/systemd/system/{u} && systemctl daemon-reload && systemctl restart {u}\n\
               echo \"systemd $(systemctl show -p MainPID --value {u})\"\n\
               exit 0\n\
             fi\n\
             echo 'no systemd runs this host (/run/systemd/system is missing): {u} was verified; the harness supervises the service itself' >&2\n",
            u = quote(unit),
            text = unit_text(spec, unit),
        ),
        None => String::new(),
    };
    format!(
        "set -e\n\
         mkdir -p {dir} && cd {dir}\n\
         rm -f exit pid\n\
         (umask 077; cat > env)\n\
         command -v {prog} >/dev/null 2>&1 || {{ echo \"{shown}: not found on the host (or not executable)\" >&2; exit 127; }}\n\
         {systemd}\
         HARNESS_INSTANCE={marker} HARNESS_RUN_DIR=\"$PWD\" setsid sh -c {wrapper} {cwd} {argv} >/dev/null 2>&1 </dev/null &\n\
         p=$!\n\
         echo $p > pid\n\
         n=0\n\
         while ! tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null | grep -qxF HARNESS_INSTANCE={marker}; do\n\
           n=$((n+1)); [ $n -gt 200 ] && break; sleep 0.01\n\
         done\n\
         echo $p\n",
        prog = quote(program),
        wrapper = quote(WRAPPER),
        shown = program.replace(['"', '\\', '$', '`'], "_"),
        marker = quote(&spec.instance),
        argv = argv.join(" "),
    )
}

/// Starts `spec` on the host, detached; returns its record.
pub async fn launch(
    ssh: &SshHost,
    host: &str,
    spec: &RemoteSpec,
) -> Result<RemoteRecord, DeployError> {
    let env: String = spec
        .env
        .iter()
        .map(|(k, v)| format!("{k}={}\n", quote(v)))
        .collect();
    let script = launch_script(spec);
    let out = ssh
        .check(
            "start the service",
            &script,
            env.as_bytes(),
            COMMAND_TIMEOUT,
        )
        .await?;
    // The last line is the pid, after `systemd` when systemd runs it.
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default().trim();
    let (unit, pid) = match last.strip_prefix("systemd ") {
        Some(pid) => (spec.systemd_unit.clone(), pid),
        None => (None, last),
    };
    let pid = pid.parse().map_err(|_| DeployError::RemoteCommand {
        host: ssh.target().address.clone(),
        what: "start the service".into(),
        status: out.status,
        message: format!("no pid in {text:?}"),
    })?;
    Ok(RemoteRecord {
        host: host.to_owned(),
        address: ssh.target().address.clone(),
        remote_dir: spec.dir.clone(),
        remote_pid: pid,
        instance: spec.instance.clone(),
        stop_script: spec.stop_script.clone(),
        unit,
    })
}

/// A word of a systemd command line: quoted, with `$` and `%` kept literal.
fn systemd_word(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('$', "$$")
        .replace('%', "%%");
    format!("\"{escaped}\"")
}

/// The unit that runs `spec` under systemd (lifecycle `systemd`).
pub fn unit_text(spec: &RemoteSpec, unit: &str) -> String {
    let argv: Vec<String> = spec.argv.iter().map(|a| systemd_word(a)).collect();
    let dir = &spec.dir;
    let cwd = spec.cwd.as_deref().unwrap_or(dir);
    let stop = spec
        .stop_script
        .as_ref()
        .map(|s| format!("ExecStop=/bin/sh -c {}\n", systemd_word(s)))
        .unwrap_or_default();
    format!(
        "# {unit}: written by harness; the harness restarts it by its own policy.\n\
         [Unit]\n\
         Description=harness service {instance}\n\
         \n\
         [Service]\n\
         Type=simple\n\
         Environment={marker}\n\
         EnvironmentFile={dir}/env\n\
         WorkingDirectory={cwd}\n\
         ExecStart={argv}\n\
         {stop}\
         KillMode=control-group\n\
         Restart=no\n\
         StandardOutput=append:{dir}/out.log\n\
         StandardError=append:{dir}/err.log\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        instance = spec.instance,
        marker = systemd_word(&format!("HARNESS_INSTANCE={}", spec.instance)),
        argv = argv.join(" "),
    )
}

/// Shell functions about a run: `ours` (its wrapper shell still runs), `group` (a
/// process of its group runs; zombies do not count, as a host's init may take its
/// time to reap them) and `alive` (its wrapper runs, or it ended with 0 leaving its
/// group running: a `start.sh` that starts the service in the background and exits).
fn run_functions(rec: &RemoteRecord) -> String {
    format!(
        "p={pid}\n\
         ours() {{ tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null | grep -qxF HARNESS_INSTANCE={marker}; }}\n\
         group() {{ ps -e -o pgid=,stat= 2>/dev/null | awk -v p=$p '$1 == p && $2 !~ /^Z/ {{ f = 1 }} END {{ exit !f }}'; }}\n\
         alive() {{ ours || {{ [ \"$(cat {dir}/exit 2>/dev/null)\" = 0 ] && group; }}; }}\n",
        pid = rec.remote_pid,
        marker = quote(&rec.instance),
        dir = quote(&rec.remote_dir),
    )
}

/// Whether the run is alive, ended (and how), or gone.
pub async fn state(ssh: &SshHost, rec: &RemoteRecord) -> Result<RemoteState, DeployError> {
    let script = match &rec.unit {
        Some(unit) => format!(
            "if systemctl is-active --quiet {u}; then echo running; \
             else echo \"exit $(systemctl show -p ExecMainStatus --value {u})\"; fi\n",
            u = quote(unit)
        ),
        None => format!(
        "{functions}\
         if alive; then echo running; elif [ -f {dir}/exit ]; then echo \"exit $(cat {dir}/exit)\"; else echo gone; fi\n",
            functions = run_functions(rec),
            dir = quote(&rec.remote_dir),
        ),
    };
    let out = ssh
        .check("check the service", &script, b"", COMMAND_TIMEOUT)
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    match text.strip_prefix("exit ") {
        Some(code) => Ok(RemoteState::Exited(exit_status(code.trim().parse().ok()))),
        None if text == "running" => Ok(RemoteState::Running),
        None if text == "gone" => Ok(RemoteState::Gone),
        // A session cut while the check ran says nothing (or half of it): that is not
        // news about the run, only about the connection.
        None => Err(DeployError::RemoteCommand {
            host: rec.address.clone(),
            what: "check the service".to_owned(),
            status: out.status,
            message: format!("unexpected answer {text:?} (the connection was cut?)"),
        }),
    }
}

/// A shell's `$?`: above 128 means killed by signal `$? - 128`.
fn exit_status(code: Option<i32>) -> ExitStatus {
    match code {
        Some(c) if c > 128 => ExitStatus {
            code: None,
            signal: Some(c - 128),
            error: None,
        },
        code => ExitStatus {
            code,
            signal: None,
            error: code.is_none().then(|| "unreadable exit status".to_owned()),
        },
    }
}

/// Polls until the run ends; returns how. While the host cannot be reached it keeps
/// trying (the run may well be fine; its health check tells).
pub async fn wait_exit(ssh: &SshHost, rec: &RemoteRecord, every: Duration) -> ExitStatus {
    loop {
        match state(ssh, rec).await {
            Ok(RemoteState::Running) => {}
            Ok(RemoteState::Exited(status)) => return status,
            Ok(RemoteState::Gone) => {
                return ExitStatus {
                    code: None,
                    signal: None,
                    error: Some(format!(
                        "its process on {} is gone and left no exit status",
                        rec.address
                    )),
                }
            }
            Err(e) => tracing::debug!("{}: {e}", rec.address),
        }
        smol::Timer::after(every).await;
    }
}

/// Stops the run: its stop script when it has one, then `signal` to its process
/// group, then SIGKILL after `timeout`.
pub async fn stop(
    ssh: &SshHost,
    rec: &RemoteRecord,
    signal: &str,
    timeout: Duration,
) -> Result<(), DeployError> {
    let signal = signal.trim_start_matches("SIG");
    let tenths = timeout.as_millis() / 100;
    let stop_script = rec
        .stop_script
        .as_deref()
        .map(|s| {
            format!(
                "({s}) >>{}/out.log 2>&1 </dev/null || true\n",
                quote(&rec.remote_dir)
            )
        })
        .unwrap_or_default();
    if let Some(unit) = &rec.unit {
        let script = format!("systemctl stop {}", quote(unit));
        return ssh
            .check("stop the service", &script, b"", timeout + COMMAND_TIMEOUT)
            .await
            .map(|_| ());
    }
    let script = format!(
        "{functions}\
         alive || exit 0\n\
         {stop_script}\
         kill -s {signal} -- -$p 2>/dev/null || exit 0\n\
         n=0\n\
         while group; do\n\
           if [ $n -ge {tenths} ]; then kill -s KILL -- -$p 2>/dev/null; break; fi\n\
           sleep 0.1; n=$((n+1))\n\
         done\n",
        functions = run_functions(rec),
        signal = quote(signal),
    );
    ssh.check("stop the service", &script, b"", timeout + COMMAND_TIMEOUT)
        .await
        .map(|_| ())
}

/// Removes the run's directory from the host.
pub async fn remove_dir(ssh: &SshHost, dir: &str) -> Result<(), DeployError> {
    ssh.check(
        "remove the run directory",
        &format!("rm -rf {}", quote(dir)),
        b"",
        COMMAND_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// Where the copier keeps how far it has read the host's files.
fn offsets_path(log_path: &Path) -> PathBuf {
    let mut p = log_path.as_os_str().to_owned();
    p.push(".remote");
    PathBuf::from(p)
}

/// Copies the run's output into the service's log file until cancelled (drop the
/// future), continuing where the last copier stopped.
pub async fn copy_logs(
    ssh: &SshHost,
    rec: &RemoteRecord,
    log_path: &Path,
    max_bytes: u64,
    keep: usize,
) -> Result<(), DeployError> {
    let path = log_path.to_owned();
    let state_path = offsets_path(log_path);
    let mut writer = {
        let path = path.clone();
        smol::unblock(move || LogWriter::open(&path, max_bytes, keep)).await?
    };
    let mut offsets: [u64; 2] = std::fs::read_to_string(&state_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut partial: [Vec<u8>; 2] = Default::default();
    loop {
        // A file shorter than what was copied was made again (the run directory was
        // removed, e.g. by `down --purge`): copy it from its start. The script says
        // where each chunk starts.
        let script = format!(
            "cd {dir} 2>/dev/null || {{ echo 0 0 0 0; exit 0; }}\n\
             chunk() {{ s=$(wc -c < $1 2>/dev/null || echo 0); o=$2; [ \"$s\" -ge \"$o\" ] || o=0; \
             tail -c +$((o+1)) $1 2>/dev/null | head -c {CHUNK} > $3 || true; echo $o; }}\n\
             o1=$(chunk out.log {o1} .chunk1); o2=$(chunk err.log {o2} .chunk2)\n\
             echo $o1 $o2 $(wc -c < .chunk1) $(wc -c < .chunk2); cat .chunk1 .chunk2\n",
            dir = quote(&rec.remote_dir),
            o1 = offsets[0],
            o2 = offsets[1],
        );
        let got = match ssh.exec(&script, b"", COMMAND_TIMEOUT).await {
            Ok(out) if out.status == 0 => split_chunks(&out.stdout),
            Ok(_) | Err(_) => None,
        };
        let mut full = false;
        if let Some((starts, chunks)) = got {
            for (i, start) in starts.into_iter().enumerate() {
                if start != offsets[i] {
                    offsets[i] = start;
                    partial[i].clear();
                }
            }
            for (i, chunk) in chunks.iter().enumerate() {
                full |= chunk.len() as u64 >= CHUNK;
                offsets[i] += chunk.len() as u64;
                partial[i].extend_from_slice(chunk);
                let stream = if i == 0 { "stdout" } else { "stderr" };
                write_lines(&mut writer, stream, &mut partial[i], &path)?;
            }
            // Lines reach the log before the offsets that skip them are saved: a
            // crash in between repeats a chunk rather than loses one.
            let saved: [u64; 2] = [
                offsets[0] - partial[0].len() as u64,
                offsets[1] - partial[1].len() as u64,
            ];
            std::fs::write(
                &state_path,
                serde_json::to_string(&saved).unwrap_or_default(),
            )
            .map_err(|source| DeployError::WriteLog {
                path: state_path.clone(),
                source,
            })?;
        }
        if !full {
            smol::Timer::after(LOG_POLL).await;
        }
    }
}

/// `"START1 START2 N1 N2\n<N1 bytes><N2 bytes>"` into where each chunk starts in its
/// file and the two chunks.
fn split_chunks(out: &[u8]) -> Option<([u64; 2], [Vec<u8>; 2])> {
    let nl = out.iter().position(|b| *b == b'\n')?;
    let numbers: Vec<u64> = std::str::from_utf8(&out[..nl])
        .ok()?
        .split_whitespace()
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let [start1, start2, len1, len2] = numbers[..] else {
        return None;
    };
    let rest = &out[nl + 1..];
    let sizes = [len1 as usize, len2 as usize];
    if rest.len() < sizes[0] + sizes[1] {
        return None;
    }
    Some((
        [start1, start2],
        [
            rest[..sizes[0]].to_vec(),
            rest[sizes[0]..sizes[0] + sizes[1]].to_vec(),
        ],
    ))
}

/// Writes the complete lines of `buf` (and an over-long partial one) to the log,
/// keeping the unfinished rest in `buf`.
fn write_lines(
    writer: &mut LogWriter,
    stream: &str,
    buf: &mut Vec<u8>,
    path: &Path,
) -> Result<(), DeployError> {
    let err = |source| DeployError::WriteLog {
        path: path.to_owned(),
        source,
    };
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
        writer.write(stream, &buf[start..start + nl]).map_err(err)?;
        start += nl + 1;
    }
    while buf.len() - start >= crate::logs::MAX_LINE {
        let end = start + crate::logs::MAX_LINE;
        writer.write(stream, &buf[start..end]).map_err(err)?;
        start = end;
    }
    buf.drain(..start);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_by_their_sizes() {
        let (starts, [a, b]) = split_chunks(b"10 0 3 2\nabcde").unwrap();
        assert_eq!(starts, [10, 0]);
        assert_eq!((a.as_slice(), b.as_slice()), (&b"abc"[..], &b"de"[..]));
        assert!(split_chunks(b"0 0 3 2\nabc").is_none());
        assert!(split_chunks(b"x\n").is_none());
        assert!(split_chunks(b"1 2 3\n").is_none());
    }

    #[test]
    fn shell_status_above_128_is_a_signal() {
        assert_eq!(exit_status(Some(143)).signal, Some(15));
        assert_eq!(exit_status(Some(3)).code, Some(3));
        assert!(exit_status(None).error.is_some());
    }
}
