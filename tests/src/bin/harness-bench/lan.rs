//! The SSH/package benchmarks (issue 4), on the test bed's sshd hosts:
//! - upload + verify of a 50 MB package of random data to one host (the harness's
//!   install: the package streamed into `tar -x`, completion marker) against `scp` of the same
//!   file; deploy-to-healthy beside it;
//! - an unchanged redeploy (`harness restart`): its time and the bytes that crossed the
//!   host's veth, against the package's size;
//! - deploy to 8 hosts with `--max-concurrent 8` against `--max-concurrent 1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deployer::ssh::{HostKeyPolicy, SshHost, SshTarget};
use tests::testbed::TestBed;
use tests::{bin, TestDaemon};

use crate::{median, ms};

const RUNS: usize = 3;

/// Incompressible bytes from a xorshift generator.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x2545f4914f6cdd1d;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// A package directory `web` running the demo service, with `blob_mb` MB of random
/// data in lib/.
fn package_dir(root: &Path, blob_mb: usize) -> PathBuf {
    let dir = root.join("web");
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(dir.join("manifest.yaml"), "name: web\nversion: 1.0.0\n").unwrap();
    std::fs::copy(bin("demo-service"), dir.join("bin/web")).unwrap();
    std::fs::write(dir.join("lib/blob"), random_bytes(blob_mb << 20)).unwrap();
    for (name, text) in [
        (
            "start.sh",
            "#!/bin/sh\nexec \"$1/bin/web\" --name web --port \"$PORT\"\n",
        ),
        (
            "health.sh",
            "#!/bin/sh\nexec bash -c \"exec 3<>/dev/tcp/127.0.0.1/$PORT\"\n",
        ),
    ] {
        let path = dir.join("scripts").join(name);
        std::fs::write(&path, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn cli(d: &TestDaemon, cwd: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = d.cli(cwd, args);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "harness {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn veth_bytes(veth: &str) -> u64 {
    ["rx_bytes", "tx_bytes"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(format!("/sys/class/net/{veth}/statistics/{f}"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

fn stack_yaml(bed: &TestBed, hosts: &[usize], package: &Path) -> String {
    let names: Vec<String> = hosts.iter().map(|i| format!("host{i}")).collect();
    format!(
        "name: bench\nsettings: {{ max_parallel: 16 }}\n{}\nservices:\n  web:\n    target: {{ remote_lan: {{ hosts: [{}], package: {} }} }}\n    port: auto\n    env: {{ PORT: \"${{self.port}}\" }}\n",
        bed.hosts_yaml(),
        names.join(", "),
        package.display()
    )
}

pub fn bench(d: &TestDaemon) {
    let dir = d.workdir("bench-lan");
    let bed = TestBed::new(8);
    let pkg = deployer::package::build(&package_dir(&dir, 50), &dir.join("out")).expect("build");
    println!(
        "\n## SSH hosts and packages ({} hosts in network namespaces, package {:.1} MB)",
        bed.hosts.len(),
        pkg.bytes as f64 / 1e6
    );

    // 1. Upload + verify against scp.
    let host = &bed.hosts[0];
    let mut scp = Vec::new();
    let mut ours = Vec::new();
    for run in 0..RUNS {
        let dest = format!("{}/scp-{run}.tar.zst", host.install_root.display());
        let t = Instant::now();
        let status = Command::new("scp")
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", bed.known_hosts.display()))
            .arg("-i")
            .arg(&bed.user_key)
            .arg(&pkg.path)
            .arg(format!("root@{}:{dest}", host.address))
            .stdout(Stdio::null())
            .status()
            .expect("scp");
        scp.push(t.elapsed());
        assert!(status.success(), "scp failed");
        std::fs::remove_file(&dest).unwrap();

        let root = format!("{}/web", host.install_root.display());
        let ssh = SshHost::new(SshTarget {
            address: host.address.clone(),
            port: 22,
            user: "root".into(),
            key: Some(bed.user_key.clone()),
            known_hosts: vec![bed.known_hosts.clone()],
            policy: HostKeyPolicy::Strict,
            own_known_hosts: dir.join("own_known_hosts"),
            connect_timeout: Duration::from_secs(10),
        });
        let t = Instant::now();
        let installed = smol::block_on(deployer::release::install(
            &ssh,
            &pkg,
            &root,
            &Default::default(),
            |_, _| {},
        ))
        .expect("install");
        ours.push(t.elapsed());
        assert!(installed.sent > 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
    let (scp, ours) = (median(scp), median(ours));
    println!(
        "| upload + verify, one host (connect, stream into tar -x, marker; median of {RUNS}) | {} | scp of the same file (connect, copy): {} | {:.2} | ≤ 1.2 |",
        ms(ours),
        ms(scp),
        ours.as_secs_f64() / scp.as_secs_f64()
    );

    // 2. Deploy to healthy, then an unchanged redeploy.
    let cwd = dir.join("one");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(cwd.join("harness.yaml"), stack_yaml(&bed, &[0], &pkg.path)).unwrap();
    let to_healthy = cli(d, &cwd, &["deploy"]);
    let before = veth_bytes(&host.veth);
    let redeploy = cli(d, &cwd, &["restart", "web"]);
    let crossed = veth_bytes(&host.veth) - before;
    println!(
        "| deploy to healthy, one host (`harness deploy`: check, upload, extract, start, health.sh) | {} | — | — | — |",
        ms(to_healthy)
    );
    println!(
        "| unchanged redeploy (`harness restart web`: stop, check, no upload, start, health.sh) | {} and {} bytes on the host's veth (all SSH commands; the package is {} bytes) | — | — | < 300 ms, 0 bytes of payload |",
        ms(redeploy),
        crossed,
        pkg.bytes
    );
    cli(d, &cwd, &["down", "--purge"]);
    // 3. Eight hosts at once against one at a time: a small package (latency-bound
    //    steps) and a larger one (cipher-bound; the 8 "hosts" share this machine's
    //    cores, so their side of the transfer competes with the harness's).
    let all: Vec<usize> = (0..bed.hosts.len()).collect();
    for blob_mb in [0, 10] {
        let src = package_dir(&dir.join(format!("p{blob_mb}")), blob_mb);
        let pkg =
            deployer::package::build(&src, &dir.join(format!("out{blob_mb}"))).expect("build");
        let cwd = dir.join(format!("eight-{blob_mb}"));
        std::fs::create_dir_all(&cwd).unwrap();
        std::fs::write(cwd.join("harness.yaml"), stack_yaml(&bed, &all, &pkg.path)).unwrap();
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            for (k, limit) in ["1", "8"].iter().enumerate() {
                times[k].push(cli(d, &cwd, &["deploy", "--max-concurrent", limit]));
                cli(d, &cwd, &["down", "--purge"]);
            }
        }
        let [one, eight] = times.map(median);
        println!(
            "| deploy to 8 hosts ({:.1} MB package each), `--max-concurrent 8` (median of {RUNS}) | {} | `--max-concurrent 1`: {} | speed-up {:.2}× | ≥ 3× expected |",
            pkg.bytes as f64 / 1e6,
            ms(eight),
            ms(one),
            one.as_secs_f64() / eight.as_secs_f64()
        );
    }
}
