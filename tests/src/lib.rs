//! Test support for harness's end-to-end tests: a real harnessd in a temp state
//! directory, the `harness` CLI, and bounded waits.
//!
//! [`TestDaemon::start`] runs the harnessd binary of this build on 127.0.0.1:0 with its
//! own state directory; its `Drop` stops every service it ran (by asking the daemon, and
//! then by pid for anything left) and removes the directory last.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness_client::Client;

pub mod testbed;
use protocol::DaemonFile;

use crate::testbed::run;

/// The directory holding this build's binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-HASH -> target/debug; target/release/harness-bench -> target/release
    let dir = exe.parent().expect("executable dir");
    if dir.ends_with("deps") {
        dir.parent().expect("target dir").to_owned()
    } else {
        dir.to_owned()
    }
}

/// Path of a workspace binary of this build.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Waits until `f` returns `Some`, polling every 20 ms, at most `timeout`.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    match poll(timeout, || f().ok_or(())) {
        Ok(v) => v,
        Err(()) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Like [`wait_for`], with `f` telling what it saw while the wait goes on (`Err`):
/// a timeout shows the last of it.
#[track_caller]
pub fn wait_until<T, S: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> Result<T, S>,
) -> T {
    match poll(timeout, f) {
        Ok(v) => v,
        Err(seen) => panic!("timed out after {timeout:?} waiting for {what}; last seen: {seen:?}"),
    }
}

/// Calls `f` every 20 ms until it returns `Ok`, or `timeout` has passed: then its last
/// `Err`.
fn poll<T, S>(timeout: Duration, mut f: impl FnMut() -> Result<T, S>) -> Result<T, S> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// A harnessd of this build in its own temp state directory.
pub struct TestDaemon {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The harnessd process (while this guard started it).
    pub child: Option<Child>,
    /// harnessd's log filter (`HARNESS_LOG`).
    pub log_level: &'static str,
    /// daemon.json of the running daemon.
    pub info: DaemonFile,
    /// Extra environment of harnessd.
    pub env: Vec<(String, String)>,
    /// The network namespace harnessd and the CLI run in (`None`: this one). Only the
    /// CLI reaches a daemon in another namespace: its loopback is that namespace's.
    pub netns: Option<String>,
    /// Run harnessd with CAP_NET_ADMIN dropped.
    without_net_admin: bool,
    /// A file system this guard mounted on the state directory.
    mount: Option<StateMount>,
    /// harnessd's arguments after `--state-dir DIR` (default `--listen 127.0.0.1:0`).
    args: Vec<String>,
    dir: Option<tempfile::TempDir>,
}

impl TestDaemon {
    /// Starts harnessd in a new temp state directory.
    pub fn start() -> TestDaemon {
        Self::start_with_log("debug")
    }

    /// Starts harnessd with the log filter `level` (benchmarks use `warn`).
    pub fn start_with_log(level: &'static str) -> TestDaemon {
        Self::start_with(level, &[])
    }

    /// Starts harnessd inside network namespace `netns` (a test-bed host's): it sees
    /// only that namespace's interfaces. Drive it with [`TestDaemon::cli`].
    pub fn start_in_netns(netns: &str) -> TestDaemon {
        Self::start_inner("debug", &[], Some(netns.to_owned()), false, default_args())
    }

    /// Starts harnessd without CAP_NET_ADMIN (dropped from its bounding set by
    /// setpriv), as an unprivileged daemon would run.
    pub fn start_without_net_admin() -> TestDaemon {
        Self::start_inner("debug", &[], None, true, default_args())
    }

    /// Starts harnessd with its state directory on a tmpfs of `megabytes` (a disk a
    /// test can fill); unmounted when dropped.
    pub fn start_on_tmpfs(megabytes: u32) -> TestDaemon {
        Self::start_on_mount(|state_dir| {
            let size = format!("size={megabytes}m,mode=0700");
            let mounted = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
                .arg(state_dir)
                .status()
                .expect("mount");
            assert!(
                mounted.success(),
                "cannot mount a tmpfs on {}",
                state_dir.display()
            );
            StateMount {
                on: state_dir.to_owned(),
                loop_device: None,
            }
        })
    }

