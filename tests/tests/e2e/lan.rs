//! LAN hosts over SSH: the test bed's real sshd hosts in network namespaces.

use std::path::PathBuf;
use std::time::Duration;

use deployer::ssh::{HostKeyPolicy, SshHost, SshTarget};
use protocol::methods::{Health, ServiceState};
use tests::testbed::TestBed;
use tests::TestDaemon;

use crate::support::*;

#[test]
fn the_test_bed_hosts_answer_ssh_with_their_own_keys() {
    let bed = TestBed::new(2);
    for h in &bed.hosts {
        let out = std::process::Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", bed.known_hosts.display()))
            .arg("-i")
            .arg(&bed.user_key)
            .arg(format!("root@{}", h.address))
            .arg("echo $HOME; ip -4 -o addr show dev eth0")
            .output()
            .expect("ssh");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&h.address), "{text}");
        // Sessions have the host's own HOME, so the machine's shell start-up files
        // (root's .bashrc) do not run.
        assert_eq!(text.lines().next(), Some(h.dir.to_str().unwrap()), "{text}");
    }
}

fn target(bed: &TestBed, i: usize, known_hosts: Vec<PathBuf>, policy: HostKeyPolicy) -> SshTarget {
    SshTarget {
        address: bed.hosts[i].address.clone(),
        port: 22,
        user: "root".into(),
        key: Some(bed.user_key.clone()),
        known_hosts,
        policy,
        own_known_hosts: bed.dir.join("own_known_hosts"),
        connect_timeout: Duration::from_secs(5),
    }
}

#[test]
fn ssh_runs_commands_and_streams_input_over_one_session() {
    let bed = TestBed::new(1);
    let host = SshHost::new(target(
        &bed,
        0,
        vec![bed.known_hosts.clone()],
        HostKeyPolicy::Strict,
    ));
    smol::block_on(async {
        let out = host
            .exec(
                "cat; echo out; echo err >&2; exit 7",
                b"in\n",
                Duration::from_secs(10),
            )
            .await
            .expect("exec");
        assert_eq!(out.status, 7);
        assert_eq!(out.stdout, b"in\nout\n");
        assert_eq!(out.stderr, b"err\n");
        // A command's output larger than the channel window, on both streams.
        let out = host
            .exec(
                "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2",
                b"",
                Duration::from_secs(20),
            )
            .await
            .expect("big output");
        assert_eq!((out.stdout.len(), out.stderr.len()), (3_000_000, 3_000_000));
        let err = host
            .exec("sleep 5", b"", Duration::from_millis(300))
            .await
            .expect_err("times out");
        assert!(err.to_string().contains("did not finish within"), "{err}");
        // The session is made again after the timeout; input is streamed.
        let data: Vec<u8> = (0..2_500_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let remote = bed.hosts[0].dir.join("uploaded");
        let payload = data.clone();
        let (out, sent) = host
            .exec_with_input(
                &format!("cat > {}", remote.display()),
                move |w| {
                    w.write_all(&payload).unwrap();
                    Ok(payload.len() as u64)
                },
                Duration::from_secs(20),
            )
            .await
            .expect("streamed input");
        assert_eq!((out.status, sent), (0, data.len() as u64));
        assert_eq!(std::fs::read(&remote).unwrap(), data);
    });
}

/// A connection that dies while a command's input is half sent fails that command at
/// once (libssh2, left with part of a packet to send, used to spin until the
/// command's timeout), and the next command connects again.
#[test]
fn a_connection_lost_in_the_middle_of_a_packet_fails_at_once_and_the_next_command_reconnects() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let mut bed = TestBed::new(1);
    // Small receive buffers on the host, so the connection's buffers fill before the
    // channel's window (2 MB) runs out, and a write stops in the middle of a packet.
    bed.sh(0, "sysctl -q -w net.ipv4.tcp_rmem='4096 16384 65536'");
    let host = SshHost::new(target(
        &bed,
        0,
        vec![bed.known_hosts.clone()],
        HostKeyPolicy::Strict,
    ));
    smol::block_on(host.connect()).expect("connect");
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let feeding = {
        let (host, written) = (host.clone(), written.clone());
        std::thread::spawn(move || {
            smol::block_on(host.exec_with_input(
                "cat > /dev/null",
                move |w| {
                    let chunk = vec![7u8; 10_000];
                    for _ in 0..100_000 {
                        w.write_all(&chunk)
                            .map_err(|source| deployer::DeployError::WriteFile {
                                path: "input".into(),
                                source,
                            })?;
                        written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    Ok(written.load(Ordering::Relaxed))
                },
                Duration::from_secs(60),
            ))
        })
    };
    tests::wait_for("input to flow", Duration::from_secs(10), || {
        (written.load(Ordering::Relaxed) > 0).then_some(())
    });
    assert!(bed.pause_ssh_sessions(0) > 0, "no session to pause");
    // Wait until the writes stall on the full buffers.
    let mut last = written.load(Ordering::Relaxed);
    tests::wait_for("the input to stall", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(Ordering::Relaxed);
        std::mem::replace(&mut last, now).eq(&now).then_some(())
    });
    bed.kill_ssh(0);
    let killed = std::time::Instant::now();
    let err = feeding
        .join()
        .unwrap()
        .expect_err("the connection was lost");
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "the failure took {:?}: {err}",
        killed.elapsed()
    );
    assert!(matches!(err, deployer::DeployError::Ssh { .. }), "{err:?}");
    bed.start_sshd(0);
    let out = smol::block_on(host.exec("echo back", b"", Duration::from_secs(10)))
        .expect("a new session");
    assert_eq!(out.stdout, b"back\n");
}

