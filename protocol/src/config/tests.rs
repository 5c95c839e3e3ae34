//! Tests of parsing, validation, ordering and resolution of configs, driven by small YAML
//! documents and the exact messages users see.

use std::collections::BTreeMap;

use super::*;

const FILE: &str = "t.yaml";

#[track_caller]
fn load(yaml: &str) -> StackConfig {
    parse_stack(yaml, FILE).unwrap_or_else(|e| panic!("{e}"))
}

/// The only service of a one-service document.
#[track_caller]
fn one(yaml: &str) -> ServiceConfig {
    load(yaml).services.into_values().next().expect("a service")
}

/// Asserts the exact error lines (file:line:col: key: message) of a document.
#[track_caller]
fn check_errors(yaml: &str, expected: &[&str]) {
    let errors = match parse_stack(yaml, FILE) {
        Ok(_) => panic!("expected errors, it loaded:\n{yaml}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
    };
    assert_eq!(errors, expected, "\n{yaml}");
}

/// A document with one service `api` whose body is `body` (indented by the caller).
fn svc(body: &str) -> String {
    format!("services:\n  api:\n{body}")
}

const PROCESS: &str = "    target: { process: { binary: /bin/api } }\n";

#[test]
fn both_target_shapes_give_the_same_model() {
    let adr = one(&svc("    target:\n      process:\n        binary: ./api\n        args: [--port, \"8080\"]\n        env: { A: b }\n        working_dir: /w\n"));
    let readme = one(&svc("    backend:\n      type: process\n      binary: ./api\n      args: [--port, 8080]\n      env: { A: b }\n      working_dir: /w\n"));
    assert_eq!(adr, readme);
    let Target::Process(p) = adr.target else {
        panic!()
    };
    assert_eq!(p.args, ["--port", "8080"]);
}

#[track_caller]
fn check_target(body: &str, expected: Target) {
    assert_eq!(one(&svc(body)).target, expected);
}

#[test]
fn target_kinds() {
    let remote = |host: &str| RemoteTarget {
        host: Some(host.into()),
        ..Default::default()
    };
    check_target(
        "    backend: { type: ssh, host: h, user: u, key_file: ~/.k, binary: /b, env: { PORT: 8080, ON: true } }\n",
        Target::RemoteLan(RemoteTarget {
            user: Some("u".into()),
            ssh_key: Some("~/.k".into()),
            binary: Some("/b".into()),
            env: [("ON".into(), "true".into()), ("PORT".into(), "8080".into())].into(),
            ..remote("h")
        }),
    );
    check_target(
        "    backend: { type: package, host: h, package: ./p.tar.zst }\n",
        Target::RemoteLan(RemoteTarget {
            package: Some("./p.tar.zst".into()),
            ..remote("h")
        }),
    );
    check_target(
        "    target: { wireguard: { host: h, package: ./p.tar.zst } }\n",
        Target::Wireguard(RemoteTarget {
            package: Some("./p.tar.zst".into()),
            ..remote("h")
        }),
    );
    check_target(
        "    target: { remote_lan: { hosts: [a, b], binary: /b, args: [x] } }\n",
        Target::RemoteLan(RemoteTarget {
            hosts: vec!["a".into(), "b".into()],
            binary: Some("/b".into()),
            args: vec!["x".into()],
            ..Default::default()
        }),
    );
    check_target(
        "    backend: { type: docker, image: 'app:1', ports: ['8080:80', 5432], volumes: [/d:/v] }\n",
        Target::Docker(DockerTarget {
            image: "app:1".into(),
            ports: vec!["8080:80".into(), "5432".into()],
            volumes: vec!["/d:/v".into()],
            ..Default::default()
        }),
    );
    check_target(
        "    target: { discovered: { type: postgresql } }\n",
        Target::Discovered(DiscoveredTarget {
            kind: "postgresql".into(),
            ranges: vec![],
            ports: vec![],
        }),
    );
    check_target(
        "    target: { external: { address: 'db.lan:5432' } }\n",
        Target::External(ExternalTarget {
            address: "db.lan:5432".into(),
        }),
    );
}

#[track_caller]
fn check_check(yaml_check: &str, expected: HealthCheck) {
    let s = one(&svc(&format!("{PROCESS}    health_check: {yaml_check}\n")));
    assert_eq!(s.health_check, Some(expected));
}

fn every(check: CheckKind) -> HealthCheck {
    HealthCheck {
        check,
        interval_ms: None,
        timeout_ms: None,
        retries: None,
        start_period_ms: None,
    }
}

#[test]
fn health_checks_and_durations() {
    let http = |url: &str| CheckKind::Http {
        url: url.into(),
        expected_status: None,
    };
    check_check(
        "{ type: http, url: 'http://x/h', expected_status: 200, interval_secs: 30 }",
        HealthCheck {
            interval_ms: Some(30_000),
            ..every(CheckKind::Http {
                url: "http://x/h".into(),
                expected_status: Some(200),
            })
        },
    );
    check_check(
        "{ type: http, url: u, interval: 2s, timeout: 500ms, start_period: 1m, retries: 3 }",
        HealthCheck {
            interval_ms: Some(2000),
            timeout_ms: Some(500),
            start_period_ms: Some(60_000),
            retries: Some(3),
            ..every(http("u"))
        },
    );
    check_check(
        "{ type: http, url: u, interval: 2, timeout: 1.5 }",
        HealthCheck {
            interval_ms: Some(2000),
            timeout_ms: Some(1500),
            ..every(http("u"))
        },
    );
    check_check(
        "{ type: tcp, port: 5432, timeout_secs: 10 }",
        HealthCheck {
            timeout_ms: Some(10_000),
            ..every(CheckKind::Tcp {
                host: None,
                port: Some(5432),
            })
        },
    );
    check_check(
        "{ type: command, command: pg_isready, args: [-h, localhost], expected_exit_code: 0 }",
        every(CheckKind::Command {
            command: "pg_isready".into(),
            args: vec!["-h".into(), "localhost".into()],
            expected_exit_code: Some(0),
        }),
    );
    check_check(
        "{ type: script, path: ./c.sh }",
        every(CheckKind::Script {
            path: "./c.sh".into(),
            args: vec![],
        }),
    );
}

#[test]
fn bad_durations_name_the_key() {
    let h = |check: &str| {
        svc(&format!(
            "{PROCESS}    health_check:\n      type: tcp\n{check}"
        ))
    };
    check_errors(&h("      interval: 5 parsecs\n"), &[
        "t.yaml:6:17: services.api.health_check.interval: bad duration \"5 parsecs\" (unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)): expected a number of seconds or a duration such as 500ms, 2s, 1m",
    ]);
    check_errors(&h("      interval_secs: 2s\n"), &[
        "t.yaml:6:22: services.api.health_check.interval_secs: bad duration \"2s\": expected a whole number of seconds (a key without `_secs` takes units: 500ms, 2s, 1m)",
    ]);
    check_errors(&h("      timeout: 1s\n      timeout_secs: 1\n"), &[
        "t.yaml:7:21: services.api.health_check.timeout_secs: give either `timeout` or `timeout_secs`, not both",
    ]);
    check_errors(&h("      start_period: -1\n"), &[
        "t.yaml:6:21: services.api.health_check.start_period: bad duration -1: expected a number of seconds or a duration such as 500ms, 2s, 1m",
    ]);
    check_errors(
        &h("      interval: 0s\n"),
        &["t.yaml:6:7: services.api.health_check.interval: `interval` must be more than 0"],
    );
    check_errors(&svc(&format!("{PROCESS}    stop_timeout: soon\n")), &[
        "t.yaml:4:19: services.api.stop_timeout: bad duration \"soon\" (expected number at 0): expected a number of seconds or a duration such as 500ms, 2s, 1m",
    ]);
}

#[test]
fn ports() {
    let port = |p: &str| one(&svc(&format!("{PROCESS}    port: {p}\n"))).port;
    assert_eq!(port("8080"), Some(PortSpec::Fixed(8080)));
    assert_eq!(port("\"8080\""), Some(PortSpec::Fixed(8080)));
    assert_eq!(port("auto"), Some(PortSpec::Auto));
    let bad = |p: &str| svc(&format!("{PROCESS}    port: {p}\n"));
    let expected = "expected a port number from 1 to 65535 or \"auto\"";
    check_errors(
        &bad("0"),
        &[&format!(
            "t.yaml:4:11: services.api.port: bad port 0: {expected}"
        )],
    );
    check_errors(
        &bad("70000"),
        &[&format!(
            "t.yaml:4:11: services.api.port: bad port 70000: {expected}"
        )],
    );
    check_errors(
        &bad("abc"),
        &[&format!(
            "t.yaml:4:11: services.api.port: bad port \"abc\": {expected}"
        )],
    );
    check_errors(&svc(&format!("{PROCESS}    health_check: {{ type: tcp, port: 65536 }}\n")), &[
        "t.yaml:4:38: services.api.health_check.port: bad port 65536: expected a port number from 1 to 65535",
    ]);
}

#[test]
fn restart_policies() {
    let restart = |r: &str| one(&svc(&format!("{PROCESS}    restart: {r}\n"))).restart;
    let policy = |policy| RestartConfig {
        policy,
        max_restarts: None,
    };
    assert_eq!(restart("no"), policy(RestartPolicy::No));
    assert_eq!(restart("\"no\""), policy(RestartPolicy::No));
    assert_eq!(restart("on-failure"), policy(RestartPolicy::OnFailure));
    assert_eq!(restart("always"), policy(RestartPolicy::Always));
    assert_eq!(
        restart("{ policy: on-failure, max_restarts: 5 }"),
        RestartConfig {
            policy: RestartPolicy::OnFailure,
            max_restarts: Some(5)
        }
    );
    let bad = |r: &str| svc(&format!("{PROCESS}    restart: {r}\n"));
    check_errors(&bad("unless-stopped"), &[
        "t.yaml:4:14: services.api.restart: `unless-stopped` is not supported: use `always` (harness restarts nothing it was told to stop)",
    ]);
    check_errors(&bad("on_failure"), &["t.yaml:4:14: services.api.restart: unknown restart policy `on_failure` (did you mean `on-failure`?)"]);
    check_errors(&bad("false"), &["t.yaml:4:14: services.api.restart: bad restart policy false: expected no, on-failure or always"]);
}

#[test]
fn dependency_forms() {
    let base = "  db:\n    target: { docker: { image: postgres } }\n  api:\n    target: { process: { binary: /a } }\n";
    let deps = |d: &str| {
        load(&format!("services:\n{base}{d}")).services["api"]
            .depends_on
            .clone()
    };
    let plain: BTreeMap<String, Dependency> = [("db".to_owned(), Dependency::default())].into();
    assert_eq!(deps("    dependencies: [db]\n"), plain);
    assert_eq!(deps("    depends_on: [db]\n"), plain);
    assert_eq!(deps("    depends_on: { db: }\n"), plain);
    let healthy: BTreeMap<String, Dependency> = [(
        "db".to_owned(),
        Dependency {
            condition: Some(Condition::Healthy),
        },
    )]
    .into();
    assert_eq!(
        deps("    depends_on: { db: { condition: healthy } }\n"),
        healthy
    );
    assert_eq!(
        deps("    depends_on:\n      db: service_healthy\n"),
        healthy
    );
}

#[test]
fn dependency_errors() {
    let doc = "services:
  db:
    target: { docker: { image: postgres } }
  api:
    target: { process: { binary: /a } }
    dependencies: [dbb, api]
  a:
    target: { process: { binary: /a } }
    depends_on: { b: { condition: healthy } }
  b:
    target: { process: { binary: /b } }
    depends_on:
      - a
";
    check_errors(
        doc,
        &[
            "t.yaml:6:20: services.api.dependencies: unknown dependency `dbb` (did you mean `db`?)",
            "t.yaml:6:25: services.api.dependencies: `api` depends on itself",
            "t.yaml:9:19: services.a.depends_on.b: dependency cycle: a -> b -> a",
        ],
    );
    check_errors(&svc(&format!("{PROCESS}    dependencies: [x]\n    depends_on: [x]\n")), &[
        "t.yaml:5:17: services.api.depends_on: give either `dependencies` or `depends_on`, not both",
    ]);
    check_errors(&svc(&format!("{PROCESS}    depends_on: {{ x: {{ condition: ready }} }}\n")), &[
        "t.yaml:4:19: services.api.depends_on.x: unknown dependency `x`",
        "t.yaml:4:35: services.api.depends_on.x.condition: unknown condition `ready` (expected one of: healthy, started, completed)",
    ]);
}

#[track_caller]
fn check_target_loads(body: &str) {
    one(&svc(body));
}

#[test]
fn names_and_targets() {
    check_errors("services:\n  Api_Server:\n    target: { process: { binary: /a } }\n", &[
        "t.yaml:2:3: services.Api_Server: bad service name \"Api_Server\": use lower-case letters, digits, `-` and `_`, starting with a letter or digit (names become environment variable and file names)",
    ]);
    check_errors("name: ../etc\nservices: {}\n", &[
        "t.yaml:1:1: name: bad stack name \"../etc\": it has a `/` (a stack name becomes a directory name in the state directory; pick another with `name:` or -p)",
    ]);
    for (name, why) in [
        ("..", "it is a relative directory"),
        ("", "it is empty"),
        ("a\tb", "it has a control character"),
        (&"x".repeat(65), "it is longer than 64 bytes"),
    ] {
        let problem = crate::config::stack_name_problem(name).unwrap();
        assert!(problem.contains(why), "{problem}");
    }
    // A directory's name, as `harness up` takes it when the file names no stack.
    assert_eq!(crate::config::stack_name_problem("My Project (v2)"), None);
    check_errors(&svc("    target: { process: { args: [x] } }\n"), &[
        "t.yaml:3:15: services.api.target.process.binary: a process target needs `binary` (the program to run)",
    ]);
    check_errors(&svc("    backend:\n      type: process\n      args: [x]\n"), &[
        "t.yaml:3:5: services.api.backend.binary: a process target needs `binary` (the program to run)",
    ]);
    check_errors(&svc("    target: { remote_lan: { host: h } }\n"), &[
        "t.yaml:3:15: services.api.target.remote_lan: a remote target needs `binary` (a program on the host) or `package` (a package to deploy)",
    ]);
    check_errors(&svc("    target: { wireguard: { host: h, binary: /b, package: p.tar.zst } }\n"), &[
        "t.yaml:3:49: services.api.target.wireguard.package: give either `binary` or `package`, not both",
    ]);
    check_errors(&svc("    backend: { type: ssh, binary: /b }\n"), &[
        "t.yaml:3:5: services.api.backend: a remote target needs `host` (or `hosts: [...]` for several)",
    ]);
    check_errors(&svc("    port: 1\n"), &[
        "t.yaml:2:3: services.api: a service needs `target:` (e.g. `target: {process: {binary: ./app}}`) or `backend: {type: ...}`",
    ]);
    check_errors(
        &svc(&format!(
            "{PROCESS}    backend: {{ type: process, binary: /b }}\n"
        )),
        &["t.yaml:4:14: services.api.backend: give either `target` or `backend`, not both"],
    );
    check_errors(&svc("    target: { process: { binary: /a }, docker: { image: i } }\n"), &[
        "t.yaml:3:13: services.api.target: expected exactly one of process, docker, remote_lan, wireguard, discovered, external",
    ]);
    check_errors(&svc("    target: { ssh: { host: h } }\n"), &[
        "t.yaml:3:15: services.api.target.ssh: `ssh` is not supported: use `remote_lan` (a program on a LAN host over SSH)",
    ]);
    check_errors(&svc("    backend: { type: dokker, image: i }\n"), &[
        "t.yaml:3:22: services.api.backend.type: unknown backend type `dokker` (did you mean `docker`?)",
    ]);
    check_errors(&svc("    target: { discovered: { type: postgres } }\n"), &[
        "t.yaml:3:29: services.api.target.discovered.type: unknown discovery type \"postgres\": did you mean `postgresql`? expected one of postgresql, redis, http, ssh",
    ]);
    // Checked again once the client resolved the reference.
    check_target_loads("    target: { external: { address: '${TEAM_DB}' } }\n");
    check_errors(&svc("    target: { external: { address: db.lan } }\n"), &[
        "t.yaml:3:27: services.api.target.external.address: bad address \"db.lan\": expected host:port",
    ]);
}

#[test]
fn unknown_keys_and_values() {
    check_errors(&svc(&format!("{PROCESS}    helth_check: {{ type: tcp }}\n")), &[
        "t.yaml:4:5: services.api.helth_check: unknown key `helth_check` (did you mean `health_check`?)",
    ]);
    check_errors(
        &svc(&format!(
            "{PROCESS}    health_check: {{ type: tcp, url: x }}\n"
        )),
        &["t.yaml:4:32: services.api.health_check.url: `url` does not apply to a tcp check"],
    );
    check_errors(
        &svc(&format!("{PROCESS}    health_check: {{ type: http }}\n")),
        &["t.yaml:4:5: services.api.health_check.url: an http check needs `url`"],
    );
    check_errors(&svc(&format!("{PROCESS}    env: {{ A: [1], B: , 1X: y }}\n")), &[
        "t.yaml:4:15: services.api.env.A: expected a string, found a list",
        "t.yaml:4:20: services.api.env.B: `B` has no value (write \"\" for an empty one)",
        "t.yaml:4:25: services.api.env.1X: bad variable name \"1X\": use letters, digits and `_`, not starting with a digit",
    ]);
    check_errors("settings: { state_dir: /x, max_parallel: 0 }\nservices: {}\n", &[
        "t.yaml:1:13: settings.state_dir: `state_dir` is not supported: use the HARNESS_STATE_DIR environment variable",
        "t.yaml:1:28: settings.max_parallel: must be at least 1",
    ]);
    check_errors(
        "hosts:\n  h1: { user: u, sudo: yes }\n",
        &[
            "t.yaml:2:3: hosts.h1.address: a host needs `address` (an IP address or host name)",
            "t.yaml:2:24: hosts.h1.sudo: expected true or false, found a string",
        ],
    );
    check_errors(
        "services: [a]\n",
        &["t.yaml:1:11: services: expected a mapping, found a list"],
    );
    check_errors(
        "services:\n  a: {\n",
        &["t.yaml:2:6: invalid YAML: unclosed bracket '{'"],
    );
    check_errors(
        "services:\n  a: {}\n  a: {}\n",
        &["t.yaml:3:3: invalid YAML: duplicate mapping key: a"],
    );
}

#[test]
fn settings_network_hosts() {
    let c = load(
        "version: 1.0\nname: shop\nsettings: { max_parallel: 4, default_timeout: 300 }\nnetwork: { wireguard_subnet: 10.42.0.0/16, listen_port: 51820 }\nhosts:\n  lan1: { address: 10.0.0.5, port: 2222, sudo: true, ssh_key: ~/.ssh/k }\n",
    );
    assert_eq!(c.version.as_deref(), Some("1.0"));
    assert_eq!(
        c.settings,
        Settings {
            max_parallel: Some(4),
            default_timeout_ms: Some(300_000)
        }
    );
    assert_eq!(c.network.listen_port, Some(51820));
    assert_eq!(c.hosts["lan1"].port, Some(2222));
    assert!(c.hosts["lan1"].sudo);
    check_errors("network: { wireguard_subnet: 10.42.0.0 }\n", &[
        "t.yaml:1:12: network.wireguard_subnet: bad subnet \"10.42.0.0\": expected an address/prefix such as 10.42.0.0/16",
    ]);
}

#[test]
fn validate_reports_without_lines() {
    let mut c = load(&svc(PROCESS));
    c.services
        .get_mut("api")
        .unwrap()
        .depends_on
        .insert("ghost".into(), Dependency::default());
    c.services.get_mut("api").unwrap().port = Some(PortSpec::Fixed(0));
    let errors = validate(&c, "config").unwrap_err().to_string();
    assert_eq!(
        errors,
        "config: services.api.port: bad port 0: expected a port number from 1 to 65535\nconfig: services.api.depends_on.ghost: unknown dependency `ghost`"
    );
    assert_eq!(validate(&load(&svc(PROCESS)), "config"), Ok(()));
}

#[test]
fn orders() {
    let c = load(
        "services:
  web: { target: { process: { binary: /w } }, dependencies: [api] }
  api: { target: { process: { binary: /a } }, dependencies: [db, cache] }
  db: { target: { process: { binary: /d } } }
  cache: { target: { process: { binary: /c } } }
  zed: { target: { process: { binary: /z } } }
",
    );
    assert_eq!(start_order(&c), ["cache", "db", "api", "web", "zed"]);
    assert_eq!(
        dependency_waves(&c),
        [vec!["cache", "db", "zed"], vec!["api"], vec!["web"]]
    );
    // A cycle (rejected by validate) still orders every service.
    let mut cyclic = c.clone();
    cyclic
        .services
        .get_mut("db")
        .unwrap()
        .depends_on
        .insert("web".into(), Dependency::default());
    assert_eq!(start_order(&cyclic), ["cache", "zed", "api", "db", "web"]);
    assert_eq!(
        dependency_waves(&cyclic),
        [vec!["cache", "zed"], vec!["api", "db", "web"]]
    );
}

#[test]
fn a_large_dag_starts_every_dependency_first() {
    // 300 services, each on up to three earlier ones (a fixed pseudo-random pick).
    let mut yaml = String::from("services:\n");
    let mut seed: u64 = 7;
    let mut edges = Vec::new();
    for i in 0..300u64 {
        let mut deps = Vec::new();
        for _ in 0..3 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let d = format!("s{}", (seed >> 33) % i.max(1));
            if i > 0 && seed.is_multiple_of(2) && !deps.contains(&d) {
                edges.push((d.clone(), format!("s{i}")));
                deps.push(d);
            }
        }
        yaml.push_str(&format!(
            "  s{i}: {{ target: {{ process: {{ binary: /x }} }}, dependencies: [{}] }}\n",
            deps.join(", ")
        ));
    }
    let c = load(&yaml);
    let order = start_order(&c);
    let position: std::collections::HashMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    assert_eq!(position.len(), 300, "every service once");
    for (dep, svc) in &edges {
        assert!(
            position[dep.as_str()] < position[svc.as_str()],
            "{dep} before {svc}"
        );
    }
}

