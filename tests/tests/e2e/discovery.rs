//! Discovery and placement against real servers: Debian's PostgreSQL and Redis, dnsmasq
//! answering SRV queries and python3-zeroconf announcing mDNS, each started by the test
//! inside a test-bed namespace (or on loopback); scans only cover the bed's own ranges.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use protocol::methods::{self as m, Health, ServiceState};
use protocol::EventKind;
use tests::testbed::TestBed;
use tests::{wait_for, TestDaemon};

use crate::support::*;

/// A server the test started; killed when dropped (the bed also ends everything in
/// its namespaces).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `argv` inside `netns` (the root namespace when `None`), output to `log`.
fn spawn_in(netns: Option<&str>, argv: &[&str], log: &Path) -> Server {
    let out = std::fs::File::create(log).expect("log file");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", argv[0]));
    Server(child)
}

#[track_caller]
fn wait_listening(addr: &str, log: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {addr}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory other users can enter (PostgreSQL runs as `postgres`).
fn open_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    dir
}

/// Debian's PostgreSQL server programs.
fn pg_bin(program: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("Debian's postgresql is installed (scripts/test.sh installs it)")
        .filter_map(|e| Some(e.ok()?.path().join("bin").join(program)))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no {program} under /usr/lib/postgresql"))
}

/// A PostgreSQL server on `addr:5432` inside `netns`, trusting every client.
fn postgres(netns: Option<&str>, addr: &str, port: u16, dir: &Path) -> Server {
    let data = dir.join("pgdata");
    std::fs::create_dir_all(&data).expect("pgdata");
    tests::testbed::run(
        "chown",
        &["-R", "postgres:postgres", &dir.display().to_string()],
    );
    let initdb = pg_bin("initdb").display().to_string();
    let data_s = data.display().to_string();
    // setpriv execs the program itself (runuser would fork and sit in between).
    let as_postgres = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
    ];
    let mut argv = as_postgres.to_vec();
    argv.extend([
        initdb.as_str(),
        "-D",
        &data_s,
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
    ]);
    tests::testbed::run(argv[0], &argv[1..]);
    let hba = data.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    text.push_str("host all all 0.0.0.0/0 trust\n");
    std::fs::write(&hba, text).expect("pg_hba.conf");
    let postgres = pg_bin("postgres").display().to_string();
    let port_s = port.to_string();
    let log = dir.join("postgres.log");
    let mut argv = as_postgres.to_vec();
    argv.extend([
        postgres.as_str(),
        "-D",
        &data_s,
        "-h",
        addr,
        "-p",
        &port_s,
        "-k",
        &data_s,
        "-c",
        "fsync=off",
    ]);
    let server = spawn_in(netns, &argv, &log);
    wait_listening(&format!("{addr}:{port}"), &log);
    server
}

fn redis(netns: Option<&str>, addr: &str, port: u16, dir: &Path) -> Server {
    let log = dir.join(format!("redis-{port}.log"));
    let port_s = port.to_string();
    let dir_s = dir.display().to_string();
    let server = spawn_in(
        netns,
        &[
            "redis-server",
            "--bind",
            addr,
            "--port",
            &port_s,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir_s,
        ],
        &log,
    );
    wait_listening(&format!("{addr}:{port}"), &log);
    server
}

fn discover_json(d: &TestDaemon, dir: &Path, args: &[&str]) -> m::DiscoverResult {
    let mut all = vec!["--json", "discover"];
    all.extend_from_slice(args);
    let out = d.cli(dir, &all);
    assert_ok(d, &out, "harness discover");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// What identified a found service ("" when nothing did).
fn detail(s: &m::DiscoveredService) -> &str {
    s.detail.as_deref().unwrap_or_default()
}

fn found<'a>(r: &'a m::DiscoverResult, address: &str, by: &str) -> &'a m::DiscoveredService {
    r.services
        .iter()
        .find(|s| s.address == address && s.found_by == by)
        .unwrap_or_else(|| panic!("nothing found at {address} by {by}: {:#?}", r.services))
}