#[test]
fn ssh_refuses_unknown_and_mismatched_host_keys_and_accepts_new_only_when_told() {
    let bed = TestBed::new(1);
    let empty = bed.dir.join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let unknown = SshHost::new(target(&bed, 0, vec![empty.clone()], HostKeyPolicy::Strict));
    let err = smol::block_on(unknown.connect()).expect_err("unknown key refused");
    let text = err.to_string();
    assert!(text.contains("unknown host key SHA256:"), "{text}");
    assert!(text.contains("accept-new"), "{text}");
    assert!(!bed.dir.join("own_known_hosts").exists());

    // Another key recorded for the address: a mismatch, also when types differ.
    let other = tests::testbed::keygen(&bed.dir.join("other_key"), "other");
    let wrong = bed.dir.join("wrong_known_hosts");
    let fields: Vec<&str> = other.split_whitespace().take(2).collect();
    std::fs::write(
        &wrong,
        format!("{} {}\n", bed.hosts[0].address, fields.join(" ")),
    )
    .unwrap();
    let mismatched = SshHost::new(target(
        &bed,
        0,
        vec![wrong.clone()],
        HostKeyPolicy::AcceptNew,
    ));
    let err = smol::block_on(mismatched.connect()).expect_err("mismatch refused");
    assert!(err.to_string().contains("HOST KEY MISMATCH"), "{err}");
    assert!(
        !bed.dir.join("own_known_hosts").exists(),
        "a mismatch is never recorded"
    );

    // accept-new records the key, and the record is then checked strictly.
    let tofu = SshHost::new(target(
        &bed,
        0,
        vec![empty.clone()],
        HostKeyPolicy::AcceptNew,
    ));
    smol::block_on(tofu.connect()).expect("accept-new connects");
    let own = std::fs::read_to_string(bed.dir.join("own_known_hosts")).unwrap();
    assert!(own.contains(&bed.hosts[0].address), "{own}");
    let strict = SshHost::new(target(&bed, 0, vec![empty], HostKeyPolicy::Strict));
    smol::block_on(strict.connect()).expect("the recorded key is known now");
    // OpenSSH agrees with what was written.
    let out = std::process::Command::new("ssh-keygen")
        .arg("-F")
        .arg(&bed.hosts[0].address)
        .arg("-f")
        .arg(bed.dir.join("own_known_hosts"))
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn ssh_logs_in_through_the_agent_when_no_key_file_is_given() {
    let bed = TestBed::new(1);
    let sock = bed.dir.join("agent.sock");
    let mut agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    tests::wait_for("agent socket", Duration::from_secs(5), || {
        sock.exists().then_some(())
    });
    let added = std::process::Command::new("ssh-add")
        .arg(&bed.user_key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    // SSH_AUTH_SOCK is read at connect time; this test process has no other use of it.
    std::env::set_var("SSH_AUTH_SOCK", &sock);
    let mut t = target(
        &bed,
        0,
        vec![bed.known_hosts.clone()],
        HostKeyPolicy::Strict,
    );
    t.key = None;
    let result = smol::block_on(SshHost::new(t).exec("echo agent", b"", Duration::from_secs(10)));
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(result.expect("agent auth").stdout, b"agent\n");
}

#[test]
fn a_lan_service_and_local_processes_reach_each_other_through_injected_addresses() {
    let bed = TestBed::new(1);
    let mut d = TestDaemon::start();
    let dir = d.workdir("lan");
    write_config(
        &dir,
        &format!(
            r#"
name: lan
{hosts}
services:
  db:
    target: {{ process: {{ binary: DEMO, args: [--name, db, --port, "${{self.port}}"] }} }}
    port: auto
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
  api:
    target: {{ remote_lan: {{ host: host0, binary: DEMO, args: [--name, api, --port, "${{self.port}}", --upstream, "db=${{db.addr}}"] }} }}
    port: auto
    depends_on: {{ db: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 300ms }}
    restart: on-failure
  web:
    target: {{ process: {{ binary: DEMO, args: [--name, web, --port, "${{self.port}}", --upstream, "api=${{api.addr}}"] }} }}
    port: auto
    depends_on: {{ api: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#,
            hosts = bed.hosts_yaml()
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let api = get(&c, "lan", "api");
    assert_eq!(
        (api.state, api.health),
        (ServiceState::Running, Health::Healthy)
    );
    let port = api.port.expect("api port");
    assert_eq!(
        api.address,
        Some(format!("{}:{port}", bed.hosts[0].address))
    );
    // The LAN service was given the hub's address on the LAN for the local db, and
    // reached it (its health needs its upstream), and web reached the LAN service.
    let db_port = get(&c, "lan", "db").port.expect("db port");
    let env = String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "api"]).stdout).into_owned();
    assert!(
        env.contains(&format!("DB_ADDR={}:{db_port}", bed.hub_address)),
        "{env}"
    );
    assert_eq!(get(&c, "lan", "web").health, Health::Healthy);
    let body = http_get(&format!("{}:{port}", bed.hosts[0].address), "/");
    assert!(
        body.contains(&format!("{}:{db_port}", bed.hub_address)),
        "{body}"
    );
    // It really runs in the host's namespace, and its output reaches the harness log.
    let procs = bed.processes(0);
    assert!(
        procs
            .iter()
            .any(|p| p.contains("demo-service") && p.contains("api")),
        "{procs:?}"
    );
    tests::wait_for("api's log lines", Duration::from_secs(10), || {
        log_lines(&c, "lan", "api")
            .iter()
            .any(|l| l.line.contains("GET /health"))
            .then_some(())
    });

    // A daemon killed and restarted adopts the LAN service: same process, not restarted.
    let pid = api.pid.expect("api pid on its host");
    assert_eq!(api.host.as_deref(), Some("host0"));
    let ps = String::from_utf8_lossy(&d.cli(&dir, &["ps"]).stdout).into_owned();
    assert!(ps.contains(&format!("{pid}@host0")), "{ps}");
    drop(c);
    d.kill9();
    d.restart();
    let c = d.client();
    let again = wait_service(&c, "lan", "api", "api adopted and healthy", |s| {
        s.health == Health::Healthy
    });
    assert_eq!((again.pid, again.restarts), (Some(pid), 0));

    // `harness exec` runs on the host, in the service's environment.
    let out = d.cli(
        &dir,
        &[
            "exec",
            "api",
            "--",
            "sh",
            "-c",
            "echo $HARNESS_SERVICE $DB_ADDR; ip -4 -o addr show dev eth0",
        ],
    );
    assert_ok(&d, &out, "harness exec api");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("api {}:{db_port}", bed.hub_address)),
        "{text}"
    );
    assert!(text.contains(&bed.hosts[0].address), "{text}");

    // A crash on the host is seen and restarted by policy.
    assert_eq!(bed.kill_processes(0, "demo-service", "--name api"), 1);
    let restarted = wait_service(&c, "lan", "api", "api restarted after its crash", |s| {
        // (Becoming healthy again resets the restart count.)
        s.health == Health::Healthy && s.pid.is_some_and(|p| p != pid)
    });
    assert_eq!(restarted.state, ServiceState::Running);

    // down stops it on the host.
    let listening = |c: &harness_client::Client| {
        log_lines(c, "lan", "api")
            .iter()
            .filter(|l| l.line.contains("listening on"))
            .count()
    };
    let before = listening(&c);
    assert_ok(
        &d,
        &d.cli(&dir, &["down", "--purge"]),
        "harness down --purge",
    );
    let procs = bed.processes(0);
    assert!(
        !procs.iter().any(|p| p.contains("demo-service")),
        "{procs:?}"
    );
    // Up again after a purge: the host's output files start afresh, and the new run's
    // output is still copied (from the start of the new files).
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up again");
    let c = d.client();
    tests::wait_for("the new run's output", Duration::from_secs(10), || {
        (listening(&c) > before).then_some(())
    });
    assert_ok(
        &d,
        &d.cli(&dir, &["down", "--purge"]),
        "harness down --purge",
    );
}

#[test]
fn lifecycle_systemd_writes_a_verified_unit_and_runs_supervised_where_systemd_does_not_run() {
    let bed = TestBed::new(1);
    let d = TestDaemon::start();
    let dir = d.workdir("unit");
    // The host and the placement come from a hosts file, not the stack's file.
    write_config(
        &dir,
        r#"
name: unit
services:
  api:
    target: { remote_lan: { binary: DEMO, args: [--name, "api $$HOME 100%", --port, "${self.port}"], lifecycle: systemd } }
    port: auto
    health_check: { type: http, url: "http://${self.addr}/health" }
"#,
    );
    let h = &bed.hosts[0];
    let hosts_file = dir.join("remote-hosts.yaml");
    std::fs::write(
        &hosts_file,
        format!(
            "default_user: root\nssh_key: {}\nknown_hosts: {}\nhosts:\n  lan1: {{ address: {}, install_root: {}, services: [api] }}\n",
            bed.user_key.display(),
            bed.known_hosts.display(),
            h.address,
            h.install_root.display()
        ),
    )
    .unwrap();
    let hosts_arg = hosts_file.display().to_string();
    assert_ok(
        &d,
        &d.cli(&dir, &["--hosts", &hosts_arg, "up"]),
        "harness --hosts FILE up",
    );
    let c = d.client();
    assert_eq!(get(&c, "unit", "api@lan1").health, Health::Healthy);
    // The unit is in the run directory, and systemd's own checker accepts it.
    let run_dirs = bed.hosts[0].install_root.join("api@lan1/run");
    let run_dir = std::fs::read_dir(&run_dirs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let unit = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".service"))
        .expect("a unit file")
        .path();
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains("ExecStart=\"") && text.contains("demo-service"),
        "{text}"
    );
    // `$` and `%` stay literal for systemd.
    assert!(text.contains("\"api $$HOME 100%%\""), "{text}");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ok(
        &d,
        &d.cli(&dir, &["--hosts", &hosts_arg, "down", "--purge"]),
        "harness down --purge",
    );
    assert!(bed.processes(0).is_empty(), "{:?}", bed.processes(0));
}

