//! The mesh on real TUN devices: `harness-node` agents in test-bed namespaces, and
//! services the daemon deploys to mesh nodes. Each bed is a link of its own to the
//! harness host (its own subnet, routed nowhere else, its own interface names and
//! namespaces), so nodes on one bed reach the hosts of another only through the mesh.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::testbed::TestBed;

use crate::support::*;
use wg_mesh::config::{Cidr, Config, Interface, Peer};
use wg_mesh::keys::PrivateKey;

/// A running agent; killed when dropped (the bed also ends it with its namespace).
struct Agent {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `config` (0600) and starts an agent with it in host `i`'s namespace; returns
/// once it printed `ready`.
fn agent(bed: &TestBed, i: usize, config: &Config, control: Option<&std::path::Path>) -> Agent {
    let dir = &bed.hosts[i].dir;
    let path = dir.join("wireguard.conf");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .expect("config");
        f.write_all(config.render().as_bytes()).expect("config");
    }
    let stderr = dir.join("agent.log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &bed.hosts[i].netns])
        .arg(tests::bin("harness-node"))
        .arg("--config")
        .arg(&path)
        .args(["--interface", &format!("hm{}", bed.id)]);
    if let Some(c) = control {
        cmd.arg("--control").arg(c);
    }
    let child = tests::start_node_agent(&mut cmd, &stderr);
    Agent { child, stderr }
}

/// One ping from host `i` to `to`, waiting at most a second for the reply.
fn ping(bed: &TestBed, i: usize, to: &str) -> bool {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.hosts[i].netns,
            "busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            to,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn nodes_reach_the_hub_and_each_other_through_it_and_a_removed_peer_is_cut_off() {
    let bed = TestBed::new(3);
    // A subnet of this bed's own: 10.42.<the bed's third octet>.0/24.
    let third = bed.third_octet();
    let mesh = Cidr::parse(&format!("10.42.{third}.0/24")).unwrap();
    let ip = |n: u8| format!("10.42.{third}.{n}");
    let (hub_key, n1_key, n2_key) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    let node_peer = |key: &PrivateKey, n: u8| Peer {
        public_key: key.public(),
        endpoint: None,
        allowed_ips: vec![Cidr::parse(&ip(n)).unwrap()],
        persistent_keepalive: None,
    };
    let hub_config = Config {
        interface: Interface {
            private_key: hub_key.clone(),
            address: Cidr::parse(&format!("{}/24", ip(1))).unwrap(),
            listen_port: Some(51820),
            mtu: None,
        },
        peers: vec![node_peer(&n1_key, 2), node_peer(&n2_key, 3)],
    };
    let hub_endpoint = format!("{}:51820", bed.hosts[0].address).parse().unwrap();
    let control_path = bed.hosts[0].dir.join("hub.sock");
    let hub = agent(&bed, 0, &hub_config, Some(&control_path));
    let started = Instant::now();
    let n1 = agent(
        &bed,
        1,
        &Config::node(
            n1_key.clone(),
            Cidr::parse(&format!("{}/24", ip(2))).unwrap(),
            hub_key.public(),
            hub_endpoint,
            mesh,
        ),
        None,
    );
    // The node's tunnel comes up at once: it starts the handshake itself.
    let deadline = started + Duration::from_secs(5);
    while !ping(&bed, 1, &ip(1)) {
        assert!(Instant::now() < deadline, "node 1 never reached the hub");
    }
    let up_after = started.elapsed();
    assert!(
        up_after < Duration::from_secs(3),
        "tunnel up after {up_after:?}"
    );
    let _n2 = agent(
        &bed,
        2,
        &Config::node(
            n2_key.clone(),
            Cidr::parse(&format!("{}/24", ip(3))).unwrap(),
            hub_key.public(),
            hub_endpoint,
            mesh,
        ),
        None,
    );
    // Node to node, through the hub.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping(&bed, 1, &ip(3)) {
        assert!(
            Instant::now() < deadline,
            "node 1 never reached node 2 through the hub"
        );
    }
    assert!(ping(&bed, 2, &ip(2)), "node 2 cannot reach node 1");

