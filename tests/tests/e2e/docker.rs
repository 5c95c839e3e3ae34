//! Containers on a real Docker engine, side by side with processes: addresses both
//! ways, exec, logs, restarts by the harness's policy, adoption after a daemon restart,
//! `down`, two daemons on one engine, and bad input. The image is imported from a
//! busybox-static rootfs (`rootfs:`), so no registry is needed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use protocol::methods::{Health, ServiceState};
use tests::{busybox_rootfs, wait_for, TestDaemon, DOCKER_SOCKET};

use crate::support::*;

/// A stack: `api` (a host process), `web` (a container that fetches from `api` when it
/// starts and serves what it got), `client` (a host process that needs `web`).
const MIXED: &str = r#"
name: NAME
services:
  api:
    target: { process: { binary: DEMO, args: [--name, api, --port, "${self.port}", --bind, "${self.bind}"] } }
    port: auto
    health_check: { type: http, url: "http://${self.addr}/health" }
  web:
    target:
      docker:
        image: harness-test/busybox:e2e
        rootfs: ROOTFS
        pull: never
        command: [sh, -c, 'echo "api is $API_ADDR"; wget -qO /www/api.json "http://$API_ADDR/" && exec httpd -f -v -p 80 -h /www']
        ports: ["80"]
    stop_timeout: 1s
    depends_on: { api: { condition: healthy } }
    restart: on-failure
    health_check: { type: http, url: "http://${self.addr}/api.json" }
  client:
    target: { process: { binary: DEMO, args: [--name, client, --port, "${self.port}", --upstream, "web=${web.addr}"] } }
    port: auto
    depends_on: { web: { condition: healthy } }
    health_check: { type: http, url: "http://${self.addr}/health" }
"#;

fn require_engine() {
    assert!(
        Path::new(DOCKER_SOCKET).exists(),
        "the docker tests need a running engine at {DOCKER_SOCKET}: run ./scripts/test.sh, which installs docker.io and starts dockerd"
    );
}

/// The image tag `IMAGE` in a test's YAML becomes, made from a busybox-static rootfs.
const IMAGE: &str = "harness-test/busybox:e2e";

/// Writes a stack under a unique stack name, with `image` for `IMAGE`; returns (dir,
/// stack).
fn mixed_stack(d: &TestDaemon, yaml: &str, image: &TestImage) -> (std::path::PathBuf, String) {
    mixed_stack_named(d, &format!("e2e{}", &d.info.instance[..8]), yaml, image)
}

/// [`mixed_stack`] under the stack name `stack`.
fn mixed_stack_named(
    d: &TestDaemon,
    stack: &str,
    yaml: &str,
    image: &TestImage,
) -> (std::path::PathBuf, String) {
    require_engine();
    let stack = stack.to_owned();
    let dir = d.workdir(&stack);
    let rootfs = dir.join("busybox-rootfs.tar");
    busybox_rootfs(&rootfs);
    let yaml = yaml
        .replace(IMAGE, &image.0)
        .replace("NAME", &stack)
        .replace("ROOTFS", &rootfs.display().to_string());
    write_config(&dir, &yaml);
    (dir, stack)
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Names of the containers and networks labelled with a daemon instance.
fn labelled(instance: &str) -> (String, String) {
    let filter = format!("label=dev.harness.instance={instance}");
    (
        docker(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]),
        docker(&[
            "network",
            "ls",
            "--filter",
            &filter,
            "--format",
            "{{.Name}}",
        ]),
    )
}