    /// Starts harnessd with its state directory on an ext4 file system of `megabytes`
    /// in a loop device, mounted `errors=remount-ro`, so that
    /// [`TestDaemon::fail_state_fs`] can turn it read-only under open files, as a disk
    /// error does. Unmounted and detached when dropped.
    pub fn start_on_ext4(megabytes: u32) -> TestDaemon {
        Self::start_on_mount(|state_dir| {
            let image = state_dir.with_file_name("state.ext4");
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(u64::from(megabytes) << 20))
                .expect("image file");
            let image_path = image.to_str().expect("a UTF-8 temp path");
            run("mkfs.ext4", &["-q", image_path]);
            let device = run("losetup", &["-f", "--show", image_path])
                .trim()
                .to_owned();
            // The guard first: a mount that fails still detaches the device.
            let mount = StateMount {
                on: state_dir.to_owned(),
                loop_device: Some((device, image)),
            };
            mount.mount_ext4();
            mount
        })
    }

    fn start_on_mount(mount: impl FnOnce(&Path) -> StateMount) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("harness-e2e-")
            .tempdir()
            .expect("temp dir");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let mount = mount(&state_dir);
        let mut d = TestDaemon {
            state_dir,
            child: None,
            log_level: "debug",
            info: placeholder(),
            env: Vec::new(),
            netns: None,
            without_net_admin: false,
            mount: Some(mount),
            args: default_args(),
            dir: Some(dir),
        };
        d.restart();
        d
    }

    /// Makes the state directory's ext4 file system fail as on a disk error: the
    /// kernel turns it read-only at once, files open for writing included.
    pub fn fail_state_fs(&self) {
        let Some((device, _)) = self.mount.as_ref().and_then(|m| m.loop_device.as_ref()) else {
            panic!("fail_state_fs needs a daemon from start_on_ext4");
        };
        let name = device.trim_start_matches("/dev/");
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "1")
            .expect("trigger an ext4 error");
    }

    /// What an operator does after a disk error, with harnessd stopped: ends what
    /// still runs from the state directory (this daemon's services, by their marker),
    /// unmounts it, repairs it with e2fsck and mounts it again.
    pub fn repair_state_fs(&mut self) {
        assert!(
            self.child.is_none(),
            "stop harnessd before repairing its disk"
        );
        let killed = self.kill_leftovers();
        let Some(mount) = &self.mount else {
            panic!("repair_state_fs needs a daemon from start_on_ext4");
        };
        let Some((device, _)) = &mount.loop_device else {
            panic!("repair_state_fs needs a daemon from start_on_ext4");
        };
        // A killed process lets go of its files once it is gone.
        wait_for("the killed services to go", Duration::from_secs(10), || {
            killed.iter().all(|&pid| !alive(pid)).then_some(())
        });
        run(
            "umount",
            &[self.state_dir.to_str().expect("a UTF-8 temp path")],
        );
        // 1: errors corrected, which is what a file system that failed has.
        let fsck = Command::new("e2fsck")
            .args(["-fy", device])
            .output()
            .expect("e2fsck");
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "e2fsck {device}: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        mount.mount_ext4();
    }

    /// Ends, by pid, every process that carries this daemon's `HARNESS_INSTANCE`
    /// marker; returns their pids.
    fn kill_leftovers(&self) -> Vec<u32> {
        if self.info.instance.is_empty() {
            return Vec::new();
        }
        let found = deployer::process::find_instances(&format!("{}/", self.info.instance));
        for (pid, _) in &found {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        found.into_iter().map(|(pid, _)| pid).collect()
    }

    /// Starts harnessd with the log filter `level` and extra environment `env`.
    pub fn start_with(level: &'static str, env: &[(&str, &str)]) -> TestDaemon {
        Self::start_inner(level, env, None, false, default_args())
    }

    fn start_inner(
        level: &'static str,
        env: &[(&str, &str)],
        netns: Option<String>,
        without_net_admin: bool,
        args: Vec<String>,
    ) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("harness-e2e-")
            .tempdir()
            .expect("temp dir");
        let state_dir = dir.path().join("state");
        let mut d = TestDaemon {
            state_dir,
            child: None,
            log_level: level,
            info: placeholder(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            netns,
            without_net_admin,
            mount: None,
            args,
            dir: Some(dir),
        };
        d.restart();
        d
    }

    /// Starts harnessd with `args` after `--state-dir DIR` in place of
    /// `--listen 127.0.0.1:0` (say where it listens).
    pub fn start_with_args(args: &[&str]) -> TestDaemon {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        Self::start_inner("debug", &[], None, false, args)
    }

    /// Starts harnessd again on the same state directory (after a kill).
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(self.state_dir.join("daemon.json"));
        let child = self.spawn_daemon();
        self.child = Some(child);
        let path = self.state_dir.join("daemon.json");
        self.info = wait_for("daemon.json", Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&path).ok()?;
            serde_json::from_str(&text).ok()
        });
    }

    /// Spawns `harnessd --state-dir DIR` with its arguments (`--listen 127.0.0.1:0`
    /// unless told otherwise), output to DIR/../harnessd.log.
    pub fn spawn_daemon(&self) -> Child {
        std::fs::create_dir_all(&self.state_dir).expect("state dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.with_file_name("harnessd.log"))
            .expect("log file");
        let mut cmd = if self.without_net_admin {
            let mut c = Command::new("setpriv");
            c.args(["--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"])
                .arg(bin("harnessd"));
            c
        } else {
            self.command(&bin("harnessd"))
        };
        cmd.args(["--state-dir"])
            .arg(&self.state_dir)
            .args(&self.args)
            .env("HARNESS_LOG", self.log_level)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn harnessd")
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.with_file_name("harnessd.log")).unwrap_or_default()
    }

    /// Kills harnessd with SIGKILL and reaps it; services keep running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A connected, authenticated client.
    pub fn client(&self) -> Client {
        smol::block_on(Client::connect(&self.info, "e2e")).expect("connect to harnessd")
    }

    /// Runs the `harness` CLI against this daemon in `cwd`.
    pub fn cli(&self, cwd: &Path, args: &[&str]) -> Output {
        self.command(&bin("harness"))
            .args(args)
            .current_dir(cwd)
            .env("HARNESS_STATE_DIR", &self.state_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run harness")
    }

    /// A command for `program`, inside the daemon's namespace when it has one.
    fn command(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// A directory inside the test's temp dir.
    pub fn workdir(&self, name: &str) -> PathBuf {
        let p = self.state_dir.with_file_name(name);
        std::fs::create_dir_all(&p).expect("workdir");
        p
    }
}

/// Starts `agent` (a `harness-node` command, its arguments given) with its output to
/// `log` and returns once it printed `ready` (its device and control socket are up).
pub fn start_node_agent(agent: &mut Command, log: &Path) -> Child {
    use std::io::{BufRead, BufReader};
    let mut child = agent
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("agent log"))
        .spawn()
        .expect("start harness-node");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read ready");
    assert!(
        first.starts_with("ready"),
        "harness-node did not start: {first}{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    child
}

/// One request to a `harness-node` control socket; its JSON answer.
pub fn node_control(socket: &Path, request: serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("control socket");
    writeln!(s, "{request}").expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).expect("json answer")
}

