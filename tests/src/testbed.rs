//! The multi-host test bed: N "LAN hosts", each a network namespace joined by a veth
//! pair to a bridge in the root namespace, each running a real OpenSSH `sshd` with
//! generated host keys, and one generated user key that every host accepts.
//!
//! - Addresses come from 198.18.0.0/15 (never this machine's uplink): each bed takes
//!   a free /24, `198.18.N.0/24`; the bridge (the harness host, the hub) is `.1`, host
//!   `i` is `.(10 + i)`. Only that /24 is routed inside a host: nothing in a bed can
//!   reach beyond it.
//! - Names are unique per bed (`hb<id>` bridge, `hn<id>-<i>` namespace, `hv<id>-<i>`
//!   veth); a record in /run/harness-testbed names what a bed made and which process
//!   owns it, so a bed whose test process was killed is swept by the next bed.
//! - The namespaces share the machine's filesystem, so each host gets its own
//!   directory (its `install_root` lives there), which is also HOME in its SSH
//!   sessions: the machine's own shell start-up files (root's .bashrc) never run
//!   there, so ending a bed's processes can never leave their locks behind.
//! - [`Drop`] ends every process in the bed's namespaces (only they can be in them),
//!   then deletes the namespaces, veths, bridge, firewall rule, the users it made
//!   (with their sudoers entries) and files.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{alive, wait_for};

/// Where beds record what they made (for sweeping the leftovers of killed tests).
const RECORDS: &str = "/run/harness-testbed";

/// One SSH host of a bed.
pub struct BedHost {
    /// Index in the bed, from 0.
    pub index: usize,
    /// Network namespace name.
    pub netns: String,
    /// The host's address on the bed's LAN.
    pub address: String,
    /// This host's own directory (config, keys, `install_root`).
    pub dir: PathBuf,
    /// Where packages are installed on this host.
    pub install_root: PathBuf,
    /// The root-namespace end of the host's veth pair (down = link cut).
    pub veth: String,
    /// A known_hosts line for this host's key.
    pub known_hosts_line: String,
    sshd: Option<Child>,
}

/// A set of SSH hosts in network namespaces; removed completely on drop.
pub struct TestBed {
    /// Unique id of this bed (part of every name it makes).
    pub id: String,
    /// The bridge in the root namespace.
    pub bridge: String,
    /// The hub's address on the bed's LAN (the bridge's).
    pub hub_address: String,
    /// The hosts.
    pub hosts: Vec<BedHost>,
    /// The user key every host accepts (OpenSSH format, no passphrase).
    pub user_key: PathBuf,
    /// A known_hosts file with every host's key.
    pub known_hosts: PathBuf,
    /// The bed's directory.
    pub dir: PathBuf,
    /// The bed's LAN, e.g. `198.18.7.0/24`.
    pub subnet: String,
    forward_rule: bool,
    /// Users of this machine made for the bed ([`TestBed::add_sudo_user`]).
    users: Vec<String>,
    _tmp: tempfile::TempDir,
}

/// Runs a command; panics with its output when it fails.
#[track_caller]
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and ignores how it ends (cleanup).
fn run_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Makes an ed25519 key pair without a passphrase; returns the public key line.
pub fn keygen(path: &Path, comment: &str) -> String {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            &path.display().to_string(),
        ],
    );
    fs::read_to_string(path.with_extension("pub"))
        .expect("public key")
        .trim()
        .to_owned()
}

