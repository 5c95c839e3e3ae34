//! Services outlive the daemon: kill -9 harnessd while services run and log, start it
//! again, and find everything as it was.

use std::time::Duration;

use protocol::methods::{names, ServiceState, ServicesParams, ServicesResult};
use tests::{alive, wait_for, TestDaemon};

use crate::support::*;

#[test]
fn kill9_of_the_daemon_loses_nothing_and_restarts_nothing() {
    let mut d = TestDaemon::start();
    let dir = d.workdir("keep");
    write_config(
        &dir,
        r#"
name: keep
services:
  chatty:
    target: { process: { binary: DEMO, args: [--name, chatty, --port, "${self.port}", --heartbeat-ms, "10"] } }
    port: auto
    health_check: { type: tcp, interval: 500ms }
    restart: on-failure
  job:
    target: { process: { binary: /bin/sh, args: [-c, "echo job runs; sleep 1; echo job done; exit 7"] } }
"#,
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let before = get(&c, "keep", "chatty");
    let pid = before.pid.expect("chatty pid");
    drop(c);

    d.kill9();
    // While the daemon is down, chatty keeps logging and job exits with code 7.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(pid), "the service must outlive the daemon");
    d.restart();

    let c = d.client();
    let after = get(&c, "keep", "chatty");
    assert_eq!(after.pid, Some(pid), "re-adopted, not restarted");
    assert_eq!(after.state, ServiceState::Running);
    let job = wait_service(&c, "keep", "job", "job's exit to be seen", |s| {
        s.exit_code.is_some()
    });
    assert_eq!((job.exit_code, job.state), (Some(7), ServiceState::Failed));

    // Started once; no line lost: offsets are contiguous and heartbeats kept coming while
    // the daemon was down (about 150 in 1.5 s at 10 ms; demand a third of that).
    let lines = wait_for("more heartbeats", Duration::from_secs(10), || {
        let l = log_lines(&c, "keep", "chatty");
        (l.len() > 60).then_some(l)
    });
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.line.contains("listening on"))
            .count(),
        1
    );
    assert!(
        lines.iter().enumerate().all(|(i, l)| l.offset == i as u64),
        "offsets have a gap"
    );
    let job_lines: Vec<String> = log_lines(&c, "keep", "job")
        .into_iter()
        .map(|l| l.line)
        .collect();
    assert_eq!(job_lines, ["job runs", "job done"]);

    // Still controllable.
    let stopped: ServicesResult = smol::block_on(c.call(
        names::SERVICE_STOP,
        ServicesParams {
            stack: "keep".into(),
            names: vec!["chatty".into()],
            purge: false,
        },
    ))
    .unwrap();
    assert_eq!(stopped.services, ["chatty"]);
    wait_for("chatty to exit", Duration::from_secs(5), || {
        (!alive(pid)).then_some(())
    });
    assert_eq!(get(&c, "keep", "chatty").state, ServiceState::Stopped);
}

/// A stack `stack` of one demo service `svc` with a tcp check; its directory.
fn one_service_stack(d: &TestDaemon, stack: &str) -> std::path::PathBuf {
    let dir = d.workdir(stack);
    write_config(
        &dir,
        &format!(
            r#"
name: {stack}
services:
  svc:
    target: {{ process: {{ binary: DEMO, args: [--name, svc, --port, "${{self.port}}"] }} }}
    port: auto
    health_check: {{ type: tcp }}
"#
        ),
    );
    dir
}

/// Brings up [`one_service_stack`] `stack` and kills the daemon with -9; the stack's
/// directory and its service's pid.
fn up_and_kill_daemon(d: &mut TestDaemon, stack: &str) -> (std::path::PathBuf, u32) {
    let dir = one_service_stack(d, stack);
    assert!(d.cli(&dir, &["up"]).status.success());
    let pid = get(&d.client(), stack, "svc").pid.expect("pid");
    d.kill9();
    (dir, pid)
}

/// A JSON file of the state directory.
fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Edits the registry record of `stack`'s `svc` while the daemon is down.
fn edit_record(d: &TestDaemon, stack: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = registry::Store::stack_file(&d.state_dir, stack);
    let mut reg = read_json(&path);
    edit(&mut reg["stack"]["services"]["svc"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&reg).unwrap()).unwrap();
}

/// The daemon dies while a start waits (no process yet, `starting` in the registry),
/// and the run directory still holds the previous run's shim.json and exit.json (run
/// directories stay across runs): that exit, counted when it happened, is not taken for
/// this start's.
#[test]
fn an_earlier_run_s_files_are_not_taken_for_an_interrupted_start() {
    let mut d = TestDaemon::start();
    let dir = one_service_stack(&d, "again");
    assert!(d.cli(&dir, &["up"]).status.success());
    assert!(d.cli(&dir, &["stop", "svc"]).status.success());
    assert!(d.state_dir.join("run/again/svc/exit.json").exists());
    d.kill9();

    // As a start of it that was still waiting left the registry.
    edit_record(&d, "again", |rec| {
        assert!(rec["process"].is_null(), "{rec}");
        rec["state"] = "starting".into();
    });

    d.restart();
    let c = d.client();
    let fixes: Vec<String> = replay(&c, &["daemon"])
        .into_iter()
        .filter_map(|e| match e.kind {
            protocol::events::EventKind::DaemonReconciled(r) => Some(r.fixes),
            _ => None,
        })
        .flatten()
        .filter(|f| f.contains("again/svc"))
        .collect();
    assert_eq!(
        fixes,
        ["again/svc: its start was interrupted by the daemon's exit"],
        "the earlier run's exit was taken for this start's"
    );
}