#[test]
fn resolve_environment_keeps_service_refs() {
    let mut c = load(
        "services:
  api:
    target: { process: { binary: '${BIN_DIR}/api', args: ['--db', '${db.addr}', '${PORT:-80}'], working_dir: '${HOME}/w' } }
    env: { URL: 'http://${self.addr}/${NAME}', PASS: '${SECRET}', LIT: '$${NAME}' }
    health_check: { type: http, url: 'http://${self.addr}/health' }
  db:
    target: { docker: { image: 'postgres:${PG:-14}' } }
",
    );
    let vars = [
        ("BIN_DIR", "/opt/bin"),
        ("HOME", "/home/u"),
        ("NAME", "shop"),
        ("SECRET", "a$b"),
    ];
    c.resolve_environment(&mut |k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    let api = &c.services["api"];
    let Target::Process(p) = &api.target else {
        panic!()
    };
    assert_eq!(p.binary, "/opt/bin/api");
    assert_eq!(p.args, ["--db", "${db.addr}", "80"]);
    assert_eq!(p.working_dir.as_deref(), Some("/home/u/w"));
    assert_eq!(api.env["URL"], "http://${self.addr}/shop");
    assert_eq!(
        api.env["PASS"], "a$$b",
        "a `$` in a value is escaped for the daemon's pass"
    );
    assert_eq!(api.env["LIT"], "$${NAME}");
    let Some(HealthCheck {
        check: CheckKind::Http { url, .. },
        ..
    }) = &api.health_check
    else {
        panic!()
    };
    assert_eq!(url, "http://${self.addr}/health");
    let Target::Docker(d) = &c.services["db"].target else {
        panic!()
    };
    assert_eq!(d.image, "postgres:14");
    // What the daemon then makes of it.
    let pass = template::expand_service_refs(&api.env["PASS"], &mut |_, _| None).unwrap();
    assert_eq!(pass, "a$b");
}

#[test]
fn resolve_environment_reports_every_problem() {
    let mut c = load(
        "services:
  api:
    target: { process: { binary: /a, working_dir: '${db.host}/x' } }
    env: { A: '${MISSING}', B: '${ALSO}' }
",
    );
    let errors = c
        .resolve_environment(&mut |_| None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        errors,
        "services.api.env.A: unresolved variable `MISSING`
services.api.env.B: unresolved variable `ALSO`
services.api.target.process.working_dir: `${db.host}` cannot be used here: service references work in env, args, binary and health checks"
    );
}

#[test]
fn resolve_paths() {
    let mut c = load(
        "hosts:
  h: { address: a, ssh_key: ~/.ssh/k, known_hosts: ./kh }
services:
  rel: { target: { process: { binary: ./bin/api, working_dir: ../w } }, env_file: .env }
  path: { target: { process: { binary: sh } }, health_check: { type: script, path: checks/c.sh } }
  nested: { target: { process: { binary: bin/api, working_dir: /abs } } }
  remote: { target: { remote_lan: { host: h, package: pkg.tar.zst, ssh_key: '~/k' } } }
  remote2: { target: { remote_lan: { host: h, binary: ./on-host } } }
  box: { target: { docker: { image: i, volumes: ['./data:/d:ro', 'named:/n', '/abs:/a'] } } }
",
    );
    c.resolve_paths("/p/stack", Some("/home/u"));
    let process = |name: &str| match &c.services[name].target {
        Target::Process(p) => (p.binary.clone(), p.working_dir.clone().unwrap()),
        _ => panic!(),
    };
    assert_eq!(
        process("rel"),
        ("/p/stack/bin/api".into(), "/p/stack/../w".into())
    );
    assert_eq!(process("path"), ("sh".into(), "/p/stack".into()));
    assert_eq!(
        process("nested"),
        ("/p/stack/bin/api".into(), "/abs".into())
    );
    assert_eq!(c.services["rel"].env_file.as_deref(), Some("/p/stack/.env"));
    let Some(HealthCheck {
        check: CheckKind::Script { path, .. },
        ..
    }) = &c.services["path"].health_check
    else {
        panic!()
    };
    assert_eq!(path, "/p/stack/checks/c.sh");
    assert_eq!(c.hosts["h"].ssh_key.as_deref(), Some("/home/u/.ssh/k"));
    assert_eq!(c.hosts["h"].known_hosts.as_deref(), Some("/p/stack/kh"));
    let Target::RemoteLan(r) = &c.services["remote"].target else {
        panic!()
    };
    assert_eq!(
        (r.package.as_deref(), r.ssh_key.as_deref()),
        (Some("/p/stack/pkg.tar.zst"), Some("/home/u/k"))
    );
    let Target::RemoteLan(r) = &c.services["remote2"].target else {
        panic!()
    };
    assert_eq!(
        r.binary.as_deref(),
        Some("./on-host"),
        "a path on the remote host is not ours to resolve"
    );
    let Target::Docker(d) = &c.services["box"].target else {
        panic!()
    };
    assert_eq!(d.volumes, ["/p/stack/data:/d:ro", "named:/n", "/abs:/a"]);
}

#[test]
fn every_error_is_collected() {
    let doc = "services:
  api:
    target: { process: { binary: /a } }
    port: 0
    restart: sometimes
    dependencies: [ghost]
    helth_check: {}
";
    let errors = parse_stack(doc, FILE).unwrap_err();
    let lines: Vec<_> = errors.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, [Some(4), Some(5), Some(6), Some(7)], "{errors}");
}

