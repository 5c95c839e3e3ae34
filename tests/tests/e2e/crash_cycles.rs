//! Crash cycles across every backend: a stack of a local process, a container, a LAN
//! service and a mesh service, with `up`, `down` and `restart` cut short by a SIGKILL
//! of harnessd at a random moment, and harnessd started again each time. After each
//! restart the registry loads, what runs is adopted once (never twice), the reconcile
//! pass reports, and `up` brings everything back healthy; at the end `down` leaves
//! nothing behind. `CRASH_CYCLES` sets the count (10 here; the soak script runs more),
//! `CRASH_SEED` the moments.
//! It is a mesh test (the serial group): it makes the hub's interface.

use std::process::{Command, Stdio};
use std::time::Duration;

use protocol::methods::{Health, ServiceState};
use tests::testbed::TestBed;
use tests::TestDaemon;

use crate::support::{assert_ok, replay, wait_service, write_config, TestImage};

/// The demo-service processes on this machine whose command line has `needle`
/// (NUL-separated args); not the shells that wrap them (their arguments name it too).
fn processes_with(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                let program = c.split('\0').next().unwrap_or_default();
                program.ends_with("demo-service") && c.contains(needle)
            })
        })
        .filter(|pid| tests::alive(*pid))
        .collect()
}

/// Containers of this daemon on the root engine.
fn containers_of(instance: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=dev.harness.instance={instance}"),
        ])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The hub agent's own peer list (all of them, owned or not), from its control socket.
fn hub_peers(d: &TestDaemon) -> Vec<serde_json::Value> {
    let socket = d.state_dir.join("mesh/hub.sock");
    let answer = tests::node_control(&socket, serde_json::json!({"op": "peers"}));
    answer["peers"].as_array().cloned().unwrap_or_default()
}

/// A small xorshift: random moments that a printed seed reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn mesh_crash_cycles_across_every_backend_lose_and_duplicate_nothing() {
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // A fixed seed by default, so a failure in CI names moments that can be tried
    // again; the soak script passes random ones.
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    eprintln!("crash cycles: {cycles}, seed {seed} (CRASH_SEED reproduces the moments)");
    let mut rng = Rng(seed);
    let bed = TestBed::new(2);
    // Before the daemon: dropped after it, also when the test fails.
    let image = TestImage::new();
    let mut d = TestDaemon::start();
    let third = bed.third_octet();
    let tag = format!("cc{}", std::process::id());
    let dir = d.workdir("crash");
    let rootfs = dir.join("rootfs.tar");
    tests::busybox_rootfs(&rootfs);
    write_config(
        &dir,
        &format!(
            r#"
name: {tag}
network: {{ wireguard_subnet: "10.49.{third}.0/24", listen_port: {port} }}
hosts:
  lan0: {lan0}
  node1: {node1}
services:
  proc:
    target: {{ process: {{ binary: DEMO, args: [--name, {tag}-proc, --port, "${{self.port}}"] }} }}
    port: auto
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 300ms }}
  box:
    target: {{ docker: {{ image: {image}, rootfs: {rootfs}, pull: never, command: [httpd, -f, -p, "80", -h, /www], ports: ["80"] }} }}
    stop_timeout: 1s
    health_check: {{ type: http, url: "http://${{self.addr}}/", interval: 300ms }}
  lan:
    target: {{ remote_lan: {{ host: lan0, binary: DEMO, args: [--name, {tag}-lan, --port, "${{self.port}}", --upstream, "proc=${{proc.addr}}"] }} }}
    port: auto
    depends_on: {{ proc: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 300ms }}
  mesh:
    target: {{ wireguard: {{ host: node1, binary: DEMO, args: [--name, {tag}-mesh, --port, "${{self.port}}", --upstream, "box=${{box.addr}}"] }} }}
    port: auto
    depends_on: {{ box: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 300ms }}
