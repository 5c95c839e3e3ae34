//! Every service-defining YAML block of the seed documents (`tests/fixtures/seeds/`) and
//! the DESIGN.md sketch: each loads, or fails naming the unsupported key and what to use
//! instead (DESIGN.md, "Configuration file").

use std::path::PathBuf;

use protocol::config::{parse_stack, CheckKind, PortSpec, StackConfig, Target};

/// What a fixture must do.
enum Outcome {
    /// Loads, with these services and backends.
    Loads(&'static [(&'static str, &'static str)]),
    /// Fails with exactly these errors, each given by its start (place, key and message
    /// up to the hint).
    Fails(&'static [&'static str]),
}

use Outcome::{Fails, Loads};

const CASES: &[(&str, Outcome)] = &[
    ("design_sketch.yaml", Loads(&[
        ("api", "process"), ("cache", "remote_lan"), ("load-gen", "wireguard"),
        ("postgres", "docker"), ("team-db", "discovered"), ("workers", "remote_lan"),
    ])),
    ("seeds/000_indexer_agent.yaml", Fails(&[
        "000_indexer_agent.yaml:3:3: services.indexer-agent: a service needs `target:`",
        "000_indexer_agent.yaml:4:5: services.indexer-agent.runtime: `runtime` is not supported: say where it runs with `target:`",
        "000_indexer_agent.yaml:5:5: services.indexer-agent.hosts: `hosts` is not supported: use `target: {remote_lan: {hosts: [...]}}`",
        "000_indexer_agent.yaml:9:5: services.indexer-agent.build: `build` is not supported: put it in the target: `target: {remote_lan: {package: ./pkg-dir, build: {type: cargo}}}` builds the program the package bundles",
        "000_indexer_agent.yaml:14:5: services.indexer-agent.deploy: `deploy` is not supported: put its keys in the target: `target: {remote_lan: {host: ..., package: ..., lifecycle: systemd, setup_commands: [...], env: {...}}}`",
    ])),
    ("seeds/001_network.yaml", Fails(&[
        "001_network.yaml:4:3: network.lan_interface: `lan_interface` is not supported: not needed",
        "001_network.yaml:5:3: network.dns_port: `dns_port` is not supported: the harness runs no DNS server",
    ])),
    ("seeds/001_hybrid_topology.yaml", Loads(&[
        ("api-server", "process"), ("cache-server", "remote_lan"),
        ("load-generator", "wireguard"), ("postgres", "docker"),
    ])),
    ("seeds/001_configuration_management.yaml", Fails(&[
        "001_configuration_management.yaml:26:5: services.load-generator.config: `config` is not supported: use `env`",
    ])),
    ("seeds/002_backend_process.yaml", Loads(&[("my-service", "process")])),
    ("seeds/002_backend_docker.yaml", Loads(&[("my-app", "docker")])),
    ("seeds/002_backend_ssh.yaml", Loads(&[("server", "remote_lan")])),
    ("seeds/002_backend_package.yaml", Fails(&[
        // pre_install and post_install load now; only install_path has moved.
        "002_backend_package.yaml:9:7: services.app.backend.install_path: `install_path` is not supported: set `install_root` on the host",
    ])),
    ("seeds/002_health_http.yaml", Loads(&[("my-service", "process")])),
    ("seeds/002_health_tcp.yaml", Loads(&[("my-service", "process")])),
    ("seeds/002_health_command.yaml", Loads(&[("my-service", "process")])),
    ("seeds/002_health_script.yaml", Loads(&[("my-service", "process")])),
    ("seeds/002_configuration.yaml", Fails(&[
        "002_configuration.yaml:6:3: settings.state_dir: `state_dir` is not supported: use the HARNESS_STATE_DIR environment variable",
        "002_configuration.yaml:11:1: networks: `networks` is not supported: use `network: {wireguard_subnet: ...}`",
        "002_configuration.yaml:49:5: services.monitoring.network: `network` is not supported: a service joins the mesh through `target: {wireguard: {...}}`",
    ])),
    ("seeds/004_remote_hosts.yaml", Fails(&[
        "004_remote_hosts.yaml:2:1: remote_deployment: `remote_deployment` is not supported: declare hosts under `hosts:`",
    ])),
    ("seeds/004_remote_deployment_development.yaml", Fails(&[
        "004_remote_deployment_development.yaml:4:1: remote_deployment: `remote_deployment` is not supported: declare hosts under `hosts:`",
    ])),
    ("seeds/004_remote_deployment_production.yaml", Fails(&[
        "004_remote_deployment_production.yaml:4:1: remote_deployment: `remote_deployment` is not supported: declare hosts under `hosts:`",
    ])),
    ("seeds/004_placement_development.yaml", Fails(&[
        "004_placement_development.yaml:3:15: services.postgresql: a service is a mapping, not \"local\": write `target: {process: {binary: ...}}`",
        "004_placement_development.yaml:4:10: services.redis: a service is a mapping, not \"local\"",
        "004_placement_development.yaml:5:13: services.chromadb: a service is a mapping, not \"local\"",
        "004_placement_development.yaml:6:11: services.claude: a service is a mapping, not \"remote@thinker.local\": write `target: {remote_lan: {host: thinker.local, binary: ...}}`",
        "004_placement_development.yaml:7:13: services.deepseek: a service is a mapping, not \"remote@gpu-server.local\"",
        "004_placement_development.yaml:8:11: services.cognee: a service is a mapping, not \"remote@thinker.local\"",
    ])),
    ("seeds/004_placement_production.yaml", Fails(&[
        "004_placement_production.yaml:3:15: services.postgresql: a service is a mapping, not \"remote@db01.prod.example.com\": write `target: {remote_lan: {host: db01.prod.example.com",
        "004_placement_production.yaml:4:10: services.redis: a service is a mapping",
        "004_placement_production.yaml:5:13: services.chromadb: a service is a mapping",
        "004_placement_production.yaml:6:11: services.claude: a service is a mapping",
        "004_placement_production.yaml:7:13: services.deepseek: a service is a mapping",
        "004_placement_production.yaml:8:11: services.gemini: a service is a mapping",
        "004_placement_production.yaml:9:11: services.cognee: a service is a mapping",
    ])),
    ("seeds/004_placement_team.yaml", Fails(&[
        "004_placement_team.yaml:3:15: services.postgresql: a service is a mapping, not \"discovered\": write `target: {discovered: {type: postgresql}}`",
        "004_placement_team.yaml:4:10: services.redis: a service is a mapping, not \"discovered\"",
        "004_placement_team.yaml:5:13: services.chromadb: a service is a mapping, not \"local\"",
        "004_placement_team.yaml:6:11: services.claude: a service is a mapping, not \"remote@shared-gpu.local\"",
        "004_placement_team.yaml:7:11: services.cognee: a service is a mapping, not \"local\"",
    ])),
];

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Parses a fixture, named in errors by its file name.
fn parse(relative: &str) -> Result<StackConfig, protocol::config::ConfigErrors> {
    let path = fixtures_dir().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    parse_stack(&text, &name)
}