#[test]
fn containers_and_processes_reach_each_other_restart_by_policy_and_down_removes_all() {
    // An image of its own, so that this run imports it and shows that as progress.
    let test_image = TestImage::new();
    let d = TestDaemon::start();
    // Named as a directory may be: with a space, which no Docker name may hold.
    let stack = format!("e2e web {}", &d.info.instance[..8]);
    let (dir, stack) = mixed_stack_named(&d, &stack, MIXED, &test_image);
    let image = &test_image.0;
    let up = d.cli(&dir, &["up"]);
    assert_ok(&d, &up, "harness up");
    let shown = String::from_utf8_lossy(&up.stderr);
    assert!(
        shown.contains(&format!("web                  importing {image} from ")),
        "{shown}"
    );
    let c = d.client();

    // A host process reaches the container at its published port...
    let web = get(&c, &stack, "web");
    assert_eq!(web.backend, "docker");
    assert_eq!(web.health, Health::Healthy);
    let container = web.container.clone().expect("ps names the container");
    assert_eq!(
        container,
        format!("harness-{}-web", stack.replace(' ', ".20"))
    );
    let addr = web.address.clone().expect("web has an address");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert_eq!(get(&c, &stack, "client").health, Health::Healthy);
    // ...and the container reached the host process through the gateway: what it
    // fetched from api at start is what it serves.
    let fetched = http_get(&addr, "/api.json");
    assert!(
        fetched.contains("\"service\":\"api\""),
        "web served {fetched:?}"
    );
    // The addresses each side was given.
    let env = d.cli(&dir, &["config", "env", "client"]);
    let env = String::from_utf8_lossy(&env.stdout).into_owned();
    assert!(env.contains(&format!("WEB_ADDR={addr}")), "{env}");
    let api_port = get(&c, &stack, "api").port.expect("api port");
    let lines = wait_for("web's first log line", Duration::from_secs(10), || {
        let lines = log_lines(&c, &stack, "web");
        (!lines.is_empty()).then_some(lines)
    });
    let first = &lines[0].line;
    assert!(
        first.starts_with("api is ") && first.ends_with(&format!(":{api_port}")),
        "{first}"
    );
    assert!(!first.contains("127.0.0.1"), "{first}");

    // exec runs inside the container, with the service's env.
    let out = d.cli(
        &dir,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "cat /www/api.json; echo; echo $API_PORT",
        ],
    );
    assert_ok(&d, &out, "harness exec");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"service\":\"api\"") && text.contains(&api_port.to_string()),
        "{text}"
    );

    // Killed from outside: the harness restarts it by its own policy, in the same
    // container, at the same address. (A restart whose start failed on the way, an
    // engine call under load, say, is counted too and tried again: the log's count of
    // starts below is what says the container ran exactly twice.)
    let id = docker(&["inspect", "-f", "{{.Id}}", &container]);
    docker(&["kill", &container]);
    let restarted = wait_service(&c, &stack, "web", "web restarted and healthy", |s| {
        s.restarts >= 1 && s.state == ServiceState::Running && s.health == Health::Healthy
    });
    assert_eq!(restarted.address.as_deref(), Some(addr.as_str()));
    assert_eq!(docker(&["inspect", "-f", "{{.Id}}", &container]), id);
    let policy = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.RestartPolicy.Name}}",
        &container,
    ]);
    assert!(
        policy.is_empty() || policy == "no",
        "engine restart policy {policy:?}"
    );

    // The container's output went through the engine into the log, across the restart.
    let lines = log_lines(&c, &stack, "web");
    let starts = lines
        .iter()
        .filter(|l| l.line.starts_with("api is "))
        .count();
    assert_eq!(starts, 2, "{lines:?}");
    assert!(
        lines.iter().any(|l| l.line.contains("response:200")),
        "{lines:?}"
    );

    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    assert_eq!(labelled(&d.info.instance), (String::new(), String::new()));
}

