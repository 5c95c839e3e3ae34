//! Bad input gets a precise error; the daemon keeps serving and the registry is
//! unchanged.

use protocol::methods::{self as m, names};
use protocol::{ErrorCode, Response};
use tests::TestDaemon;

use crate::support::*;

fn error_code(r: &Response) -> (ErrorCode, String) {
    match &r.outcome {
        protocol::envelope::Outcome::Error(e) => (e.code, e.message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let d = TestDaemon::start();
    let dir = d.workdir("solid");
    write_config(
        &dir,
        r#"
name: solid
services:
  one:
    target: { process: { binary: DEMO, args: [--name, one, --port, "${self.port}"] } }
    port: auto
"#,
    );
    assert!(d.cli(&dir, &["up"]).status.success());
    let registry = registry::Store::stack_file(&d.state_dir, "solid");
    // The save of `running` happens just after `up` returns: wait for it.
    let before = tests::wait_for(
        "the stack's registry file to say running",
        std::time::Duration::from_secs(10),
        || {
            std::fs::read(&registry)
                .ok()
                .filter(|b| String::from_utf8_lossy(b).contains("\"running\""))
        },
    );
    let c = d.client();
    let listed = list(&c, "solid");

    smol::block_on(async {
        // Malformed JSON.
        let (code, msg) = error_code(&c.raw_request("{not json".into(), 0).await.unwrap());
        assert_eq!(code, ErrorCode::ParseError);
        assert!(msg.contains("invalid JSON"), "{msg}");
        // JSON that is not a request.
        let answer = c
            .raw_request(r#"{"id": 900, "params": {}}"#.into(), 900)
            .await
            .unwrap();
        assert_eq!(error_code(&answer).0, ErrorCode::InvalidRequest);
        // Unknown method, with a suggestion.
        let e = c
            .call::<serde_json::Value>("service.lsit", serde_json::json!({}))
            .await
            .unwrap_err();
        let harness_client::ClientError::Daemon(e) = e else {
            panic!("{e}")
        };
        assert_eq!(e.code, ErrorCode::UnknownMethod);
        assert!(
            e.message.contains("did you mean service.list"),
            "{}",
            e.message
        );
        // Wrong params.
        let e = c
            .call::<serde_json::Value>(names::SERVICE_GET, serde_json::json!({"stack": 5}))
            .await
            .unwrap_err();
        assert!(
            matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::InvalidParams),
            "{e}"
        );
        // Unknown service.
        let e = c
            .call::<serde_json::Value>(
                names::SERVICE_START,
                m::ServicesParams {
                    stack: "solid".into(),
                    names: vec!["onr".into()],
                    purge: false,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::NotFound && o.message.contains("did you mean one")),
            "{e}"
        );
        // Invalid YAML and an invalid config: errors name file, line and key.
        let e = c
            .call::<m::ValidateResult>(
                names::CONFIG_VALIDATE,
                m::ValidateParams {
                    yaml: "services:\n  a: [\n".into(),
                    file: Some("bad.yaml".into()),
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::InvalidConfig && o.message.contains("bad.yaml")),
            "{e}"
        );
        let cyclic = "services:\n  a:\n    target: {process: {binary: x}}\n    dependencies: [b]\n  b:\n    target: {process: {binary: x}}\n    dependencies: [a]\n";
        let e = c
            .call::<m::ValidateResult>(
                names::CONFIG_VALIDATE,
                m::ValidateParams {
                    yaml: cyclic.into(),
                    file: Some("cyc.yaml".into()),
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::InvalidConfig && o.message.contains("cycle")),
            "{e}"
        );
        // A stack name that would lead out of the state directory (run files go in a
        // directory named after the stack).
        let config = protocol::config::parse_stack(
            "services:\n  a:\n    target: {process: {binary: /bin/true}}\n",
            "escape.yaml",
        )
        .unwrap();
        let e = c
            .call::<m::ApplyResult>(
                names::CONFIG_APPLY,
                m::ApplyParams {
                    stack: "../escape".into(),
                    config,
                    source: None,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::InvalidParams && o.message.contains("bad stack name \"../escape\"")),
            "{e}"
        );
        let stacks: Vec<m::StackInfo> = c
            .call(names::STACK_LIST, serde_json::json!({}))
            .await
            .unwrap();
        let stacks: Vec<&str> = stacks.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(stacks, ["solid"]);
    });

    // Oversized message: a clear error, then that connection is closed.
    smol::block_on(async {
        let big = d.client();
        let huge = format!(
            r#"{{"id":1,"method":"daemon.status","params":{{"pad":"{}"}}}}"#,
            "x".repeat(protocol::MAX_MESSAGE_BYTES + 10)
        );
        let (code, msg) = error_code(&big.raw_request(huge, 0).await.unwrap());
        assert_eq!(code, ErrorCode::MessageTooLarge, "{msg}");
    });

    // No hello, then a wrong token.
    smol::block_on(async {
        let anon = harness_client::Client::connect_unauthenticated(&d.info)
            .await
            .unwrap();
        let e = anon
            .call::<serde_json::Value>(names::DAEMON_STATUS, serde_json::json!({}))
            .await
            .unwrap_err();
        assert!(
            matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::HelloRequired),
            "{e}"
        );
        let e = anon
            .call::<serde_json::Value>(
                names::HELLO,
                m::HelloParams {
                    token: "0".repeat(64),
                    protocol: 1,
                    client: None,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, harness_client::ClientError::Daemon(ref o) if o.code == ErrorCode::Unauthorized),
            "{e}"
        );
    });

    // The daemon still serves, and nothing changed.
    let c2 = d.client();
    assert_eq!(list(&c2, "solid"), listed);
    assert_eq!(
        std::fs::read(&registry).unwrap(),
        before,
        "the stack's registry file changed"
    );
}

/// A full state directory: changes fail with a clear storage error, reads go on, and
/// once there is room again everything works and the registry is intact.
#[test]
fn a_full_state_directory_fails_changes_clearly_and_loses_nothing() {
    let mut d = TestDaemon::start_on_tmpfs(16);
    let dir = d.workdir("full");
    write_config(
        &dir,
        "name: full\nservices:\n  one:\n    target: { process: { binary: DEMO, args: [--name, one, --port, \"${self.port}\"] } }\n    port: auto\n    health_check: { type: tcp }\n",
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    // Fill the disk.
    let filler = d.state_dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 1 << 20];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let other = d.workdir("full2");
    write_config(
        &other,
        "name: full2\nservices:\n  two:\n    target: { process: { binary: DEMO, args: [--name, two, --port, \"${self.port}\"] } }\n    port: auto\n",
    );
    let out = d.cli(&other, &["up"]);
    assert!(!out.status.success(), "up worked on a full disk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    // Reads are served.
    let ps = d.cli(&dir, &["--json", "ps"]);
    assert_ok(&d, &ps, "harness ps on a full disk");
    assert!(String::from_utf8_lossy(&ps.stdout).contains("\"one\""));
    // Room again: changes work, and a restarted daemon finds everything.
    std::fs::remove_file(&filler).unwrap();
    assert_ok(&d, &d.cli(&other, &["up"]), "harness up with room again");
    d.kill9();
    d.restart();
    let c = d.client();
    assert_eq!(
        get(&c, "full", "one").state,
        protocol::methods::ServiceState::Running
    );
    assert_eq!(
        get(&c, "full2", "two").state,
        protocol::methods::ServiceState::Running
    );
}

/// A state directory whose disk fails and turns read-only under the running daemon
/// (ext4 `errors=remount-ro`, files open for writing included): changes fail with a
/// clear storage error, reads go on, and once the disk is repaired a restarted daemon
/// finds the registry as it was, with the refused change not half on disk.
#[test]
fn a_read_only_state_directory_fails_changes_clearly_serves_reads_and_loses_nothing() {
    let mut d = TestDaemon::start_on_ext4(64);
    let dir = d.workdir("ro");
    write_config(
        &dir,
        "name: ro\nservices:\n  one:\n    target: { process: { binary: DEMO, args: [--name, one, --port, \"${self.port}\"] } }\n    port: auto\n    health_check: { type: tcp }\n",
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let before = get(&d.client(), "ro", "one");
    d.fail_state_fs();
    let other = d.workdir("ro2");
    write_config(
        &other,
        "name: ro2\nservices:\n  two:\n    target: { process: { binary: DEMO, args: [--name, two, --port, \"${self.port}\"] } }\n    port: auto\n",
    );
    let out = d.cli(&other, &["up"]);
    assert!(!out.status.success(), "up worked on a read-only disk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot save the registry") && err.contains("Read-only file system"),
        "{err}"
    );
    // Reads are served, by the same daemon.
    let ps = d.cli(&dir, &["--json", "ps"]);
    assert_ok(&d, &ps, "harness ps on a read-only disk");
    let c = d.client();
    let now = get(&c, "ro", "one");
    assert_eq!(now.state, m::ServiceState::Running);
    assert_eq!(now.pid, before.pid, "the service was restarted");
    assert!(!log_lines(&c, "ro", "one").is_empty(), "no logs served");
    // The operator repairs the disk; a restarted daemon finds what was saved.
    d.kill9();
    d.repair_state_fs();
    d.restart();
    let c = d.client();
    let services = list(&c, "ro");
    assert_eq!(
        services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["one"]
    );
    let refused: Result<Vec<m::ServiceInfo>, _> = smol::block_on(c.call(
        names::SERVICE_LIST,
        m::ListParams {
            stack: Some("ro2".into()),
        },
    ));
    assert!(
        refused.is_err_and(|e| e.to_string().contains("no stack named ro2")),
        "the refused stack is in the registry"
    );
    let moved_aside: Vec<_> = std::fs::read_dir(&d.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    assert!(moved_aside.is_empty(), "files moved aside: {moved_aside:?}");
}