#[test]
fn stop_signals_are_checked() {
    assert_eq!(super::signal_number("TERM"), Some(15));
    assert_eq!(super::signal_number("sigint"), Some(2));
    assert_eq!(super::signal_number("9"), Some(9));
    assert_eq!(super::signal_number("SIGNOPE"), None);
    assert_eq!(
        one(&svc(&format!("{PROCESS}    stop_signal: INT\n")))
            .stop_signal
            .as_deref(),
        Some("INT")
    );
    let errors = parse_stack(&svc(&format!("{PROCESS}    stop_signal: TREM\n")), FILE)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("services.api.stop_signal: unknown signal \"TREM\""),
        "{errors}"
    );
}

#[test]
fn docker_port_mappings_parse_or_say_what_is_expected() {
    let m = PortMapping::parse("127.0.0.1:8080:80/udp").unwrap();
    assert_eq!(m.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!((m.host_port, m.container_port), (Some(8080), 80));
    assert_eq!(m.protocol, "udp");
    let m = PortMapping::parse("5432").unwrap();
    assert_eq!((m.host_port, m.container_port), (None, 5432));
    assert_eq!(m.protocol, "tcp");
    let e = PortMapping::parse("80:http").unwrap_err();
    assert!(e.contains("\"http\" is not a port number"), "{e}");
    let e = PortMapping::parse("80/sctp").unwrap_err();
    assert!(e.contains("unknown protocol"), "{e}");
    check_errors(
        &svc("    target: { docker: { image: i, ports: ['70000'] } }\n"),
        &["t.yaml:3:35: services.api.target.docker.ports[0]: bad port \"70000\": \"70000\" is not a port number (1-65535); expected \"80\", \"8080:80\" or \"127.0.0.1:8080:80\""],
    );
}

#[test]
fn compose_files_import_as_docker_services_naming_what_is_not_translated() {
    let compose = r#"
version: "3.8"
services:
  db:
    image: postgres:14
    environment: [POSTGRES_PASSWORD=test, PGDATA]
    ports: ["5432"]
    healthcheck:
      test: [CMD, pg_isready, -U, postgres]
      interval: 2s
      retries: 5
    container_name: my-db
    restart: unless-stopped
  api:
    build: { context: ./api, dockerfile: Dockerfile.dev }
    command: serve --port "8080"
    depends_on:
      db: { condition: service_healthy }
    ports: [{ target: 8080, published: 18080 }]
    volumes: ["./data:/data:ro"]
    healthcheck: { test: "wget -qO- http://localhost:8080/health" }
    stop_grace_period: 3s
    networks: [back]
networks: { back: {} }
"#;
    let imported = import_compose(compose, "docker-compose.yml", "shop").unwrap();
    let config = parse_stack(&imported.yaml, "imported.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{}", imported.yaml));
    assert_eq!(config.name.as_deref(), Some("shop"));
    let db = &config.services["db"];
    let Target::Docker(d) = &db.target else {
        panic!()
    };
    assert_eq!(d.image, "postgres:14");
    assert_eq!(d.env["POSTGRES_PASSWORD"], "test");
    assert_eq!(d.env["PGDATA"], "${PGDATA}");
    assert_eq!(d.ports, ["5432"]);
    assert_eq!(db.restart.policy, RestartPolicy::Always);
    let check = db.health_check.as_ref().unwrap();
    assert_eq!(
        check.check,
        CheckKind::Command {
            command: "pg_isready".into(),
            args: vec!["-U".into(), "postgres".into()],
            expected_exit_code: None
        }
    );
    assert_eq!(check.interval_ms, Some(2000));
    assert_eq!(check.retries, Some(5));
    let api = &config.services["api"];
    let Target::Docker(a) = &api.target else {
        panic!()
    };
    assert_eq!(a.image, "shop-api");
    assert_eq!(a.build.as_deref(), Some("./api"));
    assert_eq!(a.dockerfile.as_deref(), Some("Dockerfile.dev"));
    assert_eq!(a.command, ["serve", "--port", "8080"]);
    assert_eq!(a.ports, ["18080:8080"]);
    assert_eq!(a.volumes, ["./data:/data:ro"]);
    assert_eq!(api.depends_on["db"].condition, Some(Condition::Healthy));
    assert_eq!(api.stop_timeout_ms, Some(3000));
    let notes = imported.untranslated.join("\n");
    for key in [
        "services.db.container_name",
        "services.api.networks",
        "networks",
    ] {
        assert!(
            imported
                .untranslated
                .iter()
                .any(|n| n.contains(&format!(": {key}: not translated"))),
            "{key} not named in:\n{notes}"
        );
    }
    assert!(
        notes.contains("docker-compose.yml:12:5: services.db.container_name"),
        "{notes}"
    );
    assert_eq!(imported.untranslated.len(), 3, "{notes}");
    assert!(is_compose_file_name("docker-compose.yml"));
    assert!(is_compose_file_name("compose.yaml"));
    assert!(!is_compose_file_name("harness.yaml"));
}

