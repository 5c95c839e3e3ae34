//! Benchmarks of harness against the targets of the foundation issue. Each result is
//! printed beside a baseline measured in the same run, as a ratio.
//!
//! Run: `cargo build --release --workspace --bins && ./target/release/harness-bench [up|ps|get|fanout|rss|docker|ssh|discover|mesh|mesh-rtt]...`
//! (all of them when none is named), or `harness-bench mesh-rtt-against PATH` (the mesh
//! RTT phases against another build's `harness-node`). Needs busybox (Debian's
//! busybox-static) for `up` and `docker`, and a Docker engine and Debian's
//! docker-compose for `docker`.

mod containers;
mod discovery;
mod lan;
mod mesh;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use harness_client::Client;
use protocol::methods::{self as m, names};
use tests::{bin, TestDaemon};

const WAVES: usize = 5;
const PER_WAVE: usize = 20;
/// Rounds of `up` and its baselines, alternated; medians are reported. Eleven: with
/// five, the ratio moved by ±0.1 between runs on this shared machine.
const RUNS: usize = 11;

fn main() {
    // This one process stands in for many separate clients (500 subscribers, 16
    // requesters): let smol's global executor, which runs every client connection's
    // reader, use both cores instead of its default single thread, so the clients'
    // own decoding is not what is measured. The bench's own client tasks run on that
    // executor too, beside the readers: on an executor of their own, each hand-off
    // from a reader to its task woke another thread, which cost fan-out a fifth of
    // its p50 (BENCHMARKS.md, "2026-12-02 b"). The executor reads SMOL_THREADS once, at
    // its first spawn; the variable goes again at once, so that harnessd and the CLI
    // run as a user's would (inherited, it cost `up` about 10%).
    if std::env::var_os("SMOL_THREADS").is_none() {
        std::env::set_var("SMOL_THREADS", "2");
        smol::spawn(async {}).detach();
        std::env::remove_var("SMOL_THREADS");
    }
    let which: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, path] = &which[..] {
        if mode == "mesh-rtt-against" {
            if !Path::new(path).is_file() {
                eprintln!("harness-bench mesh-rtt-against: no harness-node binary at {path}");
                std::process::exit(2);
            }
            mesh::rtt_bench(Some(Path::new(path)));
            return;
        }
    }
    let all = which.is_empty();
    let want = |n: &str| all || which.iter().any(|w| w == n);
    let d = TestDaemon::start_with_log("warn");
    println!(
        "harness-bench: harnessd pid {} at {}",
        d.info.pid, d.info.url
    );
    if want("rss") {
        rss_idle(&d);
    }
    if want("up") || want("ps") {
        up_and_ps(&d, want("up"), want("ps"));
    }
    if want("get") {
        get_latency(&d);
    }
    if want("rss") {
        rss_1000(&d);
    }
    if want("fanout") {
        fanout(&d);
    }
    if want("docker") {
        containers::bench(&d);
    }
    if want("ssh") {
        lan::bench(&d);
    }
    if want("discover") {
        discovery::bench(&d);
    }
    if want("mesh") {
        mesh::bench();
    } else if which.iter().any(|w| w == "mesh-rtt") {
        mesh::rtt_bench(None);
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// The machine's CPU time counters (steal, all), from the first line of /proc/stat.
/// On a shared host, time the hypervisor gave to other guests shows as steal: a run
/// with much of it measured the neighbours as well.
struct CpuTimes {
    steal: u64,
    total: u64,
}

impl CpuTimes {
    fn now() -> CpuTimes {
        let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("cpu "))
            .expect("cpu line")
            .split_whitespace()
            .map(|f| f.parse().expect("cpu counter"))
            .collect();
        CpuTimes {
            // user nice system idle iowait irq softirq steal ...
            steal: fields[7],
            total: fields.iter().take(8).sum(),
        }
    }

    /// "CPU steal N%" since `self`.
    fn steal_since(&self) -> String {
        let now = CpuTimes::now();
        let total = (now.total - self.total).max(1);
        format!(
            "CPU steal {:.0}%",
            100.0 * (now.steal - self.steal) as f64 / total as f64
        )
    }
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

fn busybox() -> String {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return p.to_owned();
        }
    }
    panic!("busybox not found: apt-get install busybox-static");
}

