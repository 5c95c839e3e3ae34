//! Package releases on a host: `<root>/releases/<version>-<hash12>/` with a `current`
//! link switched atomically (`<root>` is `<install_root>/<package name>`).
//!
//! A release is complete once it holds `.harness-complete`; it is extracted into a
//! temporary directory and renamed, so a cut link or a killed sshd leaves no
//! half-installed release, and a complete one is never sent again (its name carries
//! the package's hash).

use std::path::Path;
use std::time::Duration;

use super::ssh::{quote, SshHost};
use crate::package::{self, Package};
use crate::DeployError;

/// How long a step on the host may take (extraction of a large package included).
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// How much of the tar stream is gathered before it goes to the channel.
const SEND_BUFFER: usize = 256 * 1024;

/// Marker of a complete release.
const COMPLETE: &str = ".harness-complete";

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The release's directory on the host.
    pub dir: String,
    /// Bytes sent (0 when the release was there already).
    pub sent: u64,
    /// The release `current` pointed at before, if any.
    pub previous: Option<String>,
}

/// Checks that the host can run `pkg` (os/arch, before anything is sent).
pub async fn check_platform(ssh: &SshHost, pkg: &Package) -> Result<(), DeployError> {
    let out = ssh
        .check("read the platform", PLATFORM_CHECK, b"", STEP_TIMEOUT)
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (os, arch) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    if pkg.manifest.runs_on(os, arch) {
        Ok(())
    } else {
        Err(DeployError::BadPackage {
            path: pkg.path.clone(),
            reason: format!(
                "built for {}/{}, but {} is {os}/{arch}; nothing was sent",
                pkg.manifest.os.as_deref().unwrap_or("any"),
                pkg.manifest.arch.as_deref().unwrap_or("any"),
                ssh.target().address
            ),
        })
    }
}

/// Commands run on the host around an install, as the SSH user or (with `sudo`) under
/// `sudo -n`; the first that fails fails the install.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Before anything is sent (e.g. installing what `system_requires` names).
    pub setup: Vec<String>,
    /// After the release is on the host, before `current` points at it; run in it.
    pub pre_install: Vec<String>,
    /// After `current` points at the release; run in it.
    pub post_install: Vec<String>,
    /// Run them (and the install itself) with `sudo -n`.
    pub sudo: bool,
}

/// `script` as the host should run it: as is, or under `sudo -n` when asked.
pub fn privileged(script: &str, sudo: bool) -> String {
    if sudo {
        format!("sudo -n sh -c {}", quote(script))
    } else {
        script.to_owned()
    }
}

/// `command` run in `dir` (under sudo when asked).
pub fn hook_script(command: &str, dir: &str, sudo: bool) -> String {
    privileged(&format!("cd {} && {command}", quote(dir)), sudo)
}

/// Runs each of `commands` in `dir` (one at a time, so an error names its command).
pub async fn run_hooks(
    ssh: &SshHost,
    what: &str,
    commands: &[String],
    dir: &str,
    sudo: bool,
) -> Result<(), DeployError> {
    for command in commands {
        let script = hook_script(command, dir, sudo);
        ssh.check(&format!("{what} `{command}`"), &script, b"", STEP_TIMEOUT)
            .await?;
    }
    Ok(())
}

/// Puts `pkg` on the host under `root` (sending it only when that release is not
/// complete there yet), checks its `system_requires`, and points `current` at it, with
/// `hooks` around those steps. `progress` gets (bytes sent, total) while sending.
pub async fn install(
    ssh: &SshHost,
    pkg: &Package,
    root: &str,
    hooks: &Hooks,
    progress: impl Fn(u64, u64) + Send + 'static,
) -> Result<Installed, DeployError> {
    let dir = release_dir(root, pkg);
    run_hooks(ssh, "setup command", &hooks.setup, "/", hooks.sudo).await?;
    let q = |s: &str| quote(s);
    let present = ssh
        .exec(
            &format!("test -f {}/{COMPLETE}", q(&dir)),
            b"",
            STEP_TIMEOUT,
        )
        .await?
        .status
        == 0;
    let mut sent = 0;
    if !present {
        sent = upload_and_extract(ssh, pkg, root, &dir, hooks.sudo, progress).await?;
    }
    check_requires(ssh, pkg).await?;
    run_hooks(ssh, "pre_install", &hooks.pre_install, &dir, hooks.sudo).await?;
    let previous = switch(ssh, root, &dir, hooks.sudo).await?;
    run_hooks(ssh, "post_install", &hooks.post_install, &dir, hooks.sudo).await?;
    Ok(Installed {
        previous: previous.filter(|p| *p != dir),
        dir,
        sent,
    })
}