/// The engine's socket; the docker tests need it.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Removes the containers (with their anonymous volumes) and networks labelled with
/// daemon `instance`; returns how many containers it removed.
pub fn remove_docker_leftovers(instance: &str) -> usize {
    smol::block_on(async {
        let Ok(engine) = deployer::docker::Engine::connect().await else {
            return 0;
        };
        let containers = engine.owned(instance, None).await.unwrap_or_default();
        for c in &containers {
            let _ = engine.remove(&c.id).await;
        }
        let _ = engine.remove_networks(instance, None).await;
        containers.len()
    })
}

/// Writes a root filesystem tarball of Debian's busybox-static (`/bin/busybox` with
/// its applets as symlinks, and `/www/index.html`) to `path`, for `rootfs:` images.
/// Every entry has time 0, so the tarball (and the image made from it) is the same
/// on every run.
pub fn busybox_rootfs(path: &Path) {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian's busybox-static; ./scripts/test.sh installs it)");
    let mut tar = tar::Builder::new(std::fs::File::create(path).expect("create rootfs tar"));
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        if let Some(target) = link {
            header.set_link_name(target).expect("link name");
        }
        header.set_cksum();
        tar.append_data(&mut header, name, data)
            .expect("append to rootfs tar");
    };
    for dir in ["bin", "www", "tmp", "etc"] {
        add(dir, tar::EntryType::Directory, 0o755, &[], None);
    }
    add(
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &busybox,
        None,
    );
    for applet in [
        "sh", "httpd", "wget", "nc", "sleep", "cat", "echo", "env", "ls", "true", "kill",
    ] {
        add(
            &format!("bin/{applet}"),
            tar::EntryType::Symlink,
            0o777,
            &[],
            Some("busybox"),
        );
    }
    add(
        "www/index.html",
        tar::EntryType::Regular,
        0o644,
        b"hello from busybox\n",
        None,
    );
    tar.into_inner()
        .and_then(|f| f.sync_all())
        .expect("finish rootfs tar");
}