#[test]
fn containers_are_adopted_after_a_daemon_restart_and_another_daemons_are_never_touched() {
    let image = TestImage::new();
    let mut d = TestDaemon::start();
    let (dir, stack) = mixed_stack(&d, MIXED, &image);
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let container = format!("harness-{stack}-web");
    let started_at = docker(&["inspect", "-f", "{{.Id}} {{.State.StartedAt}}", &container]);

    d.kill9();
    d.restart();
    let c = d.client();
    let web = wait_service(&c, &stack, "web", "web adopted and healthy", |s| {
        s.state == ServiceState::Running && s.health == Health::Healthy
    });
    assert_eq!(web.restarts, 0);
    // The same container, never restarted.
    assert_eq!(
        docker(&["inspect", "-f", "{{.Id}} {{.State.StartedAt}}", &container]),
        started_at
    );
    // Its output is copied on from where the killed daemon left it: a request made
    // now is logged (busybox httpd logs a 404 as "response:404"), and no line from
    // before appears twice.
    http_get(web.address.as_deref().expect("address"), "/no-such-page");
    let lines = wait_for(
        "the new request in web's log",
        Duration::from_secs(10),
        || {
            let lines = log_lines(&c, &stack, "web");
            lines
                .iter()
                .any(|l| l.line.contains("response:404"))
                .then_some(lines)
        },
    );
    let distinct: std::collections::BTreeSet<(&str, &str)> = lines
        .iter()
        .map(|l| (l.time.as_str(), l.line.as_str()))
        .collect();
    assert_eq!(
        distinct.len(),
        lines.len(),
        "a line was copied twice: {lines:?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.line.starts_with("api is "))
            .count(),
        1
    );

    // A second daemon on the same engine with a stack of the same name refuses to
    // touch the first one's container.
    let other = TestDaemon::start();
    let other_dir = other.workdir("same");
    std::fs::copy(dir.join("harness.yaml"), other_dir.join("harness.yaml")).expect("copy");
    let up = other.cli(&other_dir, &["up", "web"]);
    assert!(!up.status.success());
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(
        err.contains("was not made by this harness daemon"),
        "second daemon said: {err}"
    );
    assert_ok(
        &other,
        &other.cli(&other_dir, &["down"]),
        "second daemon's down",
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.Id}} {{.State.StartedAt}}", &container]),
        started_at
    );
    assert_eq!(
        labelled(&other.info.instance),
        (String::new(), String::new())
    );

    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    assert_eq!(labelled(&d.info.instance), (String::new(), String::new()));
}

#[test]
fn bad_container_input_fails_clearly_and_leaves_nothing_behind() {
    require_engine();
    let image = TestImage::new();
    let d = TestDaemon::start();
    let stack = format!("bad{}", &d.info.instance[..8]);
    let dir = d.workdir(&stack);

    // An image the engine does not have, with pulling forbidden.
    write_config(
        &dir,
        &format!("name: {stack}\nservices:\n  db:\n    target: {{ docker: {{ image: '127.0.0.1:1/nope', pull: never }} }}\n"),
    );
    let up = d.cli(&dir, &["up"]);
    assert!(!up.status.success());
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(
        err.contains("127.0.0.1:1/nope") && err.contains("pull: never"),
        "{err}"
    );

    // A host port somebody else holds.
    let rootfs = dir.join("rootfs.tar");
    busybox_rootfs(&rootfs);
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    write_config(
        &dir,
        &format!(
            "name: {stack}\nservices:\n  web:\n    target: {{ docker: {{ image: '{}', rootfs: {}, pull: never, command: [httpd, -f, -p, '80'], ports: ['{port}:80'] }} }}\n",
            image.0,
            rootfs.display()
        ),
    );
    let up = d.cli(&dir, &["up"]);
    assert!(!up.status.success());
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(
        err.contains(&port.to_string()) && err.contains("start container"),
        "{err}"
    );
    // Nothing half-made: the container that could not start is gone.
    assert_eq!(labelled(&d.info.instance).0, "");
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    assert_eq!(labelled(&d.info.instance), (String::new(), String::new()));

    // A container whose dependency listens on loopback only is told so.
    write_config(
        &dir,
        &format!(
            "name: {stack}\nservices:\n  api:\n    target: {{ process: {{ binary: DEMO, args: [--name, api, --port, '${{self.port}}', --bind, 127.0.0.1] }} }}\n    port: auto\n    health_check: {{ type: tcp }}\n  web:\n    target: {{ docker: {{ image: '{}', rootfs: {}, pull: never, command: [httpd, -f, -p, '80'] }} }}\n    dependencies: [api]\n",
            image.0,
            rootfs.display()
        ),
    );
    let up = d.cli(&dir, &["up"]);
    assert!(!up.status.success());
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(err.contains("listens on loopback only"), "{err}");
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    drop(taken);

    // No engine at all.
    let nowhere = TestDaemon::start_with(
        "debug",
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    );
    let dir = nowhere.workdir(&stack);
    write_config(
        &dir,
        &format!("name: {stack}\nservices:\n  db:\n    target: {{ docker: {{ image: busybox, pull: never }} }}\n"),
    );
    let up = nowhere.cli(&dir, &["up"]);
    assert!(!up.status.success());
    let err = String::from_utf8_lossy(&up.stderr);
    assert!(
        err.contains("no Docker engine answers at unix:///nonexistent/docker.sock")
            && err.contains("dockerd"),
        "{err}"
    );
    // The daemon still serves.
    assert!(nowhere.cli(&dir, &["ps"]).status.success());
}