#[track_caller]
fn check(relative: &str, expected: &Outcome) {
    match (parse(relative), expected) {
        (Ok(config), Loads(services)) => {
            let got: Vec<(&str, &str)> = config
                .services
                .iter()
                .map(|(n, s)| (n.as_str(), s.target.backend()))
                .collect();
            assert_eq!(got, *services, "{relative}");
        }
        (Err(errors), Fails(starts)) => {
            let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            assert_eq!(lines.len(), starts.len(), "{relative}:\n{errors}");
            for (line, start) in lines.iter().zip(starts.iter()) {
                assert!(
                    line.starts_with(start),
                    "{relative}: expected {start:?}, got {line:?}"
                );
            }
        }
        (Ok(_), Fails(_)) => panic!("{relative} loaded, but it must fail"),
        (Err(errors), Loads(_)) => panic!("{relative} must load:\n{errors}"),
    }
}

#[test]
fn every_fixture_loads_or_fails_with_a_hint() {
    for (relative, expected) in CASES {
        check(relative, expected);
    }
}

#[test]
fn every_fixture_file_has_a_case() {
    let listed: Vec<&str> = CASES.iter().map(|(f, _)| *f).collect();
    for entry in std::fs::read_dir(fixtures_dir().join("seeds")).unwrap() {
        let name = format!("seeds/{}", entry.unwrap().file_name().to_string_lossy());
        assert!(
            listed.contains(&name.as_str()),
            "{name} has no entry in CASES"
        );
    }
}

#[test]
fn loaded_fixtures_keep_their_values() {
    let sketch = parse("design_sketch.yaml").unwrap();
    let api = &sketch.services["api"];
    assert_eq!(api.port, Some(PortSpec::Auto));
    assert!(api.depends_on.contains_key("postgres"));
    let check = api.health_check.as_ref().unwrap();
    assert_eq!((check.interval_ms, check.retries), (Some(2000), Some(3)));
    assert_eq!(sketch.settings.default_timeout_ms, Some(300_000));
    let Target::Wireguard(load_gen) = &sketch.services["load-gen"].target else {
        panic!()
    };
    assert_eq!(
        load_gen.package.as_deref(),
        Some("./packages/load-gen.tar.zst")
    );

    let ssh = parse("seeds/002_backend_ssh.yaml").unwrap();
    let Target::RemoteLan(server) = &ssh.services["server"].target else {
        panic!()
    };
    assert_eq!(server.ssh_key.as_deref(), Some("~/.ssh/deploy_key"));
    assert_eq!(server.env["PORT"], "8080");

    let http = parse("seeds/002_health_http.yaml").unwrap();
    let check = http.services["my-service"].health_check.clone().unwrap();
    assert_eq!(check.interval_ms, Some(30_000));
    assert!(matches!(
        check.check,
        CheckKind::Http {
            expected_status: Some(200),
            ..
        }
    ));
    let tcp = parse("seeds/002_health_tcp.yaml").unwrap();
    assert_eq!(
        tcp.services["my-service"]
            .health_check
            .as_ref()
            .unwrap()
            .timeout_ms,
        Some(10_000)
    );
}
