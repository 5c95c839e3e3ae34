//! Services on LAN hosts over SSH (`remote_lan`): which host, which session, where
//! their files go, starting them, and deploying packages (build, check, send, hooks,
//! switch, health, rollback) with `deploy.*` events; `deploy` plans and `down --purge`.
//!
//! Sessions are kept per SSH target (address, port, user, key, known_hosts) for the
//! daemon's life, so every service and check on a host shares one session.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deployer::package::{self, Package};
use deployer::release;
use deployer::remote::{self, RemoteRecord, RemoteSpec};
use deployer::ssh::{HostKeyPolicy, SshHost, SshTarget};
use protocol::config::{HostConfig, RemoteTarget, StackConfig, Target};
use protocol::events::{DeployProgress, DeployRollback, DeployStep, EventKind};
use protocol::methods::PlannedStep;
use serde::{Deserialize, Serialize};

use crate::core::{Core, State};
use crate::env::{self, Place};

/// Where releases and runs go on a host unless it says otherwise.
pub const DEFAULT_INSTALL_ROOT: &str = "/opt/harness";

/// How long connecting to a host may take unless it says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A service run on an SSH host, as the registry records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRun {
    /// Its stack (to find the host's settings again after a daemon restart).
    pub remote_stack: String,
    /// Its service.
    pub remote_service: String,
    /// The run on the host.
    #[serde(flatten)]
    pub record: RemoteRecord,
    /// For a package: its `scripts/health.sh` on the host, the check used when the
    /// service has no `health_check` of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_script: Option<String>,
    /// For a service on a mesh node: its place in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<crate::mesh::MeshMember>,
}

/// A host reference (`host: lan1`) as settings: the entry of `hosts:` of that name, or
/// an address given directly.
pub fn host_config(config: &StackConfig, reference: &str) -> HostConfig {
    config
        .hosts
        .get(reference)
        .cloned()
        .unwrap_or_else(|| HostConfig {
            address: reference.to_owned(),
            ..HostConfig::default()
        })
}

/// The remote target of a service and the host it runs on.
pub fn remote_target<'a>(
    config: &'a StackConfig,
    name: &str,
) -> Option<(&'a RemoteTarget, String, HostConfig)> {
    let (Target::RemoteLan(t) | Target::Wireguard(t)) = &config.services.get(name)?.target else {
        return None;
    };
    let host = t.host.clone().or_else(|| t.hosts.first().cloned())?;
    let settings = host_config(config, &host);
    Some((t, host, settings))
}

/// The address of the harness host as `address` sees it: the source address the
/// kernel picks towards it (a UDP connect sends nothing).
pub fn hub_address_towards(address: &str) -> Option<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect((address, 9)).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

