//! Health checks run by the daemon: tcp, http, command and script.
//!
//! Until a service is healthy for the first time, checks run fast (every 2 ms for the
//! first 200 ms, every 10 ms up to 2 s, then backing off to at most 250 ms or the
//! interval), so a stack comes up as soon as its services listen: a refused connect
//! costs microseconds. Once healthy, they run every `interval`. `retries` failures in a row (not counted during
//! `start_period`) make a service unhealthy. Becoming healthy resets the restart backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::config::{
    CheckKind, HealthCheck, DEFAULT_CHECK_INTERVAL_MS, DEFAULT_CHECK_RETRIES,
    DEFAULT_CHECK_TIMEOUT_MS,
};
use protocol::events::{EventKind, HealthChange};
use protocol::methods::{Health, ServiceState};

use crate::core::{Core, State};
use crate::env;

const FAST_MAX: Duration = Duration::from_millis(250);

/// Wait before the next check while a service has never been healthy, by time since
/// its monitor started.
fn startup_delay(since_start: Duration, interval: Duration) -> Duration {
    let delay = match since_start.as_millis() {
        0..200 => Duration::from_millis(2),
        200..2000 => Duration::from_millis(10),
        // 2 s and later: 10 ms doubling every 2 s of waiting.
        ms => Duration::from_millis(10) * 2u32.pow(((ms - 2000) / 2000).min(8) as u32 + 1),
    };
    delay.min(FAST_MAX).min(interval)
}

/// Connects to `addr` (an IP address and port, or a name and port) and lets go.
///
/// A connect to a local port is over (accepted or refused) by the time the system call
/// returns, though it says "in progress": one look at the socket then spares the
/// reactor's round trip (registration, a wake-up, another thread), which was most of a
/// check's cost while a stack starts and is on the path of every dependent's start.
async fn tcp_connect(addr: &str) -> std::io::Result<()> {
    use rustix::event::{PollFd, PollFlags};
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let Ok(target) = addr.parse::<std::net::SocketAddr>() else {
        return async_net::TcpStream::connect(addr).await.map(drop);
    };
    let socket = rustix::net::socket_with(
        match target {
            std::net::SocketAddr::V4(_) => AddressFamily::INET,
            std::net::SocketAddr::V6(_) => AddressFamily::INET6,
        },
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&socket, &target) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let mut fds = [PollFd::new(&socket, PollFlags::OUT)];
    let zero = rustix::time::Timespec::default();
    if rustix::event::poll(&mut fds, Some(&zero))? == 0 {
        // Not over yet (a remote address): wait for it with the reactor.
        let socket = smol::Async::new(std::net::TcpStream::from(socket))?;
        socket.writable().await?;
        return rustix::net::sockopt::socket_error(&socket)?.map_err(Into::into);
    }
    rustix::net::sockopt::socket_error(&socket)?.map_err(Into::into)
}

/// A check ready to run: what it is and how to run it, references resolved.
#[derive(Debug, Clone)]
pub enum Probe {
    /// Connect to this address.
    Tcp(String),
    /// GET this URL; healthy on `expected` or any 2xx.
    Http { url: String, expected: Option<u16> },
    /// Run a program inside the service's container (on the engine of `host`, the
    /// local one for `None`).
    InContainer {
        stack: String,
        host: Option<String>,
        container: String,
        argv: Vec<String>,
        expected: i32,
        env: Vec<(String, String)>,
    },
    /// Run a shell command on the service's SSH host, in its run directory and with
    /// its environment.
    OnHost {
        run: Box<crate::remote::RemoteRun>,
        command: String,
        shown: String,
        expected: i32,
    },
    /// Speak a kind of service's protocol at this address (a discovered service's
    /// default check).
    Kind {
        addr: std::net::SocketAddr,
        kind: String,
    },
    /// Run a program with the service's environment.
    Command {
        argv: Vec<String>,
        expected: i32,
        env: Vec<(String, String)>,
        cwd: Option<String>,
    },
}

impl Probe {
    /// How the check is shown in events.
    pub fn describe(&self) -> String {
        match self {
            Probe::Tcp(a) => format!("tcp {a}"),
            Probe::Kind { addr, kind } => format!("{kind} at {addr}"),
            Probe::Http { url, .. } => format!("http {url}"),
            Probe::Command { argv, .. } | Probe::InContainer { argv, .. } => {
                format!("command {}", argv.join(" "))
            }
            Probe::OnHost { shown, .. } => format!("command {shown}"),
        }
    }

