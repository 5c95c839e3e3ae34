//! The process backend against real processes: spawn, logs, exit, stop, adoption.
//!
//! The shim server is `deployer-test-shim`, a stand-in for `harness-shim`. Every test
//! uses its own temporary directory, instance name and shim server, and kills only
//! what it started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deployer::logs::{self, LogEntry};
use deployer::process::{self, Adoption, ExitStatus, ProcessRecord, ProcessSpec, ShimServer};
use rustix::process::{Pid, Signal};

fn shim_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_deployer-test-shim"))
}

/// A name no other test (or test run) uses.
fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test-{}-{nanos}-{name}", std::process::id())
}

struct Test {
    dir: tempfile::TempDir,
    /// The daemon instance this test stands in for.
    daemon: String,
    shims: Arc<ShimServer>,
    /// Every run started, killed on drop if it still runs.
    runs: Vec<ProcessRecord>,
}

impl Test {
    fn new() -> Self {
        let daemon = unique("daemon");
        Self {
            dir: tempfile::tempdir().unwrap(),
            shims: Arc::new(ShimServer::new(shim_exe(), &daemon)),
            daemon,
            runs: Vec::new(),
        }
    }

    fn spec(&self, name: &str, binary: &str, args: &[&str]) -> ProcessSpec {
        let env = BTreeMap::from([("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned())]);
        ProcessSpec {
            instance: format!("{}/stack/{name}", self.daemon),
            binary: binary.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env,
            working_dir: self.dir.path().to_owned(),
            run_dir: self.dir.path().join("run").join(name),
            log_path: self.dir.path().join("logs").join(format!("{name}.log")),
            log_max_bytes: process::DEFAULT_LOG_MAX_BYTES,
            log_keep: process::DEFAULT_LOG_KEEP,
            private_files: Vec::new(),
        }
    }

    fn spawn(&mut self, spec: &ProcessSpec) -> ProcessRecord {
        let record = smol::block_on(process::spawn(spec, &self.shims)).expect("spawn");
        self.runs.push(record.clone());
        record
    }
}

impl Drop for Test {
    fn drop(&mut self) {
        for r in &self.runs {
            if start_time(r.pid) == Some(r.start) {
                let _ = rustix::process::kill_process_group(pid(r.pid), Signal::KILL);
            }
            if start_time(r.shim_pid) == Some(r.shim_start) {
                let _ = rustix::process::kill_process(pid(r.shim_pid), Signal::KILL);
            }
        }
    }
}

fn pid(p: u32) -> Pid {
    Pid::from_raw(p as i32).unwrap()
}

/// (state, start time) from /proc/<pid>/stat.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(18)?.parse().ok()?))
}

fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.1)
}

/// Whether the process that started at `start` has exited (zombies count as exited).
fn exited(pid: u32, start: u64) -> bool {
    stat(pid).is_none_or(|(state, s)| s != start || state == 'Z')
}

#[track_caller]
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait(record: &ProcessRecord) -> ExitStatus {
    smol::block_on(process::wait_exit(record)).expect("wait_exit")
}

fn lines(entries: &[LogEntry]) -> Vec<(u64, &str, &str)> {
    entries
        .iter()
        .map(|e| (e.offset, e.stream.as_str(), e.line.as_str()))
        .collect()
}

#[test]
fn logs_both_streams_and_records_the_exit_code() {
    let mut t = Test::new();
    let spec = t.spec("out", "sh", &["-c", "echo out; echo err >&2; exit 3"]);
    let record = t.spawn(&spec);
    assert_eq!(
        wait(&record),
        ExitStatus {
            code: Some(3),
            signal: None,
            error: None
        }
    );
    assert!(record.run_dir.join("exit.json").exists());
    assert!(record.run_dir.join("shim.json").exists());
    assert_eq!(
        process::adopt(&record),
        Adoption::Exited(ExitStatus {
            code: Some(3),
            ..Default::default()
        })
    );

    let mut entries = logs::read_from(&spec.log_path, 0, 100).unwrap();
    assert_eq!(
        entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![0, 1]
    );
    // The two pipes race; only the offsets are ordered.
    entries.sort_by(|a, b| a.stream.cmp(&b.stream));
    assert_eq!(
        lines(&entries)
            .iter()
            .map(|l| (l.1, l.2))
            .collect::<Vec<_>>(),
        vec![("stderr", "err"), ("stdout", "out")]
    );
    let time = humantime::parse_rfc3339(&entries[0].time).unwrap();
    assert!(time.elapsed().unwrap_or_default() < Duration::from_secs(60));
    assert_eq!(logs::next_offset(&spec.log_path).unwrap(), 2);
}