impl Core {
    /// The session to `host` (settings `h`) for target `t`, made on first use.
    pub fn ssh_host(&self, h: &HostConfig, t: Option<&RemoteTarget>) -> Result<SshHost, String> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let user = t
            .and_then(|t| t.user.clone())
            .or_else(|| h.user.clone())
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "root".to_owned());
        let key = t
            .and_then(|t| t.ssh_key.clone())
            .or_else(|| h.ssh_key.clone())
            .map(PathBuf::from);
        let known_hosts = match &h.known_hosts {
            Some(file) => vec![PathBuf::from(file)],
            None => home
                .map(|h| h.join(".ssh").join("known_hosts"))
                .into_iter()
                .collect(),
        };
        let policy = match h.host_key_checking.as_deref() {
            Some("accept-new") => HostKeyPolicy::AcceptNew,
            _ => HostKeyPolicy::Strict,
        };
        let target = SshTarget {
            address: h.address.clone(),
            port: h.port.unwrap_or(22),
            user,
            key,
            known_hosts,
            policy,
            own_known_hosts: self.state_dir.join("known_hosts"),
            connect_timeout: h
                .connect_timeout_ms
                .map_or(CONNECT_TIMEOUT, Duration::from_millis),
        };
        let mut hosts = self.ssh.lock().unwrap_or_else(|e| e.into_inner());
        Ok(hosts
            .entry(target.clone())
            .or_insert_with(|| SshHost::new(target))
            .clone())
    }

    /// The session of a recorded run (after a daemon restart too).
    pub fn ssh_for_run(&self, run: &RemoteRun) -> Result<SshHost, String> {
        let (h, t) = self
            .read(|st| {
                let config = &st.stack(&run.remote_stack)?.config;
                let t = match &config.services.get(&run.remote_service)?.target {
                    Target::RemoteLan(t) | Target::Wireguard(t) => Some(t.clone()),
                    _ => None,
                };
                Some((host_config(config, &run.record.host), t))
            })
            .ok_or_else(|| {
                format!(
                    "{}/{}: its stack or service is no longer registered",
                    run.remote_stack, run.remote_service
                )
            })?;
        self.ssh_host(&h, t.as_ref())
    }

    /// The systemd unit of a service with lifecycle `systemd`.
    fn unit_name(&self, stack: &str, name: &str) -> String {
        let instance: String = self.instance.chars().take(8).collect();
        let clean = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-");
        format!(
            "harness-{instance}-{}-{}.service",
            clean(stack),
            clean(name)
        )
    }

    /// The run directory of a service on its host.
    pub fn remote_dir(&self, h: &HostConfig, stack: &str, name: &str) -> String {
        let root = h.install_root.as_deref().unwrap_or(DEFAULT_INSTALL_ROOT);
        let instance: String = self.instance.chars().take(8).collect();
        format!(
            "{}/{name}/run/{stack}-{instance}",
            root.trim_end_matches('/')
        )
    }

    /// Starts a `remote_lan` service on its host: a `binary:` as it is, a `package:`
    /// deployed first (and rolled back when the new release fails its health
    /// script). Returns the run and, after a rollback, what happened.
    pub async fn launch_remote(
        self: &Arc<Self>,
        stack: &str,
        name: &str,
    ) -> Result<(RemoteRun, Option<String>), String> {
        if self.read(|st| {
            st.stack(stack)
                .is_some_and(|r| crate::mesh::is_mesh(&r.config, name))
        }) {
            // Its dependencies get their mesh addresses and relays first: its
            // environment names them.
            self.relay_dependencies(stack, name).await?;
        }
        let (mut spec, ssh, host, package) = self.read(|st| self.remote_spec(st, stack, name))?;
        // A mesh node joins before its service starts (its config goes into the
        // release's, or for a binary the run's, `network/`); the run records where it is.
        let mesh_host = self.read(|st| {
            st.stack(stack)
                .filter(|r| crate::mesh::is_mesh(&r.config, name))
                .map(|r| host_config(&r.config, &host))
        });
        let join = |dir: String| {
            let (ssh, mesh_host) = (ssh.clone(), mesh_host.clone());
            async move {
                match mesh_host {
                    Some(h) => self.join_mesh(stack, name, &ssh, &h, &dir).await.map(Some),
                    None => Ok(None),
                }
            }
        };
        let Some(package) = package else {
            let mesh = join(spec.dir.clone()).await?;
            let mut run = self
                .start_remote(stack, name, &ssh, &host, &spec, None)
                .await?;
            run.mesh = mesh;
            return Ok((run, None));
        };
        let (root, hooks, keep, build) = self.read(|st| {
            let (t, _, h) = st
                .stack(stack)
                .and_then(|r| remote_target(&r.config, name))
                .ok_or("the service was removed")?;
            let hooks = release::Hooks {
                setup: t.setup_commands.clone(),
                pre_install: t.pre_install.clone(),
                post_install: t.post_install.clone(),
                sudo: h.sudo,
            };
            let root = h
                .install_root
                .unwrap_or_else(|| DEFAULT_INSTALL_ROOT.to_owned());
            Ok::<_, String>((
                root,
                hooks,
                t.keep_releases.unwrap_or(KEEP_RELEASES),
                t.build.clone(),
            ))
        })?;
        let deploy = Deploy {
            core: self.clone(),
            stack: stack.to_owned(),
            name: name.to_owned(),
            host: host.clone(),
            hooks,
            keep,
        };
        let package = if std::path::Path::new(&package).is_dir() {
            deploy.build(&package, build.as_ref()).await?
        } else {
            package
        };
        let (pkg, installed) = deploy.install(&ssh, &package, &root).await?;
        deploy
            .render_templates(&ssh, &pkg, &installed.dir, &spec)
            .await?;
        let health = pkg
            .has_health
            .then(|| format!("{}/scripts/health.sh", installed.dir));
        package_command(&mut spec, &installed.dir, pkg.has_stop);
        let mesh = join(installed.dir.clone()).await?;
        let with_mesh = |mut run: RemoteRun| {
            run.mesh = mesh.clone();
            run
        };
        let run = self
            .start_remote(stack, name, &ssh, &host, &spec, health.clone())
            .await?;
        let run = with_mesh(run);
        let Some(script) = &health else {
            return Ok((run, None));
        };
        deploy.step("health", "started", None);
        let Err(why) = self.wait_healthy(&ssh, &run, script).await else {
            deploy.step("health", "done", None);
            return Ok((run, None));
        };
        deploy.step("health", "failed", Some(why.clone()));
        let _ = remote::stop(&ssh, &run.record, "TERM", ROLLBACK_STOP).await;
        let Some(previous) = installed.previous else {
            return Err(format!(
                "release {} failed its health check ({why}) and there is no previous release to go back to",
                installed.dir
            ));
        };
        release::switch(
            &ssh,
            &package_root_of(&installed.dir),
            &previous,
            deploy.hooks.sudo,
        )
        .await
        .map_err(|e| e.to_string())?;
        let had_stop = ssh
            .exec(
                &format!(
                    "test -x {}/scripts/stop.sh",
                    deployer::ssh::quote(&previous)
                ),
                b"",
                ROLLBACK_STOP,
            )
            .await
            .is_ok_and(|o| o.status == 0);
        package_command(&mut spec, &previous, had_stop);
        let health = Some(format!("{previous}/scripts/health.sh"));
        let run = self
            .start_remote(stack, name, &ssh, &host, &spec, health)
            .await?;
        let reason = format!(
            "release {} failed its health check ({why}); rolled back to {previous}",
            installed.dir
        );
        self.update(|_, ch| {
            ch.push(EventKind::DeployRollback(DeployRollback {
                stack: stack.to_owned(),
                name: name.to_owned(),
                host: host.clone(),
                from: installed.dir.clone(),
                to: previous.clone(),
                reason: reason.clone(),
            }))
        });
        Ok((with_mesh(run), Some(reason)))
    }

    async fn start_remote(
        &self,
        stack: &str,
        name: &str,
        ssh: &SshHost,
        host: &str,
        spec: &RemoteSpec,
        health_script: Option<String>,
    ) -> Result<RemoteRun, String> {
        let record = remote::launch(ssh, host, spec)
            .await
            .map_err(|e| e.to_string())?;
        Ok(RemoteRun {
            remote_stack: stack.to_owned(),
            remote_service: name.to_owned(),
            record,
            health_script,
            mesh: None,
        })
    }

    /// Runs a package's health script until it passes, at most [`ROLLOUT_WAIT`] (or
    /// half the stack's `default_timeout`, so a rollback fits in one `up`).
    async fn wait_healthy(
        &self,
        ssh: &SshHost,
        run: &RemoteRun,
        script: &str,
    ) -> Result<(), String> {
        let command = on_host_command(&run.record.remote_dir, &[script.to_owned()]);
        let up_timeout = self.read(|st| {
            st.stack(&run.remote_stack)
                .and_then(|r| r.config.settings.default_timeout_ms)
        });
        let wait = up_timeout.map_or(ROLLOUT_WAIT, |ms| {
            ROLLOUT_WAIT.min(Duration::from_millis(ms / 2))
        });
        let deadline = std::time::Instant::now() + wait;
        let mut last = String::from("never ran");
        // A service usually listens within milliseconds: look again soon, then less often.
        let mut pause = Duration::from_millis(20);
        while std::time::Instant::now() < deadline {
            match ssh.exec(&command, b"", wait).await {
                Ok(out) if out.status == 0 => return Ok(()),
                Ok(out) => last = format!("exit {}: {}", out.status, out.message()),
                Err(e) => last = e.to_string(),
            }
            if matches!(
                remote::state(ssh, &run.record).await,
                Ok(remote::RemoteState::Exited(_) | remote::RemoteState::Gone)
            ) {
                return Err(format!("it exited ({last})"));
            }
            smol::Timer::after(pause).await;
            pause = (pause * 2).min(Duration::from_millis(300));
        }
        Err(last)
    }

    /// What deploying `names` would do, step by step with the commands, without
    /// connecting to any host.
    pub async fn deploy_plan(
        &self,
        st: &State,
        stack: &str,
        names: &[String],
    ) -> Result<Vec<PlannedStep>, String> {
        let mut plan = Vec::new();
        for name in names {
            let (mut spec, ssh, _, package) = self.remote_spec(st, stack, name)?;
            let host = ssh.target().describe();
            let mut step = |step: &str, command: Option<String>| {
                plan.push(PlannedStep {
                    service: name.clone(),
                    host: host.clone(),
                    step: step.to_owned(),
                    command,
                })
            };
            let (t, _, h) = st
                .stack(stack)
                .and_then(|r| remote_target(&r.config, name))
                .ok_or("the service was removed")?;
            let sudo = h.sudo;
            let hook = |command: &str, dir: &str| release::hook_script(command, dir, sudo);
            for c in &t.setup_commands {
                step("setup command", Some(hook(c, "/")));
            }
            if let Some(package) = package.clone().filter(|p| std::path::Path::new(p).is_dir()) {
                let how = match &t.build {
                    Some(b) => format!("build the program (type {}) and ", b.kind),
                    None => String::new(),
                };
                step(
                    &format!("{how}make a package of {package}; then check, send, extract, switch and start it as a package file"),
                    None,
                );
            } else if let Some(package) = package {
                let pkg = open_package(package.clone()).await?;
                let root = release::package_root(
                    h.install_root.as_deref().unwrap_or(DEFAULT_INSTALL_ROOT),
                    &pkg.manifest.name,
                );
                let dir = release::release_dir(&root, &pkg);
                step(
                    &format!(
                        "check {package} ({} {}) runs on the host",
                        pkg.manifest.name, pkg.manifest.version
                    ),
                    Some(release::PLATFORM_CHECK.to_owned()),
                );
                step(
                    &format!("unless {dir}/.harness-complete exists: stream the package ({} bytes compressed) as a plain tar into", pkg.bytes),
                    Some(release::privileged(&release::extract_script(&root, &dir), sudo)),
                );
                for c in &t.pre_install {
                    step("pre_install", Some(hook(c, &dir)));
                }
                step(
                    "point current at it",
                    Some(release::privileged(
                        &release::switch_script(&root, &dir),
                        sudo,
                    )),
                );
                for c in &t.post_install {
                    step("post_install", Some(hook(c, &dir)));
                }
                package_command(&mut spec, &dir, pkg.has_stop);
                step(
                    "start scripts/start.sh detached (its environment on stdin)",
                    Some(remote::launch_script(&spec)),
                );
                if pkg.has_health {
                    step(
                        "run scripts/health.sh until it passes; on failure switch current back and start the previous release",
                        Some(on_host_command(&spec.dir, &[format!("{dir}/scripts/health.sh")])),
                    );
                }
            } else {
                step(
                    "start the program detached (its environment on stdin)",
                    Some(remote::launch_script(&spec)),
                );
            }
        }
        Ok(plan)
    }

    /// Removes from the host what `down --purge` removes for a service: its run
    /// directory and, for a package, every release.
    pub async fn purge_remote(&self, stack: &str, name: &str) -> Result<(), String> {
        let (ssh, dir, package, root, sudo, lifecycle) = self.read(|st| {
            let config = &st.stack(stack).ok_or("stack was removed")?.config;
            let (t, _, h) = remote_target(config, name).ok_or("not a remote_lan service")?;
            let ssh = self.ssh_host(&h, Some(t))?;
            let root = h
                .install_root
                .clone()
                .unwrap_or_else(|| DEFAULT_INSTALL_ROOT.to_owned());
            Ok::<_, String>((
                ssh,
                self.remote_dir(&h, stack, name),
                t.package.clone(),
                root,
                h.sudo,
                t.lifecycle.clone(),
            ))
        })?;
        remote::remove_dir(&ssh, &dir)
            .await
            .map_err(|e| e.to_string())?;
        if lifecycle.as_deref() == Some("systemd") {
            let unit = deployer::ssh::quote(&self.unit_name(stack, name));
            let script = release::privileged(
                &format!(
                    "[ -d /run/systemd/system ] || exit 0\nrm -f /etc/systemd/system/{unit}\nsystemctl daemon-reload"
                ),
                sudo,
            );
            ssh.check("remove the systemd unit", &script, b"", ROLLBACK_STOP)
                .await
                .map_err(|e| e.to_string())?;
        }
        // The service's own directory goes when nothing else is left in it.
        let service_dir = format!("{}/{name}", root.trim_end_matches('/'));
        let _ = ssh
            .exec(
                &format!(
                    "rmdir {q}/run {q} 2>/dev/null; true",
                    q = deployer::ssh::quote(&service_dir)
                ),
                b"",
                ROLLBACK_STOP,
            )
            .await;
        if let Some(package) = package {
            release::purge(
                &ssh,
                &release::package_root(&root, &package_name(package).await?),
                sudo,
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn remote_spec(
        &self,
        st: &State,
        stack: &str,
        name: &str,
    ) -> Result<(RemoteSpec, SshHost, String, Option<String>), String> {
        let config = &st.stack(stack).ok_or("stack was removed")?.config;
        let (t, host, h) = remote_target(config, name)
            .ok_or_else(|| format!("service {name}: not a remote_lan service"))?;
        let place = env::place_of(st, stack, name);
        let dir = self.remote_dir(&h, stack, name);
        let vars: BTreeMap<String, String> = env::service_env(
            st,
            stack,
            name,
            &place,
            &PathBuf::from(format!("{dir}/env")),
        )?;
        // A package's command is set once it is installed (see `package_command`).
        let mut argv = Vec::new();
        if let Some(binary) = &t.binary {
            argv.push(env::expand(st, stack, name, &place, binary)?);
            for a in &t.args {
                argv.push(env::expand(st, stack, name, &place, a)?);
            }
        }
        let ssh = self.ssh_host(&h, Some(t))?;
        let spec = RemoteSpec {
            dir,
            argv,
            env: vars,
            cwd: None,
            instance: format!("{}/{stack}/{name}", self.instance),
            stop_script: None,
            systemd_unit: (t.lifecycle.as_deref() == Some("systemd"))
                .then(|| self.unit_name(stack, name)),
        };
        Ok((spec, ssh, host, t.package.clone()))
    }
}

/// How long a new release may take to pass its health script before it is rolled
/// back.
const ROLLOUT_WAIT: Duration = Duration::from_secs(20);

/// How long stopping a failed release may take.
const ROLLBACK_STOP: Duration = Duration::from_secs(10);

/// `start.sh <work_dir> <env_file>` of the release in `dir` (and its `stop.sh`).
fn package_command(spec: &mut RemoteSpec, dir: &str, has_stop: bool) {
    spec.argv = vec![
        format!("{dir}/scripts/start.sh"),
        dir.to_owned(),
        format!("{}/env", spec.dir),
    ];
    spec.cwd = Some(dir.to_owned());
    spec.stop_script = has_stop.then(|| {
        format!(
            "{} {}",
            deployer::ssh::quote(&format!("{dir}/scripts/stop.sh")),
            deployer::ssh::quote(dir)
        )
    });
}

/// `<root>` of a release directory `<root>/releases/<release>`.
fn package_root_of(release_dir: &str) -> String {
    release_dir
        .rsplitn(3, '/')
        .nth(2)
        .unwrap_or(release_dir)
        .to_owned()
}

/// A shell command that runs `argv` in a run directory with the run's environment.
pub fn on_host_command(run_dir: &str, argv: &[String]) -> String {
    let argv: Vec<String> = argv.iter().map(|a| deployer::ssh::quote(a)).collect();
    format!(
        "cd {} && set -a && . ./env && set +a && exec {}",
        deployer::ssh::quote(run_dir),
        argv.join(" ")
    )
}

/// The name of a package file, or of a package directory (its manifest.yaml's).
async fn package_name(path: String) -> Result<String, String> {
    if std::path::Path::new(&path).is_dir() {
        let manifest = std::path::Path::new(&path).join("manifest.yaml");
        let shown = manifest.display().to_string();
        let text = smol::unblock(move || std::fs::read_to_string(manifest))
            .await
            .map_err(|e| format!("{shown}: {e}"))?;
        return protocol::package::Manifest::parse(&text).map(|m| m.name);
    }
    Ok(open_package(path).await?.manifest.name)
}

/// Opens and checks a package off the executor.
async fn open_package(path: String) -> Result<Package, String> {
    smol::unblock(move || package::open(std::path::Path::new(&path)))
        .await
        .map_err(|e| e.to_string())
}

/// One package deploy of a service to a host, reporting its steps as events.
struct Deploy {
    core: Arc<Core>,
    stack: String,
    name: String,
    host: String,
    /// Commands around the install (and whether it runs under sudo).
    hooks: release::Hooks,
    /// Releases kept on the host.
    keep: usize,
}

impl Deploy {
    fn step(&self, step: &str, status: &str, detail: Option<String>) {
        self.core.update(|_, ch| {
            ch.push(EventKind::DeployStep(DeployStep {
                stack: self.stack.clone(),
                name: self.name.clone(),
                host: self.host.clone(),
                step: step.to_owned(),
                status: status.to_owned(),
                detail,
            }))
        });
    }

    /// Checks the package, puts it on the host (when not there yet) and switches
    /// `current` to it; a step that fails on the connection (sshd gone, link cut) is
    /// tried again after a backoff, [`INSTALL_ATTEMPTS`] times in all.
    async fn install(
        &self,
        ssh: &SshHost,
        package: &str,
        install_root: &str,
    ) -> Result<(Package, release::Installed), String> {
        let pkg = open_package(package.to_owned()).await?;
        let mut backoff = Duration::from_millis(500);
        for attempt in 1.. {
            match self.install_once(ssh, &pkg, install_root).await {
                Ok(installed) => return Ok((pkg, installed)),
                // Failed on the connection, not on the package or the host's answer.
                Err(e) if e.is_transport() && attempt < INSTALL_ATTEMPTS => {
                    self.step(
                        "retry",
                        "started",
                        Some(format!(
                            "attempt {attempt} failed: {e}; trying again in {} ms",
                            backoff.as_millis()
                        )),
                    );
                    smol::Timer::after(backoff).await;
                    backoff *= 2;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    async fn install_once(
        &self,
        ssh: &SshHost,
        pkg: &Package,
        install_root: &str,
    ) -> Result<release::Installed, deployer::DeployError> {
        self.step("check", "started", None);
        if let Err(e) = release::check_platform(ssh, pkg).await {
            self.step("check", "failed", Some(e.to_string()));
            return Err(e);
        }
        self.step("check", "done", None);
        if let Some(port) = pkg.manifest.port {
            // The manifest's port, unless the service names one.
            self.core.update(|st, _| {
                if let Some(rec) = st.service_mut(&self.stack, &self.name) {
                    rec.port.get_or_insert(port);
                }
            });
        }
        let root = release::package_root(install_root, &pkg.manifest.name);
        self.step("upload", "started", Some(format!("{} bytes", pkg.bytes)));
        let installed = match release::install(ssh, pkg, &root, &self.hooks, self.progress()).await
        {
            Ok(i) => i,
            Err(e) => {
                self.step("upload", "failed", Some(e.to_string()));
                return Err(e);
            }
        };
        let (status, detail) = if installed.sent == 0 {
            (
                "skipped",
                format!("{} is on the host already; 0 bytes sent", installed.dir),
            )
        } else {
            (
                "done",
                format!("{} bytes sent to {}", installed.sent, installed.dir),
            )
        };
        self.step("upload", status, Some(detail));
        let _ = release::prune(ssh, &root, self.keep, self.hooks.sudo).await;
        Ok(installed)
    }

    /// Makes the package from the package directory `dir`, with the program `build`
    /// makes in its bin/; returns the package file.
    async fn build(
        &self,
        dir: &str,
        build: Option<&protocol::config::BuildSpec>,
    ) -> Result<String, String> {
        self.step("build", "started", None);
        let result = async {
            let program = match build {
                Some(spec) => {
                    let program = deployer::build::run(spec)
                        .await
                        .map_err(|e| e.to_string())?;
                    let name = spec.bin.clone().unwrap_or_else(|| {
                        program
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| "service".to_owned())
                    });
                    Some((program, name))
                }
                None => None,
            };
            let work = self
                .core
                .state_dir
                .join("build")
                .join(&self.stack)
                .join(&self.name);
            let src = std::path::PathBuf::from(dir);
            smol::unblock(move || {
                deployer::build::package_with(
                    &src,
                    program.as_ref().map(|(p, n)| (p.as_path(), n.as_str())),
                    &work.join("stage"),
                    &work,
                )
            })
            .await
            .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(pkg) => {
                let path = pkg.path.display().to_string();
                self.step(
                    "build",
                    "done",
                    Some(format!("{path} ({} bytes)", pkg.bytes)),
                );
                Ok(path)
            }
            Err(e) => {
                self.step("build", "failed", Some(e.clone()));
                Err(e)
            }
        }
    }

    /// Writes each `config/X.template` of the package as `config/X` in the release,
    /// rendered for this service (`${svc.addr}` as the host sees it, `${VAR}` from its
    /// environment).
    async fn render_templates(
        &self,
        ssh: &SshHost,
        pkg: &Package,
        dir: &str,
        spec: &RemoteSpec,
    ) -> Result<(), String> {
        let pkg2 = pkg.clone();
        let templates = smol::unblock(move || package::templates(&pkg2))
            .await
            .map_err(|e| e.to_string())?;
        if templates.is_empty() {
            return Ok(());
        }
        let rendered = self.core.read(|st| {
            let place = env::place_of(st, &self.stack, &self.name);
            templates
                .iter()
                .map(|(rel, text)| {
                    let text =
                        env::expand_config(st, &self.stack, &self.name, &place, text, &spec.env)
                            .map_err(|e| format!("{}: {e}", rel.display()))?;
                    Ok((rel.with_extension(""), text))
                })
                .collect::<Result<Vec<_>, String>>()
        });
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) => {
                self.step("config", "failed", Some(e.clone()));
                return Err(e);
            }
        };
        for (rel, text) in &rendered {
            let path = format!("{dir}/{}", rel.display());
            let script = release::privileged(
                &format!("umask 077 && cat > {}", deployer::ssh::quote(&path)),
                self.hooks.sudo,
            );
            ssh.check(
                "write a rendered config",
                &script,
                text.as_bytes(),
                ROLLBACK_STOP,
            )
            .await
            .map_err(|e| e.to_string())?;
        }
        let names: Vec<String> = rendered
            .iter()
            .map(|(r, _)| r.display().to_string())
            .collect();
        self.step(
            "config",
            "done",
            Some(format!("rendered {}", names.join(", "))),
        );
        Ok(())
    }

    /// A `deploy.progress` event at every tenth of an upload.
    fn progress(&self) -> impl Fn(u64, u64) + Send + 'static {
        let (core, stack, name, host) = (
            self.core.clone(),
            self.stack.clone(),
            self.name.clone(),
            self.host.clone(),
        );
        let last_tenth = std::sync::atomic::AtomicU64::new(0);
        move |bytes, total| {
            let tenth = (bytes * 10).checked_div(total).unwrap_or(10);
            if tenth > last_tenth.swap(tenth, std::sync::atomic::Ordering::Relaxed) {
                core.update(|_, ch| {
                    ch.push(EventKind::DeployProgress(DeployProgress {
                        stack: stack.clone(),
                        name: name.clone(),
                        host: host.clone(),
                        bytes,
                        total,
                    }))
                });
            }
        }
    }
}

/// Attempts at installing a package before the deploy fails.
const INSTALL_ATTEMPTS: u32 = 4;

/// Releases kept on a host per package (the current one included).
const KEEP_RELEASES: usize = 3;

/// The `remote_lan` services (instances) of `names` (all when empty) on `hosts` (all
/// when empty).
pub fn remote_services(
    st: &State,
    stack: &str,
    names: &[String],
    hosts: &[String],
) -> Result<Vec<String>, String> {
    let config = &st
        .stack(stack)
        .ok_or(format!("no stack named {stack}"))?
        .config;
    let candidates = if names.is_empty() {
        config.services.keys().cloned().collect()
    } else {
        protocol::config::expand_names(config, names)
    };
    let mut out = Vec::new();
    for name in candidates {
        if !config.services.contains_key(&name) {
            return Err(crate::orchestrator::not_found_message(config, &name));
        }
        let Some((_, host, _)) = remote_target(config, &name) else {
            if names.contains(&name) {
                return Err(format!(
                    "service {name} has no SSH-host target; use `harness up`"
                ));
            }
            continue;
        };
        if hosts.is_empty() || hosts.contains(&host) {
            out.push(name);
        }
    }
    if out.is_empty() {
        return Err(format!(
            "nothing to deploy in {stack}: no remote_lan service{}",
            if hosts.is_empty() {
                String::new()
            } else {
                format!(" on {}", hosts.join(", "))
            }
        ));
    }
    Ok(out)
}

/// Where a `remote_lan` service runs, as a caller of others: its host, which reaches
/// the harness host at `hub`.
pub fn lan_place(config: &StackConfig, name: &str) -> Option<Place> {
    let (_, _, h) = remote_target(config, name)?;
    Some(Place::Lan {
        hub: hub_address_towards(&h.address).unwrap_or_else(|| "127.0.0.1".to_owned()),
    })
}