    /// Runs the check once; Ok(output) when healthy, Err(output) when not.
    pub async fn run(&self, core: &Core, timeout: Duration) -> Result<String, String> {
        let attempt = async {
            match self {
                Probe::Tcp(addr) => tcp_connect(addr)
                    .await
                    .map(|()| format!("connected to {addr}"))
                    .map_err(|e| format!("cannot connect to {addr}: {e}")),
                Probe::Http { url, expected } => http_get(url, *expected).await,
                Probe::Kind { addr, kind } => crate::discovery::is_kind(*addr, kind, timeout).await,
                Probe::Command {
                    argv,
                    expected,
                    env,
                    cwd,
                } => {
                    let out = crate::exec::run_captured(argv, env, cwd.as_deref()).await?;
                    judge(out, *expected)
                }
                Probe::OnHost {
                    run,
                    command,
                    expected,
                    ..
                } => {
                    let ssh = core.ssh_for_run(run)?;
                    let out = ssh
                        .exec(command, b"", timeout)
                        .await
                        .map_err(|e| e.to_string())?;
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    judge((Some(out.status), text), *expected)
                }
                Probe::InContainer {
                    stack,
                    host,
                    container,
                    argv,
                    expected,
                    env,
                } => {
                    let engine = core.engine_for(stack, host.as_deref()).await?;
                    let out = crate::exec::run_in_container_captured(&engine, container, argv, env)
                        .await?;
                    judge(out, *expected)
                }
            }
        };
        let timer = async {
            smol::Timer::after(timeout).await;
            Err(format!("timed out after {} ms", timeout.as_millis()))
        };
        smol::future::or(attempt, timer).await
    }
}

/// A command check's verdict from its exit code and output.
fn judge((code, output): (Option<i32>, String), expected: i32) -> Result<String, String> {
    if code == Some(expected) {
        Ok(output)
    } else {
        Err(format!("exit code {code:?}: {output}"))
    }
}

/// Resolves a service's check into a probe; `None` when it has no check.
pub fn probe_for(
    st: &State,
    stack: &str,
    name: &str,
    run_dir_env: &std::path::Path,
) -> Result<Option<(Probe, HealthCheck)>, String> {
    let Some(stack_rec) = st.stack(stack) else {
        return Ok(None);
    };
    let Some(cfg) = stack_rec.config.services.get(name) else {
        return Ok(None);
    };
    let rec = stack_rec.services.get(name);
    let Some(hc) = cfg
        .health_check
        .clone()
        .or_else(|| package_health_check(rec?))
    else {
        return Ok(discovered_check(cfg, rec));
    };
    // The daemon checks a container at its bridge address and container port (see
    // `Place::Probe`), a process at 127.0.0.1 and its port.
    let container = rec.and_then(crate::containers::record_of);
    let (default_host, port) = match (&cfg.target, &container) {
        (protocol::config::Target::External(_) | protocol::config::Target::Discovered(_), _) => {
            match env::endpoint(stack_rec, name, &env::Place::Probe) {
                Some((host, port)) => (Some(host), Some(port)),
                None => (None, None),
            }
        }
        (_, Some(c)) if c.engine_host.is_some() => {
            match env::endpoint(stack_rec, name, &env::Place::Probe) {
                Some((host, port)) => (Some(host), Some(port)),
                None => (None, None),
            }
        }
        (_, Some(c)) => (
            c.ip.clone(),
            crate::containers::main_port(cfg).map(|m| m.container_port),
        ),
        (protocol::config::Target::RemoteLan(_) | protocol::config::Target::Wireguard(_), _) => {
            match env::endpoint(stack_rec, name, &env::Place::Probe) {
                Some((host, port)) => (Some(host), Some(port)),
                None => (None, None),
            }
        }
        _ => (Some("127.0.0.1".to_owned()), rec.and_then(|r| r.port)),
    };
    let place = env::Place::Probe;
    let expand = |s: &str| env::expand(st, stack, name, &place, s);
    let probe = match &hc.check {
        CheckKind::Tcp { host, port: p } => {
            let host = match host {
                Some(h) => expand(h)?,
                None => default_host
                    .ok_or_else(|| format!("service {name}: its container has no address yet"))?,
            };
            let port = p.or(port).ok_or_else(|| {
                format!("service {name}: a tcp check needs `port` on the check or the service")
            })?;
            Probe::Tcp(format!("{host}:{port}"))
        }
        CheckKind::Http {
            url,
            expected_status,
        } => Probe::Http {
            url: expand(url)?,
            expected: *expected_status,
        },
        CheckKind::Command {
            command,
            args,
            expected_exit_code,
        } => {
            // A command runs where the service runs, and sees addresses from there.
            let own = env::place_of(st, stack, name);
            let expand = |s: &str| env::expand(st, stack, name, &own, s);
            let argv = if args.is_empty() {
                vec!["/bin/sh".to_owned(), "-c".to_owned(), expand(command)?]
            } else {
                let mut v = vec![expand(command)?];
                for a in args {
                    v.push(expand(a)?);
                }
                v
            };
            command_probe(
                st,
                stack,
                name,
                argv,
                expected_exit_code.unwrap_or(0),
                run_dir_env,
            )?
        }
        CheckKind::Script { path, args } => {
            let own = env::place_of(st, stack, name);
            let mut argv = vec![env::expand(st, stack, name, &own, path)?];
            for a in args {
                argv.push(env::expand(st, stack, name, &own, a)?);
            }
            command_probe(st, stack, name, argv, 0, run_dir_env)?
        }
    };
    Ok(Some((probe, hc)))
}

