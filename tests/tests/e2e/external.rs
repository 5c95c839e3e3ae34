//! Services the harness uses but does not run: an `external` target, and a service with
//! `reuse_if_running` whose healthy instance already answers. Both are health-checked
//! and injected into dependents, and never started or stopped by the harness.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use protocol::methods::{Health, ServiceState};
use tests::{alive, bin, TestDaemon};

use crate::support::*;

/// A demo service started by the test, not by the harness; killed when dropped.
struct Outside(Child);

impl Outside {
    fn start(name: &str, port: u16) -> Outside {
        let child = Command::new(bin("demo-service"))
            .args(["--name", name, "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo-service");
        tests::wait_for(
            "the outside service to listen",
            Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        );
        Outside(child)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn external_and_reused_services_are_checked_and_injected_but_never_run() {
    let d = TestDaemon::start();
    let (db_port, cache_port) = (free_port(), free_port());
    let mut db = Outside::start("db", db_port);
    let cache = Outside::start("cache", cache_port);
    let dir = d.workdir("ext");
    write_config(
        &dir,
        &format!(
            r#"
name: ext
services:
  db:
    target: {{ external: {{ address: "127.0.0.1:{db_port}" }} }}
    health_check: {{ type: tcp, interval: 200ms, retries: 1 }}
  cache:
    target: {{ process: {{ binary: DEMO, args: [--name, cache, --port, "{cache_port}"] }} }}
    port: {cache_port}
    reuse_if_running: true
    health_check: {{ type: tcp }}
  api:
    target: {{ process: {{ binary: DEMO, args: [--name, api, --port, "${{self.port}}", --upstream, "db=${{db.addr}}", --upstream, "cache=${{cache.addr}}"] }} }}
    port: auto
    depends_on: {{ db: {{ condition: healthy }}, cache: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();

    let db_info = get(&c, "ext", "db");
    assert_eq!(
        (db_info.backend.as_str(), db_info.health),
        ("external", Health::Healthy)
    );
    assert_eq!(db_info.address, Some(format!("127.0.0.1:{db_port}")));
    assert_eq!(db_info.pid, None);
    let cache_info = get(&c, "ext", "cache");
    assert_eq!(cache_info.state, ServiceState::Running);
    assert_eq!(cache_info.pid, None, "the harness started a second cache");
    assert!(
        cache_info
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("reused")),
        "{cache_info:?}"
    );
    // No process of the harness runs for cache: only the one the test started.
    let ours = deployer::process::find_instances(&format!("{}/ext/cache", d.info.instance));
    assert!(ours.is_empty(), "{ours:?}");
    // The dependent got both addresses and reached them.
    assert_eq!(get(&c, "ext", "api").health, Health::Healthy);
    let env = d.cli(&dir, &["config", "env", "api"]);
    let env = String::from_utf8_lossy(&env.stdout).into_owned();
    assert!(
        env.contains(&format!("DB_ADDR=127.0.0.1:{db_port}")),
        "{env}"
    );
    assert!(
        env.contains(&format!("CACHE_ADDR=127.0.0.1:{cache_port}")),
        "{env}"
    );

    // The external service going away is seen by its health check.
    let _ = db.0.kill();
    let _ = db.0.wait();
    wait_service(&c, "ext", "db", "db unhealthy", |s| {
        s.health == Health::Unhealthy
    });

    // down stops what the harness runs, and nothing else.
    let down = d.cli(&dir, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        alive(cache.0.id()),
        "the harness stopped a service it did not start"
    );
}