#[test]
fn a_compose_file_imports_and_comes_up_like_its_harness_twin() {
    let image = TestImage::new();
    let d = TestDaemon::start();
    // The twin, written by hand; bringing it up also imports the image.
    let twin = r#"
name: NAME
services:
  web:
    target: { docker: { image: harness-test/busybox:e2e, rootfs: ROOTFS, pull: never, command: [httpd, -f, -p, "80", -h, /www], ports: ["80"] } }
    health_check: { type: command, command: wget, args: [-qO-, "http://127.0.0.1/"], interval: 1s }
    stop_timeout: 1s
  probe:
    target: { docker: { image: harness-test/busybox:e2e, pull: never, command: [sh, -c, "wget -qO- http://web/ && exec sleep 1000"] } }
    depends_on: { web: { condition: healthy } }
    stop_timeout: 1s
"#;
    let (twin_dir, twin_stack) = mixed_stack(&d, twin, &image);
    assert_ok(&d, &d.cli(&twin_dir, &["up"]), "harness up (twin)");

    let compose_stack = format!("{twin_stack}c");
    let dir = d.workdir(&compose_stack);
    let compose = format!(
        r#"
name: {compose_stack}
services:
  web:
    image: harness-test/busybox:e2e
    pull_policy: never
    command: httpd -f -p 80 -h /www
    ports: ["80"]
    healthcheck:
      test: ["CMD", "wget", "-qO-", "http://127.0.0.1/"]
      interval: 1s
    stop_grace_period: 1s
    container_name: fixed-name
  probe:
    image: harness-test/busybox:e2e
    pull_policy: never
    command: sh -c 'wget -qO- http://web/ && exec sleep 1000'
    depends_on:
      web: {{ condition: service_healthy }}
    stop_grace_period: 1s
"#
    )
    .replace(IMAGE, &image.0);
    std::fs::write(dir.join("docker-compose.yml"), compose).expect("write compose file");

    // `harness import` names what it cannot translate.
    let imported = d.cli(
        &dir,
        &["import", "docker-compose.yml", "-o", "harness.yaml"],
    );
    assert_ok(&d, &imported, "harness import");
    let warnings = String::from_utf8_lossy(&imported.stderr);
    assert!(
        warnings.contains("docker-compose.yml:13:5: services.web.container_name: not translated"),
        "{warnings}"
    );
    let validated = d.cli(&dir, &["validate"]);
    assert_ok(&d, &validated, "harness validate of the import");

    // `-f docker-compose.yml` works directly, and the stack comes up like its twin.
    assert_ok(
        &d,
        &d.cli(&dir, &["-f", "docker-compose.yml", "up"]),
        "harness -f compose up",
    );
    let c = d.client();
    let shape = |stack: &str| {
        let mut rows: Vec<_> = list(&c, stack)
            .into_iter()
            .map(|s| (s.name, s.state, s.health, s.backend, s.dependencies))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    };
    assert_eq!(shape(&compose_stack), shape(&twin_stack));
    let probe_log = log_lines(&c, &compose_stack, "probe");
    assert!(
        probe_log
            .iter()
            .any(|l| l.line.contains("hello from busybox")),
        "{probe_log:?}"
    );
    assert_ok(
        &d,
        &d.cli(&dir, &["-f", "docker-compose.yml", "down"]),
        "down (compose)",
    );
    assert_ok(&d, &d.cli(&twin_dir, &["down"]), "down (twin)");
    assert_eq!(labelled(&d.info.instance), (String::new(), String::new()));
}