/// A discovered service with no check of its own is checked by speaking its protocol
/// at the address where it was found, at the default interval.
fn discovered_check(
    cfg: &protocol::config::ServiceConfig,
    rec: Option<&registry::ServiceRecord>,
) -> Option<(Probe, HealthCheck)> {
    let protocol::config::Target::Discovered(t) = &cfg.target else {
        return None;
    };
    let Some(crate::run::Run::Discovered(d)) = crate::run::Run::of(rec?) else {
        return None;
    };
    let addr = d.discovered_at.parse().ok()?;
    let hc = HealthCheck {
        check: CheckKind::Tcp {
            host: None,
            port: None,
        },
        interval_ms: None,
        timeout_ms: None,
        retries: None,
        start_period_ms: None,
    };
    Some((
        Probe::Kind {
            addr,
            kind: t.kind.clone(),
        },
        hc,
    ))
}

/// A deployed package's `scripts/health.sh`, as the check of a service that has
/// none of its own.
fn package_health_check(rec: &registry::ServiceRecord) -> Option<HealthCheck> {
    let Some(crate::run::Run::Remote(run)) = crate::run::Run::of(rec) else {
        return None;
    };
    Some(HealthCheck {
        check: CheckKind::Script {
            path: run.health_script?,
            args: Vec::new(),
        },
        interval_ms: None,
        timeout_ms: None,
        retries: None,
        start_period_ms: None,
    })
}

fn command_probe(
    st: &State,
    stack: &str,
    name: &str,
    argv: Vec<String>,
    expected: i32,
    env_file: &std::path::Path,
) -> Result<Probe, String> {
    let target = st.stack(stack).map(|r| &r.config.services[name].target);
    if let Some(protocol::config::Target::RemoteLan(_) | protocol::config::Target::Wireguard(_)) =
        target
    {
        // On the host, the run's own env file gives the environment.
        let run = match st.service(stack, name).and_then(crate::run::Run::of) {
            Some(crate::run::Run::Remote(r)) => r,
            _ => return Err(format!("service {name}: it is not running on its host")),
        };
        let shown = argv.join(" ");
        let command = crate::remote::on_host_command(&run.record.remote_dir, &argv);
        return Ok(Probe::OnHost {
            run: Box::new(run),
            command,
            shown,
            expected,
        });
    }
    let place = env::place_of(st, stack, name);
    let env: Vec<(String, String)> = env::service_env(st, stack, name, &place, env_file)?
        .into_iter()
        .collect();
    match target {
        Some(protocol::config::Target::Docker(_)) => {
            let container = st
                .service(stack, name)
                .and_then(crate::containers::record_of)
                .ok_or_else(|| format!("service {name}: its container is not running"))?;
            Ok(Probe::InContainer {
                stack: stack.to_owned(),
                host: container.engine_host,
                container: container.container_id,
                argv,
                expected,
                env,
            })
        }
        Some(protocol::config::Target::Process(p)) => Ok(Probe::Command {
            argv,
            expected,
            env,
            cwd: p.working_dir.clone(),
        }),
        _ => Ok(Probe::Command {
            argv,
            expected,
            env,
            cwd: None,
        }),
    }
}

