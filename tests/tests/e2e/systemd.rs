//! The systemd units: they pass `systemd-analyze verify`, and harnessd tells a
//! `NOTIFY_SOCKET` (owned by the test, as systemd is not PID 1 here) when it serves and
//! when it stops.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::{bin, TestDaemon};

/// Runs `systemd-analyze verify` on `unit` (in a directory with its companions);
/// returns what it printed. Unknown keys are only warnings there, so any output fails.
fn verify(unit: &Path) -> String {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian's systemd package; ./scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}: {text}", unit.display());
    text
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let dir = tempfile::tempdir().expect("temp dir");
    // verify checks that programs exist: point the units at this build and at a
    // release directory made here instead of /usr/local/bin and /opt/harness.
    let daemon = std::fs::read_to_string(units.join("harnessd.service")).expect("unit");
    let daemon = daemon.replace(
        "/usr/local/bin/harnessd",
        &bin("harnessd").display().to_string(),
    );
    std::fs::write(dir.path().join("harnessd.service"), daemon).expect("write unit");
    let root = dir.path().join("opt");
    let release = root.join("demo-1.0.0/scripts");
    std::fs::create_dir_all(&release).expect("release dir");
    for script in ["start.sh", "stop.sh"] {
        std::fs::copy("/bin/true", release.join(script)).expect("script");
    }
    let template = std::fs::read_to_string(units.join("harness-package@.service")).expect("unit");
    let template = template.replace("/opt/harness", &root.display().to_string());
    std::fs::write(dir.path().join("harness-package@.service"), template).expect("write unit");

    assert_eq!(verify(&dir.path().join("harnessd.service")), "");
    assert_eq!(
        verify(&dir.path().join("harness-package@demo-1.0.0.service")),
        ""
    );
}

#[test]
fn harnessd_notifies_readiness_once_it_serves_and_stopping_when_it_stops() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let d = TestDaemon::start_with("debug", &[("NOTIFY_SOCKET", path.to_str().expect("path"))]);
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("READY=1 from harnessd");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready
            .lines()
            .any(|l| l == format!("MAINPID={}", d.info.pid)),
        "{ready}"
    );
    // Ready means serving: a client gets in.
    drop(d.client());
    drop(d);
    let n = socket.recv(&mut buf).expect("STOPPING=1 from harnessd");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
