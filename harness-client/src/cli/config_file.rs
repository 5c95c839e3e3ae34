//! Finding and loading the config file on the client side: the CLI resolves `${VAR}`
//! from the caller's environment and paths from the file's directory before it applies
//! the config (DESIGN.md "Who resolves what").

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use protocol::config::{self, StackConfig};

use super::GlobalOpts;

/// Names the config file is found under, in order.
pub const CONFIG_NAMES: &[&str] = &["harness.yaml", "services.yaml"];

/// A loaded, resolved config.
pub struct Loaded {
    /// The file.
    pub path: PathBuf,
    /// Stack name.
    pub stack: String,
    /// Resolved config.
    pub config: StackConfig,
}

/// The config file: `-f`, else harness.yaml or services.yaml in the working directory.
pub fn find(opts: &GlobalOpts) -> Option<PathBuf> {
    if let Some(f) = &opts.file {
        return Some(f.clone());
    }
    CONFIG_NAMES.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Loads, validates and resolves the config file.
pub fn load(opts: &GlobalOpts) -> anyhow::Result<Loaded> {
    let Some(path) = find(opts) else {
        bail!("no harness.yaml or services.yaml in this directory; pass -f FILE or create one with `harness init`");
    };
    let path = std::path::absolute(&path).with_context(|| format!("{}", path.display()))?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let shown = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let dir = path.parent().unwrap_or(Path::new("/"));
    let hosts = match &opts.hosts_file {
        Some(file) => Some((
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read hosts file {}", file.display()))?,
            file.display().to_string(),
        )),
        None => None,
    };
    let hosts = hosts.as_ref().map(|(t, f)| (t.as_str(), f.as_str()));
    let mut config = if config::is_compose_file_name(&shown) {
        let imported = import(&path)?;
        config::parse_stack_with_hosts(&imported.yaml, &format!("{shown} (as imported)"), hosts)
    } else {
        config::parse_stack_with_hosts(&text, &shown, hosts)
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    config
        .resolve_environment(&mut |k| std::env::var(k).ok())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let home = std::env::var("HOME").ok();
    config.resolve_paths(&dir.display().to_string(), home.as_deref());
    let stack = stack_name(opts, Some(&config), dir);
    Ok(Loaded {
        path,
        stack,
        config,
    })
}

/// Translates a docker compose file into harness.yaml text; tells stderr what it could
/// not translate. The stack is named after the file's `name:`, else its directory.
pub fn import(path: &Path) -> anyhow::Result<config::ComposeImport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let shown = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let dir = std::path::absolute(path)?
        .parent()
        .and_then(|d| d.file_name())
        .map_or_else(
            || "default".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
    let imported =
        config::import_compose(&text, &shown, &dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    for note in &imported.untranslated {
        eprintln!("warning: {note}");
    }
    Ok(imported)
}

/// Stack name: `-p`, else `name:` in the config, else the config directory's name.
pub fn stack_name(opts: &GlobalOpts, config: Option<&StackConfig>, dir: &Path) -> String {
    opts.stack
        .clone()
        .or_else(|| config.and_then(|c| c.name.clone()))
        .unwrap_or_else(|| {
            dir.file_name().map_or_else(
                || "default".to_owned(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
}

/// The stack commands act on: `-p`, else the config file's stack; `None` when neither.
pub fn current_stack(opts: &GlobalOpts) -> anyhow::Result<Option<String>> {
    if let Some(s) = &opts.stack {
        return Ok(Some(s.clone()));
    }
    match find(opts) {
        Some(_) => Ok(Some(load(opts)?.stack)),
        None => Ok(None),
    }
}

/// The stack, or an error saying how to name one.
pub fn require_stack(opts: &GlobalOpts) -> anyhow::Result<String> {
    current_stack(opts)?
        .context("no stack: run in a directory with harness.yaml, or pass -f FILE or -p STACK")
}

/// The commented config `harness init` writes.
pub const TEMPLATE: &str = r#"# harness.yaml: the services of this stack. `harness up` starts them all.
version: "1"
# name: mystack             # stack name (default: this directory's name)
settings:
  max_parallel: 8           # services started at once
  default_timeout: 120      # seconds `up` waits for a service to become healthy
services:
  db:
    target:
      process:
        binary: sh          # any program; relative paths are relative to this file
        args: ["-c", "exec python3 -m http.server ${self.port} --bind 127.0.0.1"]
    port: auto              # the harness picks a free port; ${self.port} is it
    health_check: { type: tcp, interval: 5s }
  api:
    target:
      process:
        binary: sh
        # DB_ADDR, DB_HOST and DB_PORT are injected because api depends on db
        args: ["-c", "echo db is at $DB_ADDR; exec python3 -m http.server ${self.port} --bind 127.0.0.1"]
    port: auto
    depends_on: { db: { condition: healthy } }
    env: { DATABASE_URL: "postgres://${db.addr}/app" }
    health_check: { type: http, url: "http://${self.addr}/", interval: 5s, retries: 3 }
    restart: on-failure     # no | on-failure | always (exponential backoff)
"#;