#[test]
fn reuse_if_running_needs_a_fixed_port_and_external_addresses_split() {
    check_errors(
        &svc("    target: { process: { binary: /a } }\n    port: auto\n    reuse_if_running: true\n"),
        &["t.yaml:5:5: services.api.reuse_if_running: reuse_if_running needs a fixed `port:`, where a running instance would answer"],
    );
    assert!(
        one(&svc(
            "    target: { process: { binary: /a } }\n    port: 8080\n    reuse_if_running: true\n"
        ))
        .reuse_if_running
    );
    let t = ExternalTarget {
        address: "[::1]:5432".into(),
    };
    assert_eq!(t.host_port(), Some(("::1".to_owned(), 5432)));
    let t = ExternalTarget {
        address: "db.lan".into(),
    };
    assert_eq!(t.host_port(), None);
}

#[test]
fn a_target_list_is_a_placement_with_fallback() {
    let s = one(&svc(
        "    target:\n      - discovered: { type: postgresql, ranges: [198.18.0.0/24], ports: [5432] }\n      - process: { binary: /bin/pg }\n",
    ));
    assert_eq!(s.placement.len(), 2);
    assert_eq!(s.target, s.placement[0]);
    assert_eq!(s.placement_position(), Some(0));
    let Target::Discovered(d) = &s.target else {
        panic!("{:?}", s.target)
    };
    assert_eq!(
        (d.ranges.as_slice(), d.ports.as_slice()),
        (&["198.18.0.0/24".to_owned()][..], &[5432][..])
    );
    // One target in a list is just that target.
    assert!(
        one(&svc("    target: [{ process: { binary: /bin/pg } }]\n"))
            .placement
            .is_empty()
    );
    // Errors inside the list name the entry.
    check_errors(
        &svc("    target:\n      - process: { binary: /bin/pg }\n      - remote_lan: { hosts: [a, b], binary: /x }\n      - discovered: { type: postgres, ranges: [10.0.0.0/8] }\n"),
        &[
            "t.yaml:5:23: services.api.target[1].remote_lan.hosts: a target in a placement list runs on one host: use `host:`",
            "t.yaml:6:23: services.api.target[2].discovered.type: unknown discovery type \"postgres\": did you mean `postgresql`? expected one of postgresql, redis, http, ssh",
            "t.yaml:6:39: services.api.target[2].discovered.ranges[0]: range \"10.0.0.0/8\" has 16777216 addresses; a scan covers at most 65536 (a /16): give smaller ranges",
        ],
    );
    check_errors(
        &svc("    target: []\n"),
        &["t.yaml:3:13: services.api.target: a placement list needs at least one target"],
    );
}