    // The hub's peers with handshakes and traffic.
    let peers = tests::node_control(&control_path, serde_json::json!({"op": "peers"}));
    let list = peers["peers"].as_array().expect("peers");
    assert_eq!(list.len(), 2, "{peers}");
    for p in list {
        assert!(p["handshake_age_secs"].as_u64().is_some(), "{p}");
        assert!(p["rx_bytes"].as_u64().unwrap_or(0) > 0, "{p}");
    }

    // Removing node 2's peer cuts it off at once; adding it back (with the endpoint
    // the hub knew) restores it without touching the node.
    let n2_pub = n2_key.public().to_string();
    let removed = tests::node_control(
        &control_path,
        serde_json::json!({"op": "remove_peer", "public_key": n2_pub}),
    );
    assert_eq!(removed["ok"], true, "{removed}");
    assert!(
        !ping(&bed, 1, &ip(3)),
        "node 2 still reachable after its removal"
    );
    assert!(
        !ping(&bed, 2, &ip(1)),
        "node 2 still reaches the hub after its removal"
    );
    let endpoint = format!("{}:{}", bed.hosts[2].address, node_port(&bed, 2));
    let added = tests::node_control(
        &control_path,
        serde_json::json!({"op": "add_peer", "public_key": n2_pub, "allowed_ips": [format!("{}/32", ip(3))], "endpoint": endpoint}),
    );
    assert_eq!(added["ok"], true, "{added}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping(&bed, 1, &ip(3)) {
        assert!(Instant::now() < deadline, "node 2 did not come back");
    }

    // A node back on another port (its agent restarted, or a NAT remapped it) is
    // reached there: the hub's packets follow the node's.
    let old_port = node_port(&bed, 1);
    drop(n1);
    let mut moved = Config::node(
        n1_key.clone(),
        Cidr::parse(&format!("{}/24", ip(2))).unwrap(),
        hub_key.public(),
        hub_endpoint,
        mesh,
    );
    // A port of its own, so the kernel cannot hand the old one back.
    let new_port = if old_port == 51821 { 51822 } else { 51821 };
    moved.interface.listen_port = Some(new_port);
    let n1 = agent(&bed, 1, &moved, None);
    assert_eq!(node_port(&bed, 1), new_port);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ping(&bed, 0, &ip(2)) {
        assert!(
            Instant::now() < deadline,
            "the hub lost node 1 when it came back on port {new_port} (was {old_port})"
        );
    }
    let peers = tests::node_control(&control_path, serde_json::json!({"op": "peers"}));
    let n1_pub = n1_key.public().to_string();
    let n1_peer = peers["peers"]
        .as_array()
        .and_then(|l| l.iter().find(|p| p["public_key"] == n1_pub.as_str()))
        .unwrap_or_else(|| panic!("no peer for node 1: {peers}"));
    assert_eq!(
        n1_peer["endpoint"],
        format!("{}:{new_port}", bed.hosts[1].address).as_str(),
        "{peers}"
    );

    // Bad control input gets an error, and the hub keeps serving.
    let bad = tests::node_control(
        &control_path,
        serde_json::json!({"op": "add_peer", "public_key": "nope", "allowed_ips": []}),
    );
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or_default()
            .contains("bad WireGuard key"),
        "{bad}"
    );
    assert!(ping(&bed, 1, &ip(1)));

    // A relay on the hub, reached from node 1 through the tunnel: added again as it is,
    // it stays (not lost to its own port); pointed elsewhere, it follows.
    for (port, body) in [(7101, "first"), (7102, "second")] {
        let www = bed.hosts[0].dir.join(format!("www{port}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), body).unwrap();
        bed.sh(
            0,
            &format!("busybox httpd -p 127.0.0.1:{port} -h {}", www.display()),
        );
    }
    let relay_to = |port: u16| {
        let request = serde_json::json!({
            "op": "add_relay", "listen": format!("{}:7100", ip(1)), "to": format!("127.0.0.1:{port}"),
        });
        let answer = tests::node_control(&control_path, request);
        assert_eq!(answer["ok"], true, "{answer}");
    };
    let fetch = || {
        bed.sh(
            1,
            &format!(
                "timeout 5 busybox wget -q -O - http://{}:7100/ 2>&1 || echo FAILED",
                ip(1)
            ),
        )
    };
    relay_to(7101);
    assert_eq!(fetch().trim(), "first");
    relay_to(7101);
    assert_eq!(fetch().trim(), "first", "the relay added again was lost");
    relay_to(7102);
    assert_eq!(fetch().trim(), "second");

    // Private keys are in the 0600 config files only: not on command lines, not in logs.
    for (agent, key) in [(&hub, &hub_key), (&n1, &n1_key)] {
        let secret = key.to_base64();
        let cmdline =
            std::fs::read(format!("/proc/{}/cmdline", agent.child.id())).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(&secret));
        let log = std::fs::read_to_string(&agent.stderr).unwrap_or_default();
        assert!(!log.contains(&secret), "{log}");
    }
}