#[test]
fn spawn_failure_names_the_binary() {
    let t = Test::new();
    let missing = t.dir.path().join("no/such/binary");
    let spec = t.spec("missing", missing.to_str().unwrap(), &[]);
    let err = smol::block_on(process::spawn(&spec, &t.shims))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("No such file"),
        "{err}"
    );

    let spec = t.spec("unknown", "no-such-binary-on-path", &[]);
    let err = smol::block_on(process::spawn(&spec, &t.shims))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot run no-such-binary-on-path"), "{err}");

    let mut spec = t.spec("nodir", "true", &[]);
    spec.working_dir = t.dir.path().join("nodir");
    let err = smol::block_on(process::spawn(&spec, &t.shims))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("working directory") && err.contains("nodir"),
        "{err}"
    );

    let no_server = ShimServer::new(&t.dir.path().join("no-shim"), "x");
    let err = smol::block_on(process::spawn(&spec, &no_server)).unwrap_err();
    assert!(err.to_string().contains("no-shim"), "{err}");
}

#[test]
fn child_gets_exactly_its_env_and_working_dir() {
    let mut t = Test::new();
    let mut spec = t.spec("env", "env", &[]);
    spec.env.insert("FOO".into(), "bar baz".into());
    let record = t.spawn(&spec);
    assert_eq!(wait(&record).code, Some(0));
    let mut got: Vec<String> = logs::read_from(&spec.log_path, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.line)
        .collect();
    got.sort();
    let want = vec![
        "FOO=bar baz".to_owned(),
        format!("HARNESS_INSTANCE={}", spec.instance),
        "PATH=/usr/local/bin:/usr/bin:/bin".to_owned(),
    ];
    assert_eq!(got, want);

    let workdir = t.dir.path().join("work dir");
    std::fs::create_dir(&workdir).unwrap();
    let mut spec = t.spec("pwd", "pwd", &[]);
    spec.working_dir = workdir.clone();
    let record = t.spawn(&spec);
    assert_eq!(wait(&record).code, Some(0));
    assert_eq!(
        logs::tail(&spec.log_path, 1).unwrap()[0].line,
        workdir.to_str().unwrap()
    );
}

#[test]
fn private_files_are_written_owner_only_before_the_service_starts() {
    use std::os::unix::fs::PermissionsExt;
    let mut t = Test::new();
    let mut spec = t.spec("files", "cat", &["service.env"]);
    spec.working_dir = spec.run_dir.clone();
    let path = spec.run_dir.join("service.env");
    // There already, longer and readable by all: overwritten whole, made 0600.
    std::fs::create_dir_all(&spec.run_dir).unwrap();
    std::fs::write(&path, "OLD='a much longer line than the new one'\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    spec.private_files.push(process::PrivateFile {
        path: path.clone(),
        text: "TOKEN='s3cret'\n".into(),
    });
    let record = t.spawn(&spec);
    assert_eq!(wait(&record).code, Some(0));
    // The service read it: it was written before the service started.
    assert_eq!(
        logs::tail(&spec.log_path, 1).unwrap()[0].line,
        "TOKEN='s3cret'"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "TOKEN='s3cret'\n");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn stop_with_term() {
    let mut t = Test::new();
    let record = t.spawn(&t.spec("sleep", "sleep", &["100"]));
    assert_eq!(process::adopt(&record), Adoption::Alive);
    let began = Instant::now();
    let status =
        smol::block_on(process::stop(&record, "SIGTERM", Duration::from_secs(30))).unwrap();
    assert_eq!(status.signal, Some(15));
    assert!(began.elapsed() < Duration::from_secs(10));
    assert!(exited(record.pid, record.start) && exited(record.shim_pid, record.shim_start));
}

#[test]
fn stop_kills_the_whole_group_after_the_timeout() {
    let mut t = Test::new();
    // The shell and its background child both ignore TERM; the child's pid goes to
    // the log.
    let spec = t.spec(
        "stubborn",
        "sh",
        &["-c", "trap '' TERM; sleep 100 & echo $!; wait"],
    );
    let record = t.spawn(&spec);
    let grandchild: u32 = eventually("the grandchild's pid", || {
        logs::tail(&spec.log_path, 1)
            .ok()?
            .first()?
            .line
            .parse()
            .ok()
    });
    let grandchild_start = start_time(grandchild).expect("grandchild runs");
    let began = Instant::now();
    let status =
        smol::block_on(process::stop(&record, "TERM", Duration::from_millis(300))).unwrap();
    assert_eq!(status.signal, Some(9));
    assert!(began.elapsed() >= Duration::from_millis(300));
    eventually("the grandchild to die", || {
        exited(grandchild, grandchild_start).then_some(())
    });
}

