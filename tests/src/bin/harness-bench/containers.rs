//! The docker benchmark: 20 busybox httpd containers, each counted up when it answers
//! HTTP 200 on its published port, then down with a 1 s stop timeout everywhere
//! (busybox httpd as PID 1 ignores SIGTERM, so every tool waits the timeout). harness
//! against docker-compose (`up -d`, wait for the 200s; `down -t 1`) on an equivalent
//! compose file, and against parallel `docker run -d` / `docker rm -f`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::{bin, busybox_rootfs, TestDaemon};

use crate::{free_ports, median, ms};

const CONTAINERS: usize = 20;
const RUNS: usize = 3;
const IMAGE: &str = "harness-bench/busybox:httpd";

/// Runs a command to success; panics with its output otherwise.
fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until every port answers `GET /` with 200.
fn wait_for_200s(ports: &[u16]) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(60);
    for port in ports {
        loop {
            let ok = std::net::TcpStream::connect(("127.0.0.1", *port))
                .and_then(|mut s| {
                    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut head = [0u8; 12];
                    s.read_exact(&mut head)?;
                    Ok(head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"))
                })
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "port {port} never answered 200");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Runs the same command for every container at once, as parallel shell loops do.
fn in_parallel(commands: Vec<Command>, what: &str) {
    let children: Vec<_> = commands
        .into_iter()
        .map(|mut c| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        })
        .collect();
    for mut c in children {
        assert!(c.wait().expect("wait").success(), "{what} failed");
    }
}

pub fn bench(d: &TestDaemon) {
    let tag = format!("b{}", std::process::id());
    let dir = d.workdir("containers");
    let rootfs = dir.join("rootfs.tar");
    busybox_rootfs(&rootfs);
    run(
        Command::new("docker").args(["import", &rootfs.display().to_string(), IMAGE]),
        "docker import",
    );
    let ports = free_ports(CONTAINERS);

    // harness
    let mut yaml = format!("name: {tag}h\nsettings: {{ max_parallel: {CONTAINERS} }}\nservices:\n");
    for (i, port) in ports.iter().enumerate() {
        yaml.push_str(&format!(
            "  c{i}:\n    target: {{ docker: {{ image: {IMAGE}, pull: never, command: [httpd, -f, -p, \"80\", -h, /www], ports: [\"{port}:80\"] }} }}\n    stop_timeout: 1s\n    health_check: {{ type: http, url: \"http://${{self.addr}}/\" }}\n"
        ));
    }
    std::fs::write(dir.join("harness.yaml"), yaml).expect("harness.yaml");
    let harness = |args: &[&str]| {
        let mut c = Command::new(bin("harness"));
        c.args(args)
            .current_dir(&dir)
            .env("HARNESS_STATE_DIR", &d.state_dir);
        c
    };
    // compose
    let mut compose = String::from("services:\n");
    for (i, port) in ports.iter().enumerate() {
        compose.push_str(&format!(
            "  c{i}:\n    image: {IMAGE}\n    command: httpd -f -p 80 -h /www\n    ports: [\"{port}:80\"]\n"
        ));
    }
    let compose_file = dir.join("docker-compose.yml");
    std::fs::write(&compose_file, compose).expect("docker-compose.yml");
    let compose_cmd = |args: &[&str]| {
        let mut c = Command::new("docker-compose");
        c.args([
            "-f",
            &compose_file.display().to_string(),
            "-p",
            &format!("{tag}c"),
        ])
        .args(args);
        c
    };
    // docker run
    let names: Vec<String> = (0..CONTAINERS).map(|i| format!("{tag}r{i}")).collect();
    let runs = || {
        names
            .iter()
            .zip(&ports)
            .map(|(name, port)| {
                let mut c = Command::new("docker");
                c.args([
                    "run",
                    "-d",
                    "--name",
                    name,
                    "-p",
                    &format!("{port}:80"),
                    IMAGE,
                ])
                .args(["httpd", "-f", "-p", "80", "-h", "/www"]);
                c
            })
            .collect::<Vec<_>>()
    };
    let removals = || {
        names
            .iter()
            .map(|name| {
                let mut c = Command::new("docker");
                c.args(["rm", "-f", name]);
                c
            })
            .collect::<Vec<_>>()
    };

    let timed = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed()
    };
    let (mut h_up, mut h_down, mut c_up, mut c_down, mut r_up, mut r_down) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    // Each round starts with another tool: the engine still tidies up after the last
    // removals (layers, network namespaces) when the next tool starts.
    for round in 0..RUNS {
        for tool in (0..3).map(|k| (round + k) % 3) {
            match tool {
                0 => {
                    h_up.push(timed(&mut || {
                        run(&mut harness(&["up"]), "harness up");
                        wait_for_200s(&ports);
                    }));
                    h_down.push(timed(&mut || run(&mut harness(&["down"]), "harness down")));
                }
                1 => {
                    c_up.push(timed(&mut || {
                        run(&mut compose_cmd(&["up", "-d"]), "docker-compose up -d");
                        wait_for_200s(&ports);
                    }));
                    c_down.push(timed(&mut || {
                        run(
                            &mut compose_cmd(&["down", "-t", "1"]),
                            "docker-compose down",
                        )
                    }));
                }
                _ => {
                    r_up.push(timed(&mut || {
                        in_parallel(runs(), "docker run");
                        wait_for_200s(&ports);
                    }));
                    r_down.push(timed(&mut || in_parallel(removals(), "docker rm -f")));
                }
            }
        }
    }
    let (h_up, h_down, c_up, c_down, r_up, r_down) = (
        median(h_up),
        median(h_down),
        median(c_up),
        median(c_down),
        median(r_up),
        median(r_down),
    );
    println!(
        "docker, {CONTAINERS} busybox httpd (median of {RUNS}): up: harness {} vs docker-compose {} -> ratio {:.2} (target <= 0.7); parallel docker run {} -> ratio {:.2}",
        ms(h_up),
        ms(c_up),
        h_up.as_secs_f64() / c_up.as_secs_f64(),
        ms(r_up),
        h_up.as_secs_f64() / r_up.as_secs_f64()
    );
    run(Command::new("docker").args(["rmi", IMAGE]), "docker rmi");
    println!(
        "docker down (1 s stop timeout): harness {} vs docker-compose {} -> ratio {:.2} (target <= 0.7); parallel docker rm -f {} -> ratio {:.2}",
        ms(h_down),
        ms(c_down),
        h_down.as_secs_f64() / c_down.as_secs_f64(),
        ms(r_down),
        h_down.as_secs_f64() / r_down.as_secs_f64()
    );
}
