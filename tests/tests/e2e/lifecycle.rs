//! A stack's life: `up` in dependency order with health checks and injected addresses,
//! logs, restarts with backoff, `down`; two stacks side by side; one daemon per state
//! directory.

use std::time::Duration;

use protocol::events::EventKind;
use protocol::methods::{self as m, names, Health, ServiceState};
use tests::{alive, wait_for, TestDaemon};

use crate::support::*;

const STACK: &str = r#"
name: shop
settings: { max_parallel: 4, default_timeout: 30 }
services:
  db:
    target: { process: { binary: DEMO, args: [--name, db, --port, "${self.port}", --heartbeat-ms, "50"] } }
    port: auto
    health_check: { type: tcp, interval: 1s }
  cache:
    backend: { type: process, binary: DEMO, args: [--name, cache, --port, "${self.port}"] }
    port: auto
  api:
    target:
      process:
        binary: DEMO
        args: [--name, api, --port, "${self.port}", --upstream, "db=${db.addr}", --upstream, "cache=${cache.addr}"]
    port: auto
    depends_on: { db: { condition: healthy }, cache: { condition: started } }
    env: { DATABASE_URL: "postgres://${db.addr}/shop" }
    health_check: { type: http, url: "http://${self.addr}/health", interval: 1s }
  web:
    target:
      process:
        binary: /bin/sh
        args: [-c, 'exec DEMO --name web --port ${self.port} --upstream "api=$API_ADDR"']
    port: auto
    dependencies: [api]
    health_check: { type: http, url: "http://${self.addr}/health" }
"#;