"#,
            port = 43000 + u16::from(third),
            lan0 = bed.host_yaml(0, ""),
            node1 = bed.host_yaml(1, ""),
            image = image.0,
            rootfs = rootfs.display(),
        ),
    );
    let names = ["proc", "box", "lan", "mesh"];
    // Each service's processes: at most one instance, ever.
    let instances = |name: &str| processes_with(&format!("--name\0{tag}-{name}\0"));
    let check_no_duplicates = |d: &TestDaemon, when: &str| {
        for n in ["proc", "lan", "mesh"] {
            let pids = instances(n);
            assert!(
                pids.len() <= 1,
                "{when}: {n} runs {} times: {pids:?}",
                pids.len()
            );
        }
        let boxes = containers_of(&d.info.instance);
        assert!(boxes.len() <= 1, "{when}: containers {boxes:?}");
    };
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let (mut kills, mut adopted) = ([0usize; 3], 0usize);
    for cycle in 0..cycles {
        let which = rng.below(3) as usize;
        kills[which] += 1;
        let action = ["up", "down", "restart"][which];
        let wait_ms = rng.below(1500);
        let mut cli = Command::new(tests::bin("harness"))
            .arg(action)
            .current_dir(&dir)
            .env("HARNESS_STATE_DIR", &d.state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("harness");
        std::thread::sleep(Duration::from_millis(wait_ms));
        d.kill9();
        let _ = cli.kill();
        let _ = cli.wait();
        let when = format!("cycle {cycle} ({action}, killed after {wait_ms} ms)");
        check_no_duplicates(&d, &when);
        // What runs now is what a new daemon must adopt, not start again.
        let running: Vec<(String, Vec<u32>)> = ["proc", "lan", "mesh"]
            .iter()
            .map(|n| ((*n).to_owned(), instances(n)))
            .collect();
        d.restart();
        let c = d.client();
        let reconciled = replay(&c, &["daemon"])
            .into_iter()
            .any(|e| matches!(e.kind, protocol::EventKind::DaemonReconciled(_)));
        assert!(reconciled, "{when}: no daemon.reconciled");
        // The registry holds the whole stack, or (a `down` that finished) none of it.
        let listed: Result<Vec<protocol::methods::ServiceInfo>, _> = smol::block_on(c.call(
            protocol::methods::names::SERVICE_LIST,
            protocol::methods::ListParams {
                stack: Some(tag.clone()),
            },
        ));
        match listed {
            Ok(services) => assert_eq!(services.len(), names.len(), "{when}: {services:?}"),
            Err(e) => assert!(
                action == "down" && e.to_string().contains("no stack named"),
                "{when}: {e}"
            ),
        }
        check_no_duplicates(&d, &format!("{when}, after the restart"));
        assert_ok(&d, &d.cli(&dir, &["up"]), &format!("{when}: harness up"));
        for n in names {
            wait_service(&c, &tag, n, &format!("{when}: {n} healthy"), |s| {
                s.state == ServiceState::Running && s.health == Health::Healthy
            });
        }
        check_no_duplicates(&d, &format!("{when}, after up"));
        // The hub has one peer, the node's: none left over from a crash.
        let peers = hub_peers(&d);
        assert_eq!(peers.len(), 1, "{when}: the hub's peers: {peers:?}");
        // A service that ran through the crash is the same process now.
        for (n, pids) in running {
            if let [pid] = pids[..] {
                if tests::alive(pid) {
                    assert_eq!(instances(&n), vec![pid], "{when}: {n} was started again");
                    adopted += 1;
                }
            }
        }
    }
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    for n in ["proc", "lan", "mesh"] {
        tests::wait_for(&format!("{n} to end"), Duration::from_secs(10), || {
            instances(n).is_empty().then_some(())
        });
    }
    assert!(
        containers_of(&d.info.instance).is_empty(),
        "containers left"
    );
    for i in 0..2 {
        assert!(
            bed.processes(i).is_empty(),
            "left on host {i}: {:?}",
            bed.processes(i)
        );
    }
    let ifname = format!("hm{}", &d.info.instance[..10]);
    tests::wait_for("the mesh interface to go", Duration::from_secs(10), || {
        (!tests::testbed::run("ip", &["-o", "link", "show"]).contains(&ifname)).then_some(())
    });
    // And the `unreachable` route that covered the mesh subnet while it was in use.
    let subnet = format!("10.49.{third}.0/24");
    let routes = tests::testbed::run("ip", &["-4", "route", "show", "table", "all"]);
    assert!(
        !routes.contains(&subnet),
        "a route of the mesh is left: {routes}"
    );
    println!(
        "crash cycles: {cycles} cycles, seed {seed}: harnessd SIGKILLed {cycles} times (during up {}, down {}, restart {}), restarted and reconciled each time; {adopted} times a service ran through a crash and was the same process after it, none ran twice, the registry whole every time; nothing left after down",
        kills[0], kills[1], kills[2]
    );
}