/// Addresses of the bed's LAN the root namespace has a neighbour entry for: every
/// address anything here tried to reach on that link.
fn neighbours(bed: &TestBed) -> Vec<std::net::Ipv4Addr> {
    let out = tests::testbed::run("ip", &["-4", "neigh", "show", "dev", &bed.bridge]);
    out.lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn discovery_identifies_postgres_redis_and_ssh_by_protocol_and_stays_in_its_range() {
    let bed = TestBed::new(2);
    let d = TestDaemon::start();
    let tmp = open_dir("harness-disc-");
    let (h0, h1) = (bed.hosts[0].address.clone(), bed.hosts[1].address.clone());
    let _pg = postgres(Some(&bed.hosts[0].netns), &h0, 5432, tmp.path());
    let _redis = redis(Some(&bed.hosts[1].netns), &h1, 6379, tmp.path());

    // The hosts are .10 and .11; scan .0/28 of the bed's /24 (.1 to .14), nothing else.
    let prefix = bed.subnet.trim_end_matches("0/24");
    let range = format!("{prefix}0/28");
    let dir = d.workdir("disc");
    let r = discover_json(
        &d,
        &dir,
        &[
            "--range",
            &range,
            "--ports",
            "22,5432,6379,8080",
            "--strategy",
            "tcp",
            "--timeout",
            "300ms",
        ],
    );
    assert_eq!(r.addresses, 14, "{r:?}");
    assert_eq!(found(&r, &format!("{h0}:5432"), "tcp").kind, "postgresql");
    assert_eq!(found(&r, &format!("{h1}:6379"), "tcp").kind, "redis");
    for h in [&h0, &h1] {
        let ssh = found(&r, &format!("{h}:22"), "tcp");
        assert_eq!(ssh.kind, "ssh");
        assert!(detail(ssh).starts_with("SSH-2.0-OpenSSH"), "{ssh:?}");
    }
    // PostgreSQL is not mistaken for Redis, nor Redis for PostgreSQL.
    assert!(r.services.iter().all(|s| s.address != format!("{h0}:6379")));
    // Absent hosts (no ARP answer) cost one connect each, not four.
    assert!(r.probes < 14 * 4, "{r:?}");

    // Nothing outside the range was tried: no neighbour entry beyond .14.
    let range = protocol::config::AddressRange::parse(&format!("{prefix}0/28")).unwrap();
    let seen = neighbours(&bed);
    // The check can see a scan: addresses in the range where no host is were tried.
    let absent: std::net::Ipv4Addr = format!("{prefix}5").parse().unwrap();
    assert!(
        seen.contains(&absent),
        "no neighbour entry for {absent}: {seen:?}"
    );
    let outside: Vec<_> = seen.into_iter().filter(|a| !range.contains(*a)).collect();
    assert!(
        outside.is_empty(),
        "the scan reached beyond its range: {outside:?}"
    );

    // A second identical search is served from the cache; --refresh looks again.
    let again = discover_json(
        &d,
        &dir,
        &[
            "--range",
            &format!("{prefix}0/28"),
            "--ports",
            "22,5432,6379,8080",
            "--strategy",
            "tcp",
            "--timeout",
            "300ms",
        ],
    );
    assert!(again.cached);
    assert_eq!(again.services, r.services);

    // --save writes a config of external services that validates as it is.
    let saved = dir.join("found.yaml");
    let out = d.cli(
        &dir,
        &[
            "discover",
            "--range",
            &h0,
            "--ports",
            "5432",
            "--strategy",
            "tcp",
            "--refresh",
            "--save",
            saved.to_str().unwrap(),
        ],
    );
    assert_ok(&d, &out, "discover --save");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("postgresql") && table.contains(&format!("{h0}:5432")),
        "{table}"
    );
    let out = d.cli(&dir, &["-f", saved.to_str().unwrap(), "validate"]);
    assert_ok(&d, &out, "validate the saved file");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains(&format!("address: \"{h0}:5432\"")), "{text}");

    // Bad input: a clear error, and the daemon keeps serving.
    let out = d.cli(&dir, &["discover", "--range", "10.0.0.0/8"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a scan covers at most 65536"), "{err}");
    assert!(d.cli(&dir, &["daemon", "status"]).status.success());
}

#[test]
fn with_no_range_only_loopback_is_scanned_and_the_config_section_is_used() {
    let d = TestDaemon::start();
    let tmp = open_dir("harness-disc-");
    let port = free_port();
    let _redis = redis(None, "127.0.0.1", port, tmp.path());
    let dir = d.workdir("loop");
    let r = discover_json(
        &d,
        &dir,
        &["--ports", &port.to_string(), "--strategy", "tcp"],
    );
    assert_eq!(r.addresses, 1);
    assert_eq!(found(&r, &format!("127.0.0.1:{port}"), "tcp").kind, "redis");
    // The config's `discovery:` section gives what flags leave out; flags win.
    write_config(
        &dir,
        &format!(
            "name: loop\ndiscovery:\n  tcp_ports: [{port}]\n  strategies: [tcp]\nservices: {{}}\n"
        ),
    );
    let r = discover_json(&d, &dir, &["--refresh"]);
    assert_eq!(found(&r, &format!("127.0.0.1:{port}"), "tcp").kind, "redis");
    let r = discover_json(&d, &dir, &["--refresh", "--ports", "1"]);
    assert!(r.services.is_empty(), "{r:?}");
    // The deployment guide's DISCOVERY_* variables count as flags.
    let out = Command::new(tests::bin("harness"))
        .args(["--json", "discover", "--refresh", "--strategy", "tcp"])
        .current_dir(d.workdir("no-config"))
        .env("HARNESS_STATE_DIR", &d.state_dir)
        .env("DISCOVERY_TCP_PORTS", format!("1,{port}"))
        .env("DISCOVERY_NETWORK_RANGES", "127.0.0.1/32")
        .env("DISCOVERY_TCP_TIMEOUT", "2")
        .output()
        .expect("harness discover");
    assert_ok(&d, &out, "discover with DISCOVERY_* variables");
    let r: m::DiscoverResult = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((r.addresses, r.probes), (1, 2), "{r:?}");
    assert_eq!(found(&r, &format!("127.0.0.1:{port}"), "tcp").kind, "redis");
}

#[test]
fn dns_srv_and_mdns_find_services_announced_by_real_responders() {
    let bed = TestBed::new(3);
    // The daemon runs on host 2: mdns-sd joins the mDNS group on every interface it
    // sees before it is told which to use, and there it sees only the bed's.
    let d = TestDaemon::start_in_netns(&bed.hosts[2].netns);
    let tmp = open_dir("harness-disc-");
    let (h0, h1) = (bed.hosts[0].address.clone(), bed.hosts[1].address.clone());
    // dnsmasq on host 0 answers for test.internal only.
    let dns_log = tmp.path().join("dnsmasq.log");
    let _dns = spawn_in(
        Some(&bed.hosts[0].netns),
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={h0}"),
            "--port=53",
            "--local=/test.internal/",
            &format!("--pid-file={}", tmp.path().join("dnsmasq.pid").display()),
            "--srv-host=_postgresql._tcp.test.internal,db.test.internal,5432",
            &format!("--host-record=db.test.internal,{h0}"),
        ],
        &dns_log,
    );
    // python3-zeroconf on host 1 announces a Redis service.
    let script = tmp.path().join("announce.py");
    std::fs::write(
        &script,
        format!(
            r#"import socket, time
from zeroconf import IPVersion, ServiceInfo, Zeroconf
zc = Zeroconf(interfaces=["{h1}"], ip_version=IPVersion.V4Only)
info = ServiceInfo("_redis._tcp.local.", "cache._redis._tcp.local.", addresses=[socket.inet_aton("{h1}")], port=6379, server="cachehost.local.")
zc.register_service(info)
print("announced", flush=True)
while True:
    time.sleep(60)
"#
        ),
    )
    .unwrap();
    let mdns_log = tmp.path().join("zeroconf.log");
    let _mdns = spawn_in(
        Some(&bed.hosts[1].netns),
        &["/usr/bin/python3", script.to_str().unwrap()],
        &mdns_log,
    );
    wait_for("the mDNS announcement", Duration::from_secs(20), || {
        std::fs::read_to_string(&mdns_log)
            .ok()
            .filter(|t| t.contains("announced"))
    });
    wait_for("dnsmasq", Duration::from_secs(20), || {
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        probe.connect(format!("{h0}:53")).ok()?;
        std::fs::read_to_string(&dns_log)
            .ok()
            .filter(|t| t.contains("started"))
    });

    let dir = d.workdir("dns");
    let dns_server = format!("{h0}:53");
    let r = discover_json(
        &d,
        &dir,
        &[
            "--strategy",
            "dns,mdns",
            "--dns-server",
            &dns_server,
            "--srv",
            "_postgresql._tcp.test.internal,_nope._tcp.test.internal",
            "--mdns-interface",
            "eth0",
            "--mdns-type",
            "_redis._tcp.local.",
            "--mdns-wait",
            "4s",
        ],
    );
    let srv = found(&r, &format!("{h0}:5432"), "dns");
    assert_eq!(srv.kind, "postgresql");
    assert!(detail(srv).contains("db.test.internal"), "{srv:?}");
    let mdns = found(&r, &format!("{h1}:6379"), "mdns");
    assert_eq!(mdns.kind, "redis");
    assert!(
        detail(mdns).contains("cache._redis._tcp.local."),
        "{mdns:?}"
    );
    // The unknown name is a note, not a failure of the whole search.
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("_nope._tcp.test.internal") && n.contains("NXDOMAIN")),
        "{:?}",
        r.notes
    );
    // No strategy scanned: nothing was connected to.
    assert_eq!(r.probes, 0);
}

