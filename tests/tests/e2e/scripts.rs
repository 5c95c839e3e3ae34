//! The script examples in ui-examples/scripts, run as their users run them: the Python
//! events client (websockets) and the websocat shell client, against a real daemon.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use tests::TestDaemon;

use crate::support::*;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../ui-examples/scripts")
        .join(name)
}

fn up_one_service(d: &TestDaemon) {
    let dir = d.workdir("scripted");
    write_config(
        &dir,
        "name: scripted\nservices:\n  web:\n    target: { process: { binary: DEMO, args: [--name, web, --port, '${self.port}'] } }\n    port: auto\n    health_check: { type: tcp }\n",
    );
    assert_ok(d, &d.cli(&dir, &["up"]), "harness up");
}

#[test]
fn the_python_events_script_replays_and_prints_events() {
    let d = TestDaemon::start();
    up_one_service(&d);
    let out = Command::new("python3")
        .arg(script("harness_events.py"))
        .args(["--since", "1", "--topic", "service", "--count", "3"])
        .env("HARNESS_STATE_DIR", &d.state_dir)
        .stdin(Stdio::null())
        .output()
        .expect("python3 (./scripts/test.sh installs it and the websockets library)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    assert_eq!(events.len(), 3, "{stdout}");
    assert_eq!(events[0]["event"], "service.registered");
    assert_eq!(events[0]["data"]["name"], "web");
    assert!(events
        .windows(2)
        .all(|w| w[1]["seq"].as_u64() > w[0]["seq"].as_u64()));
}

#[test]
fn the_websocat_script_lists_services_trusting_the_ca_by_ssl_cert_file() {
    let d = TestDaemon::start();
    up_one_service(&d);
    let out = Command::new("sh")
        .arg(script("harness_ps.sh"))
        .arg("scripted")
        .env("HARNESS_STATE_DIR", &d.state_dir)
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(stdout.trim()).expect("a JSON answer");
    assert_eq!(answer["id"], 2);
    assert_eq!(answer["result"][0]["name"], "web");
    assert_eq!(answer["result"][0]["state"], "running");
}
