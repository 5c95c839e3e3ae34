//! Building the program a package directory bundles (`build: {type: cargo}` or
//! `{type: command}`), and the package around it.

use std::path::{Path, PathBuf};

use protocol::config::BuildSpec;

use crate::package::{self, Package};
use crate::DeployError;

fn failed(what: &str, detail: impl Into<String>) -> DeployError {
    DeployError::Build {
        what: what.to_owned(),
        detail: detail.into(),
    }
}

/// The last lines of a command's error output, for messages.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs the build; returns the program it made.
pub async fn run(spec: &BuildSpec) -> Result<PathBuf, DeployError> {
    let dir = PathBuf::from(spec.dir.as_deref().unwrap_or("."));
    match spec.kind.as_str() {
        "cargo" => cargo(spec, &dir).await,
        "command" => {
            let command = spec.command.as_deref().unwrap_or_default();
            let out = smol::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .current_dir(&dir)
                .output()
                .await
                .map_err(|e| failed(command, e.to_string()))?;
            if !out.status.success() {
                return Err(failed(
                    command,
                    format!("{}: {}", out.status, tail(&out.stderr)),
                ));
            }
            let output = PathBuf::from(spec.output.as_deref().unwrap_or_default());
            if !output.is_file() {
                return Err(failed(
                    command,
                    format!("it did not make {}", output.display()),
                ));
            }
            Ok(output)
        }
        other => Err(failed("build", format!("unknown build type {other:?}"))),
    }
}

/// `cargo build`; the program is the executable cargo reports (JSON messages).
async fn cargo(spec: &BuildSpec, dir: &Path) -> Result<PathBuf, DeployError> {
    let mut cmd =
        smol::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.arg("build")
        .arg("--message-format=json-render-diagnostics")
        .arg("--profile")
        .arg(spec.profile.as_deref().unwrap_or("release"))
        .current_dir(dir);
    if let Some(m) = &spec.manifest {
        cmd.arg("--manifest-path").arg(m);
    }
    if let Some(b) = &spec.bin {
        cmd.arg("--bin").arg(b);
    }
    if let Some(t) = &spec.target {
        cmd.arg("--target").arg(t);
    }
    if !spec.features.is_empty() {
        cmd.arg("--features").arg(spec.features.join(","));
    }
    let shown = "cargo build";
    let out = cmd
        .output()
        .await
        .map_err(|e| failed(shown, e.to_string()))?;
    if !out.status.success() {
        return Err(failed(
            shown,
            format!("{}: {}", out.status, tail(&out.stderr)),
        ));
    }
    let executables: Vec<(String, PathBuf)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter_map(|m| {
            let exe = m["executable"].as_str()?;
            Some((m["target"]["name"].as_str()?.to_owned(), PathBuf::from(exe)))
        })
        .collect();
    let chosen = match &spec.bin {
        Some(b) => executables.iter().find(|(n, _)| n == b),
        None if executables.len() == 1 => executables.first(),
        None => None,
    };
    chosen.map(|(_, p)| p.clone()).ok_or_else(|| {
        failed(
            shown,
            format!(
                "cannot tell which program to package ({} built); name it with `bin:`",
                executables
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

/// Copies the package directory `src` to `stage` (made afresh), puts `program` (when
/// given) into its bin/ as `bin_name`, and builds the package into `out`.
pub fn package_with(
    src: &Path,
    program: Option<(&Path, &str)>,
    stage: &Path,
    out: &Path,
) -> Result<Package, DeployError> {
    let write = |path: &Path| {
        let path = path.to_owned();
        move |source| DeployError::WriteFile { path, source }
    };
    if stage.exists() {
        std::fs::remove_dir_all(stage).map_err(write(stage))?;
    }
    copy_tree(src, stage).map_err(write(stage))?;
    if let Some((program, name)) = program {
        let dest = stage.join("bin").join(name);
        std::fs::create_dir_all(stage.join("bin")).map_err(write(&dest))?;
        std::fs::copy(program, &dest).map_err(write(&dest))?;
    }
    package::build(stage, out)
}

/// Copies a directory tree (files, directories, symlinks as links).
fn copy_tree(src: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&from, &to)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else {
            std::fs::copy(&from, &to)?;
        }
    }
    Ok(())
}