/// Runs a service's checks for the lifetime of run `generation`.
pub async fn monitor(core: Arc<Core>, stack: String, name: String, generation: u64) {
    let env_file = core.env_file(&stack, &name);
    let prepared = core.read(|st| probe_for(st, &stack, &name, &env_file));
    let (probe, hc) = match prepared {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(reason) => {
            tracing::warn!("{stack}/{name}: {reason}");
            return;
        }
    };
    let interval = Duration::from_millis(hc.interval_ms.unwrap_or(DEFAULT_CHECK_INTERVAL_MS));
    let timeout = Duration::from_millis(hc.timeout_ms.unwrap_or(DEFAULT_CHECK_TIMEOUT_MS));
    let retries = hc.retries.unwrap_or(DEFAULT_CHECK_RETRIES).max(1);
    let start_period = Duration::from_millis(hc.start_period_ms.unwrap_or(0));
    let started = Instant::now();
    let check = probe.describe();
    let mut was_healthy = false;
    let mut failures = 0u32;
    loop {
        let outcome = probe.run(&core, timeout).await;
        let status = match &outcome {
            Ok(_) => {
                failures = 0;
                Some(Health::Healthy)
            }
            Err(_) if started.elapsed() < start_period => None,
            Err(_) => {
                failures += 1;
                (failures >= retries).then_some(Health::Unhealthy)
            }
        };
        let output = match &outcome {
            Ok(o) | Err(o) => truncate(o, 512),
        };
        // Most checks change nothing: look first, so they cost neither a save nor events.
        let look = core.read(|st| {
            let is_current = st
                .runtime
                .get(&(stack.clone(), name.clone()))
                .is_some_and(|r| r.generation == generation);
            let rec = st.service(&stack, &name).filter(|_| is_current)?;
            let changes =
                rec.state == ServiceState::Running && status.is_some_and(|s| s != rec.health);
            Some((rec.state, changes))
        });
        let still_current = match look {
            None => false,
            Some((state, false)) => matches!(state, ServiceState::Running | ServiceState::Starting),
            Some((_, true)) => core.update(|st, ch| {
                let is_current = st
                    .runtime
                    .get(&(stack.clone(), name.clone()))
                    .is_some_and(|r| r.generation == generation);
                let Some(rec) = st.service_mut(&stack, &name).filter(|_| is_current) else {
                    return false;
                };
                if let Some(status) = status.filter(|s| *s != rec.health) {
                    rec.health = status;
                    if status == Health::Healthy {
                        // Recovered: the next crash starts the backoff from the beginning.
                        rec.restarts = 0;
                    }
                    ch.push(EventKind::ServiceHealth(HealthChange {
                        stack: stack.clone(),
                        name: name.clone(),
                        status,
                        check: check.clone(),
                        output: output.clone(),
                    }));
                    if status == Health::Healthy {
                        st.runtime(&stack, &name).healthy_once = true;
                    }
                }
                true
            }),
        };
        if !still_current {
            return;
        }
        was_healthy |= outcome.is_ok();
        let wait = if was_healthy {
            interval
        } else {
            startup_delay(started.elapsed(), interval)
        };
        smol::Timer::after(wait).await;
    }
}

/// GETs an `http://` URL; healthy on `expected`, else on any 2xx.
async fn http_get(url: &str, expected: Option<u16>) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported by http checks"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let head = crate::http1::get(&addr, authority, path, url).await?;
    let ok = match expected {
        Some(e) => head.code == e,
        None => (200..300).contains(&head.code),
    };
    if ok {
        Ok(head.status_line)
    } else {
        Err(format!("{url}: {}", head.status_line))
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.trim_end().to_owned();
    }
    format!("{}…", &s[..s.floor_char_boundary(max)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_checks_tell_a_listening_port_from_a_closed_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        smol::block_on(async {
            tcp_connect(&format!("127.0.0.1:{port}")).await.unwrap();
            // A name goes through the resolver, then the same connect.
            tcp_connect(&format!("localhost:{port}")).await.unwrap();
            drop(listener);
            let refused = tcp_connect(&format!("127.0.0.1:{port}")).await.unwrap_err();
            assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        });
    }

    #[test]
    fn startup_checks_are_fast_then_back_off() {
        let long = Duration::from_secs(10);
        assert_eq!(
            startup_delay(Duration::ZERO, long),
            Duration::from_millis(2)
        );
        assert_eq!(
            startup_delay(Duration::from_millis(500), long),
            Duration::from_millis(10)
        );
        assert_eq!(
            startup_delay(Duration::from_millis(2500), long),
            Duration::from_millis(20)
        );
        assert_eq!(startup_delay(Duration::from_secs(60), long), FAST_MAX);
        assert_eq!(
            startup_delay(Duration::ZERO, Duration::from_millis(1)),
            Duration::from_millis(1)
        );
    }
}