#[test]
fn up_starts_in_order_injects_addresses_follows_logs_and_down_cleans_up() {
    let d = TestDaemon::start();
    let dir = d.workdir("shop");
    write_config(&dir, STACK);
    let up = d.cli(&dir, &["up"]);
    assert!(
        up.status.success(),
        "harness up failed:\n{}\n{}",
        String::from_utf8_lossy(&up.stderr),
        d.log()
    );

    // ps --json: every service running and healthy where checked, with address and pid.
    let ps = d.cli(&dir, &["ps", "--json"]);
    assert!(ps.status.success());
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&ps.stdout).expect("ps --json is a JSON array");
    assert_eq!(rows.len(), 4);
    for row in &rows {
        for key in ["name", "state", "health", "backend", "address", "pid"] {
            assert!(row.get(key).is_some(), "ps row lacks {key}: {row}");
        }
        assert_eq!(row["state"], "running", "{row}");
        assert_eq!(row["backend"], "process");
    }
    let c = d.client();
    let svc = |n: &str| get(&c, "shop", n);
    assert_eq!(svc("db").health, Health::Healthy);
    assert_eq!(svc("web").health, Health::Healthy);

    // Order: api started only after db was healthy and cache running; web after api healthy.
    let events = replay(&c);
    let seq_of = |pred: &dyn Fn(&EventKind) -> bool| {
        events
            .iter()
            .find(|e| pred(&e.kind))
            .map(|e| e.seq)
            .expect("event")
    };
    let healthy = |n: &'static str| move |k: &EventKind| matches!(k, EventKind::ServiceHealth(h) if h.name == n && h.status == Health::Healthy);
    let running = |n: &'static str| move |k: &EventKind| matches!(k, EventKind::ServiceState(s) if s.name == n && s.to == ServiceState::Running);
    assert!(seq_of(&healthy("db")) < seq_of(&running("api")));
    assert!(seq_of(&running("cache")) < seq_of(&running("api")));
    assert!(seq_of(&healthy("api")) < seq_of(&running("web")));

    // Injected addresses really connect: api and web say so, and report what they got.
    let db_addr = svc("db").address.expect("db address");
    let api_addr = svc("api").address.expect("api address");
    // The shim copies output to the log as it comes; under load a line may land just
    // after the health check passed, so wait for it (bounded).
    let logged = |svc: &str, line: String| {
        wait_for(
            &format!("{svc} to log {line:?}"),
            Duration::from_secs(10),
            || {
                log_lines(&c, "shop", svc)
                    .iter()
                    .any(|l| l.line == line)
                    .then_some(())
            },
        )
    };
    logged("api", format!("api: connected to db at {db_addr}"));
    logged("web", format!("web: connected to api at {api_addr}"));
    assert!(http_get(&api_addr, "/").contains(&format!("\"db\":\"{db_addr}\"")));
    let env: m::EnvResult = smol::block_on(c.call(
        names::CONFIG_ENV,
        m::ServiceParams {
            stack: "shop".into(),
            name: "api".into(),
        },
    ))
    .unwrap();
    assert_eq!(env.env["DB_ADDR"], db_addr);
    assert_eq!(
        env.env["DATABASE_URL"],
        format!("postgres://{db_addr}/shop")
    );

    // Follow db's heartbeat: new lines arrive with increasing offsets.
    smol::block_on(async {
        let mut stream = c
            .start_request(
                names::SERVICE_LOGS,
                m::LogsParams {
                    stack: "shop".into(),
                    name: "db".into(),
                    tail: Some(1),
                    since: None,
                    follow: true,
                },
            )
            .await
            .unwrap();
        let mut offsets = Vec::new();
        while offsets.len() < 3 {
            match stream.next().await.unwrap() {
                protocol::ServerMessage::Log(l) => offsets.push(l.log.offset),
                protocol::ServerMessage::Response(r) => {
                    let first: m::LogsResult = harness_client::decode(r).unwrap();
                    offsets.extend(first.lines.iter().map(|l| l.offset));
                }
                _ => {}
            }
        }
        assert!(
            offsets.windows(2).all(|w| w[1] == w[0] + 1),
            "offsets {offsets:?}"
        );
    });

    // Down: nothing of the stack keeps running.
    let pids: Vec<u32> = list(&c, "shop").iter().filter_map(|s| s.pid).collect();
    assert_eq!(pids.len(), 4);
    let down = d.cli(&dir, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    for pid in pids {
        wait_for("service process to exit", Duration::from_secs(5), || {
            (!alive(pid)).then_some(())
        });
    }
    let left = smol::block_on(c.call::<Vec<m::ServiceInfo>>(
        names::SERVICE_LIST,
        m::ListParams {
            stack: Some("shop".into()),
        },
    ));
    assert!(left.is_err(), "the stack is forgotten after down");
}

fn replay(c: &harness_client::Client) -> Vec<protocol::Event> {
    let r: m::SubscribeResult = smol::block_on(c.call(
        names::SUBSCRIBE,
        m::SubscribeParams {
            topics: vec![],
            stack: None,
            since: Some(0),
        },
    ))
    .unwrap();
    let rx = c.events();
    let mut out = Vec::new();
    while out.last().is_none_or(|e: &protocol::Event| e.seq < r.seq) {
        out.push(smol::block_on(rx.recv()).unwrap());
    }
    out
}

