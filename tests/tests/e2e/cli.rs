//! The `harness` CLI as people use it: init and validate, a failing `up` that says why,
//! exec with the service's environment, racing `up`s that end with one daemon, and a
//! taken port.

use std::process::{Command, Stdio};

use tests::{bin, TestDaemon};

use crate::support::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn init_writes_a_config_that_validates() {
    let d = TestDaemon::start();
    let dir = d.workdir("fresh");
    let init = d.cli(&dir, &["init"]);
    assert!(init.status.success(), "{}", text(&init));
    let validate = d.cli(&dir, &["validate"]);
    assert!(validate.status.success(), "{}", text(&validate));
    assert!(
        text(&validate).contains("start order: db, api"),
        "{}",
        text(&validate)
    );
    // A second init refuses to overwrite.
    assert!(!d.cli(&dir, &["init"]).status.success());
}

#[test]
fn a_failing_up_names_the_reason_and_shows_the_last_log_lines() {
    let d = TestDaemon::start();
    let dir = d.workdir("broken");
    write_config(
        &dir,
        r#"
name: broken
settings: { default_timeout: 20 }
services:
  db:
    target: { process: { binary: /bin/sh, args: [-c, "echo cannot open data dir >&2; exit 2"] } }
    port: auto
    health_check: { type: tcp }
  api:
    target: { process: { binary: DEMO, args: [--port, "${self.port}"] } }
    port: auto
    dependencies: [db]
"#,
    );
    let up = d.cli(&dir, &["up"]);
    let out = text(&up);
    assert!(!up.status.success(), "{out}");
    assert!(out.contains("db: exited with code 2"), "{out}");
    assert!(out.contains("api: dependency db failed"), "{out}");
    assert!(
        out.contains("cannot open data dir"),
        "the failing service's log is shown:\n{out}"
    );
}

#[test]
fn exec_runs_with_the_service_environment_and_returns_its_exit_code() {
    let d = TestDaemon::start();
    let dir = d.workdir("ex");
    write_config(
        &dir,
        r#"
name: ex
services:
  db:
    target: { process: { binary: DEMO, args: [--port, "${self.port}"] } }
    port: auto
  api:
    target: { process: { binary: DEMO, args: [--port, "${self.port}"], working_dir: /tmp } }
    port: auto
    depends_on: [db]
    env: { GREETING: hello }
"#,
    );
    assert!(d.cli(&dir, &["up"]).status.success());
    let out = d.cli(
        &dir,
        &[
            "exec",
            "api",
            "--",
            "sh",
            "-c",
            "echo $GREETING $DB_PORT; pwd; echo oops >&2; exit 5",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let c = d.client();
    let db_port = get(&c, "ex", "db").port.unwrap();
    assert_eq!(stdout, format!("hello {db_port}\n/tmp\n"));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
}

#[test]
fn racing_ups_end_with_one_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    write_config(&work, "name: race\nservices:\n  one:\n    target: { process: { binary: DEMO, args: [--port, \"${self.port}\"] } }\n    port: auto\n");
    let up = || {
        Command::new(bin("harness"))
            .arg("up")
            .current_dir(&work)
            .env("HARNESS_STATE_DIR", &state)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (up(), up());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a));
    assert!(b.status.success(), "{}", text(&b));
    let info: protocol::DaemonFile =
        serde_json::from_str(&std::fs::read_to_string(state.join("daemon.json")).unwrap()).unwrap();
    let c = smol::block_on(harness_client::Client::connect(&info, "race")).unwrap();
    assert_eq!(list(&c, "race").len(), 1);
    let _: serde_json::Value = smol::block_on(c.call(
        "daemon.shutdown",
        serde_json::json!({"stop_services": true}),
    ))
    .unwrap();
    // Exactly one harnessd ran for this state directory: the log shows one start.
    let log = std::fs::read_to_string(state.join("harnessd.log")).unwrap();
    assert_eq!(log.matches("listening on").count(), 1, "{log}");
    tests::wait_for(
        "harnessd to exit",
        std::time::Duration::from_secs(10),
        || (!tests::alive(info.pid)).then_some(()),
    );
    // And the racing starts launched the service once: a second run, hidden behind
    // the first's record, would have outlived the shutdown. (The shim server goes
    // too, once it sees the daemon's end of its socket close.)
    let marker = format!("{}/", info.instance);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut left = deployer::process::find_instances(&marker);
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
        left = deployer::process::find_instances(&marker);
    }
    for (pid, _) in &left {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert!(
        left.is_empty(),
        "processes of the stack outlived the shutdown: {left:?}"
    );
}