#[test]
fn the_discovery_section() {
    let c = load("discovery:\n  ranges: [198.18.0.0/24, 127.0.0.1]\n  tcp_ports: [5432, 6379]\n  tcp_timeout: 200ms\n  http_timeout_secs: 2\n  concurrency: 64\n  dns_servers: [198.18.0.9:5353]\n  srv_names: [_redis._tcp.test]\n  mdns_interfaces: [br0]\n");
    let d = &c.discovery;
    assert_eq!(d.ranges, ["198.18.0.0/24", "127.0.0.1"]);
    assert_eq!(d.tcp_ports, [5432, 6379]);
    assert_eq!(
        (d.tcp_timeout_ms, d.http_timeout_ms, d.concurrency),
        (Some(200), Some(2000), Some(64))
    );
    // Flags win over the section, which fills what they leave unset.
    let flags = DiscoveryOptions {
        ranges: vec!["10.1.0.0/24".into()],
        ..Default::default()
    };
    let merged = flags.or(d);
    assert_eq!(merged.ranges, ["10.1.0.0/24"]);
    assert_eq!(merged.tcp_ports, [5432, 6379]);
    check_errors(
        "discovery:\n  ranges: [300.1.1.0/24]\n  strategies: [tcp, ping]\n  dns_servers: [resolver]\n  network_ranges: [x]\n  tcp_ports: [99999]\n",
        &[
            "t.yaml:2:3: discovery.ranges[0]: bad range \"300.1.1.0/24\": expected an IPv4 address or address/prefix such as 192.168.1.0/24",
            "t.yaml:3:3: discovery.strategies[1]: unknown strategy \"ping\": expected one of tcp, http, dns, mdns",
            "t.yaml:4:3: discovery.dns_servers[0]: bad DNS server \"resolver\": expected an IP address or ip:port",
            "t.yaml:5:3: discovery.network_ranges: `network_ranges` is not supported: use `ranges`",
            "t.yaml:6:15: discovery.tcp_ports[0]: bad port 99999: expected a port number from 1 to 65535",
        ],
    );
}