fn default_args() -> Vec<String> {
    vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()]
}

fn placeholder() -> DaemonFile {
    DaemonFile {
        url: String::new(),
        ca: PathBuf::new(),
        token_file: PathBuf::new(),
        pid: 0,
        instance: String::new(),
        client_cert: None,
        client_key: None,
    }
}

/// Lines of the daemon's log a failed test shows.
const LOG_LINES_ON_FAILURE: usize = 80;

impl Drop for TestDaemon {
    fn drop(&mut self) {
        // 0. A test that failed shows the end of the daemon's log with its panic: in
        //    CI, that is all there is to go on.
        if std::thread::panicking() {
            let log = self.log();
            // Less the TLS and WebSocket libraries' lines about each connection.
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains(" rustls::") && !l.contains(" tungstenite::"))
                .collect();
            let tail = &lines[lines.len().saturating_sub(LOG_LINES_ON_FAILURE)..];
            eprintln!(
                "--- the last {} lines of harnessd's log ---\n{}\n--- end of harnessd's log ---",
                tail.len(),
                tail.join("\n")
            );
        }
        // 1. Ask the daemon to stop everything it runs (one in another namespace is
        //    out of this process's reach: it gets SIGTERM, which it also obeys).
        if let (Some(c), Some(_)) = (&self.child, &self.netns) {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        } else if self.child.is_some() {
            let info = self.info.clone();
            let _ = smol::block_on(async {
                let c = Client::connect(&info, "e2e-cleanup").await?;
                c.call::<serde_json::Value>(
                    "daemon.shutdown",
                    serde_json::json!({"stop_services": true}),
                )
                .await
            });
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // 2. Anything of this daemon still alive (a test killed the daemon and did not
        //    restart it): end it by pid, found by its HARNESS_INSTANCE marker.
        self.kill_leftovers();
        // 3. Containers and networks this daemon made (a test that left them, or a
        //    daemon that was killed): found by its instance label.
        if !self.info.instance.is_empty() && std::path::Path::new(DOCKER_SOCKET).exists() {
            remove_docker_leftovers(&self.info.instance);
        }
        // 4. The temp dir goes last (its file system first).
        drop(self.mount.take());
        drop(self.dir.take());
    }
}

/// A file system a [`TestDaemon`] mounted on its state directory: a tmpfs, or ext4 in
/// an image file attached as a loop device. Unmounted (and detached) when dropped.
struct StateMount {
    on: PathBuf,
    /// The loop device and its image file, for ext4.
    loop_device: Option<(String, PathBuf)>,
}

impl StateMount {
    fn mount_ext4(&self) {
        if let Some((device, _)) = &self.loop_device {
            let on = self.on.to_str().expect("a UTF-8 temp path");
            run(
                "mount",
                &["-t", "ext4", "-o", "errors=remount-ro", device, on],
            );
        }
    }
}

impl Drop for StateMount {
    fn drop(&mut self) {
        // Lazily, should something still hold a file there: a loop device is then
        // freed when the last one closes.
        let _ = Command::new("umount").arg("-l").arg(&self.on).status();
        if let Some((device, image)) = &self.loop_device {
            let _ = Command::new("losetup").args(["-d", device]).status();
            let _ = std::fs::remove_file(image);
        }
    }
}