#[test]
fn an_image_built_from_a_context_is_rebuilt_when_the_context_changes() {
    let unused = TestImage::new();
    let d = TestDaemon::start();
    let (dir, stack) = mixed_stack(&d, "name: NAME\nservices: {}\n", &unused);
    let short = &d.info.instance[..8];
    let (base, built) = (
        format!("harness-test/busybox:base-{short}"),
        format!("harness-test/built:{short}"),
    );
    let out = Command::new("docker")
        .args(["import"])
        .arg(dir.join("busybox-rootfs.tar"))
        .arg(&base)
        .output()
        .expect("docker import");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let context = dir.join("web");
    std::fs::create_dir_all(&context).expect("context dir");
    std::fs::write(
        context.join("Dockerfile"),
        format!("FROM {base}\nCOPY hello.txt /www/hello.txt\nCMD [\"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/www\"]\n"),
    )
    .expect("Dockerfile");
    std::fs::write(context.join("hello.txt"), "first\n").expect("hello.txt");
    write_config(
        &dir,
        &format!(
            "name: {stack}\nservices:\n  web:\n    target: {{ docker: {{ image: '{built}', build: ./web, pull: never, ports: ['80'] }} }}\n    stop_timeout: 1s\n    health_check: {{ type: http, url: 'http://${{self.addr}}/hello.txt' }}\n"
        ),
    );
    let up = d.cli(&dir, &["up"]);
    assert_ok(&d, &up, "harness up");
    assert!(String::from_utf8_lossy(&up.stderr).contains(&format!("building {built}")));
    let c = d.client();
    let addr = get(&c, &stack, "web").address.expect("address");
    assert_eq!(http_get(&addr, "/hello.txt"), "first\n");
    let first_id = docker(&["inspect", "-f", "{{.Id}}", &format!("harness-{stack}-web")]);
    let first_image = docker(&[
        "inspect",
        "-f",
        "{{.Image}}",
        &format!("harness-{stack}-web"),
    ]);

    // Unchanged context: no rebuild, same container.
    assert_ok(&d, &d.cli(&dir, &["restart", "web"]), "harness restart");
    assert_eq!(
        docker(&["inspect", "-f", "{{.Id}}", &format!("harness-{stack}-web")]),
        first_id
    );

    // Changed context: rebuilt, and the container is made again from the new image.
    std::fs::write(context.join("hello.txt"), "second\n").expect("hello.txt");
    assert_ok(&d, &d.cli(&dir, &["restart", "web"]), "harness restart");
    let second_id = docker(&["inspect", "-f", "{{.Id}}", &format!("harness-{stack}-web")]);
    assert_ne!(second_id, first_id);
    assert_eq!(http_get(&addr, "/hello.txt"), "second\n");

    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    assert_eq!(labelled(&d.info.instance), (String::new(), String::new()));
    docker(&["rmi", &built, &first_image, &base]);
}