#[test]
fn a_discovered_postgres_is_used_by_its_dependent_and_never_started_or_stopped() {
    let bed = TestBed::new(1);
    let d = TestDaemon::start();
    let tmp = open_dir("harness-disc-");
    let h0 = bed.hosts[0].address.clone();
    let mut pg = postgres(Some(&bed.hosts[0].netns), &h0, 5432, tmp.path());
    // A Redis that already runs on loopback, and a stack service for it with
    // reuse_if_running: it must not be started a second time.
    let cache_port = free_port();
    let _cache = redis(None, "127.0.0.1", cache_port, tmp.path());
    let psql = pg_bin("psql").display().to_string();
    let dir = d.workdir("pg");
    write_config(
        &dir,
        &format!(
            r#"
name: pgstack
services:
  db:
    target: {{ discovered: {{ type: postgresql, ranges: ["{subnet}"] }} }}
  cache:
    target: {{ process: {{ binary: redis-server, args: [--port, "{cache_port}", --save, ""] }} }}
    port: {cache_port}
    reuse_if_running: true
    health_check: {{ type: tcp }}
  api:
    target:
      process:
        binary: /bin/sh
        args: [-c, '{psql} -h "$DB_HOST" -p "$DB_PORT" -U postgres -tAc "select 40 + 2" > answer.txt && exec DEMO --name api --port "$API_PORT"']
        working_dir: {dir}
    port: auto
    env: {{ API_PORT: "${{self.port}}" }}
    depends_on: {{ db: {{ condition: healthy }}, cache: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#,
            subnet = bed.subnet,
            dir = dir.display(),
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let db = get(&c, "pgstack", "db");
    assert_eq!(
        (db.backend.as_str(), db.state, db.health),
        ("discovered", ServiceState::Running, Health::Healthy)
    );
    assert_eq!(db.address, Some(format!("{h0}:5432")));
    assert_eq!(db.pid, None);
    assert!(
        db.reason
            .as_deref()
            .unwrap_or_default()
            .contains("discovered at"),
        "{db:?}"
    );
    // The dependent connected to the injected address and ran a query there.
    let answer = std::fs::read_to_string(dir.join("answer.txt")).expect("answer.txt");
    assert_eq!(answer.trim(), "42");
    let env = String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "api"]).stdout).into_owned();
    assert!(env.contains(&format!("DB_ADDR={h0}:5432")), "{env}");
    // The running Redis was reused, not started again.
    let cache = get(&c, "pgstack", "cache");
    assert_eq!(cache.pid, None, "{cache:?}");
    assert!(
        cache
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("reused"),
        "{cache:?}"
    );
    let ours = deployer::process::find_instances(&format!("{}/pgstack/cache", d.info.instance));
    assert!(ours.is_empty(), "{ours:?}");

    // The discovered service is checked by speaking its protocol where it was found;
    // stopping the server is seen by that check.
    let check = |d: &TestDaemon| -> m::HealthResult {
        // (It exits with 1 when the check fails: only its output matters here.)
        let out = d.cli(&dir, &["--json", "health", "db"]);
        let all: Vec<m::HealthResult> = serde_json::from_slice(&out.stdout).expect("health json");
        all.into_iter().next().expect("db's check")
    };
    let before = check(&d);
    assert_eq!(before.health, Health::Healthy, "{before:?}");
    assert_eq!(before.check, format!("postgresql at {h0}:5432"));
    tests::testbed::run("kill", &["-INT", &pg.0.id().to_string()]);
    let _ = pg.0.wait();
    let after = check(&d);
    assert_eq!(after.health, Health::Unhealthy, "{after:?}");
    assert!(
        after.output.contains("no postgresql service answers"),
        "{after:?}"
    );

    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    // down stopped nothing it did not start: the loopback Redis still answers.
    assert!(std::net::TcpStream::connect(("127.0.0.1", cache_port)).is_ok());
}

#[test]
fn placement_falls_back_to_the_next_target_and_says_why() {
    let d = TestDaemon::start();
    let nothing_there = free_port();
    let dir = d.workdir("place");
    write_config(
        &dir,
        &format!(
            r#"
name: place
services:
  web:
    target:
      - discovered: {{ type: http, ports: [{nothing_there}] }}
      - process: {{ binary: /bin/sleep, args: ["600"] }}
      - process: {{ binary: DEMO, args: [--name, web, --port, "${{self.port}}"] }}
    port: auto
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 200ms, retries: 2 }}
  client:
    target: {{ process: {{ binary: DEMO, args: [--name, client, --port, "${{self.port}}", --upstream, "web=${{web.addr}}"] }} }}
    port: auto
    depends_on: {{ web: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let web = get(&c, "place", "web");
    assert_eq!(
        (web.backend.as_str(), web.health),
        ("process", Health::Healthy)
    );
    assert_eq!(web.placement.as_deref(), Some("3 of 3 (process)"));
    let ps = String::from_utf8_lossy(&d.cli(&dir, &["ps", "--json"]).stdout).into_owned();
    assert!(ps.contains("\"placement\": \"3 of 3 (process)\""), "{ps}");
    // Each fallback is an event with the reason.
    let fallbacks: Vec<_> = replay(&c, &["service"])
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ServiceFallback(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(fallbacks.len(), 2, "{fallbacks:?}");
    assert_eq!(
        (
            fallbacks[0].from.as_str(),
            fallbacks[0].to.as_str(),
            fallbacks[0].position
        ),
        ("discovered", "process", 2)
    );
    assert!(
        fallbacks[0].reason.contains("no http service found"),
        "{fallbacks:?}"
    );
    assert!(
        fallbacks[1].reason.contains("not healthy within"),
        "{fallbacks:?}"
    );
    // The sleep of the second target was stopped when it was given up. (Shims carry
    // the shim server's marker, not their service's.)
    let sleeps = deployer::process::find_instances(&format!("{}/place/web", d.info.instance));
    assert_eq!(sleeps.len(), 1, "the demo service only: {sleeps:?}");
    // The dependent reached the target in use through its injected address (it is
    // healthy only once it connected there).
    assert_eq!(get(&c, "place", "client").health, Health::Healthy);
    let env =
        String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "client"]).stdout).into_owned();
    assert!(
        env.contains(&format!("WEB_ADDR={}", web.address.as_deref().unwrap())),
        "{env}"
    );

    // Applying the same file again changes nothing: the fallback is not a change.
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up again");
    let again = get(&c, "place", "web");
    assert_eq!(
        (again.pid, again.placement.as_deref()),
        (web.pid, Some("3 of 3 (process)"))
    );

    // The placement survives a daemon restart: same run, same target.
    let mut d = d;
    d.kill9();
    d.restart();
    let c = d.client();
    let after = get(&c, "place", "web");
    assert_eq!(
        (after.pid, after.placement.as_deref()),
        (web.pid, Some("3 of 3 (process)"))
    );
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
}