impl TestBed {
    /// Makes a bed of `n` hosts (at most 200) and waits until every sshd accepts
    /// connections.
    pub fn new(n: usize) -> TestBed {
        assert!(n <= 200, "a bed has at most 200 hosts");
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "/usr/sbin/sshd is missing (Debian's openssh-server; ./scripts/test.sh installs it)"
        );
        sweep_dead_beds();
        let tmp = tempfile::Builder::new()
            .prefix("harness-bed-")
            .tempdir()
            .expect("bed dir");
        let dir = tmp.path().to_owned();
        let id = unique_id();
        let bridge = format!("hb{id}");
        // Claiming a subnet and making the bridge happen under one lock, so two beds
        // never take the same /24.
        fs::create_dir_all(RECORDS).expect("records dir");
        let lock = fs::File::create(Path::new(RECORDS).join(".lock")).expect("lock file");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("lock");
        let third = free_subnet();
        let subnet = format!("{third}.0/24");
        let hub_address = format!("{third}.1");
        record(&id, &format!("bridge {bridge}\n"));
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        run(
            "ip",
            &["addr", "add", &format!("{hub_address}/24"), "dev", &bridge],
        );
        run("ip", &["link", "set", &bridge, "up"]);
        drop(lock);
        // Docker sets the FORWARD policy to DROP and (with br_netfilter) bridged frames
        // pass through it: let the bed's hosts talk to each other.
        let forward_rule = Command::new("iptables")
            .args([
                "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if forward_rule {
            record(&id, &format!("forward {bridge}\n"));
        }
        let user_key = dir.join("id_ed25519");
        let user_pub = keygen(&user_key, &format!("harness-bed-{id}"));
        let mut bed = TestBed {
            id: id.clone(),
            bridge,
            hub_address,
            hosts: Vec::new(),
            user_key,
            known_hosts: dir.join("known_hosts"),
            dir,
            subnet,
            forward_rule,
            users: Vec::new(),
            _tmp: tmp,
        };
        for i in 0..n {
            let host = bed.add_host(i, &third, &user_pub);
            bed.hosts.push(host);
        }
        let lines: String = bed
            .hosts
            .iter()
            .map(|h| format!("{}\n", h.known_hosts_line))
            .collect();
        fs::write(&bed.known_hosts, lines).expect("known_hosts");
        for i in 0..n {
            bed.start_sshd(i);
        }
        bed
    }

    fn add_host(&self, i: usize, third: &str, user_pub: &str) -> BedHost {
        let netns = format!("hn{}-{i}", self.id);
        let veth = format!("hv{}-{i}", self.id);
        let peer = format!("hp{}-{i}", self.id);
        let address = format!("{third}.{}", 10 + i);
        record(&self.id, &format!("netns {netns}\nlink {veth}\n"));
        run("ip", &["netns", "add", &netns]);
        run(
            "ip",
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        );
        run("ip", &["link", "set", &veth, "master", &self.bridge]);
        run("ip", &["link", "set", &veth, "up"]);
        run("ip", &["link", "set", &peer, "netns", &netns]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &netns, "ip"];
            all.extend_from_slice(args);
            run("ip", &all);
        };
        in_ns(&["link", "set", &peer, "name", "eth0"]);
        in_ns(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        in_ns(&["link", "set", "eth0", "up"]);
        in_ns(&["link", "set", "lo", "up"]);

        let dir = self.dir.join(format!("host{i}"));
        let install_root = dir.join("root");
        fs::create_dir_all(&install_root).expect("host dir");
        let host_key = dir.join("ssh_host_ed25519_key");
        let host_pub = keygen(&host_key, &format!("host{i}"));
        let key_only: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        fs::write(dir.join("authorized_keys"), format!("{user_pub}\n")).expect("authorized_keys");
        let config = format!(
            "Port 22\nListenAddress {address}\nHostKey {key}\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nSubsystem sftp internal-sftp\nLogLevel ERROR\nMaxSessions 64\n\
             MaxStartups 64\nSetEnv HOME={dir}\n",
            key = host_key.display(),
            dir = dir.display(),
        );
        fs::write(dir.join("sshd_config"), config).expect("sshd_config");
        BedHost {
            index: i,
            netns,
            known_hosts_line: format!("{address} {}", key_only.join(" ")),
            address,
            dir,
            install_root,
            veth,
            sshd: None,
        }
    }