/// A stack `NAME<pid>` (in its own work dir, returned with the name) of one mesh
/// service on the bed's host 0, its mesh on UDP port `port_base` + the bed's octet.
fn one_mesh_service(
    d: &TestDaemon,
    bed: &TestBed,
    name: &str,
    port_base: u16,
) -> (String, std::path::PathBuf) {
    let third = bed.third_octet();
    let tag = format!("{name}{}", std::process::id());
    let stack = d.workdir(&format!("{name}-stack"));
    write_config(
        &stack,
        &format!(
            r#"
name: {tag}
network: {{ wireguard_subnet: "10.49.{third}.0/24", listen_port: {port} }}
hosts:
  node0: {node0}
services:
  mesh:
    target: {{ wireguard: {{ host: node0, binary: DEMO, args: [--name, {tag}-mesh, --port, "${{self.port}}"] }} }}
    port: auto
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 300ms }}
"#,
            port = port_base + u16::from(third),
            node0 = bed.host_yaml(0, ""),
        ),
    );
    (tag, stack)
}

/// The moment crash cycle 13 of seed 320122769 hit: a hub agent that the daemon started
/// but did not record (it was killed in between) still runs, holding the mesh
/// interface's name. The next mesh service must not fail with "Device or resource busy":
/// the daemon ends that agent and starts its own hub.
#[test]
fn an_unrecorded_hub_agent_is_ended_before_a_new_hub_starts() {
    use wg_mesh::config::{Cidr, Config, Interface};
    let bed = TestBed::new(1);
    let d = TestDaemon::start();
    let third = bed.third_octet();
    let dir = d.workdir("orphan");
    let conf = Config {
        interface: Interface {
            private_key: wg_mesh::keys::PrivateKey::generate().unwrap(),
            address: Cidr::parse(&format!("10.50.{third}.1/24")).unwrap(),
            listen_port: Some(0),
            mtu: None,
        },
        peers: Vec::new(),
    };
    let conf_path = dir.join("orphan.conf");
    std::fs::write(&conf_path, conf.render()).unwrap();
    let interface = format!("hm{}", &d.info.instance[..10]);
    let mut orphan = tests::start_node_agent(
        Command::new(tests::bin("harness-node"))
            .arg("--config")
            .arg(&conf_path)
            .args(["--interface", &interface])
            .env(
                "HARNESS_INSTANCE",
                format!("{}/-/mesh-hub", d.info.instance),
            ),
        &dir.join("orphan.log"),
    );

    let (_, stack) = one_mesh_service(&d, &bed, "orphan", 44000);
    let up = d.cli(&stack, &["up"]);
    // Ended by the daemon, whatever the outcome (a failed `up` must not leave it).
    let ended = tests::wait_for("the orphan to be ended", Duration::from_secs(10), || {
        orphan.try_wait().ok().flatten()
    });
    assert_ok(&d, &up, "harness up beside an unrecorded hub agent");
    assert!(!ended.success(), "the orphan exited by itself: {ended}");
    assert_ok(&d, &d.cli(&stack, &["down"]), "harness down");
}

/// A hub agent that runs with its record (`hub.pid`) gone, as when the daemon is killed
/// between starting it and recording it, while it already serves: the restarted daemon
/// adopts it (the same process, its peer kept, the mesh service's tunnel up), neither
/// ending it nor starting a second hub.
#[test]
fn a_hub_whose_record_is_gone_is_adopted_not_replaced() {
    let bed = TestBed::new(1);
    let mut d = TestDaemon::start();
    let (tag, stack) = one_mesh_service(&d, &bed, "adopt", 45000);
    assert_ok(&d, &d.cli(&stack, &["up"]), "harness up");
    let record = d.state_dir.join("mesh/hub.pid");
    let hub_pid: u32 = std::fs::read_to_string(&record)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mesh_pid = {
        let c = d.client();
        crate::support::get(&c, &tag, "mesh").pid
    };
    d.kill9();
    std::fs::remove_file(&record).unwrap();
    d.restart();
    let c = d.client();
    let mesh = wait_service(&c, &tag, "mesh", "mesh healthy after the restart", |s| {
        s.state == ServiceState::Running && s.health == Health::Healthy
    });
    assert_eq!(mesh.pid, mesh_pid, "the mesh service was started again");
    assert!(tests::alive(hub_pid), "the hub was ended");
    assert_eq!(hub_peers(&d).len(), 1, "the hub lost its peer");
    // `up` again finds the adopted hub: no second one, the same process.
    assert_ok(&d, &d.cli(&stack, &["up"]), "harness up after the restart");
    let recorded: u32 = std::fs::read_to_string(&record)
        .expect("the adopted hub recorded again")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(recorded, hub_pid);
    assert_ok(&d, &d.cli(&stack, &["down"]), "harness down");
    tests::wait_for("the hub to end", Duration::from_secs(10), || {
        (!tests::alive(hub_pid)).then_some(())
    });
}
