//! The mesh data plane benchmark (issue 5): single-stream TCP throughput (iperf3, 10 s)
//! and ping RTT (the median of every ping, with both tunnels up and their pings
//! alternated in batches; once as the scheduler places things, once with everything
//! on one CPU) between two test-bed namespaces, over raw veth, through two
//! `harness-node` agents, and through boringtun-cli 0.7.1 (with 1 and with 4 threads),
//! all with tunnel MTU 1420, alternating in each round; the tunnel-up time (agent start
//! to the first ping reply); and the throughput of a hub relay (a TCP relay in the
//! agent, from the hub's LAN address to the node's mesh address, as LAN callers use).
//!
//! `mesh-rtt-against PATH` runs the RTT phases with another build's `harness-node`
//! (at PATH) in boringtun-cli's place: for a change to the data plane, two builds
//! paired batch by batch tell a smaller difference than each against boringtun-cli.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::testbed::{run, TestBed};
use wg_mesh::config::{Cidr, Config, Interface, Peer};
use wg_mesh::keys::PrivateKey;

const ROUNDS: usize = 3;
const SECONDS: u32 = 10;

/// A process in a namespace, ended when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A boringtun-cli device: the process, and its UAPI socket, which a killed
/// boringtun-cli leaves behind in /var/run/wireguard.
struct Boringtun {
    process: Proc,
    socket: std::path::PathBuf,
}

impl Drop for Boringtun {
    fn drop(&mut self) {
        // The process first: fields drop only after this body.
        let Proc(child) = &mut self.process;
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn in_ns(ns: &str, argv: &[&str]) -> Command {
    in_ns_on(ns, None, argv)
}

/// [`in_ns`], on CPU `cpu` only when one is given (`taskset`; what the command starts
/// inherits it).
fn in_ns_on(ns: &str, cpu: Option<usize>, argv: &[&str]) -> Command {
    let mut c = match cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string(), "ip"]);
            c
        }
        None => Command::new("ip"),
    };
    c.args(["netns", "exec", ns]).args(argv);
    c
}

/// Mbit/s of one 10 s single-stream iperf3 run from `a` to `to` (a server in `b`).
fn iperf(a: &str, b: &str, to: &str) -> f64 {
    iperf_via(a, b, to, to, 5201)
}