#[test]
fn a_taken_port_gets_a_clear_message() {
    let d = TestDaemon::start();
    let port = d.info.url.rsplit(':').next().unwrap().to_owned();
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(bin("harnessd"))
        .args(["--state-dir"])
        .arg(other.path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the port is taken") && err.contains("--listen"),
        "{err}"
    );
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    let run = |args: &[&str]| {
        Command::new(bin("harness"))
            .args(args)
            .output()
            .expect("run harness")
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout).into_owned();
    assert!(
        script.contains("_harness()") && script.contains("import"),
        "{script}"
    );
    // The bash script parses.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("harness.bash"), &script).expect("write");
    let check = Command::new("bash")
        .arg("-n")
        .arg(dir.path().join("harness.bash"))
        .status()
        .expect("bash -n");
    assert!(check.success());
    for shell in ["zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("daemon"),
            "{shell}"
        );
    }
    let man_dir = dir.path().join("man");
    let man = run(&["man", man_dir.to_str().expect("path")]);
    assert!(man.status.success());
    for page in [
        "harness.1",
        "harness-up.1",
        "harness-logs.1",
        "harness-daemon-stop.1",
    ] {
        let text = std::fs::read_to_string(man_dir.join(page)).expect(page);
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
}

#[test]
fn colour_only_on_a_terminal_without_no_color_and_errors_suggest_the_fix() {
    let d = TestDaemon::start();
    let dir = d.workdir("tty");
    write_config(
        &dir,
        "name: tty\nservices:\n  web:\n    target: { process: { binary: DEMO, args: [--name, web, --port, '${self.port}'] } }\n    port: auto\n    health_check: { type: tcp }\n",
    );
    assert!(d.cli(&dir, &["up"]).status.success());
    // `script` gives the command a terminal; its output comes back through the pipe.
    let under_tty = |no_color: bool| {
        let mut cmd = Command::new("script");
        cmd.args(["-qec"])
            .arg(format!("{} ps", bin("harness").display()))
            .arg("/dev/null")
            .current_dir(&dir)
            .env("HARNESS_STATE_DIR", &d.state_dir)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null());
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd.output().expect("script (util-linux)");
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = under_tty(false);
    assert!(
        coloured.contains("running") && coloured.contains("\x1b["),
        "{coloured:?}"
    );
    let plain = under_tty(true);
    assert!(
        plain.contains("running") && !plain.contains("\x1b["),
        "{plain:?}"
    );
    // Not a terminal (the test's pipe): no colour either.
    let piped = d.cli(&dir, &["ps"]);
    assert!(!String::from_utf8_lossy(&piped.stdout).contains("\x1b["));

    // A mistyped service name and a mistyped key each come with the fix.
    let logs = d.cli(&dir, &["logs", "wbe"]);
    assert!(!logs.status.success());
    assert!(text(&logs).contains("did you mean web"), "{}", text(&logs));
    write_config(
        &dir,
        "name: tty\nservices:\n  web:\n    target: { process: { binary: DEMO } }\n    helth_check: { type: tcp }\n",
    );
    let validate = d.cli(&dir, &["validate"]);
    assert!(!validate.status.success());
    assert!(
        text(&validate).contains("health_check"),
        "{}",
        text(&validate)
    );
}
