//! Service packages deployed to the test bed's SSH hosts: releases, the content-hash
//! cache, rollback, purge, and the packages that are refused.

use std::path::{Path, PathBuf};

use protocol::events::EventKind;
use protocol::methods::{Health, ServiceState};
use tests::testbed::TestBed;
use tests::{bin, TestDaemon};

use crate::support::*;

/// A package directory `web` (version `version`) whose service is the demo service;
/// `healthy: false` gives it a health.sh that always fails.
fn package_dir(root: &Path, version: &str, healthy: bool) -> PathBuf {
    let dir = root.join(format!("web-{version}"));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(
        dir.join("manifest.yaml"),
        format!("name: web\nversion: {version}\nos: linux\nsystem_requires: [sh]\n"),
    )
    .unwrap();
    std::fs::copy(bin("demo-service"), dir.join("bin/web")).unwrap();
    let health = if healthy {
        "#!/bin/sh\nexec bash -c \"exec 3<>/dev/tcp/127.0.0.1/$PORT\"\n".to_owned()
    } else {
        "#!/bin/sh\necho not ready\nexit 1\n".to_owned()
    };
    for (name, text) in [
        (
            "start.sh",
            format!("#!/bin/sh\nexec \"$1/bin/web\" --name web-{version} --port \"$PORT\"\n"),
        ),
        (
            "stop.sh",
            "#!/bin/sh\necho stop.sh ran in \"$1\"\n".to_owned(),
        ),
        ("health.sh", health),
    ] {
        let path = dir.join("scripts").join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn build(d: &TestDaemon, cwd: &Path, dir: &Path) -> PathBuf {
    let out = d.cli(cwd, &["--json", "package", "build", dir.to_str().unwrap()]);
    assert_ok(d, &out, "harness package build");
    let info: protocol::methods::PackageInfo = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(info.path)
}

fn stack_yaml(bed: &TestBed, package: &Path) -> String {
    format!(
        r#"
name: pkg
settings: {{ default_timeout: 10 }}
{hosts}
services:
  web:
    target: {{ remote_lan: {{ hosts: [host0, host1, host2], package: {package} }} }}
    port: auto
    env: {{ PORT: "${{self.port}}" }}
  client:
    target: {{ process: {{ binary: DEMO, args: [--name, client, --port, "${{self.port}}", --upstream, "web=${{web.addr}}"] }} }}
    port: auto
    depends_on: {{ web: {{ condition: healthy }} }}
    health_check: {{ type: http, url: "http://${{self.addr}}/health" }}
"#,
        hosts = bed.hosts_yaml(),
        package = package.display()
    )
}

/// Files under a host's install root, relative, sorted.
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn upload_steps(events: &[protocol::Event]) -> Vec<(String, Option<String>)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::DeployStep(s) if s.step == "upload" && s.status != "started" => {
                Some((s.status.clone(), s.detail.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_package_is_deployed_to_three_hosts_cached_rolled_back_and_purged() {
    let bed = TestBed::new(3);
    let d = TestDaemon::start();
    let dir = d.workdir("pkg");
    let roots: Vec<&PathBuf> = bed.hosts.iter().map(|h| &h.install_root).collect();
    let v1 = build(&d, &dir, &package_dir(&dir, "1.0.0", true));
    assert_eq!(v1.file_name().unwrap(), "web-1.0.0.tar.zst");
    write_config(&dir, &stack_yaml(&bed, &v1));
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    // One instance per host, each healthy by its package's health.sh.
    for h in &bed.hosts {
        let web = get(&c, "pkg", &format!("web@host{}", h.index));
        assert_eq!(
            (web.state, web.health),
            (ServiceState::Running, Health::Healthy)
        );
        assert_eq!(
            web.address.as_deref().map(|a| a.starts_with(&h.address)),
            Some(true)
        );
        let files = tree(&h.install_root);
        assert!(
            files
                .iter()
                .any(|f| f.starts_with("web/releases/1.0.0-") && f.ends_with(".harness-complete")),
            "{files:?}"
        );
        let current = std::fs::read_link(h.install_root.join("web/current")).expect("current link");
        assert!(
            current.to_string_lossy().contains("/web/releases/1.0.0-"),
            "{current:?}"
        );
    }
    // The local client was given every instance and reached the first.
    assert_eq!(get(&c, "pkg", "client").health, Health::Healthy);
    let env =
        String::from_utf8_lossy(&d.cli(&dir, &["config", "env", "client"]).stdout).into_owned();
    let addrs = env
        .lines()
        .find_map(|l| l.strip_prefix("WEB_ADDRS="))
        .unwrap_or_else(|| panic!("no WEB_ADDRS in {env}"));
    assert_eq!(addrs.split(',').count(), 3, "{addrs}");
    for h in &bed.hosts {
        assert!(addrs.contains(&h.address), "{addrs}");
    }
    assert!(env.lines().any(|l| l.starts_with("WEB_ADDR=")), "{env}");
    let first = upload_steps(&replay(&c, &["deploy"]));
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(
        first
            .iter()
            .all(|(s, d)| s == "done" && d.as_deref().unwrap_or("").contains("bytes sent")),
        "{first:?}"
    );

    // The same package again: nothing is sent to any host.
    assert_ok(&d, &d.cli(&dir, &["restart", "web"]), "harness restart web");
    let steps = upload_steps(&replay(&c, &["deploy"]));
    assert_eq!(steps.len(), 6, "{steps:?}");
    for (status, detail) in &steps[3..] {
        assert_eq!(status, "skipped", "{steps:?}");
        assert!(
            detail.as_deref().unwrap_or("").contains("0 bytes sent"),
            "{steps:?}"
        );
    }

    // A new release whose health fails is rolled back; the old one runs again.
    let v2 = build(&d, &dir, &package_dir(&dir, "2.0.0", false));
    write_config(&dir, &stack_yaml(&bed, &v2));
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up (rolled back)");
    for h in &bed.hosts {
        let web = get(&c, "pkg", &format!("web@host{}", h.index));
        assert_eq!(web.health, Health::Healthy);
        assert!(
            web.reason.as_deref().unwrap_or("").contains("rolled back"),
            "{web:?}"
        );
        let current = std::fs::read_link(h.install_root.join("web/current")).expect("current link");
        assert!(
            current.to_string_lossy().contains("/web/releases/1.0.0-"),
            "{current:?}"
        );
    }
    let rollbacks: Vec<_> = replay(&c, &["deploy"])
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::DeployRollback(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rollbacks.len(), 3, "{rollbacks:?}");
    assert!(
        rollbacks.iter().all(|r| r.reason.contains("not ready")),
        "{rollbacks:?}"
    );
    assert!(rollbacks[0].from.contains("2.0.0") && rollbacks[0].to.contains("1.0.0"));
    tests::wait_for(
        "stop.sh's output in the log",
        std::time::Duration::from_secs(10),
        || {
            log_lines(&c, "pkg", "web@host0")
                .iter()
                .any(|l| l.line.contains("stop.sh ran in") && l.line.contains("2.0.0"))
                .then_some(())
        },
    );

    // down --purge leaves the hosts as they were.
    assert_ok(
        &d,
        &d.cli(&dir, &["down", "--purge"]),
        "harness down --purge",
    );
    for (i, root) in roots.iter().enumerate() {
        assert_eq!(tree(root), Vec::<String>::new());
        assert_eq!(
            bed.processes(i),
            Vec::<String>::new(),
            "processes left on host{i}"
        );
    }
}

/// A package made by hand as a plain tar (accepted like .tar.zst and .tar.gz), with
/// `extra` as one more entry whose raw name is written as a hostile archive would.
fn hand_made(path: &Path, manifest: &str, extra: Option<&str>) {
    let file = std::fs::File::create(path).unwrap();
    let mut tar = tar::Builder::new(file);
    for (name, body) in [
        ("manifest.yaml", manifest.as_bytes()),
        ("scripts/start.sh", &b"#!/bin/sh\nexec sleep 100\n"[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        tar.append_data(&mut h, name, body).unwrap();
    }
    if let Some(name) = extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        tar.append(&h, &b"evil\n"[..]).unwrap();
    }
    tar.into_inner().unwrap();
}

#[test]
fn bad_packages_and_host_keys_are_refused_and_leave_the_host_unchanged() {
    let bed = TestBed::new(1);
    let d = TestDaemon::start();
    let dir = d.workdir("bad");
    let root = &bed.hosts[0].install_root;
    let slip = dir.join("slip.tar");
    hand_made(&slip, "name: web\nversion: 1\n", Some("../../../evil"));
    let no_version = dir.join("noversion.tar");
    hand_made(&no_version, "name: web\n", None);
    let arch = dir.join("arch.tar");
    hand_made(&arch, "name: web\nversion: 1\narch: riscv64\n", None);
    let good = dir.join("good.tar");
    hand_made(&good, "name: web\nversion: 1\n", None);

    let empty_known = dir.join("empty_known_hosts");
    std::fs::write(&empty_known, "").unwrap();
    let other = tests::testbed::keygen(&dir.join("other_key"), "other");
    let wrong_known = dir.join("wrong_known_hosts");
    let fields: Vec<&str> = other.split_whitespace().take(2).collect();
    std::fs::write(
        &wrong_known,
        format!("{} {}\n", bed.hosts[0].address, fields.join(" ")),
    )
    .unwrap();

    let cases: [(&Path, Option<&Path>, &str); 5] = [
        (&slip, None, "`..` in a path"),
        (&no_version, None, "needs `name` and `version`"),
        (&arch, None, "built for any/riscv64"),
        (&good, Some(&empty_known), "unknown host key SHA256:"),
        (&good, Some(&wrong_known), "HOST KEY MISMATCH"),
    ];
    for (package, known_hosts, want) in cases {
        let mut hosts = bed.hosts_yaml();
        if let Some(kh) = known_hosts {
            hosts = hosts.replace(
                &bed.known_hosts.display().to_string(),
                &kh.display().to_string(),
            );
        }
        write_config(
            &dir,
            &format!(
                "name: bad\n{hosts}\nservices:\n  web:\n    target: {{ remote_lan: {{ host: host0, package: {} }} }}\n",
                package.display()
            ),
        );
        let out = d.cli(&dir, &["up"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{want}: up succeeded");
        assert!(stderr.contains(want), "{want}: {stderr}");
        assert_eq!(
            tree(root),
            Vec::<String>::new(),
            "{want}: the host was changed"
        );
        assert!(
            !bed.dir.join("evil").exists() && !root.join("../evil").exists(),
            "a tar-slip entry was written"
        );
        assert_ok(&d, &d.cli(&dir, &["down"]), "harness down");
    }
    // The daemon kept serving throughout.
    assert_ok(
        &d,
        &d.cli(&dir, &["daemon", "status"]),
        "harness daemon status",
    );
}

#[test]
fn deploy_dry_run_host_limit_hooks_templates_and_kept_releases() {
    let bed = TestBed::new(2);
    let d = TestDaemon::start();
    let dir = d.workdir("deploy");
    let src = package_dir(&dir, "1.0.0", true);
    std::fs::create_dir_all(src.join("config")).unwrap();
    std::fs::write(
        src.join("config/app.conf.template"),
        "listen=${self.addr}\nport=${PORT}\nmode=${MODE:-dev}\n",
    )
    .unwrap();
    let v1 = build(&d, &dir, &src);
    let yaml = stack_yaml(&bed, &v1).replace(
        "hosts: [host0, host1, host2], package:",
        "hosts: [host0, host1], setup_commands: [\"test -d /\"], pre_install: [\"test -x scripts/start.sh\"], post_install: [\"echo installed > post_install.txt\"], keep_releases: 2, package:",
    );
    assert!(yaml.contains("keep_releases"), "{yaml}");
    write_config(&dir, &yaml);
    let out = d.cli(&dir, &["deploy", "--dry-run"]);
    assert_ok(&d, &out, "harness deploy --dry-run");
    let plan = String::from_utf8_lossy(&out.stdout).into_owned();
    for want in [
        "web@host0 on root@",
        "web@host1 on root@",
        "$ uname -s; uname -m",
        "tar -xf",
        "scripts/start.sh",
        "scripts/health.sh",
        "setup command",
        "$ cd / && test -d /",
        "pre_install",
        "post_install",
        "echo installed > post_install.txt",
        "dry run: nothing was run",
    ] {
        assert!(plan.contains(want), "{want:?} not in the plan:\n{plan}");
    }
    for h in &bed.hosts {
        assert_eq!(
            tree(&h.install_root),
            Vec::<String>::new(),
            "the dry run changed a host"
        );
    }
    let c = d.client();
    let stacks: Vec<protocol::methods::StackInfo> =
        smol::block_on(c.call(protocol::methods::names::STACK_LIST, serde_json::json!({})))
            .unwrap();
    assert!(
        stacks.is_empty(),
        "the dry run registered a stack: {stacks:?}"
    );

    let out = d.cli(
        &dir,
        &["deploy", "--host", "host1", "--max-concurrent", "1"],
    );
    assert_ok(&d, &out, "harness deploy --host host1");
    let progress = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(progress.contains("host1 upload done"), "{progress}");
    let web = get(&c, "pkg", "web@host1");
    assert_eq!(web.health, Health::Healthy);
    // The config template was rendered for this instance, and post_install ran in the
    // release.
    let current = bed.hosts[1].install_root.join("web/current");
    let conf = std::fs::read_to_string(current.join("config/app.conf")).expect("rendered config");
    let port = web.port.expect("port");
    assert_eq!(
        conf,
        format!(
            "listen={}:{port}\nport={port}\nmode=dev\n",
            bed.hosts[1].address
        )
    );
    assert_eq!(
        std::fs::read_to_string(current.join("post_install.txt")).unwrap(),
        "installed\n"
    );
    assert_eq!(get(&c, "pkg", "web@host0").state, ServiceState::Registered);
    assert_eq!(tree(&bed.hosts[0].install_root), Vec::<String>::new());
    // Two newer releases: with keep_releases 2, the oldest is removed.
    for version in ["1.1.0", "1.2.0"] {
        let next = build(&d, &dir, &package_dir(&dir, version, true));
        write_config(
            &dir,
            &yaml.replace(&v1.display().to_string(), &next.display().to_string()),
        );
        assert_ok(
            &d,
            &d.cli(&dir, &["deploy", "--host", "host1"]),
            "harness deploy",
        );
    }
    let releases: Vec<String> = std::fs::read_dir(bed.hosts[1].install_root.join("web/releases"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(releases.len(), 2, "{releases:?}");
    assert!(
        releases.iter().all(|r| !r.starts_with("1.0.0-")),
        "{releases:?}"
    );
    assert_ok(
        &d,
        &d.cli(&dir, &["down", "--purge"]),
        "harness down --purge",
    );
    assert_eq!(tree(&bed.hosts[1].install_root), Vec::<String>::new());
}

/// What happens to the host in the middle of an upload.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// sshd and its sessions are killed, and started again 1.2 s later.
    KillSshd,
    /// The host's link is down for 1.2 s.
    CutLink,
}

#[test]
fn sshd_killed_mid_upload_fails_cleanly_and_a_retry_succeeds_once_it_is_back() {
    deploy_through(Fault::KillSshd);
}

#[test]
fn a_link_cut_mid_upload_leaves_nothing_half_installed_and_the_deploy_completes() {
    deploy_through(Fault::CutLink);
}

fn deploy_through(fault: Fault) {
    let mut bed = TestBed::new(1);
    let d = TestDaemon::start();
    let dir = d.workdir("fault");
    let src = package_dir(&dir, "1.0.0", true);
    // 40 MB that does not compress, so the upload takes a while.
    std::fs::create_dir_all(src.join("lib")).unwrap();
    let mut data = vec![0u8; 40 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(src.join("lib/blob"), &data).unwrap();
    let v1 = build(&d, &dir, &src);
    // A retried 40 MB upload on a busy machine may take longer than the usual 10 s.
    let yaml = stack_yaml(&bed, &v1)
        .replace("[host0, host1, host2]", "[host0]")
        .replace("default_timeout: 10", "default_timeout: 30");
    write_config(&dir, &yaml);
    let up = std::process::Command::new(bin("harness"))
        .arg("up")
        .current_dir(&dir)
        .env("HARNESS_STATE_DIR", &d.state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The release is extracted into `<release>.tmp` as it arrives.
    let releases = bed.hosts[0].install_root.join("web/releases");
    tests::wait_for(
        "the upload to start",
        std::time::Duration::from_secs(30),
        || {
            std::fs::read_dir(&releases)
                .ok()?
                .flatten()
                .find(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        },
    );
    match fault {
        Fault::KillSshd => bed.kill_ssh(0),
        Fault::CutLink => bed.set_link(0, false),
    }
    std::thread::sleep(std::time::Duration::from_millis(1200));
    // Nothing half-installed while the host is away.
    let half: Vec<String> = tree(&bed.hosts[0].install_root)
        .into_iter()
        .filter(|f| f.starts_with("web/releases/"))
        .collect();
    assert!(
        half.iter().all(|f| !f.contains(".harness-complete")),
        "{half:?}"
    );
    match fault {
        Fault::KillSshd => bed.start_sshd(0),
        Fault::CutLink => bed.set_link(0, true),
    }
    let out = up.wait_with_output().unwrap();
    if !out.status.success() {
        // When each deploy step happened tells a slow host from a stuck step.
        for e in replay(&d.client(), &["deploy"]) {
            eprintln!("{} {:?}", e.time, e.kind);
        }
    }
    assert_ok(&d, &out, "harness up across the fault");
    let c = d.client();
    assert_eq!(get(&c, "pkg", "web@host0").health, Health::Healthy);
    let retries = replay(&c, &["deploy"])
        .into_iter()
        .filter(|e| matches!(&e.kind, EventKind::DeployStep(s) if s.step == "retry"))
        .count();
    // A killed sshd fails the step, which is tried again; across a short cut TCP
    // retransmits and the upload just continues.
    if fault == Fault::KillSshd {
        assert!(retries >= 1, "no retry step");
    }
    let files = tree(&bed.hosts[0].install_root);
    assert!(
        files.iter().all(|f| !f.contains(".tmp")),
        "leftovers: {files:?}"
    );
    let releases: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("web/releases/") && f.matches('/').count() == 2)
        .collect();
    assert_eq!(releases.len(), 1, "{releases:?}");
}

#[test]
fn a_package_directory_is_built_with_cargo_or_a_command_and_deployed() {
    let bed = TestBed::new(1);
    let d = TestDaemon::start();
    let dir = d.workdir("build");
    // A crate of its own, built by the harness.
    std::fs::create_dir_all(dir.join("crate/src")).unwrap();
    std::fs::write(
        dir.join("crate/Cargo.toml"),
        "[package]\nname = \"hello-svc\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("crate/src/main.rs"),
        "fn main() {\n    println!(\"built by cargo: {}\", std::env::var(\"GREETING\").unwrap_or_default());\n    std::thread::sleep(std::time::Duration::from_secs(300));\n}\n",
    )
    .unwrap();
    for (name, start) in [
        ("hello", "exec \"$1/bin/hello-svc\""),
        ("napper", "echo napping; exec \"$1/bin/napper\" 300"),
    ] {
        let pkg = dir.join(format!("pkg-{name}"));
        std::fs::create_dir_all(pkg.join("scripts")).unwrap();
        std::fs::write(
            pkg.join("manifest.yaml"),
            format!("name: {name}\nversion: 0.1.0\n"),
        )
        .unwrap();
        let script = pkg.join("scripts/start.sh");
        std::fs::write(&script, format!("#!/bin/sh\n{start}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    write_config(
        &dir,
        &format!(
            r#"
name: built
{hosts}
services:
  hello:
    target: {{ remote_lan: {{ host: host0, package: ./pkg-hello, build: {{ type: cargo, manifest: ./crate/Cargo.toml, profile: dev }} }} }}
    env: {{ GREETING: hi }}
  napper:
    target: {{ remote_lan: {{ host: host0, package: ./pkg-napper, build: {{ type: command, command: "mkdir -p out && cp /bin/sleep out/napper", output: ./out/napper }} }} }}
"#,
            hosts = bed.hosts_yaml()
        ),
    );
    assert_ok(&d, &d.cli(&dir, &["up"]), "harness up");
    let c = d.client();
    for name in ["hello", "napper"] {
        assert_eq!(
            get(&c, "built", name).state,
            ServiceState::Running,
            "{name}"
        );
    }
    tests::wait_for(
        "the built program's output",
        std::time::Duration::from_secs(10),
        || {
            log_lines(&c, "built", "hello")
                .iter()
                .any(|l| l.line == "built by cargo: hi")
                .then_some(())
        },
    );
    let root = &bed.hosts[0].install_root;
    assert!(root.join("hello/current/bin/hello-svc").is_file());
    assert!(root.join("napper/current/bin/napper").is_file());
    // A build that fails says why and installs nothing.
    std::fs::write(
        dir.join("crate/src/main.rs"),
        "fn main() { this is not rust }\n",
    )
    .unwrap();
    assert_ok(
        &d,
        &d.cli(&dir, &["down", "--purge"]),
        "harness down --purge",
    );
    let out = d.cli(&dir, &["up", "hello"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("build failed: cargo build"), "{stderr}");
    assert_eq!(tree(root), Vec::<String>::new());
}