    /// Makes a user of this machine (the beds share its /etc) who logs in to the
    /// bed's hosts with the bed's key, owns host `i`'s `install_root`, and may run
    /// anything as root with `sudo -n` (the sudo package); the user and its sudoers
    /// entry go with the bed. Returns its name.
    pub fn add_sudo_user(&mut self, i: usize) -> String {
        let name = format!("hu{}", self.id);
        record(&self.id, &format!("user {name}\n"));
        let home = self.hosts[i].dir.display().to_string();
        // `*`: no password, yet not locked (sshd refuses locked accounts).
        run(
            "useradd",
            &[
                "--no-create-home",
                "--home-dir",
                &home,
                "--shell",
                "/bin/sh",
                "--password",
                "*",
                &name,
            ],
        );
        self.users.push(name.clone());
        let sudoers = sudoers_file(&name);
        fs::write(&sudoers, format!("{name} ALL=(root) NOPASSWD: ALL\n")).expect("sudoers entry");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&sudoers, fs::Permissions::from_mode(0o440)).expect("sudoers mode");
        let root = self.hosts[i].install_root.display().to_string();
        run("chown", &[&name, &root]);
        name
    }

    /// Starts host `i`'s sshd (again) and waits until it accepts connections.
    pub fn start_sshd(&mut self, i: usize) {
        // sshd's privilege separation directory; Debian makes it at boot.
        fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let host = &mut self.hosts[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.dir.join("sshd.log"))
            .expect("sshd log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.netns,
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
            ])
            .arg(host.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start sshd");
        host.sshd = Some(child);
        let addr: SocketAddr = format!("{}:22", host.address).parse().expect("address");
        wait_for(
            &format!("sshd of {} to accept", host.address),
            Duration::from_secs(10),
            || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok(),
        );
    }

    /// Kills host `i`'s sshd (SIGKILL; its sessions' processes stay).
    pub fn kill_sshd(&mut self, i: usize) {
        if let Some(mut child) = self.hosts[i].sshd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills host `i`'s sshd and every SSH session on it (their processes are in the
    /// host's namespace, so nothing outside the bed is touched).
    pub fn kill_ssh(&mut self, i: usize) {
        self.kill_sshd(i);
        self.kill_where(i, is_sshd);
    }

    /// Kills (SIGKILL) the processes on host `i` that run `program` (the file name of
    /// their first word: not the shell that wraps a service, whose arguments name it
    /// too) with `needle` in their command line, as a crash would; returns how many.
    /// Only this host's: a `pkill` run in its namespace would see every process of the
    /// machine (network namespaces do not separate pids), other tests' included.
    pub fn kill_processes(&self, i: usize, program: &str, needle: &str) -> usize {
        self.kill_where(i, |cmdline| {
            let first = cmdline.split(' ').next().unwrap_or_default();
            Path::new(first).file_name().is_some_and(|f| f == program) && cmdline.contains(needle)
        })
    }

    /// Stops (SIGSTOP) host `i`'s SSH sessions, not its sshd: they read nothing more
    /// from their connections, which stay open; returns how many.
    pub fn pause_ssh_sessions(&self, i: usize) -> usize {
        let listener = self.hosts[i].sshd.as_ref().map(Child::id);
        self.signal_where(i, "-STOP", |pid, cmdline| {
            Some(pid) != listener && is_sshd(cmdline)
        })
    }

    fn kill_where(&self, i: usize, matches: impl Fn(&str) -> bool) -> usize {
        self.signal_where(i, "-KILL", |_, cmdline| matches(cmdline))
    }

    fn signal_where(&self, i: usize, signal: &str, matches: impl Fn(u32, &str) -> bool) -> usize {
        let mut signalled = 0;
        for (pid, cmdline) in self.command_lines(i) {
            if matches(pid, &cmdline) {
                run_quiet("kill", &[signal, &pid.to_string()]);
                signalled += 1;
            }
        }
        signalled
    }

    /// The pid and command line (arguments joined by spaces) of every process on host `i`.
    fn command_lines(&self, i: usize) -> Vec<(u32, String)> {
        self.pids(i)
            .into_iter()
            .filter_map(|pid| {
                let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                Some((pid, String::from_utf8_lossy(&raw).replace('\0', " ")))
            })
            .collect()
    }

    /// Cuts (or restores) host `i`'s link to the bridge.
    pub fn set_link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        run("ip", &["link", "set", &self.hosts[i].veth, state]);
    }

    /// Runs `script` with `sh -c` inside host `i`'s namespace; returns its output.
    pub fn sh(&self, i: usize, script: &str) -> String {
        run(
            "ip",
            &["netns", "exec", &self.hosts[i].netns, "sh", "-c", script],
        )
    }

    /// The pids of every process in host `i`'s namespace.
    pub fn pids(&self, i: usize) -> Vec<u32> {
        netns_pids(&self.hosts[i].netns)
    }

    /// Command lines of the processes in host `i`'s namespace other than sshd and its
    /// sessions: what services left running there.
    pub fn processes(&self, i: usize) -> Vec<String> {
        self.command_lines(i)
            .into_iter()
            .filter(|(_, c)| !is_sshd(c))
            .map(|(_, c)| c.trim().to_owned())
            .collect()
    }

    /// Starts a Docker engine of its own inside host `i`'s namespace (its own data
    /// root, exec root, socket, pid file, containerd namespaces, bridge and cgroup
    /// parent), as a "remote" host's engine; reachable only where its socket is read,
    /// which is what the host's SSH sessions do. Waits until it answers.
    pub fn start_dockerd(&self, i: usize) -> BedDocker {
        self.start_dockerd_with(i, true)
    }

    /// Like [`TestBed::start_dockerd`], with or without `--live-restore` (without it,
    /// stopping dockerd stops its containers).
    pub fn start_dockerd_with(&self, i: usize, live_restore: bool) -> BedDocker {
        let h = &self.hosts[i];
        let dir = h.dir.join("docker");
        fs::create_dir_all(&dir).expect("docker dir");
        let socket = dir.join("docker.sock");
        let octets: Vec<u8> = self
            .subnet
            .split(['.', '/'])
            .filter_map(|o| o.parse().ok())
            .collect();
        let bip = format!("10.{}.{}.1/24", 180 + octets[1] - 18, octets[2]);
        let ns = format!("hd{}-{i}", self.id);
        // nsenter, not `ip netns exec`: that one mounts a fresh /sys, which hides the
        // cgroup hierarchy dockerd needs. `--live-restore` keeps containers running
        // while this dockerd restarts.
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", h.netns))
            .arg("dockerd")
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--host=unix://{}", socket.display()))
            .arg(format!("--pidfile={}", dir.join("dockerd.pid").display()))
            .arg(format!("--bip={bip}"))
            .arg(format!("--containerd-namespace={ns}"))
            .arg(format!("--containerd-plugins-namespace={ns}-plugins"))
            .arg(format!("--cgroup-parent={ns}"));
        if live_restore {
            command.arg("--live-restore");
        }
        let mut engine = BedDocker {
            socket,
            dir,
            command,
            child: None,
        };
        engine.start();
        engine
    }

    /// The third octet of the bed's /24 (`198.18.N.0/24` gives N): tests derive
    /// names, subnets and ports of their own from it.
    pub fn third_octet(&self) -> u8 {
        self.subnet
            .split('.')
            .nth(2)
            .and_then(|o| o.parse().ok())
            .expect("a bed subnet a.b.c.0/24")
    }

    /// A `hosts:` block naming every host `host0..hostN` for a harness config.
    pub fn hosts_yaml(&self) -> String {
        let mut out = String::from("hosts:\n");
        for h in &self.hosts {
            out += &format!("  host{}: {}\n", h.index, self.host_yaml(h.index, ""));
        }
        out
    }

    /// Host `i`'s settings as a flow mapping for a config's `hosts:` (address, user,
    /// key, known_hosts, install_root), with `extra` (`key: value, ...`) added.
    pub fn host_yaml(&self, i: usize, extra: &str) -> String {
        self.host_yaml_as(i, "root", extra)
    }

    /// Like [`TestBed::host_yaml`], logging in as `user`.
    pub fn host_yaml_as(&self, i: usize, user: &str, extra: &str) -> String {
        let h = &self.hosts[i];
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(", {extra}")
        };
        format!(
            "{{ address: {}, user: {user}, ssh_key: {}, known_hosts: {}, install_root: {}{extra} }}",
            h.address,
            self.user_key.display(),
            self.known_hosts.display(),
            h.install_root.display(),
        )
    }
}