#[test]
fn leftovers_of_the_group_die_with_the_service() {
    let mut t = Test::new();
    let spec = t.spec("leaver", "sh", &["-c", "sleep 100 & echo $!"]);
    let record = t.spawn(&spec);
    assert_eq!(wait(&record).code, Some(0));
    let grandchild: u32 = logs::tail(&spec.log_path, 1).unwrap()[0]
        .line
        .parse()
        .unwrap();
    eventually("the grandchild to die", || {
        stat(grandchild)
            .is_none_or(|(state, _)| state == 'Z')
            .then_some(())
    });
}

#[test]
fn the_shim_outlives_the_process_that_spawned_it() {
    let mut t = Test::new();
    let spec = t.spec("orphan", "sh", &["-c", "echo started; exec sleep 100"]);
    let spec_file = t.dir.path().join("orphan.json");
    std::fs::write(&spec_file, serde_json::to_vec(&spec).unwrap()).unwrap();
    // A "daemon" that spawns and exits at once.
    let out = Command::new(shim_exe())
        .arg("spawn")
        .arg(&spec_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: ProcessRecord = serde_json::from_slice(&out.stdout).unwrap();
    t.runs.push(record.clone());

    // Own process groups: a signal to the daemon's group reaches neither.
    assert_eq!(
        rustix::process::getpgid(Some(pid(record.shim_pid))).unwrap(),
        pid(record.shim_pid)
    );
    assert_eq!(
        rustix::process::getpgid(Some(pid(record.pid))).unwrap(),
        pid(record.pid)
    );
    assert_eq!(process::adopt(&record), Adoption::Alive);
    eventually("the first line", || {
        (logs::next_offset(&spec.log_path).ok()? == 1).then_some(())
    });

    // Not our child: waiting works through the pidfd alone.
    let waiter = smol::spawn({
        let record = record.clone();
        async move { process::wait_exit(&record).await }
    });
    let status = smol::block_on(process::stop(&record, "INT", Duration::from_secs(30))).unwrap();
    assert_eq!(status.signal, Some(2));
    assert_eq!(smol::block_on(waiter).unwrap(), status);
    assert_eq!(process::adopt(&record), Adoption::Exited(status));
}

#[test]
fn a_reused_pid_is_never_adopted_or_signalled() {
    let t = Test::new();
    let me = std::process::id();
    let my_start = start_time(me).unwrap();
    // Our own live pid, with the start time of an earlier process.
    let fake = ProcessRecord {
        shim_pid: me,
        shim_start: my_start - 1,
        pid: me,
        start: my_start - 1,
        run_dir: t.dir.path().to_owned(),
    };
    assert_eq!(process::adopt(&fake), Adoption::Gone);
    // Would kill this test if it signalled.
    assert!(smol::block_on(process::stop(&fake, "KILL", Duration::from_millis(50))).is_err());
    assert!(smol::block_on(process::wait_exit(&fake)).is_err());
}

#[test]
fn stale_exit_status_is_not_taken_for_a_new_run() {
    let mut t = Test::new();
    let spec = t.spec("again", "sh", &["-c", "exit 7"]);
    let first = t.spawn(&spec);
    assert_eq!(wait(&first).code, Some(7));
    let second = t.spawn(&spec);
    assert_eq!(wait(&second).code, Some(7));
    // The first run's record does not claim the second run's exit.json.
    assert_eq!(process::adopt(&first), Adoption::Gone);
}

#[test]
fn rotation_and_restarts_keep_offsets_continuous() {
    let mut t = Test::new();
    let mut spec = t.spec(
        "chatty",
        "sh",
        &[
            "-c",
            "i=0; while [ $i -lt 200 ]; do echo line$i; i=$((i+1)); done",
        ],
    );
    spec.log_max_bytes = 2000;
    spec.log_keep = 20;
    let record = t.spawn(&spec);
    assert_eq!(wait(&record).code, Some(0));
    assert!(Path::new(&format!("{}.3", spec.log_path.display())).exists());
    let all = logs::read_from(&spec.log_path, 0, usize::MAX).unwrap();
    assert_eq!(
        all.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
    assert_eq!(all[123].line, "line123");
    assert_eq!(
        logs::read_from(&spec.log_path, 150, 2).unwrap()[1].line,
        "line151"
    );

    // The restarted service continues the numbering.
    let record = t.spawn(&spec);
    assert_eq!(wait(&record).code, Some(0));
    let last = logs::tail(&spec.log_path, 3).unwrap();
    assert_eq!(
        lines(&last),
        vec![
            (397, "stdout", "line197"),
            (398, "stdout", "line198"),
            (399, "stdout", "line199")
        ]
    );
    assert_eq!(logs::next_offset(&spec.log_path).unwrap(), 400);
}

#[test]
fn find_instances_sees_server_shim_and_service() {
    let mut t = Test::new();
    let spec = t.spec("found", "sleep", &["100"]);
    let record = t.spawn(&spec);
    let prefix = format!("{}/", t.daemon);
    // The shim is a fork of the server: its initial environment is the server's.
    let server = process::server_instance(&t.daemon);
    let mut want = vec![
        (parent(record.shim_pid).unwrap(), server.clone()),
        (record.shim_pid, server),
        (record.pid, spec.instance.clone()),
    ];
    want.sort();
    assert_eq!(process::find_instances(&prefix), want);
    assert!(process::find_instances(&unique("nobody")).is_empty());
    assert!(process::kill_stray(record.pid));
    assert_eq!(wait(&record).signal, Some(9));
}

/// A shim that does not report in time is killed, and so is the service it started
/// already: here the shim is stuck opening its shim.json, a FIFO no one reads, right
/// after starting the service.
#[test]
fn a_shim_that_times_out_takes_the_service_it_started_with_it() {
    let t = Test::new();
    let shims = ShimServer::new(shim_exe(), &t.daemon).with_start_timeout(Duration::from_secs(1));
    let spec = t.spec("stuck", "sleep", &["300"]);
    std::fs::create_dir_all(&spec.run_dir).unwrap();
    let fifo = Command::new("mkfifo")
        .arg(spec.run_dir.join("shim.json"))
        .status()
        .unwrap();
    assert!(fifo.success());

    let spawning = {
        let spec = spec.clone();
        std::thread::spawn(move || smol::block_on(process::spawn(&spec, &shims)))
    };
    // The service runs (the shim started it), unreported.
    let service = eventually("the service to start", || {
        process::find_instances(&spec.instance)
            .into_iter()
            .find(|(_, instance)| *instance == spec.instance)
            .map(|(pid, _)| pid)
    });
    let start = start_time(service).unwrap();
    // Killed on failure too, if it is still that process.
    struct Guard(u32, u64);
    impl Drop for Guard {
        fn drop(&mut self) {
            if start_time(self.0) == Some(self.1) {
                let _ = rustix::process::kill_process_group(pid(self.0), Signal::KILL);
            }
        }
    }
    let _guard = Guard(service, start);

    let err = spawning.join().unwrap().unwrap_err();
    assert!(
        matches!(err, deployer::DeployError::ShimTimeout { .. }),
        "{err}"
    );
    eventually("the service to be killed", || {
        exited(service, start).then_some(())
    });
    let deployer::DeployError::ShimTimeout { shim_pid, .. } = err else {
        unreachable!()
    };
    eventually("the shim to be killed", || {
        stat(shim_pid)
            .is_none_or(|(state, _)| state == 'Z')
            .then_some(())
    });
}

#[test]
fn many_services_start_at_once() {
    let mut t = Test::new();
    let specs: Vec<ProcessSpec> = (0..20)
        .map(|i| t.spec(&format!("svc{i}"), "true", &[]))
        .collect();
    let records: Vec<ProcessRecord> = smol::block_on(async {
        let tasks: Vec<_> = specs
            .iter()
            .map(|s| {
                let (s, shims) = (s.clone(), t.shims.clone());
                smol::spawn(async move { process::spawn(&s, &shims).await })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.expect("spawn"));
        }
        out
    });
    t.runs.extend(records.iter().cloned());
    for r in &records {
        assert_eq!(wait(r).code, Some(0));
    }
    let run_dirs: Vec<PathBuf> = records.iter().map(|r| r.run_dir.clone()).collect();
    assert_eq!(
        run_dirs,
        specs.iter().map(|s| s.run_dir.clone()).collect::<Vec<_>>()
    );
}

#[test]
fn concurrent_starts_each_get_their_own_shim() {
    let mut t = Test::new();
    let specs: Vec<ProcessSpec> = (0..20)
        .map(|i| t.spec(&format!("svc{i}"), "sleep", &["100"]))
        .collect();
    // All requests are in flight at once: the server answers none of them on the
    // control socket, so each shim says its pid on the start's own channel.
    let results: Vec<_> = smol::block_on(futures_util::future::join_all(
        specs.iter().map(|s| process::spawn(s, &t.shims)),
    ));
    let records: Vec<ProcessRecord> = results.into_iter().map(|r| r.expect("spawn")).collect();
    t.runs.extend(records.iter().cloned());
    let server = parent(records[0].shim_pid).expect("the server");
    for (spec, record) in specs.iter().zip(&records) {
        assert_eq!(
            parent(record.pid),
            Some(record.shim_pid),
            "{}",
            spec.instance
        );
        assert_eq!(parent(record.shim_pid), Some(server));
        let environ = std::fs::read(format!("/proc/{}/environ", record.pid)).unwrap();
        let wanted = format!("HARNESS_INSTANCE={}", spec.instance);
        assert!(
            environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes()),
            "{} runs another start's spec",
            record.pid
        );
    }
    for r in &records {
        let status = smol::block_on(process::stop(r, "TERM", Duration::from_secs(10))).unwrap();
        assert_eq!(status.signal, Some(15));
    }
}

#[test]
fn a_daemon_of_another_version_gets_a_usage_error_from_the_shim_binary() {
    // What a daemon that speaks the protocol before version 2 runs.
    let out = Command::new(env!("CARGO_BIN_EXE_harness-shim"))
        .arg("shim-server")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(process::SHIM_SERVER_COMMAND), "{stderr}");
}