#[test]
fn a_crashing_service_restarts_with_backoff_then_fails() {
    let d = TestDaemon::start();
    let dir = d.workdir("crash");
    write_config(
        &dir,
        r#"
name: crash
services:
  flaky:
    target: { process: { binary: DEMO, args: [--name, flaky, --port, "0", --crash-after-ms, "50"] } }
    restart: { policy: on-failure, max_restarts: 3 }
"#,
    );
    let c = d.client();
    let _: m::SubscribeResult = smol::block_on(c.call(
        names::SUBSCRIBE,
        m::SubscribeParams {
            topics: vec!["service".into()],
            stack: Some("crash".into()),
            since: None,
        },
    ))
    .unwrap();
    let up = d.cli(&dir, &["up"]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let failed = wait_service(&c, "crash", "flaky", "flaky to fail", |s| {
        s.state == ServiceState::Failed
    });
    assert_eq!(failed.exit_code, Some(3));
    assert!(
        failed
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("gave up after 3 restarts"),
        "{failed:?}"
    );
    let rx = c.events();
    let mut backoffs = Vec::new();
    while let Ok(e) = rx.try_recv() {
        if let EventKind::ServiceRestarting(r) = e.kind {
            backoffs.push((r.attempt, r.backoff_ms));
        }
    }
    assert_eq!(backoffs, vec![(1, 100), (2, 200), (3, 400)]);
}

#[test]
fn two_stacks_in_one_daemon_do_not_interfere() {
    let d = TestDaemon::start();
    let yaml = r#"
services:
  svc:
    target: { process: { binary: DEMO, args: [--name, svc, --port, "${self.port}"] } }
    port: auto
    health_check: { type: tcp }
"#;
    let (a, b) = (d.workdir("alpha"), d.workdir("beta"));
    write_config(&a, yaml);
    write_config(&b, yaml);
    assert!(d.cli(&a, &["up"]).status.success());
    assert!(d.cli(&b, &["up"]).status.success());
    let c = d.client();
    let (pa, pb) = (get(&c, "alpha", "svc"), get(&c, "beta", "svc"));
    assert_ne!(pa.port, pb.port);
    assert!(d.cli(&a, &["stop"]).status.success());
    assert_eq!(get(&c, "alpha", "svc").state, ServiceState::Stopped);
    let still = get(&c, "beta", "svc");
    assert_eq!((still.state, still.pid), (ServiceState::Running, pb.pid));
    assert!(alive(pb.pid.unwrap()));
}

#[test]
fn a_second_daemon_on_the_same_state_dir_refuses() {
    let d = TestDaemon::start();
    let out = d
        .spawn_daemon()
        .wait_with_output()
        .expect("second harnessd");
    assert!(!out.status.success());
    let log = d.log();
    assert!(log.contains("holds the state directory"), "{log}");
    // The first one still serves.
    let c = d.client();
    let s: m::DaemonStatus =
        smol::block_on(c.call(names::DAEMON_STATUS, serde_json::json!({}))).unwrap();
    assert_eq!(s.pid, d.info.pid);
}

/// harnessd's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces) close with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[test]
fn a_service_that_dies_at_once_backs_off_without_a_busy_loop_and_its_dependents_are_told() {
    let d = TestDaemon::start();
    let dir = d.workdir("loop");
    write_config(
        &dir,
        r#"
name: loop
settings: { default_timeout: 20s }
services:
  dies:
    target: { process: { binary: /bin/false } }
    restart: { policy: always, max_restarts: 6 }
    health_check: { type: tcp, port: 1 }
  needs:
    target: { process: { binary: DEMO, args: [--name, needs, --port, "${self.port}"] } }
    port: auto
    depends_on: { dies: { condition: healthy } }
"#,
    );
    let before = cpu_time(d.info.pid);
    let started = std::time::Instant::now();
    let up = d.cli(&dir, &["up"]);
    assert!(
        !up.status.success(),
        "up succeeded with a service that cannot run"
    );
    let c = d.client();
    let dies = wait_service(&c, "loop", "dies", "dies to fail", |s| {
        s.state == ServiceState::Failed
    });
    assert!(
        dies.reason
            .as_deref()
            .unwrap_or("")
            .contains("gave up after 6 restarts"),
        "{dies:?}"
    );
    let elapsed = started.elapsed();
    // 100 ms doubling six times: 6.3 s of backoff, not a tight loop.
    assert!(
        elapsed >= Duration::from_secs(6),
        "gave up after {elapsed:?}"
    );
    let needs = wait_service(&c, "loop", "needs", "needs to fail", |s| {
        s.state == ServiceState::Failed
    });
    assert!(
        needs.reason.as_deref().unwrap_or("").contains("dies"),
        "{needs:?}"
    );
    let cpu = cpu_time(d.info.pid) - before;
    // A busy loop would burn the whole 6 s; seven short runs cost a few tens of ms.
    assert!(
        cpu < Duration::from_millis(1500),
        "harnessd used {cpu:?} of CPU in {elapsed:?}"
    );
    eprintln!("crash loop: {elapsed:?}, harnessd CPU {cpu:?}");
}

/// Every process command line on this machine, for looking for a secret in `ps`.
fn all_command_lines() -> String {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " ") + "\n")
        .collect()
}