/// A Docker engine inside a bed host's namespace; stopped, with every container it
/// ran, when dropped.
pub struct BedDocker {
    /// Its API socket (on the shared filesystem; the bed host's sshd forwards it).
    pub socket: PathBuf,
    dir: PathBuf,
    command: Command,
    child: Option<Child>,
}

impl BedDocker {
    /// Starts dockerd (again, after [`BedDocker::stop`]); returns once it answers.
    pub fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .expect("dockerd log");
        let child = self
            .command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd (Debian's docker.io)");
        self.child = Some(child);
        wait_for("the bed's dockerd", Duration::from_secs(60), || {
            self.try_docker(&["info"]).ok()
        });
    }

    /// Stops dockerd (its containers keep running with `--live-restore`, and are
    /// stopped without it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            run_quiet("kill", &["-TERM", &child.id().to_string()]);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts dockerd again on the same state; returns once it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }
    /// Runs the docker CLI against this engine; its output, or what went wrong.
    pub fn try_docker(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker")
            .arg(format!("--host=unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs the docker CLI against this engine; panics when it fails.
    #[track_caller]
    pub fn docker(&self, args: &[&str]) -> String {
        self.try_docker(args)
            .unwrap_or_else(|e| panic!("docker {}: {e}", args.join(" ")))
    }

    /// dockerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }
}

impl Drop for BedDocker {
    fn drop(&mut self) {
        // Container processes live in namespaces of their own: the bed's sweep of its
        // hosts' namespaces would not find them.
        if let Ok(ids) = self.try_docker(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f", "-v"];
                args.extend(ids);
                let _ = self.try_docker(&args);
            }
        }
        self.stop();
        // dockerd bind-mounts its data root onto itself (in our mount namespace: it was
        // entered into the host's network namespace only) and leaves that mount behind
        // when it stops with live restore; the directory cannot go while it is mounted.
        run_quiet(
            "umount",
            &[
                "--recursive",
                "--lazy",
                &self.dir.join("data").display().to_string(),
            ],
        );
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.kill_sshd(i);
        }
        let names: Vec<String> = self.hosts.iter().map(|h| h.netns.clone()).collect();
        remove(
            &self.id,
            &self.bridge,
            &names,
            &self.users,
            self.forward_rule,
        );
    }
}

/// Whether a command line is sshd's (the listener or a session of it).
fn is_sshd(cmdline: &str) -> bool {
    cmdline.starts_with("sshd") || cmdline.starts_with("/usr/sbin/sshd")
}

/// Ends every process in the namespaces, then removes namespaces, links and rule.
fn remove(id: &str, bridge: &str, netns: &[String], users: &[String], forward_rule: bool) {
    for ns in netns {
        for pid in netns_pids(ns) {
            run_quiet("kill", &["-KILL", &pid.to_string()]);
        }
        let _ = wait_gone(ns);
        // Deleting the namespace deletes the veth pair with it.
        run_quiet("ip", &["netns", "del", ns]);
    }
    if forward_rule {
        run_quiet(
            "iptables",
            &["-D", "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"],
        );
    }
    run_quiet("ip", &["link", "del", bridge]);
    for user in users {
        let _ = fs::remove_file(sudoers_file(user));
        run_quiet("userdel", &[user]);
    }
    let _ = fs::remove_file(Path::new(RECORDS).join(id));
}

fn wait_gone(ns: &str) -> bool {
    for _ in 0..100 {
        if netns_pids(ns).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn netns_pids(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A short id unique among live beds: this process's pid and a per-process counter.
fn unique_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // Interface names have at most 15 bytes: "hv" + id + "-" + index.
    format!("{:x}{n:x}", std::process::id() & 0xfffff)
}

/// Appends to this bed's record, which starts with the owning pid.
fn record(id: &str, line: &str) {
    let path = Path::new(RECORDS).join(id);
    let new = !path.exists();
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("bed record");
    if new {
        writeln!(f, "pid {}", std::process::id()).expect("bed record");
    }
    f.write_all(line.as_bytes()).expect("bed record");
}

/// Removes what beds of dead test processes left.
fn sweep_dead_beds() {
    let Ok(entries) = fs::read_dir(RECORDS) else {
        return;
    };
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        if id.starts_with('.') {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |key: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
                .collect()
        };
        let owner = field("pid ").first().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(alive) {
            continue;
        }
        let bridge = field("bridge ").pop().unwrap_or_default();
        remove(
            &id,
            &bridge,
            &field("netns "),
            &field("user "),
            !field("forward ").is_empty(),
        );
    }
}

/// The sudoers entry of a bed's user.
fn sudoers_file(user: &str) -> PathBuf {
    Path::new("/etc/sudoers.d").join(format!("harness-testbed-{user}"))
}

/// The third octet's prefix (`198.18.N`) of a /24 in 198.18.0.0/15 that no interface
/// of this machine uses.
fn free_subnet() -> String {
    let used = run("ip", &["-4", "-o", "addr", "show"]);
    let start = std::process::id() as usize;
    (0..512)
        .map(|k| (start + k) % 512)
        .map(|n| format!("198.{}.{}", 18 + n / 256, n % 256))
        .find(|p| !used.contains(&format!(" {p}.")))
        .expect("a free /24 in 198.18.0.0/15")
}