/// The daemon dies after spawning a service but before its record is saved: the
/// registry says `starting` with no process. The next daemon finds the running service
/// through the record its shim left in the run directory and adopts it.
#[test]
fn a_crash_between_spawn_and_record_adopts_the_running_service() {
    let mut d = TestDaemon::start();
    let (_, pid) = up_and_kill_daemon(&mut d, "gap");

    // Rewrite the registry as it was between intent and record.
    edit_record(&d, "gap", |rec| {
        assert!(rec["process"].is_object(), "{rec}");
        rec["process"] = serde_json::Value::Null;
        rec["state"] = "starting".into();
    });

    d.restart();
    let c = d.client();
    let svc = wait_service(&c, "gap", "svc", "svc to be adopted", |s| {
        s.state == ServiceState::Running
    });
    assert_eq!(svc.pid, Some(pid), "adopted, not started again");
    assert!(alive(pid));
    let log: Vec<String> = log_lines(&c, "gap", "svc")
        .into_iter()
        .map(|l| l.line)
        .collect();
    assert_eq!(
        log.iter().filter(|l| l.contains("listening on")).count(),
        1,
        "{log:?}"
    );
}

/// An upgrade from a harnessd that kept every stack in `registry.json` (schema 1),
/// with services running: the new daemon moves the registry into stack files and
/// adopts the services, restarting none.
#[test]
fn a_schema_1_registry_is_migrated_with_its_services_still_running() {
    let mut d = TestDaemon::start();
    let (dir, pid) = up_and_kill_daemon(&mut d, "old");

    // The state directory as the old daemon left it.
    let stack_file = registry::Store::stack_file(&d.state_dir, "old");
    let stack = read_json(&stack_file);
    let header = d.state_dir.join("registry.json");
    let instance = read_json(&header);
    let v1 = serde_json::json!({
        "schema": 1,
        "instance": instance["instance"],
        "stacks": { "old": stack["stack"] },
    });
    std::fs::write(&header, serde_json::to_vec_pretty(&v1).unwrap()).unwrap();
    std::fs::remove_dir_all(d.state_dir.join("stacks")).unwrap();

    d.restart();
    let c = d.client();
    let svc = get(&c, "old", "svc");
    assert_eq!(
        (svc.pid, svc.state),
        (Some(pid), ServiceState::Running),
        "adopted, not restarted"
    );
    assert!(stack_file.exists(), "the stack has its own file again");
    let header = read_json(&header);
    assert_eq!(header["schema"], registry::SCHEMA_VERSION);
    assert!(header.get("stacks").is_none(), "{header}");
    assert!(d.cli(&dir, &["down"]).status.success());
    assert!(!alive(pid));
}

/// A state directory a newer harnessd wrote (a downgrade): this daemon refuses to
/// start on it and says why, rather than taking that daemon's services for strays; the
/// service keeps running and the file is left as it was.
#[test]
fn a_newer_harnessd_s_registry_stops_the_daemon_and_kills_nothing() {
    let mut d = TestDaemon::start();
    let (dir, pid) = up_and_kill_daemon(&mut d, "newer");
    let stack_file = registry::Store::stack_file(&d.state_dir, "newer");
    let mut file = read_json(&stack_file);
    file["schema"] = (registry::SCHEMA_VERSION + 1).into();
    let newer = serde_json::to_vec_pretty(&file).unwrap();
    std::fs::write(&stack_file, &newer).unwrap();

    let out = d.spawn_daemon().wait_with_output().expect("harnessd");
    assert!(!out.status.success());
    let log = d.log();
    assert!(
        log.contains("written by a newer harnessd") && log.contains("newer.json"),
        "{log}"
    );
    assert!(alive(pid), "the service was taken for a stray");
    assert_eq!(std::fs::read(&stack_file).unwrap(), newer);
    // Back to this daemon's schema (the newer one's `down`, in effect): it starts
    // and adopts the service.
    file["schema"] = registry::SCHEMA_VERSION.into();
    std::fs::write(&stack_file, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    d.restart();
    assert_eq!(get(&d.client(), "newer", "svc").pid, Some(pid));
    assert!(d.cli(&dir, &["down"]).status.success());
}

/// SIGTERM stops the daemon cleanly (as systemd does): it exits 0, removes daemon.json,
/// leaves the services running, and the next daemon adopts them.
#[test]
fn sigterm_stops_the_daemon_cleanly_and_services_keep_running() {
    let mut d = TestDaemon::start();
    let dir = d.workdir("term");
    write_config(&dir, "name: term\nservices:\n  svc:\n    target: { process: { binary: DEMO, args: [--port, \"${self.port}\"] } }\n    port: auto\n");
    assert!(d.cli(&dir, &["up"]).status.success());
    let pid = get(&d.client(), "term", "svc").pid.expect("pid");
    let mut child = d.child.take().expect("daemon child");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "harnessd exited with {status}:\n{}",
        d.log()
    );
    assert!(!d.state_dir.join("daemon.json").exists());
    assert!(alive(pid));
    d.restart();
    assert_eq!(get(&d.client(), "term", "svc").pid, Some(pid));
}