#[test]
fn pre_generated_mesh_keys_belong_to_wireguard_targets() {
    let s = one(&svc(
        "    target: { wireguard: { host: n1, binary: /x, wireguard_key: ./node.key } }\n",
    ));
    let Target::Wireguard(t) = &s.target else {
        panic!("{:?}", s.target)
    };
    assert_eq!(t.wireguard_key.as_deref(), Some("./node.key"));
    check_errors(
        &svc("    target: { remote_lan: { host: n1, binary: /x, wireguard_key: ./node.key } }\n"),
        &["t.yaml:3:51: services.api.target.remote_lan.wireguard_key: `wireguard_key` is for `wireguard` targets: a remote_lan service is not on the mesh"],
    );
    let c = load("network: { hub_key: ./hub.key }\n");
    assert_eq!(c.network.hub_key.as_deref(), Some("./hub.key"));
}

#[test]
fn secret_env_values_are_masked_wherever_the_config_is_shown() {
    let cfg = load(&svc("    target: { process: { binary: /bin/api, env: { PASSWORD: from-target, PLAIN: p } } }\n    env: { API_TOKEN: t0ken-value, MODE: dev }\n    secret_env: [API_TOKEN, PASSWORD]\n"));
    let api = &cfg.services["api"];
    assert!(api.is_secret("API_TOKEN") && api.is_secret("PASSWORD") && !api.is_secret("MODE"));
    let shown = cfg.masked();
    let shown_api = &shown.services["api"];
    assert_eq!(shown_api.env["API_TOKEN"], SECRET_MASK);
    assert_eq!(shown_api.env["MODE"], "dev");
    let target_env = shown_api.target.env().unwrap();
    assert_eq!(target_env["PASSWORD"], SECRET_MASK);
    assert_eq!(target_env["PLAIN"], "p");
    let text = serde_json::to_string(&shown).unwrap();
    assert!(
        !text.contains("t0ken-value") && !text.contains("from-target"),
        "{text}"
    );
    // A value built from a secret, a URL holding one: masked where they appear.
    let built = load(&svc("    target: { process: { binary: /bin/api } }\n    env: { DB_PASSWORD: hunter22, DATABASE_URL: \"postgres://u:hunter22@db/x\" }\n    secret_env: [DB_PASSWORD]\n    health_check: { type: http, url: \"http://u:hunter22@${self.addr}/\" }\n"))
    .masked();
    let text = serde_json::to_string(&built).unwrap();
    assert!(!text.contains("hunter22"), "{text}");
    assert!(text.contains("postgres://u:(secret)@db/x"), "{text}");
    // A secret that is also a keyword of the config (`type: http`, `port: auto`): the
    // config still reads back, the variable is masked, the keywords stay.
    let keyword = load(&svc("    target: { process: { binary: /bin/api, env: { OTHER: \"x-http-y\" } } }\n    port: auto\n    env: { WORD: http, AUTO: auto }\n    secret_env: [WORD, AUTO]\n    health_check: { type: http, url: \"http://${self.addr}/\" }\n"));
    let shown_kw = keyword.masked();
    let kw = &shown_kw.services["api"];
    assert_eq!(
        (kw.env["WORD"].as_str(), kw.env["AUTO"].as_str()),
        (SECRET_MASK, SECRET_MASK)
    );
    assert_eq!(kw.port, keyword.services["api"].port);
    // `type: http` is still an http check; the secret inside strings is masked.
    let Some(CheckKind::Http { url, .. }) = kw.health_check.as_ref().map(|h| &h.check) else {
        panic!("the check's type changed: {:?}", kw.health_check);
    };
    assert_eq!(url, "(secret)://${self.addr}/");
    assert_eq!(kw.target.env().unwrap()["OTHER"], "x-(secret)-y");
    // The config itself keeps the values: the service gets them.
    assert_eq!(api.env["API_TOKEN"], "t0ken-value");
}