/// A value named in `secret_env` reaches the service and no one else: masked in
/// `config.get`, `config.env` and `harness config`, absent from the daemon's log, the
/// event journal and every command line (as the daemon's token is); a config that
/// puts it on a command line is refused with a message that does not repeat it.
#[test]
fn a_secret_env_value_reaches_the_service_and_no_one_else() {
    let d = TestDaemon::start();
    let dir = d.workdir("secrets");
    let secret = format!("s3cret-{}", std::process::id());
    // The service checks the value it got against a file, so the value is on no
    // command line, not even the test's.
    std::fs::write(dir.join("expected"), &secret).unwrap();
    std::fs::write(
        dir.join("check.sh"),
        "#!/bin/sh\n[ \"$API_TOKEN\" = \"$(cat expected)\" ] && echo token-ok || echo token-wrong\nexec sleep 600\n",
    )
    .unwrap();
    write_config(
        &dir,
        &format!(
            "name: secrets\nservices:\n  api:\n    target: {{ process: {{ binary: /bin/sh, args: [./check.sh] }} }}\n    env: {{ API_TOKEN: {secret}, MODE: dev, URL: \"pg://u:{secret}@db/x\" }}\n    secret_env: [API_TOKEN]\n"
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    wait_for("the service's check", Duration::from_secs(10), || {
        log_lines(&c, "secrets", "api")
            .iter()
            .any(|l| l.line.contains("token-ok"))
            .then_some(())
    });
    let shown: Vec<String> = [
        vec!["config", "show"],
        vec!["config", "env", "api"],
        vec!["config", "resolve"],
        vec!["--json", "config", "show"],
    ]
    .iter()
    .map(|args| {
        let out = d.cli(&dir, args);
        assert_ok(&d, &out, &args.join(" "));
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .collect();
    for (out, what) in shown.iter().zip([
        "config show",
        "config env",
        "config resolve",
        "config show --json",
    ]) {
        assert!(!out.contains(&secret), "{what} shows the secret:\n{out}");
        assert!(
            out.contains(protocol::config::SECRET_MASK),
            "{what}:\n{out}"
        );
    }
    assert!(shown[1].contains("dev"), "{}", shown[1]);
    // Nor is the daemon's token anywhere but its file.
    let token = std::fs::read_to_string(&d.info.token_file).unwrap();
    let journal = std::fs::read_to_string(d.state_dir.join("events.jsonl")).unwrap();
    let (command_lines, log) = (all_command_lines(), d.log());
    assert!(journal.contains("service.state") && log.contains("listening"));
    for (value, what) in [(secret.as_str(), "the secret"), (token.trim(), "the token")] {
        assert!(
            !command_lines.contains(value),
            "a command line shows {what}"
        );
        assert!(!log.contains(value), "the daemon's log shows {what}");
        assert!(!journal.contains(value), "the event journal holds {what}");
    }

    // On a command line it is refused, without being repeated.
    let bad = d.workdir("secrets-bad");
    write_config(
        &bad,
        &format!(
            "name: secretsbad\nservices:\n  api:\n    target: {{ process: {{ binary: /bin/sh, args: [-c, 'echo {secret}'] }} }}\n    env: {{ API_TOKEN: {secret} }}\n    secret_env: [API_TOKEN]\n"
        ),
    );
    let out = d.cli(&bad, &["up"]);
    assert!(
        !out.status.success(),
        "a secret on a command line was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secret API_TOKEN") && err.contains("`ps`"),
        "{err}"
    );
    assert!(
        !err.contains(&secret),
        "the error repeats the secret: {err}"
    );
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
}