/// A container placed on an SSH host runs on that host's own engine (a second dockerd
/// in a test-bed namespace), reached only through the host's SSH connection: the local
/// engine never sees it, and it and a local process reach each other.
#[test]
fn a_container_on_an_ssh_host_runs_on_its_engine_through_ssh() {
    require_engine();
    let mut bed = tests::testbed::TestBed::new(1);
    let engine = bed.start_dockerd(0);
    let d = TestDaemon::start();
    let dir = d.workdir("rdock");
    let rootfs = dir.join("busybox-rootfs.tar");
    busybox_rootfs(&rootfs);
    let h = &bed.hosts[0];
    let stack = format!("rdock{}", std::process::id());
    write_config(
        &dir,
        &format!(
            r#"
name: {stack}
hosts:
  host0: {host0}
services:
  api:
    target: {{ process: {{ binary: DEMO, args: [--name, api, --port, "${{self.port}}", --bind, "${{self.bind}}"] }} }}
    port: auto
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
  web:
    target:
      docker:
        host: host0
        image: harness-test/remote-busybox:e2e
        rootfs: {rootfs}
        pull: never
        command: [sh, -c, 'echo "web got api at $API_ADDR"; mkdir -p /www && wget -qO /www/api.json "http://$API_ADDR/" && exec httpd -f -p 80 -h /www']
        ports: ["80"]
    stop_timeout: 1s
    depends_on: {{ api: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/api.json" }}
  client:
    target: {{ process: {{ binary: DEMO, args: [--name, client, --port, "${{self.port}}", --upstream, "web=${{web.addr}}"] }} }}
    port: auto
    depends_on: {{ web: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#,
            host0 = bed.host_yaml(0, &format!("docker_socket: {}", engine.socket.display())),
            rootfs = rootfs.display(),
        ),
    );
    let up = d.cli(&dir, &["up"]);
    assert!(
        up.status.success(),
        "harness up failed:\n{}\n{}\ndaemon log:\n{}\ndockerd log:\n{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr),
        d.log(),
        engine.log()
    );
    let c = d.client();
    let web = get(&c, &stack, "web");
    assert_eq!(
        (web.backend.as_str(), web.health),
        ("docker", Health::Healthy)
    );
    assert_eq!(web.host.as_deref(), Some("host0"));
    let web_addr = web.address.clone().expect("web's address");
    assert!(
        web_addr.starts_with(&format!("{}:", h.address)),
        "{web_addr}"
    );
    // The host's engine runs it; the local engine has never heard of it.
    let name = format!("harness-{stack}-web");
    let there = engine.docker(&["ps", "-q", "--filter", &format!("name={name}")]);
    assert!(!there.trim().is_empty(), "not on the host's engine");
    let local = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("name={name}")])
        .output()
        .expect("docker ps");
    assert!(
        String::from_utf8_lossy(&local.stdout).trim().is_empty(),
        "the local engine has it"
    );
    // The container reached the local process at the harness host's address towards
    // the host (it served what it fetched), and the local client reached the container.
    let api_json = http_get(&web_addr, "/api.json");
    assert!(api_json.contains("\"api\""), "{api_json}");
    let env = String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "web"]).stdout).into_owned();
    assert!(
        env.contains(&format!("API_ADDR={}:", bed.hub_address)),
        "{env}"
    );
    assert_eq!(get(&c, &stack, "client").health, Health::Healthy);
    // exec and logs go through the same forward.
    let out = d.cli(&dir, &["exec", "web", "--", "cat", "/www/api.json"]);
    assert_ok(&d, &out, "harness exec web");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"api\""));
    wait_for("web's log line", Duration::from_secs(20), || {
        log_lines(&c, &stack, "web")
            .iter()
            .any(|l| l.line.contains("web got api at"))
            .then_some(())
    });

    // Only the SSH connection carries the engine: with the host's sshd gone, the
    // engine cannot be reached; once it is back, it can again.
    bed.kill_ssh(0);
    let out = d.cli(&dir, &["exec", "web", "--", "true"]);
    assert!(!out.status.success(), "exec worked without the host's sshd");
    bed.start_sshd(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !d.cli(&dir, &["exec", "web", "--", "true"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "exec did not work again once sshd was back:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    let left = engine.docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.harness.instance={}", d.info.instance),
    ]);
    assert!(
        left.trim().is_empty(),
        "containers left on the host: {left}"
    );
    let networks = engine.docker(&[
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label=dev.harness.instance={}", d.info.instance),
    ]);
    assert!(
        networks.trim().is_empty(),
        "networks left on the host: {networks}"
    );
}