#[test]
fn an_unreachable_host_fails_within_its_connect_timeout() {
    let bed = TestBed::new(1);
    bed.set_link(0, false);
    let d = TestDaemon::start();
    let dir = d.workdir("down");
    let hosts = bed
        .hosts_yaml()
        .replace("install_root:", "connect_timeout: 1s, install_root:");
    write_config(
        &dir,
        &format!(
            "name: down\n{hosts}\nservices:\n  api:\n    target: {{ remote_lan: {{ host: host0, binary: /bin/sleep, args: [\"100\"] }} }}\n"
        ),
    );
    let started = std::time::Instant::now();
    let out = d.cli(&dir, &["up"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot connect"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The daemon keeps serving.
    assert_ok(
        &d,
        &d.cli(&dir, &["daemon", "status"]),
        "harness daemon status",
    );
}

/// Faults while a LAN service runs: its host's sshd killed (with every SSH session),
/// then its link cut. Neither is taken for an exit: the service turns unhealthy while
/// it cannot be reached, with an event, and is healthy again once the host is back,
/// the same process, neither restarted nor deployed again.
#[test]
fn a_lan_service_rides_out_a_killed_sshd_and_a_cut_link() {
    let mut bed = TestBed::new(1);
    let d = TestDaemon::start();
    let dir = d.workdir("lanfaults");
    let hosts = bed
        .hosts_yaml()
        .replace("install_root:", "connect_timeout: 1s, install_root:");
    write_config(
        &dir,
        &format!(
            r#"
name: lanfaults
{hosts}
services:
  api:
    target: {{ remote_lan: {{ host: host0, binary: DEMO, args: [--name, api, --port, "${{self.port}}"] }} }}
    port: auto
    restart: always
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 300ms, timeout: 500ms, retries: 2 }}
"#
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let before = get(&c, "lanfaults", "api");
    assert_eq!(before.health, Health::Healthy);

    // sshd and its sessions gone: the daemon cannot look at the run, which keeps going.
    bed.kill_ssh(0);
    std::thread::sleep(Duration::from_secs(3));
    let during = get(&c, "lanfaults", "api");
    assert_eq!(
        (during.state, during.pid),
        (ServiceState::Running, before.pid)
    );
    bed.start_sshd(0);
    std::thread::sleep(Duration::from_secs(2));

    // The link cut: unhealthy, with an event; back: healthy, the same run.
    bed.set_link(0, false);
    wait_service(&c, "lanfaults", "api", "api unhealthy", |s| {
        s.health == Health::Unhealthy
    });
    bed.set_link(0, true);
    let back = wait_service(&c, "lanfaults", "api", "api healthy again", |s| {
        s.health == Health::Healthy
    });
    let events = replay(&c, &["service"]);
    assert_eq!(
        (back.state, back.pid),
        (ServiceState::Running, before.pid),
        "{events:#?}\n{}",
        d.log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("lanfaults"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        events.iter().any(|e| matches!(&e.kind,
            protocol::EventKind::ServiceHealth(h) if h.status == Health::Unhealthy)),
        "no unhealthy event: {events:?}"
    );
    let restarted = events.iter().any(|e| {
        matches!(
            e.kind,
            protocol::EventKind::ServiceExited(_) | protocol::EventKind::ServiceRestarting(_)
        )
    });
    assert!(!restarted, "taken for an exit: {events:?}");
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    assert!(bed.processes(0).is_empty(), "{:?}", bed.processes(0));
}