/// Streams the package as a plain tar into `tar -x` on the host (see
/// [`extract_script`]); returns the bytes sent.
async fn upload_and_extract(
    ssh: &SshHost,
    pkg: &Package,
    root: &str,
    dir: &str,
    sudo: bool,
    progress: impl Fn(u64, u64) + Send + 'static,
) -> Result<u64, DeployError> {
    let pkg2 = pkg.clone();
    let total = pkg.bytes;
    let script = privileged(&extract_script(root, dir), sudo);
    let (out, sent) = ssh
        .exec_with_input(
            &script,
            move |channel| {
                let w = Progress {
                    inner: channel,
                    sent: 0,
                    total,
                    progress,
                };
                // tar writes in small pieces; the channel sends a packet per write, so
                // gather them into full packets.
                let mut w = std::io::BufWriter::with_capacity(SEND_BUFFER, w);
                let sent = package::write_plain_tar(&pkg2, &mut w)?;
                std::io::Write::flush(&mut w).map_err(|source| DeployError::WriteFile {
                    path: pkg2.path.clone(),
                    source,
                })?;
                Ok(sent)
            },
            STEP_TIMEOUT,
        )
        .await?;
    if out.status != 0 {
        return Err(DeployError::RemoteCommand {
            host: ssh.target().address.clone(),
            what: "extract the package".into(),
            status: out.status,
            message: out.message(),
        });
    }
    Ok(sent)
}

/// Reports (bytes sent, package size) as the tar stream goes out.
struct Progress<'a, F> {
    inner: &'a mut dyn std::io::Write,
    sent: u64,
    total: u64,
    progress: F,
}

impl<F: Fn(u64, u64)> std::io::Write for Progress<'_, F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent += n as u64;
        (self.progress)(self.sent.min(self.total), self.total);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Extracts the tar arriving on standard input into a temporary directory and
/// renames it to `dir` once complete; an interrupted transfer leaves nothing.
pub fn extract_script(root: &str, dir: &str) -> String {
    // GNU tar also refuses `..` and strips a leading `/` on its own: a second guard.
    format!(
        "set -e\n\
         trap 'rm -rf {tmp}' EXIT HUP INT TERM\n\
         mkdir -p {root}/releases\n\
         rm -rf {tmp}\n\
         mkdir {tmp}\n\
         tar -xf - -C {tmp} --no-same-owner\n\
         touch {tmp}/{COMPLETE}\n\
         rm -rf {dir}\n\
         mv {tmp} {dir}\n",
        root = quote(root),
        tmp = quote(&format!("{dir}.tmp")),
        dir = quote(dir),
    )
}

/// Points `<root>/current` at `dir` atomically; prints where it pointed before.
pub fn switch_script(root: &str, dir: &str) -> String {
    format!(
        "cd {root}\n\
         readlink current 2>/dev/null || true\n\
         ln -sfn {dir} .current.tmp && mv -T .current.tmp current\n",
        root = quote(root),
        dir = quote(dir),
    )
}

/// The directory of `pkg`'s release under `root`.
pub fn release_dir(root: &str, pkg: &Package) -> String {
    format!("{root}/releases/{}", pkg.release())
}

/// The check that the host can run a package (`uname`).
pub const PLATFORM_CHECK: &str = "uname -s; uname -m";

async fn check_requires(ssh: &SshHost, pkg: &Package) -> Result<(), DeployError> {
    if pkg.manifest.system_requires.is_empty() {
        return Ok(());
    }
    let tests: Vec<String> = pkg
        .manifest
        .system_requires
        .iter()
        .map(|r| {
            let test = if r.starts_with('/') {
                format!("test -e {}", quote(r))
            } else {
                format!("command -v {} >/dev/null 2>&1", quote(r))
            };
            format!("{test} || echo {}", quote(r))
        })
        .collect();
    let out = ssh
        .check(
            "check system_requires",
            &tests.join("\n"),
            b"",
            STEP_TIMEOUT,
        )
        .await?;
    let missing: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // The release stays: it is complete and is used once the host has them.
    Err(DeployError::RemoteCommand {
        host: ssh.target().address.clone(),
        what: "check system_requires".into(),
        status: 1,
        message: format!(
            "missing on the host: {} (install them, e.g. with the host's package manager, or a `setup_commands` step)",
            missing.join(", ")
        ),
    })
}

/// Points `<root>/current` at `dir` atomically; returns where it pointed before.
pub async fn switch(
    ssh: &SshHost,
    root: &str,
    dir: &str,
    sudo: bool,
) -> Result<Option<String>, DeployError> {
    let out = ssh
        .check(
            "switch the current release",
            &privileged(&switch_script(root, dir), sudo),
            b"",
            STEP_TIMEOUT,
        )
        .await?;
    let before = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((!before.is_empty()).then_some(before))
}

/// Removes all but the newest `keep` releases (never `current`).
pub async fn prune(ssh: &SshHost, root: &str, keep: usize, sudo: bool) -> Result<(), DeployError> {
    let script = format!(
        "cd {root}/releases 2>/dev/null || exit 0\n\
         cur=$(readlink ../current 2>/dev/null | sed 's|.*/||')\n\
         ls -1t | grep -v '\\.tmp$' | tail -n +{from} | while read -r r; do [ \"$r\" = \"$cur\" ] || rm -rf \"$r\"; done\n",
        root = quote(root),
        from = keep + 1,
    );
    ssh.check(
        "remove old releases",
        &privileged(&script, sudo),
        b"",
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// Removes `<root>` (every release, `current`) from the host.
pub async fn purge(ssh: &SshHost, root: &str, sudo: bool) -> Result<(), DeployError> {
    ssh.check(
        "remove the releases",
        &privileged(&format!("rm -rf {}", quote(root)), sudo),
        b"",
        STEP_TIMEOUT,
    )
    .await
    .map(|_| ())
}

/// The package root of `name` under `install_root`.
pub fn package_root(install_root: &str, name: &str) -> String {
    Path::new(install_root).join(name).display().to_string()
}
