//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness_client::Client;
use protocol::methods::{self as m, names};
use tests::{bin, wait_until};

/// Writes `harness.yaml` into `dir`, replacing `DEMO` with the demo service's path.
pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
    let path = dir.join("harness.yaml");
    let demo = bin("demo-service");
    std::fs::write(&path, yaml.replace("DEMO", &demo.display().to_string())).expect("write config");
    path
}

/// Lists a stack's services.
pub fn list(c: &Client, stack: &str) -> Vec<m::ServiceInfo> {
    smol::block_on(c.call(
        names::SERVICE_LIST,
        m::ListParams {
            stack: Some(stack.to_owned()),
        },
    ))
    .expect("service.list")
}

/// One service.
pub fn get(c: &Client, stack: &str, name: &str) -> m::ServiceInfo {
    list(c, stack)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

/// Waits until a service satisfies `pred`.
#[track_caller]
pub fn wait_service(
    c: &Client,
    stack: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&m::ServiceInfo) -> bool,
) -> m::ServiceInfo {
    wait_until(what, Duration::from_secs(20), || {
        let seen = get(c, stack, name);
        if pred(&seen) {
            Ok(seen)
        } else {
            Err(Box::new(seen))
        }
    })
}

/// Log lines of a service.
pub fn log_lines(c: &Client, stack: &str, name: &str) -> Vec<m::LogLine> {
    let r: m::LogsResult = smol::block_on(c.call(
        names::SERVICE_LOGS,
        m::LogsParams {
            stack: stack.to_owned(),
            name: name.to_owned(),
            tail: None,
            since: Some(0),
            follow: false,
        },
    ))
    .expect("service.logs");
    r.lines
}

/// A GET over plain HTTP/1.1; returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Asserts that a CLI command succeeded; otherwise shows its output and the daemon's log.
#[track_caller]
pub fn assert_ok(d: &tests::TestDaemon, out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
}

/// Every journaled event of `topics` so far, replayed from the start (waits at most
/// a second after the last one for more).
pub fn replay(c: &Client, topics: &[&str]) -> Vec<protocol::Event> {
    let r: m::SubscribeResult = smol::block_on(c.call(
        names::SUBSCRIBE,
        m::SubscribeParams {
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            stack: None,
            since: Some(0),
        },
    ))
    .expect("subscribe");
    let rx = c.events();
    let mut out = Vec::new();
    loop {
        let next = smol::block_on(async {
            smol::future::or(async { rx.recv().await.ok() }, async {
                smol::Timer::after(Duration::from_secs(1)).await;
                None
            })
            .await
        });
        let Some(e) = next else { break };
        let last = e.seq >= r.seq;
        out.push(e);
        if last {
            break;
        }
    }
    smol::block_on(c.call::<m::Empty>(
        names::UNSUBSCRIBE,
        m::UnsubscribeParams {
            subscription: r.subscription,
        },
    ))
    .expect("unsubscribe");
    out
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An image tag of one test (`harness-test/busybox:e2e-<pid>-<n>`), so that concurrent tests never import
/// over each other's tag; removed when the test ends, also when it fails. Make it before
/// the test's daemon, so that it is dropped after the daemon removed its containers
/// (removing a tag still in use would leave the image behind, untagged).
pub struct TestImage(pub String);

impl TestImage {
    pub fn new() -> TestImage {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TestImage(format!(
            "harness-test/busybox:e2e-{}-{n}",
            std::process::id()
        ))
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