/// The UDP port node `i`'s agent listens on (the kernel picked it).
fn node_port(bed: &TestBed, i: usize) -> u16 {
    let out = tests::testbed::run(
        "ip",
        &["netns", "exec", &bed.hosts[i].netns, "ss", "-Hunlp"],
    );
    out.lines()
        .filter(|l| l.contains("harness-node"))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .next()
        .unwrap_or_else(|| panic!("no UDP socket of harness-node in:\n{out}"))
}

/// The interfaces of the root namespace whose name starts with `prefix`.
fn interfaces(prefix: &str) -> Vec<String> {
    tests::testbed::run("ip", &["-o", "link", "show"])
        .lines()
        .filter_map(|l| Some(l.split(':').nth(1)?.trim().to_owned()))
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// A service on a mesh node, deployed by the harness: the hub starts with it, the node
/// joins over SSH (as a user with `sudo: true`: the agent runs as root, the service as
/// that user), and it and local processes reach each other through mesh addresses.
#[test]
fn a_mesh_service_and_local_processes_reach_each_other_through_the_hub() {
    let mut bed = TestBed::new(1);
    let user = bed.add_sudo_user(0);
    // The service runs as that user, who may not reach this build's target directory
    // (a fresh clone under a 0700 temp directory): a copy on the host it can run.
    let node_demo = bed.hosts[0].dir.join("demo-service");
    std::fs::copy(tests::bin("demo-service"), &node_demo).unwrap();
    let mut d = tests::TestDaemon::start();
    let third = bed.third_octet();
    let port = 40000 + u16::from(third);
    let h = &bed.hosts[0];
    let dir = d.workdir("mesh");
    let stack = format!("mesh{}", std::process::id());
    let ifname = format!("hm{}", &d.info.instance[..10]);
    assert!(
        interfaces(&ifname).is_empty(),
        "a mesh interface before any mesh service"
    );
    // Pre-generated keys, given in the config, are the ones used.
    let (hub_key, node_key) = (
        PrivateKey::generate().unwrap(),
        PrivateKey::generate().unwrap(),
    );
    let (hub_key_file, node_key_file) = (dir.join("hub.key"), dir.join("node.key"));
    std::fs::write(&hub_key_file, hub_key.to_base64()).unwrap();
    std::fs::write(&node_key_file, node_key.to_base64()).unwrap();
    write_config(
        &dir,
        &format!(
            r#"
name: {stack}
network: {{ wireguard_subnet: "10.42.{third}.0/24", listen_port: {port}, hub_key: {hub_key} }}
hosts:
  node0: {node0}
services:
  api:
    target: {{ process: {{ binary: DEMO, args: [--name, api, --port, "${{self.port}}", --bind, "${{self.bind}}"] }} }}
    port: auto
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
  web:
    target: {{ wireguard: {{ host: node0, wireguard_key: {node_key}, binary: {node_demo}, args: [--name, web, --port, "${{self.port}}", --upstream, "api=${{api.addr}}"] }} }}
    port: auto
    depends_on: {{ api: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 500ms }}
  client:
    target: {{ process: {{ binary: DEMO, args: [--name, client, --port, "${{self.port}}", --upstream, "web=${{web.addr}}"] }} }}
    port: auto
    depends_on: {{ web: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#,
            node0 = bed.host_yaml_as(0, &user, "sudo: true"),
            node_demo = node_demo.display(),
            hub_key = hub_key_file.display(),
            node_key = node_key_file.display(),
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let web = get(&c, &stack, "web");
    assert_eq!(
        (web.backend.as_str(), web.health),
        ("wireguard", protocol::methods::Health::Healthy)
    );
    let run_dir = h
        .install_root
        .join("web/run")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let node_conf = std::fs::read_to_string(run_dir.join("network/wireguard.conf")).unwrap();
    let node_conf = Config::parse(&node_conf, "node").unwrap();
    assert_eq!(node_conf.interface.private_key, node_key);
    assert_eq!(node_conf.peers[0].public_key, hub_key.public());
    let web_addr = web.address.clone().expect("web's address");
    // The hub is .1; the api's alias, handed out first, .2; the node .3.
    assert!(
        web_addr.starts_with(&format!("10.42.{third}.3:")),
        "{web_addr}"
    );
    // The node reached the local api at a mesh address of its own (an alias on the
    // hub, relayed), and the local client reached the node at its mesh address (each
    // is healthy only once it connected).
    let env = String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "web"]).stdout).into_owned();
    let api_alias = env
        .lines()
        .find_map(|l| l.strip_prefix("API_ADDR="))
        .unwrap_or_default()
        .to_owned();
    let api_ip = api_alias.split(':').next().unwrap_or_default();
    assert!(
        api_ip.starts_with(&format!("10.42.{third}."))
            && api_ip != format!("10.42.{third}.1")
            && !web_addr.starts_with(&format!("{api_ip}:")),
        "the api's mesh address is neither the hub's nor the node's: {env}"
    );
    assert_eq!(
        get(&c, &stack, "client").health,
        protocol::methods::Health::Healthy
    );
    let env =
        String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "client"]).stdout).into_owned();
    assert!(env.contains(&format!("WEB_ADDR={web_addr}")), "{env}");
    // Under sudo: the agent is root's, the service the SSH user's.
    let uid_of = |needle: &str| -> Vec<String> {
        bed.pids(0)
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
            })
            .filter_map(|pid| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
                Some(uid.split_whitespace().next()?.to_owned())
            })
            .collect()
    };
    assert_eq!(uid_of("harness-node"), vec!["0".to_owned()], "the agent");
    let service_uids = uid_of("--name\0web");
    assert!(
        !service_uids.is_empty() && service_uids.iter().all(|u| u != "0"),
        "the service runs as {user}: uids {service_uids:?}"
    );
    assert_eq!(interfaces(&ifname), vec![ifname.clone()]);
    let unreachable = format!("unreachable 10.42.{third}.0/24");
    let routes = || tests::testbed::run("ip", &["route", "show"]);
    assert!(routes().contains(&unreachable), "{}", routes());
    // The node's private key is only in its 0600 config file.
    let conf = std::fs::metadata(
        h.install_root
            .join("web/run")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("network/wireguard.conf"),
    )
    .expect("node config");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(conf.permissions().mode() & 0o777, 0o600);

    // The address table and a real reachability test, both ways.
    let json = |args: &[&str]| -> serde_json::Value {
        let out = d.cli(&dir, args);
        assert_ok(&d, &out, &args.join(" "));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let rows = json(&["--json", "network", "show"]);
    let row = |n: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("web")["runs_on"], "mesh node0");
    assert_eq!(row("web")["from_host"], web_addr.as_str());
    let api_from_mesh = row("api")["from_mesh"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(api_from_mesh, api_alias, "{rows}");
    let checks = json(&["--json", "network", "test"]);
    let checks = checks.as_array().unwrap();
    assert!(checks.iter().all(|c| c["ok"] == true), "{checks:?}");
    assert!(
        checks.iter().any(|c| c["from"] == "node0"
            && c["to"] == "api"
            && c["address"] == api_from_mesh.as_str()),
        "{checks:?}"
    );
    let networks = json(&["--json", "network", "list"]);
    assert!(
        networks
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["kind"] == "mesh" && n["name"] == ifname.as_str()),
        "{networks}"
    );

    // harnessd killed while a connection through the tunnel is open: the data plane is
    // not harnessd's to lose. The connection carries a request afterwards, new ones
    // work, and a new harnessd adopts the hub and the node's run (same pid).
    let mut open = std::net::TcpStream::connect(&web_addr).expect("connect to web");
    d.kill9();
    write!(
        open,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut open, &mut reply).expect("reply over the open connection");
    assert!(
        reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
        "{reply}"
    );
    assert!(
        http_get(&web_addr, "/").contains("web"),
        "no new connection while harnessd was down"
    );
    d.restart();
    let c = d.client();
    let after = get(&c, &stack, "web");
    assert_eq!(
        (after.state, after.pid),
        (protocol::methods::ServiceState::Running, web.pid)
    );
    assert_eq!(
        interfaces(&ifname),
        vec![ifname.clone()],
        "the hub was replaced"
    );

    // The hub killed (-9, so it removes nothing): the daemon starts it again with the
    // node's peer, and asks the node's agent for a new handshake, so web is reached
    // through the mesh again without a redeploy.
    let hub_pid = || {
        std::fs::read_to_string(d.state_dir.join("mesh/hub.pid"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let killed = hub_pid();
    assert!(!killed.is_empty(), "no hub.pid");
    tests::testbed::run("kill", &["-KILL", &killed]);
    tests::wait_for(
        "the hub to be back, and web through it",
        Duration::from_secs(20),
        || {
            let back = hub_pid() != killed
                && std::net::TcpStream::connect_timeout(
                    &web_addr.parse().unwrap(),
                    Duration::from_secs(1),
                )
                .is_ok();
            back.then_some(())
        },
    );
    assert!(http_get(&web_addr, "/").contains("web"));
    assert_eq!(
        get(&c, &stack, "web").pid,
        web.pid,
        "web was redeployed, not reached again"
    );

    // The hub's peers, with handshake age and bytes.
    let out = d.cli(&dir, &["--json", "mesh", "peers"]);
    assert_ok(&d, &out, "harness mesh peers");
    let peers: Vec<protocol::methods::MeshPeer> =
        serde_json::from_slice(&out.stdout).expect("peers json");
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(
        (peers[0].node.as_str(), peers[0].name.as_str()),
        ("node0", "web")
    );
    assert_eq!(peers[0].public_key, node_key.public().to_string());
    assert!(
        peers[0].handshake_age_secs.is_some() && peers[0].rx_bytes > 0,
        "{peers:?}"
    );

    // Revoking the node cuts its traffic at once and stops its service.
    let out = d.cli(&dir, &["mesh", "revoke", "node0"]);
    assert_ok(&d, &out, "harness mesh revoke");
    let addr: std::net::SocketAddr = web_addr.parse().unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "web still reachable after its node was revoked"
    );
    assert_eq!(
        get(&c, &stack, "web").state,
        protocol::methods::ServiceState::Stopped
    );
    let mesh_events: Vec<String> = replay(&c, &["mesh"])
        .into_iter()
        .map(|e| match e.kind {
            protocol::EventKind::MeshPeerRemoved(p) => {
                format!("removed {} {}", p.node, p.reason.unwrap_or_default())
            }
            protocol::EventKind::MeshPeerAdded(p) => format!("added {} {}", p.node, p.mesh_ip),
            protocol::EventKind::MeshUp(_) => "up".into(),
            protocol::EventKind::MeshDown(_) => "down".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        mesh_events,
        [
            "up".to_owned(),
            format!("added node0 10.42.{third}.3"),
            // The hub started again.
            "up".to_owned(),
            "removed node0 revoked".to_owned(),
            "down".to_owned()
        ],
    );

    // down takes the node out and, with the last mesh service, the hub and its device.
    let down = d.cli(&dir, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    tests::wait_for("the mesh interface to go", Duration::from_secs(10), || {
        interfaces(&ifname).is_empty().then_some(())
    });
    assert!(!routes().contains(&unreachable), "{}", routes());
    let agents: Vec<String> = bed
        .processes(0)
        .into_iter()
        .filter(|p| p.contains("harness-node"))
        .collect();
    assert!(agents.is_empty(), "agents left on the node: {agents:?}");
}

/// A package deployed to a mesh node: its WireGuard config lands in the release (0600),
/// it reaches a container on the harness host at that container's mesh alias, a
/// container on the harness host reaches it through its mesh address, and a cut link
/// turns it unhealthy until the link is back, with no redeploy.
#[test]
fn a_package_on_a_mesh_node_is_reached_by_a_container_and_survives_a_cut_link() {
    assert!(
        std::path::Path::new(tests::DOCKER_SOCKET).exists(),
        "needs a Docker engine (./scripts/test.sh starts one)"
    );
    let bed = TestBed::new(1);
    let d = tests::TestDaemon::start();
    let third = bed.third_octet();
    let port = 41000 + u16::from(third);
    let h = &bed.hosts[0];
    let dir = d.workdir("meshpkg");
    let pkg = dir.join("web");
    std::fs::create_dir_all(pkg.join("bin")).unwrap();
    std::fs::create_dir_all(pkg.join("scripts")).unwrap();
    std::fs::write(pkg.join("manifest.yaml"), "name: web\nversion: 1.0.0\n").unwrap();
    std::fs::copy(tests::bin("demo-service"), pkg.join("bin/web")).unwrap();
    std::fs::write(
        pkg.join("scripts/start.sh"),
        // It connects to its upstream (a host container) before it serves.
        "#!/bin/sh\nexec \"$1/bin/web\" --name web --port \"$PORT\" --upstream \"files=$FILES_ADDR\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        pkg.join("scripts/start.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let rootfs = dir.join("rootfs.tar");
    tests::busybox_rootfs(&rootfs);
    let image = format!("harness-test/mesh-busybox:{}", std::process::id());
    let _image = RemoveImage(image.clone());
    let stack = format!("meshpkg{}", std::process::id());
    write_config(
        &dir,
        &format!(
            r#"
name: {stack}
network: {{ wireguard_subnet: "10.43.{third}.0/24", listen_port: {port} }}
hosts:
  node0: {node0}
services:
  files:
    target:
      docker:
        image: {image}
        rootfs: {rootfs}
        pull: never
        command: [httpd, -f, -p, "80", -h, /www]
        ports: ["80"]
    stop_timeout: 1s
    health_check: {{ type: http, url: "http://${{self.addr}}/" }}
  web:
    target: {{ wireguard: {{ host: node0, package: {pkg}, env: {{ PORT: "${{self.port}}" }} }} }}
    port: auto
    depends_on: {{ files: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health", interval: 300ms, retries: 2, timeout: 500ms }}
  box:
    target:
      docker:
        image: {image}
        rootfs: {rootfs}
        pull: never
        command: [sh, -c, 'mkdir -p /www && wget -qO /www/got "http://$WEB_ADDR/" && exec httpd -f -p 80 -h /www']
        ports: ["80"]
    stop_timeout: 1s
    depends_on: {{ web: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/got" }}
"#,
            node0 = bed.host_yaml(0, ""),
            pkg = pkg.display(),
            rootfs = rootfs.display(),
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let web = get(&c, &stack, "web");
    assert!(
        web.address
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!("10.43.{third}.3:")),
        "{web:?}"
    );
    // The container fetched from the mesh service through its mesh address.
    let got = http_get(get(&c, &stack, "box").address.as_deref().unwrap(), "/got");
    assert!(got.contains("web"), "{got}");
    // And the node reached a host container at a mesh address of its own (web
    // connects to it before it serves, so web being healthy proves the relay).
    let env = String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "web"]).stdout).into_owned();
    let files_ip = env
        .lines()
        .find_map(|l| l.strip_prefix("FILES_ADDR="))
        .and_then(|a| a.split(':').next())
        .unwrap_or_default()
        .to_owned();
    assert!(
        files_ip.starts_with(&format!("10.43.{third}.")) && files_ip != format!("10.43.{third}.1"),
        "{env}"
    );
    // The node's config is in the release, 0600, and not in the package.
    let releases = h.install_root.join("web/releases");
    let release = std::fs::read_dir(&releases)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let conf = release.join("network/wireguard.conf");
    assert_eq!(
        std::fs::metadata(&conf)
            .expect("release config")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // A cut link: unhealthy, with an event; back: healthy again, same run.
    bed.set_link(0, false);
    wait_service(&c, &stack, "web", "web unhealthy", |s| {
        s.health == protocol::methods::Health::Unhealthy
    });
    bed.set_link(0, true);
    let back = wait_service(&c, &stack, "web", "web healthy again", |s| {
        s.health == protocol::methods::Health::Healthy
    });
    assert_eq!(back.pid, web.pid, "the service was redeployed");

    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
}

/// Removes a test's image when the test ends.
struct RemoveImage(String);

impl Drop for RemoveImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// LAN hosts have no tunnel: a mesh service reaches a LAN service at an alias on the
/// hub relayed to its LAN address, and a LAN service reaches a mesh service through a
/// relay on the hub's LAN address; a second mesh node reaches the first through the
/// hub. The nodes and the LAN host are on separate beds (a WAN and a LAN).
#[test]
fn lan_and_mesh_services_reach_each_other_through_the_hub_s_relays() {
    // The mesh nodes are on a "WAN" bed of their own: they reach the harness host and
    // nothing of the LAN bed, whose hosts reach the harness host and no node.
    let (wan, lan) = (TestBed::new(2), TestBed::new(1));
    let d = tests::TestDaemon::start();
    let third = wan.third_octet();
    let port = 42000 + u16::from(third);
    let dir = d.workdir("meshlan");
    let stack = format!("meshlan{}", std::process::id());
    write_config(
        &dir,
        &format!(
            r#"
name: {stack}
network: {{ wireguard_subnet: "10.44.{third}.0/24", listen_port: {port} }}
hosts:
  node0: {node0}
  lan1: {lan1}
  node2: {node2}
services:
  db:
    target: {{ remote_lan: {{ host: lan1, binary: DEMO, args: [--name, db, --port, "${{self.port}}"] }} }}
    port: auto
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
  web:
    target: {{ wireguard: {{ host: node0, binary: DEMO, args: [--name, web, --port, "${{self.port}}", --upstream, "db=${{db.addr}}"] }} }}
    port: auto
    depends_on: {{ db: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
  lanclient:
    target: {{ remote_lan: {{ host: lan1, binary: DEMO, args: [--name, lanclient, --port, "${{self.port}}", --upstream, "web=${{web.addr}}"] }} }}
    port: auto
    depends_on: {{ web: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
  web2:
    target: {{ wireguard: {{ host: node2, binary: DEMO, args: [--name, web2, --port, "${{self.port}}", --upstream, "web=${{web.addr}}"] }} }}
    port: auto
    depends_on: {{ web: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#,
            node0 = wan.host_yaml(0, ""),
            lan1 = lan.host_yaml(0, ""),
            node2 = wan.host_yaml(1, ""),
        ),
    );
    let ping = |ns: &str, to: &str| {
        Command::new("ip")
            .args([
                "netns", "exec", ns, "busybox", "ping", "-c", "1", "-W", "1", to,
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let (node_ns, lan_ns) = (&wan.hosts[0].netns, &lan.hosts[0].netns);
    assert!(
        ping(node_ns, &wan.hub_address),
        "a node reaches the harness host"
    );
    assert!(
        !ping(node_ns, &lan.hosts[0].address) && !ping(lan_ns, &wan.hosts[0].address),
        "the WAN and the LAN bed reach each other directly"
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    // Each is healthy only once it connected to its upstream at the address it got.
    for s in ["db", "web", "lanclient", "web2"] {
        assert_eq!(
            get(&c, &stack, s).health,
            protocol::methods::Health::Healthy,
            "{s}"
        );
    }
    let env_of =
        |s: &str| String::from_utf8_lossy(&d.cli(&dir, &["config", "env", s]).stdout).into_owned();
    let web_env = env_of("web");
    assert!(
        web_env.contains(&format!("DB_ADDR=10.44.{third}.")),
        "{web_env}"
    );
    let web2_env = env_of("web2");
    assert!(
        web2_env.contains(&format!("WEB_ADDR=10.44.{third}.")),
        "{web2_env}"
    );
    let lan_env = env_of("lanclient");
    assert!(
        lan_env.contains(&format!("WEB_ADDR={}:", lan.hub_address)),
        "{lan_env}"
    );
    let checks = d.cli(&dir, &["--json", "network", "test"]);
    assert_ok(&d, &checks, "harness network test");
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
}

/// Without CAP_NET_ADMIN the hub cannot make its device: the mesh service fails and
/// says why; the daemon serves on and no interface is left.
#[test]
fn a_mesh_service_without_cap_net_admin_fails_saying_so() {
    let bed = TestBed::new(1);
    let d = tests::TestDaemon::start_without_net_admin();
    let dir = d.workdir("nocap");
    write_config(
        &dir,
        &format!(
            "name: nocap\nhosts:\n  node0: {}\nservices:\n  web:\n    target: {{ wireguard: {{ host: node0, binary: /bin/true }} }}\n",
            bed.host_yaml(0, "")
        ),
    );
    let out = d.cli(&dir, &["up"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the mesh needs root or CAP_NET_ADMIN"),
        "{err}"
    );
    assert!(!err.contains("Stack backtrace"), "{err}");
    assert!(interfaces(&format!("hm{}", &d.info.instance[..10])).is_empty());
    assert!(d.cli(&dir, &["daemon", "status"]).status.success());
}