/// 100 busybox httpd in 5 waves of 20; each service of wave k depends on the one with
/// the same index in wave k-1 (a DAG of depth 5); tcp checks.
fn stack_yaml(ports: &[u16], www: &Path) -> String {
    let bb = busybox();
    let mut y = String::from(
        "name: bench\nsettings: { max_parallel: 20, default_timeout: 60 }\nservices:\n",
    );
    for w in 0..WAVES {
        for i in 0..PER_WAVE {
            let port = ports[w * PER_WAVE + i];
            y.push_str(&format!(
                "  s{w}-{i}:\n    target: {{ process: {{ binary: {bb}, args: [httpd, -f, -p, \"127.0.0.1:{port}\", -h, \"{}\"] }} }}\n    port: {port}\n    health_check: {{ type: tcp, interval: 10s }}\n",
                www.display()
            ));
            if w > 0 {
                y.push_str(&format!("    dependencies: [s{}-{i}]\n", w - 1));
            }
        }
    }
    y
}

/// The baseline as the issue words it: a shell loop (`up-baseline.sh`, bash) that
/// spawns the same 100 in the same order and waits for each port of a wave before the
/// next; from its exec to its exit.
fn shell_baseline_up(script: &Path, ports: &[u16], www: &Path) -> Duration {
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(script)
        .arg(busybox())
        .arg(www)
        .arg(WAVES.to_string())
        .args(ports.iter().map(u16::to_string))
        .stderr(Stdio::inherit())
        .output()
        .expect("run the shell baseline");
    let took = start.elapsed();
    assert!(out.status.success(), "the shell baseline failed");
    // The httpds it started (our own children's children), by pid.
    let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(pids.len(), ports.len(), "the shell baseline's pids");
    let _ = Command::new("kill").args(&pids).status();
    for port in ports {
        while std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    took
}

/// A stricter baseline than the issue's: the same spawns and waits from this process
/// (no shell forks per service).
fn baseline_up(ports: &[u16], www: &Path) -> Duration {
    let bb = busybox();
    let start = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    for w in 0..WAVES {
        let wave = &ports[w * PER_WAVE..(w + 1) * PER_WAVE];
        for port in wave {
            children.push(
                Command::new(&bb)
                    .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
                    .arg(www)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn busybox httpd"),
            );
        }
        for port in wave {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let took = start.elapsed();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    took
}

fn up_and_ps(d: &TestDaemon, do_up: bool, do_ps: bool) {
    let dir = d.workdir("bench");
    let www = d.workdir("www");
    let ports = free_ports(WAVES * PER_WAVE);
    std::fs::write(dir.join("harness.yaml"), stack_yaml(&ports, &www)).expect("config");
    let harness = bin("harness");
    let cli = |args: &[&str]| {
        Command::new(&harness)
            .args(args)
            .current_dir(&dir)
            .env("HARNESS_STATE_DIR", &d.state_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run harness")
    };
    let (mut ours, mut base, mut shell) = (Vec::new(), Vec::new(), Vec::new());
    let script = d.workdir("bench").join("up-baseline.sh");
    std::fs::write(&script, include_str!("up-baseline.sh")).expect("the baseline script");
    let runs = if do_up { RUNS } else { 1 };
    for run in 0..runs {
        let start = Instant::now();
        let out = cli(&["up"]);
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "harness up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ours.push(took);
        let last = run + 1 == runs;
        if !(last && do_ps) {
            assert!(cli(&["down"]).status.success());
            shell.push(shell_baseline_up(&script, &ports, &www));
            base.push(baseline_up(&ports, &www));
        }
    }
    if do_up {
        let (o, sh, b) = (median(ours), median(shell), median(base));
        println!(
            "up 100 services (5 waves x 20, tcp checks): harness up {} vs the shell-loop baseline {} -> ratio {:.2} (target <= 1.5); vs spawning from one process {} -> ratio {:.2}",
            ms(o),
            ms(sh),
            o.as_secs_f64() / sh.as_secs_f64(),
            ms(b),
            o.as_secs_f64() / b.as_secs_f64()
        );
    }
    if do_ps {
        let mut ps = Vec::new();
        for _ in 0..31 {
            let start = Instant::now();
            let out = Command::new(&harness)
                .args(["-p", "bench", "ps", "--json"])
                .env("HARNESS_STATE_DIR", &d.state_dir)
                .output()
                .expect("ps");
            ps.push(start.elapsed());
            let rows: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).expect("ps --json output");
            assert_eq!(rows.len(), WAVES * PER_WAVE);
        }
        let mut hello = Vec::new();
        for _ in 0..31 {
            let start = Instant::now();
            drop(smol::block_on(Client::connect(&d.info, "bench")).expect("connect"));
            hello.push(start.elapsed());
        }
        let (p, h) = (median(ps), median(hello));
        println!(
            "harness ps --json, 100 services: median {} (target < 20 ms) vs baseline TLS connect + hello {} -> ratio {:.2}",
            ms(p),
            ms(h),
            p.as_secs_f64() / h.as_secs_f64()
        );
        assert!(cli(&["down"]).status.success());
    }
}

/// 16 clients, one request outstanding each, `service.get` against the baseline of the
/// cheapest round trip the daemon has (an unknown method: envelope, dispatch, error).
fn get_latency(d: &TestDaemon) {
    let dir = d.workdir("get");
    std::fs::write(
        dir.join("harness.yaml"),
        "name: get\nservices:\n  one:\n    target: { process: { binary: /bin/true } }\n",
    )
    .expect("config");
    let c = d.client();
    let cfg = protocol::config::parse_stack(
        &std::fs::read_to_string(dir.join("harness.yaml")).unwrap(),
        "harness.yaml",
    )
    .unwrap();
    let _: m::ApplyResult = smol::block_on(c.call(
        names::CONFIG_APPLY,
        m::ApplyParams {
            stack: "get".into(),
            config: cfg,
            source: None,
        },
    ))
    .unwrap();
    for (label, method) in [
        ("baseline (unknown method)", "bench.noop"),
        ("service.get", names::SERVICE_GET),
    ] {
        let cpu = CpuTimes::now();
        let (lat, wall) = load(d, 16, 10_000, method);
        println!(
            "{label}: {} requests from 16 clients: p50 {} p99 {} throughput {:.0}/s{}, {}",
            lat.len(),
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            lat.len() as f64 / wall.as_secs_f64(),
            if method == names::SERVICE_GET {
                " (target p99 < 2 ms)"
            } else {
                ""
            },
            cpu.steal_since()
        );
    }
}

fn load(d: &TestDaemon, clients: usize, total: usize, method: &str) -> (Vec<Duration>, Duration) {
    let lat = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let per = total.div_ceil(clients);
    let conns: Vec<Client> = (0..clients).map(|_| d.client()).collect();
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let (lat, method) = (lat.clone(), method.to_owned());
            smol::spawn(async move {
                let params = m::ServiceParams {
                    stack: "get".into(),
                    name: "one".into(),
                };
                let mut mine = Vec::with_capacity(per);
                for _ in 0..per {
                    let t = Instant::now();
                    let r = c.call::<serde_json::Value>(&method, &params).await;
                    mine.push(t.elapsed());
                    if method == names::SERVICE_GET {
                        r.expect("service.get");
                    }
                }
                lat.lock().unwrap().extend(mine);
            })
        })
        .collect();
    smol::block_on(async {
        for t in tasks {
            t.await;
        }
    });
    let wall = start.elapsed();
    let mut v = Arc::try_unwrap(lat).unwrap().into_inner().unwrap();
    v.sort();
    (v, wall)
}

/// When a subscriber got an event: (seq, arrival, the event's own `time`).
type Arrival = (u64, SystemTime, String);

/// Time from an event's publication (its `time`, microseconds) until the last of N
/// subscribers has it, for N = 500 against the baseline N = 1.
fn fanout(d: &TestDaemon) {
    let c = d.client();
    let stack_cfg = |v: usize| {
        let yaml = format!("name: fan\nservices:\n  one:\n    target: {{ process: {{ binary: /bin/true }} }}\n    env: {{ V: \"{v}\" }}\n");
        protocol::config::parse_stack(&yaml, "fan.yaml").unwrap()
    };
    for subscribers in [1usize, 500] {
        let conns: Vec<Client> = (0..subscribers).map(|_| d.client()).collect();
        for s in &conns {
            let _: m::SubscribeResult = smol::block_on(s.call(
                names::SUBSCRIBE,
                m::SubscribeParams {
                    topics: vec!["service".into()],
                    stack: Some("fan".into()),
                    since: None,
                },
            ))
            .unwrap();
        }
        const EVENTS: usize = 200;
        let arrivals: Arc<Mutex<Vec<Vec<Arrival>>>> = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|s| {
                let arrivals = arrivals.clone();
                smol::spawn(async move {
                    let rx = s.events();
                    let mut mine = Vec::with_capacity(EVENTS);
                    while mine.len() < EVENTS {
                        let e = rx.recv().await.expect("event");
                        mine.push((e.seq, SystemTime::now(), e.time.clone()));
                    }
                    arrivals.lock().unwrap().push(mine);
                    drop(s);
                })
            })
            .collect();
        let publisher = {
            let c = &c;
            async move {
                for v in 0..EVENTS {
                    let _: m::ApplyResult = c
                        .call(
                            names::CONFIG_APPLY,
                            m::ApplyParams {
                                stack: "fan".into(),
                                config: stack_cfg(v + subscribers),
                                source: None,
                            },
                        )
                        .await
                        .unwrap();
                    // 50 events a second: the latency of each, not a saturated queue.
                    smol::Timer::after(Duration::from_millis(20)).await;
                }
            }
        };
        let cpu = CpuTimes::now();
        smol::block_on(async {
            publisher.await;
            for t in tasks {
                t.await;
            }
        });
        let all = arrivals.lock().unwrap();
        let mut delays = Vec::new();
        for i in 0..EVENTS {
            let published = humantime::parse_rfc3339(&all[0][i].2).expect("event time");
            let last = all.iter().map(|a| a[i].1).max().unwrap();
            delays.push(last.duration_since(published).unwrap_or_default());
        }
        delays.sort();
        println!(
            "event fan-out to {subscribers} subscriber(s), {EVENTS} events: publish -> last subscriber p50 {} p99 {}{}, {}",
            ms(pct(&delays, 0.5)),
            ms(pct(&delays, 0.99)),
            if subscribers == 500 { " (target p99 < 20 ms)" } else { " (baseline)" },
            cpu.steal_since()
        );
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn rss_idle(d: &TestDaemon) {
    drop(d.client());
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "harnessd RSS idle: {} KiB (target < 20 MB)",
        rss_kib(d.info.pid)
    );
}

fn rss_1000(d: &TestDaemon) {
    let idle = rss_kib(d.info.pid);
    let mut yaml = String::from("name: big\nservices:\n");
    for i in 0..1000 {
        yaml.push_str(&format!(
            "  svc-{i}:\n    target: {{ process: {{ binary: /bin/true, args: [\"{i}\"] }} }}\n    port: auto\n    health_check: {{ type: tcp }}\n"
        ));
    }
    let cfg = protocol::config::parse_stack(&yaml, "big.yaml").unwrap();
    let c = d.client();
    let r: m::ApplyResult = smol::block_on(c.call(
        names::CONFIG_APPLY,
        m::ApplyParams {
            stack: "big".into(),
            config: cfg,
            source: None,
        },
    ))
    .unwrap();
    assert_eq!(r.added.len(), 1000);
    std::thread::sleep(Duration::from_millis(500));
    let full = rss_kib(d.info.pid);
    println!(
        "harnessd RSS with 1000 registered services: {full} KiB (target < 60 MB) vs {idle} KiB before -> ratio {:.2}",
        full as f64 / idle as f64
    );
}
