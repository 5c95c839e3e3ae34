//! The browser dashboard in Debian's headless Chromium against a real daemon and stack:
//! the one-time login link from `harness ui`, the live table, the log panel, and a stop
//! clicked in the page (ui-examples/dashboard/test/dashboard.test.mjs drives the page).

use std::path::PathBuf;
use std::process::Command;

use protocol::methods::{names, HelloParams, ServiceState, UiLoginResult};
use protocol::ErrorCode;
use tests::TestDaemon;

use crate::support::*;

#[test]
fn stopping_a_service_in_the_dashboard_changes_its_state_live() {
    let d = TestDaemon::start();
    let dir = d.workdir("shop");
    write_config(
        &dir,
        r#"
name: shop
services:
  db:
    target: { process: { binary: DEMO, args: [--name, db, --port, "${self.port}", --heartbeat-ms, "200"] } }
    port: auto
    health_check: { type: tcp }
  api:
    target: { process: { binary: DEMO, args: [--name, api, --port, "${self.port}", --upstream, "db=${db.addr}", --heartbeat-ms, "200"] } }
    port: auto
    depends_on: { db: { condition: healthy } }
    health_check: { type: http, url: "http://${self.addr}/health" }
"#,
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");

    let ui = d.cli(&dir, &["--json", "ui"]);
    assert!(
        ui.status.success(),
        "{}",
        String::from_utf8_lossy(&ui.stderr)
    );
    let login: UiLoginResult = serde_json::from_slice(&ui.stdout).expect("ui --json");
    assert!(login.url.starts_with("https://127.0.0.1:") && login.url.contains("/#code="));

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ui-examples/dashboard/test");
    let screenshot = d.workdir("shots").join("dashboard.png");
    let out = Command::new("node")
        .arg(root.join("dashboard.test.mjs"))
        .current_dir(&root)
        .env("LOGIN_URL", &login.url)
        .env("CA_PEM", &d.info.ca)
        .env("SERVICE", "shop/api")
        .env("SCREENSHOT", &screenshot)
        .output()
        .expect("node (./scripts/test.sh installs chromium and playwright-core)");
    assert!(
        out.status.success(),
        "the dashboard test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The click in the page really stopped it, and the page showed a real screenshot.
    let c = d.client();
    assert_eq!(get(&c, "shop", "api").state, ServiceState::Stopped);
    assert_eq!(get(&c, "shop", "db").state, ServiceState::Running);
    let png = std::fs::read(&screenshot).expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");

    // The code was spent by the page: it opens nothing a second time.
    let e = smol::block_on(async {
        let anon = harness_client::Client::connect_unauthenticated(&d.info)
            .await
            .expect("connect");
        anon.call::<serde_json::Value>(
            names::HELLO,
            HelloParams {
                token: login.code.clone(),
                protocol: 1,
                client: None,
            },
        )
        .await
        .unwrap_err()
    });
    assert!(
        matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::Unauthorized),
        "{e}"
    );
}