#[test]
fn a_secret_on_the_command_line_is_refused_without_showing_it() {
    check_errors(
        &svc("    target: { process: { binary: /bin/api, args: [--token, \"t0ken-value\"] } }\n    env: { API_TOKEN: t0ken-value }\n    secret_env: [API_TOKEN]\n"),
        &["t.yaml:5:5: services.api.secret_env: the value of secret API_TOKEN is in a command it runs, where `ps` shows it to every user of the host: pass it in the environment (API_TOKEN) and read it there"],
    );
    // In a health check's command too; and in the daemon, once `${VAR}` is resolved.
    check_errors(
        &svc("    target: { process: { binary: /bin/api } }\n    env: { API_TOKEN: t0ken-value }\n    secret_env: [API_TOKEN]\n    health_check: { type: command, command: curl, args: [-H, \"X: t0ken-value\"] }\n"),
        &["t.yaml:5:5: services.api.secret_env: the value of secret API_TOKEN is in its health check's command, where `ps` shows it to every user of the host: pass it in the environment (API_TOKEN) and read it there"],
    );
    let mut resolved = load(&svc("    target: { process: { binary: /bin/api, args: [\"--key=${KEY}\"] } }\n    env: { API_TOKEN: \"${TOKEN}\" }\n    secret_env: [API_TOKEN]\n"));
    resolved
        .resolve_environment(&mut |_| Some("t0ken-value".into()))
        .unwrap();
    let errors = validate(&resolved, FILE).unwrap_err().to_string();
    assert!(
        errors.contains("secret API_TOKEN is in a command it runs"),
        "{errors}"
    );
    assert!(!errors.contains("t0ken-value"), "{errors}");
    // Another service's secret counts too: masked in its client's URL, refused on its
    // command line.
    let stack = load("services:\n  db:\n    target: { process: { binary: /bin/db } }\n    env: { POSTGRES_PASSWORD: hunter22 }\n    secret_env: [POSTGRES_PASSWORD]\n  api:\n    target: { process: { binary: /bin/api } }\n    env: { DATABASE_URL: \"postgres://u:hunter22@db/x\" }\n");
    let text = serde_json::to_string(&stack.masked()).unwrap();
    assert!(!text.contains("hunter22"), "{text}");
    check_errors(
        "services:\n  db:\n    target: { process: { binary: /bin/db } }\n    env: { POSTGRES_PASSWORD: hunter22 }\n    secret_env: [POSTGRES_PASSWORD]\n  api:\n    target: { process: { binary: /bin/api, args: [--db-password, hunter22] } }\n",
        &["t.yaml:7:5: services.api.target: the value of secret POSTGRES_PASSWORD (of service db) is in a command it runs, where `ps` shows it to every user of the host: pass it in the environment (POSTGRES_PASSWORD) and read it there"],
    );
    // Short values are not looked for (they would match by chance), nor names alone.
    one(&svc("    target: { process: { binary: /bin/api, args: [--mode, \"1\", API_TOKEN] } }\n    env: { API_TOKEN: \"1\" }\n    secret_env: [API_TOKEN]\n"));
}