#[test]
fn a_container_on_a_host_without_an_engine_fails_saying_how_to_get_one() {
    let bed = tests::testbed::TestBed::new(1);
    let d = TestDaemon::start();
    let dir = d.workdir("noengine");
    write_config(
        &dir,
        &format!(
            "name: noengine\nhosts:\n  host0: {}\nservices:\n  web:\n    target: {{ docker: {{ host: host0, image: busybox, pull: never }} }}\n",
            bed.host_yaml(0, &format!("docker_socket: {}/none.sock", bed.hosts[0].dir.display()))
        ),
    );
    let out = d.cli(&dir, &["up"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no Docker engine on host0") && err.contains("apt-get install docker.io"),
        "{err}"
    );
    // Nothing was made anywhere, and the daemon serves on.
    assert_eq!(
        get(&d.client(), "noengine", "web").state,
        ServiceState::Failed
    );
    assert!(!d
        .state_dir
        .join("engines")
        .read_dir()
        .is_ok_and(|mut e| e.next().is_some()));
}

/// The engine a running container is on restarts (`--live-restore`): the harness takes
/// the end of its wait for what it is, looks again, finds the container running and
/// keeps it: no exit, no restart, the same process.
#[test]
fn a_container_outlives_its_engine_restarting_and_is_kept() {
    let bed = tests::testbed::TestBed::new(1);
    let mut engine = bed.start_dockerd(0);
    let d = TestDaemon::start();
    let dir = d.workdir("engine-restart");
    let rootfs = dir.join("busybox-rootfs.tar");
    busybox_rootfs(&rootfs);
    write_config(
        &dir,
        &format!(
            "name: er\nhosts:\n  host0: {}\nservices:\n  web:\n    target: {{ docker: {{ host: host0, image: harness-test/er-busybox:e2e, rootfs: {}, pull: never, command: [httpd, -f, -p, '80'], ports: ['80'] }} }}\n    stop_timeout: 1s\n    restart: always\n    health_check: {{ type: tcp, interval: 300ms }}\n",
            bed.host_yaml(0, &format!("docker_socket: {}", engine.socket.display())),
            rootfs.display()
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let before = get(&c, "er", "web");
    assert_eq!(before.health, Health::Healthy);
    let started_at = |e: &tests::testbed::BedDocker| {
        e.docker(&["inspect", "-f", "{{.State.StartedAt}}", "harness-er-web"])
    };
    let first_start = started_at(&engine);
    engine.restart();
    // Give the harness time to notice the engine went and came back.
    std::thread::sleep(Duration::from_secs(3));
    let after = wait_service(
        &c,
        "er",
        "web",
        "web healthy after the engine restart",
        |s| s.health == Health::Healthy,
    );
    assert_eq!(
        (after.state, after.pid),
        (ServiceState::Running, before.pid)
    );
    assert_eq!(
        started_at(&engine),
        first_start,
        "the container was restarted"
    );
    let restarts: Vec<_> = replay(&c, &["service"])
        .into_iter()
        .filter(|e| {
            matches!(
                e.kind,
                protocol::EventKind::ServiceExited(_) | protocol::EventKind::ServiceRestarting(_)
            )
        })
        .collect();
    assert!(restarts.is_empty(), "{restarts:?}");
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
}

/// The engine stops without `--live-restore`, which stops its containers: the harness
/// takes that as the exit it is, says so in its events, tries restarts while the
/// engine is away, and restarts the service by its policy once the engine is back.
#[test]
fn a_container_its_engine_stopped_is_restarted_by_policy() {
    let bed = tests::testbed::TestBed::new(1);
    let mut engine = bed.start_dockerd_with(0, false);
    let d = TestDaemon::start();
    let dir = d.workdir("engine-stop");
    let rootfs = dir.join("busybox-rootfs.tar");
    busybox_rootfs(&rootfs);
    write_config(
        &dir,
        &format!(
            "name: es\nhosts:\n  host0: {}\nservices:\n  web:\n    target: {{ docker: {{ host: host0, image: harness-test/es-busybox:e2e, rootfs: {}, pull: never, command: [httpd, -f, -p, '80'], ports: ['80'] }} }}\n    stop_timeout: 1s\n    restart: always\n    health_check: {{ type: tcp, interval: 300ms }}\n",
            bed.host_yaml(0, &format!("docker_socket: {}", engine.socket.display())),
            rootfs.display()
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    let before = get(&c, "es", "web");
    assert_eq!(before.health, Health::Healthy);
    engine.stop();
    // The engine stays away until a restart has failed for want of it: how long the
    // engine takes to go and come back is then no part of what is tested.
    wait_for(
        "a restart that failed while the engine was away",
        Duration::from_secs(30),
        || {
            get(&c, "es", "web")
                .reason
                .filter(|r| r.starts_with("restarting after its last start failed"))
        },
    );
    engine.start();
    // Running and healthy again, by its policy.
    let after = wait_service(&c, "es", "web", "web restarted and healthy", |s| {
        s.state == ServiceState::Running
            && s.health == Health::Healthy
            && s.restarts >= 1
            && s.container.is_some()
    });
    assert!(after.restarts >= 1);
    // The events say what happened: the container exited (the engine stopped it), and
    // restarts that could not start while the engine was away were tried again.
    let events = replay(&c, &["service"]);
    assert!(
        events.iter().any(|e| matches!(&e.kind,
            protocol::EventKind::ServiceExited(x) if x.name == "web" && x.code == Some(137))),
        "{events:?}"
    );
    let retried = events.iter().any(|e| matches!(&e.kind,
        protocol::EventKind::ServiceState(x) if x.reason.as_deref().is_some_and(|r| r.starts_with("restarting after its last start failed"))));
    let attempts = events
        .iter()
        .filter(|e| matches!(e.kind, protocol::EventKind::ServiceRestarting(_)))
        .count();
    assert!(retried && attempts >= 2, "{events:?}");
    assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
}