/// A corrupt registry is moved aside and reported, never silently reset: the daemon
/// still starts, says what it did in `daemon.reconciled`, and the original bytes are
/// kept for a human.
#[test]
fn a_corrupt_registry_is_moved_aside_and_reported() {
    let mut d = TestDaemon::start();
    d.kill9();
    let path = d.state_dir.join("registry.json");
    std::fs::write(&path, b"{ this is not json").unwrap();
    d.restart();
    let c = d.client();
    let r: protocol::methods::SubscribeResult = smol::block_on(c.call(
        names::SUBSCRIBE,
        protocol::methods::SubscribeParams {
            topics: vec!["daemon".into()],
            stack: None,
            since: Some(0),
        },
    ))
    .unwrap();
    let rx = c.events();
    let mut fixes = Vec::new();
    loop {
        let e = smol::block_on(rx.recv()).unwrap();
        if let protocol::events::EventKind::DaemonReconciled(rec) = &e.kind {
            fixes.extend(rec.fixes.clone());
        }
        if e.seq >= r.seq {
            break;
        }
    }
    assert!(
        fixes
            .iter()
            .any(|f| f.contains("registry.json") && f.contains("corrupt")),
        "{fixes:?}"
    );
    let moved: Vec<_> = std::fs::read_dir(&d.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("registry.json.corrupt-")
        })
        .collect();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        std::fs::read(moved[0].path()).unwrap(),
        b"{ this is not json"
    );
}

/// Reads JSON lines from a child's stdout on a thread.
fn json_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<serde_json::Value> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// Ends a follower child when the test is done with it (also when it fails).
struct Follower(std::process::Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn logs_follow_and_events_survive_a_daemon_restart() {
    let mut d = TestDaemon::start();
    let dir = d.workdir("follow");
    write_config(
        &dir,
        r#"
name: follow
services:
  ticker:
    target: { process: { binary: DEMO, args: [--name, ticker, --port, "${self.port}", --heartbeat-ms, "20"] } }
    port: auto
"#,
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let follow = |args: &[&str]| {
        let child = std::process::Command::new(tests::bin("harness"))
            .args(args)
            .current_dir(&dir)
            .env("HARNESS_STATE_DIR", &d.state_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn harness");
        Follower(child)
    };
    let mut logs = follow(&["--json", "logs", "-f", "-n", "5", "ticker"]);
    let mut events = follow(&["--json", "events", "--since", "1"]);
    let (log_rx, event_rx) = (json_lines(&mut logs.0), json_lines(&mut events.0));
    let collect_until = |rx: &std::sync::mpsc::Receiver<serde_json::Value>,
                         got: &mut Vec<serde_json::Value>,
                         what: &str,
                         done: &dyn Fn(&[serde_json::Value]) -> bool| {
        wait_for(what, Duration::from_secs(20), || {
            while let Ok(v) = rx.try_recv() {
                got.push(v);
            }
            done(got).then_some(())
        })
    };
    let (mut log_lines_seen, mut events_seen) = (Vec::new(), Vec::new());
    collect_until(
        &log_rx,
        &mut log_lines_seen,
        "log lines before the restart",
        &|l| l.len() >= 10,
    );
    collect_until(
        &event_rx,
        &mut events_seen,
        "events before the restart",
        &|e| e.iter().any(|e| e["event"] == "service.state"),
    );

    d.kill9();
    std::thread::sleep(Duration::from_millis(300));
    d.restart();
    let new_pid = d.info.pid;

    // The log follower goes on after the restart, with lines written meanwhile.
    let before = log_lines_seen.len();
    collect_until(
        &log_rx,
        &mut log_lines_seen,
        "log lines after the restart",
        &|l| l.len() >= before + 30,
    );
    let offsets: Vec<u64> = log_lines_seen
        .iter()
        .map(|l| l["offset"].as_u64().expect("offset"))
        .collect();
    for pair in offsets.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "a gap or a repeat in {offsets:?}");
    }
    // The event follower resumes after the last seq it printed: it sees the new
    // daemon start, and no seq twice.
    collect_until(
        &event_rx,
        &mut events_seen,
        "the new daemon's start event",
        &|e| {
            e.iter()
                .any(|e| e["event"] == "daemon.started" && e["data"]["pid"] == new_pid)
        },
    );
    let seqs: Vec<u64> = events_seen
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    for pair in seqs.windows(2) {
        assert!(pair[1] > pair[0], "seq went back or repeated: {seqs:?}");
    }
}