/// Like [`iperf`], with the client connecting to `via:port` (a relay to `to:5201`).
fn iperf_via(a: &str, b: &str, to: &str, via: &str, port: u16) -> f64 {
    let _server = Proc(
        in_ns(b, &["iperf3", "-s", "-1", "-B", to])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s (Debian's iperf3)"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = in_ns(
        a,
        &[
            "iperf3",
            "-c",
            via,
            "-p",
            &port.to_string(),
            "-t",
            &SECONDS.to_string(),
            "-J",
        ],
    )
    .output()
    .expect("iperf3 -c");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

/// The RTTs in ms of `count` pings from `a` to `to` (each ping's own: the median of
/// them all is robust against a few scheduling hiccups, which an average is not).
fn rtt(a: &str, to: &str, count: usize, cpu: Option<usize>) -> Vec<f64> {
    let count = count.to_string();
    let out = in_ns_on(a, cpu, &["busybox", "ping", "-c", &count, "-i", "0.02", to])
        .output()
        .expect("ping");
    // 64 bytes from 10.45.7.2: seq=0 ttl=64 time=0.123 ms
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Ping batches per path in the RTT phase, alternating between the paths. Twenty: each
/// pair of batches (the two tunnels back to back) gives a ratio, and twenty of them
/// bound the typical ratio within about ±2% on this machine.
const RTT_BATCHES: usize = 20;
/// Pings per batch.
const RTT_BATCH: usize = 30;

fn ping_once(a: &str, to: &str) -> bool {
    in_ns(a, &["busybox", "ping", "-c", "1", "-W", "1", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Asks agent A (host 0's, with a control socket) for a relay.
fn add_relay(bed: &TestBed, listen: &str, to: &str) {
    let path = bed.hosts[0].dir.join("bench-control.sock");
    let request = serde_json::json!({"op": "add_relay", "listen": listen, "to": to});
    let answer = tests::node_control(&path, request);
    assert_eq!(answer["ok"], true, "add_relay: {answer}");
}

/// A harness-node build and where its tunnel runs: a subnet (10.`net`.third.0/24),
/// a port and interface names of its own, so that two can be up at once.
struct Build {
    binary: std::path::PathBuf,
    net: u8,
    port: u16,
    prefix: &'static str,
}

impl Build {
    /// This build's agent.
    fn this() -> Build {
        Build {
            binary: tests::bin("harness-node"),
            net: 45,
            port: 51900,
            prefix: "hw",
        }
    }

    /// Another build's agent at `binary`, where boringtun-cli's tunnel would be.
    fn other(binary: &std::path::Path) -> Build {
        Build {
            binary: binary.to_owned(),
            net: 46,
            port: 51901,
            prefix: "hx",
        }
    }
}

/// Two harness-node agents of `build`: A (hub-like, listening) and B (node, towards
/// A), on CPU `cpu` when one is given.
fn harness_tunnel(
    bed: &TestBed,
    third: &str,
    cpu: Option<usize>,
    build: &Build,
) -> (Proc, Proc, Duration) {
    let (ka, kb) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    let (net, port) = (build.net, build.port);
    let mesh = Cidr::parse(&format!("10.{net}.{third}.0/24")).unwrap();
    let a_conf = Config {
        interface: Interface {
            private_key: ka.clone(),
            address: Cidr::parse(&format!("10.{net}.{third}.1/24")).unwrap(),
            listen_port: Some(port),
            mtu: Some(1420),
        },
        peers: vec![Peer {
            public_key: kb.public(),
            endpoint: None,
            allowed_ips: vec![Cidr::parse(&format!("10.{net}.{third}.2/32")).unwrap()],
            persistent_keepalive: None,
        }],
    };
    let endpoint = format!("{}:{port}", bed.hosts[0].address).parse().unwrap();
    let b_conf = Config::node(
        kb,
        Cidr::parse(&format!("10.{net}.{third}.2/24")).unwrap(),
        ka.public(),
        endpoint,
        mesh,
    );
    let log = |i: usize| bed.hosts[i].dir.join(format!("bench-agent-{net}.log"));
    let start = |i: usize, conf: &Config| {
        let path = bed.hosts[i].dir.join(format!("bench-wg-{net}.conf"));
        std::fs::write(&path, conf.render()).unwrap();
        let mut cmd = in_ns_on(&bed.hosts[i].netns, cpu, &[]);
        cmd.arg(&build.binary)
            .arg("--config")
            .arg(&path)
            .args(["--interface", &format!("{}{}", build.prefix, bed.id)]);
        if i == 0 {
            cmd.arg("--control")
                .arg(bed.hosts[0].dir.join(format!("bench-control-{net}.sock")));
        }
        Proc(tests::start_node_agent(&mut cmd, &log(i)))
    };
    let a = start(0, &a_conf);
    let t = Instant::now();
    let b = start(1, &b_conf);
    while !ping_once(&bed.hosts[1].netns, &format!("10.{net}.{third}.1")) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the harness tunnel of {} never came up: {}{}",
            build.binary.display(),
            std::fs::read_to_string(log(0)).unwrap_or_default(),
            std::fs::read_to_string(log(1)).unwrap_or_default()
        );
    }
    (a, b, t.elapsed())
}

/// Two boringtun-cli devices with `threads` threads, configured with wg(8), on CPU `cpu`
/// when one is given.
fn boringtun_tunnel(
    bed: &TestBed,
    third: &str,
    threads: usize,
    cpu: Option<usize>,
) -> (Boringtun, Boringtun) {
    let keys = [
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    ];
    // UAPI sockets live in /var/run/wireguard, which the namespaces share: each
    // side's interface needs a name of its own.
    let name = |i: usize| format!("bt{}{}", bed.id, ["a", "b"][i]);
    let mut procs = Vec::new();
    for i in 0..2 {
        let ns = &bed.hosts[i].netns;
        procs.push(Boringtun {
            socket: format!("/var/run/wireguard/{}.sock", name(i)).into(),
            process: Proc(
                in_ns_on(
                    ns,
                    cpu,
                    &[
                        "boringtun-cli",
                        "--foreground",
                        "--disable-drop-privileges",
                        "--threads",
                        &threads.to_string(),
                        &name(i),
                    ],
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("boringtun-cli (cargo install boringtun-cli)"),
            ),
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..2 {
        let ns = bed.hosts[i].netns.clone();
        let other = 1 - i;
        let key_file = bed.hosts[i].dir.join("bench-bt.key");
        std::fs::write(&key_file, keys[i].to_base64()).unwrap();
        let peer = keys[other].public().to_string();
        let endpoint = format!("{}:51901", bed.hosts[other].address);
        let allowed = format!("10.46.{third}.{}/32", other + 1);
        let name = name(i);
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "wg",
                "set",
                &name,
                "private-key",
                key_file.to_str().unwrap(),
                "listen-port",
                "51901",
                "peer",
                &peer,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &allowed,
            ],
        );
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("10.46.{third}.{}/24", i + 1),
                "dev",
                &name,
            ],
        );
        run(
            "ip",
            &[
                "netns", "exec", &ns, "ip", "link", "set", &name, "mtu", "1420", "up",
            ],
        );
    }
    let t = Instant::now();
    while !ping_once(&bed.hosts[0].netns, &format!("10.46.{third}.2")) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the boringtun-cli tunnel never came up"
        );
    }
    let b = procs.pop().unwrap();
    let a = procs.pop().unwrap();
    (a, b)
}

pub fn bench() {
    let bed = TestBed::new(2);
    let third = bed.third_octet().to_string();
    let (na, nb) = (bed.hosts[0].netns.clone(), bed.hosts[1].netns.clone());
    let (mut raw, mut ours, mut bt1, mut bt4) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut up = Vec::new();
    let mut relayed = Vec::new();
    for _ in 0..ROUNDS {
        raw.push(iperf(&na, &nb, &bed.hosts[1].address));
        {
            let this = Build::this();
            let (_a, _b, took) = harness_tunnel(&bed, &third, None, &this);
            up.push(took.as_secs_f64() * 1e3);
            let to = format!("10.{}.{third}.2", this.net);
            ours.push(iperf(&na, &nb, &to));
            let via = bed.hosts[0].address.clone();
            add_relay(&bed, &format!("{via}:5202"), &format!("{to}:5201"));
            relayed.push(iperf_via(&na, &nb, &to, &via, 5202));
        }
        for (threads, out) in [(1, &mut bt1), (4, &mut bt4)] {
            let (_a, _b) = boringtun_tunnel(&bed, &third, threads, None);
            let to = format!("10.46.{third}.2");
            out.push(iperf(&na, &nb, &to));
        }
    }
    let free = rtt_phase(&bed, &third, None, None);
    let pinned = rtt_phase(&bed, &third, Some(0), None);
    let (raw, ours, bt1, bt4) = (median(raw), median(ours), median(bt1), median(bt4));
    let best = bt1.max(bt4);
    println!(
        "mesh, single TCP stream {SECONDS} s, MTU 1420, medians of {ROUNDS}: raw veth {raw:.0} Mbit/s; harness-node {ours:.0} Mbit/s; boringtun-cli -t 1 {bt1:.0} Mbit/s, -t 4 {bt4:.0} Mbit/s; harness-node / best boringtun-cli = {:.2} (target >= 1.2); {}; {}; tunnel up (agent start to first ping reply) {:.0} ms (target < 1000); through a hub relay (LAN address to mesh address) {:.0} Mbit/s",
        ours / best,
        free.summary("median ping RTT"),
        pinned.summary("all on CPU 0"),
        median(up),
        median(relayed),
    );
}

/// The RTT phase alone (`harness-bench mesh-rtt`): quicker to repeat than the whole
/// bench, for changes that only touch latency. Against boringtun-cli, or against the
/// `harness-node` at `against` (`mesh-rtt-against PATH`).
pub fn rtt_bench(against: Option<&std::path::Path>) {
    let bed = TestBed::new(2);
    let third = bed.third_octet().to_string();
    println!(
        "mesh RTT, {}",
        rtt_phase(&bed, &third, None, against).summary("median")
    );
    println!(
        "mesh RTT, {}",
        rtt_phase(&bed, &third, Some(0), against)
            .summary("all on CPU 0 (no wake-up crosses CPUs), median")
    );
}

/// Median ping RTTs in ms of one RTT phase.
struct Rtt {
    pings: usize,
    raw: f64,
    ours: f64,
    /// What it was measured against: boringtun-cli (the target applies), or
    /// another build.
    baseline_name: String,
    against_boringtun: bool,
    baseline: f64,
    /// harness-node / the baseline of each batch's median, per pair of batches (the
    /// two run back to back, so what the machine does between pairs falls on both).
    paired: Vec<f64>,
}

impl Rtt {
    fn summary(&self, what: &str) -> String {
        let paired = match median_interval(self.paired.clone()) {
            Some((median, low, high)) => {
                let verdict = if low > 1.0 {
                    "harness-node slower"
                } else if high < 1.0 {
                    "harness-node faster"
                } else {
                    "no difference resolved"
                };
                format!(
                    "; per pair of batches: median ratio {median:.3}, 95% interval {low:.3}-{high:.3} ({verdict})"
                )
            }
            None => String::new(),
        };
        let name = &self.baseline_name;
        format!(
            "{what} of {} pings each: raw veth {:.3} ms, harness-node {:.3} ms, {name} {:.3} ms; harness-node / {name} = {:.3}{}{paired}",
            self.pings,
            self.raw,
            self.ours,
            self.baseline,
            self.ours / self.baseline,
            if self.against_boringtun {
                " (target <= 1)"
            } else {
                ""
            }
        )
    }
}

/// The median of `values` and a distribution-free interval of at least 95% confidence
/// around it: the sign test's, from order statistics `k` and `n + 1 - k`, with `k` the
/// largest for which P(Binomial(n, 1/2) < k) <= 2.5%. `None` for fewer than six values,
/// which bound nothing at that confidence.
fn median_interval(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let all = 2f64.powi(i32::try_from(n).ok()?);
    // `below` is P(B < k); `choose` is C(n, k).
    let (mut k, mut below, mut choose) = (0, 0.0, 1.0);
    while k < n && below + choose / all <= 0.025 {
        below += choose / all;
        choose = choose * (n - k) as f64 / (k + 1) as f64;
        k += 1;
    }
    (k > 0).then(|| (values[n / 2], values[k - 1], values[n - k]))
}

/// Ping RTTs over raw veth, the harness tunnel and boringtun-cli `-t 1` (or the tunnel
/// of the harness-node at `against`): both tunnels up at once and their pings
/// alternated in batches, so the machine's moods (it is shared) fall on both alike.
/// With `cpu`, the four agents and `ping` all run on that CPU: a round trip is then
/// the work on its path alone, without the cross-CPU wake-ups that the scheduler
/// places differently from one ping to the next (an unpinned run mixes pings that
/// stay on one CPU, about 0.19 ms here, with pings that cross, about 0.28 ms, and its
/// median falls in between).
fn rtt_phase(
    bed: &TestBed,
    third: &str,
    cpu: Option<usize>,
    against: Option<&std::path::Path>,
) -> Rtt {
    let (mut raw, mut ours, mut bt) = (Vec::new(), Vec::new(), Vec::new());
    let mut paired = Vec::new();
    let na = &bed.hosts[0].netns;
    let this = Build::this();
    let (_a, _b, _) = harness_tunnel(bed, third, cpu, &this);
    // The baseline's tunnel, which answers on 10.46 (either of them).
    let (_other, _boringtun, baseline_name) = match against {
        Some(path) => {
            let other = harness_tunnel(bed, third, cpu, &Build::other(path));
            (
                Some(other),
                None,
                format!("harness-node at {}", path.display()),
            )
        }
        None => (
            None,
            Some(boringtun_tunnel(bed, third, 1, cpu)),
            "boringtun-cli -t 1".to_owned(),
        ),
    };
    let (ours_to, bt_to) = (
        format!("10.{}.{third}.2", this.net),
        format!("10.46.{third}.2"),
    );
    for batch in 0..RTT_BATCHES {
        raw.extend(rtt(na, &bed.hosts[1].address, RTT_BATCH, cpu));
        // Which goes first alternates too.
        let (ours_batch, bt_batch) = if batch % 2 == 0 {
            let o = rtt(na, &ours_to, RTT_BATCH, cpu);
            (o, rtt(na, &bt_to, RTT_BATCH, cpu))
        } else {
            let b = rtt(na, &bt_to, RTT_BATCH, cpu);
            (rtt(na, &ours_to, RTT_BATCH, cpu), b)
        };
        if !ours_batch.is_empty() && !bt_batch.is_empty() {
            paired.push(median(ours_batch.clone()) / median(bt_batch.clone()));
        }
        ours.extend(ours_batch);
        bt.extend(bt_batch);
    }
    Rtt {
        pings: ours.len(),
        raw: median(raw),
        ours: median(ours),
        against_boringtun: against.is_none(),
        baseline_name,
        baseline: median(bt),
        paired,
    }
}

#[cfg(test)]
mod interval_tests {
    use super::median_interval;

    /// The sign test's order statistics: the 2nd and 9th of ten (97.9%), the 6th and
    /// 15th of twenty (95.9%); five values are too few for 95%.
    #[test]
    fn median_interval_takes_the_sign_tests_order_statistics() {
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(median_interval(ten), Some((6.0, 2.0, 9.0)));
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(median_interval(twenty), Some((11.0, 6.0, 15.0)));
        assert_eq!(median_interval(vec![1.0; 5]), None);
    }
}