/// The parent pid, from /proc/<pid>/stat.
fn parent(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn shims_are_forked_by_one_server_which_reaps_them() {
    let mut t = Test::new();
    let first = t.spawn(&t.spec("one", "sleep", &["0.5"]));
    let server = parent(first.shim_pid).expect("the first shim's parent");
    let second = t.spawn(&t.spec("two", "sleep", &["100"]));
    assert_ne!(server, std::process::id(), "the shim is the server's child");
    assert_eq!(parent(second.shim_pid), Some(server), "one server for both");
    assert_eq!(wait(&first).code, Some(0));
    // Reaped by the server, not left a zombie.
    eventually("the exited shim reaped", || {
        stat(first.shim_pid)
            .is_none_or(|(_, start)| start != first.shim_start)
            .then_some(())
    });
    assert_eq!(process::adopt(&second), Adoption::Alive);
}

#[test]
fn a_killed_shim_server_is_replaced_and_its_shims_live_on() {
    let mut t = Test::new();
    let before = t.spawn(&t.spec("before", "sleep", &["100"]));
    let server = parent(before.shim_pid).unwrap();
    let server_start = start_time(server).unwrap();
    // Our own child (the test's ShimServer started it), checked by its start time.
    rustix::process::kill_process(pid(server), Signal::KILL).unwrap();
    eventually("the server gone", || {
        exited(server, server_start).then_some(())
    });
    let after = t.spawn(&t.spec("after", "sleep", &["100"]));
    let replacement = parent(after.shim_pid).unwrap();
    assert_ne!(
        (replacement, start_time(replacement)),
        (server, Some(server_start))
    );
    assert_eq!(process::adopt(&before), Adoption::Alive);
    for r in [&before, &after] {
        let status = smol::block_on(process::stop(r, "TERM", Duration::from_secs(10))).unwrap();
        assert_eq!(status.signal, Some(15));
    }
}

#[test]
fn the_shim_server_ends_with_its_daemon_and_its_shims_do_not() {
    let mut t = Test::new();
    let shims = ShimServer::new(shim_exe(), &unique("daemon"));
    let spec = t.spec("survivor", "sleep", &["100"]);
    let record = smol::block_on(process::spawn(&spec, &shims)).unwrap();
    t.runs.push(record.clone());
    let server = parent(record.shim_pid).unwrap();
    let server_start = start_time(server).unwrap();
    // The daemon's end of the control socket closes.
    drop(shims);
    eventually("the server exited", || {
        exited(server, server_start).then_some(())
    });
    assert_eq!(process::adopt(&record), Adoption::Alive);
    let status = smol::block_on(process::stop(&record, "TERM", Duration::from_secs(10))).unwrap();
    assert_eq!(status.signal, Some(15));
}
