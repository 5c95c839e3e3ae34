//! The client's resolution of a parsed config before it is sent to the daemon: `${VAR}`
//! from the caller's environment, then `~` and relative paths from the config file's
//! directory. Pure string work; nothing here touches the file system.
//!
//! Fields fall into two groups. Those the daemon templates again for each caller (env
//! values, args, binaries, health checks) keep their `${svc.field}` references and `$$`
//! escapes; the others (paths, images, hosts) are final after this pass, so a service
//! reference in them is an error.

use std::collections::BTreeMap;

use super::error::{ConfigError, ConfigErrors};
use super::model::*;
use super::read::join;
use super::template::{self, TemplateError};

/// Walks the templated fields of a config, collecting errors.
struct Pass<'l> {
    lookup: &'l mut dyn FnMut(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

impl Pass<'_> {
    fn done(&mut self, key: String, result: Result<String, TemplateError>, value: &mut String) {
        match result {
            Ok(expanded) => *value = expanded,
            Err(e) => self.errors.push(ConfigError {
                file: String::new(),
                line: None,
                column: None,
                key,
                message: e.to_string(),
            }),
        }
    }

    /// A field the daemon templates again: keep `${svc.field}` and `$$`.
    fn daemon(&mut self, key: String, value: &mut String) {
        let result = template::expand_env_keeping_refs(value, self.lookup);
        self.done(key, result, value);
    }

    /// A field used as it is after this pass.
    fn client(&mut self, key: String, value: &mut String) {
        let result = template::expand_env_only(value, self.lookup);
        self.done(key, result, value);
    }

    fn client_opt(&mut self, key: String, value: &mut Option<String>) {
        if let Some(v) = value {
            self.client(key, v);
        }
    }

    fn daemon_list(&mut self, key: &str, values: &mut [String]) {
        for (i, v) in values.iter_mut().enumerate() {
            self.daemon(format!("{key}[{i}]"), v);
        }
    }

    fn client_list(&mut self, key: &str, values: &mut [String]) {
        for (i, v) in values.iter_mut().enumerate() {
            self.client(format!("{key}[{i}]"), v);
        }
    }

    fn daemon_map(&mut self, key: &str, values: &mut BTreeMap<String, String>) {
        for (name, v) in values.iter_mut() {
            self.daemon(join(key, name), v);
        }
    }

    fn host(&mut self, key: &str, h: &mut HostConfig) {
        self.client(join(key, "address"), &mut h.address);
        self.client_opt(join(key, "user"), &mut h.user);
        self.client_opt(join(key, "ssh_key"), &mut h.ssh_key);
        self.client_opt(join(key, "known_hosts"), &mut h.known_hosts);
        self.client_opt(join(key, "install_root"), &mut h.install_root);
    }

    fn service(&mut self, key: &str, s: &mut ServiceConfig) {
        self.daemon_map(&join(key, "env"), &mut s.env);
        self.client_opt(join(key, "env_file"), &mut s.env_file);
        let target_key = join(&join(key, "target"), s.target.backend());
        self.target(&target_key, &mut s.target);
        if let Some(check) = &mut s.health_check {
            self.check(&join(key, "health_check"), &mut check.check);
        }
    }

    fn target(&mut self, key: &str, target: &mut Target) {
        match target {
            Target::Process(t) => {
                self.daemon(join(key, "binary"), &mut t.binary);
                self.daemon_list(&join(key, "args"), &mut t.args);
                self.daemon_map(&join(key, "env"), &mut t.env);
                self.client_opt(join(key, "working_dir"), &mut t.working_dir);
            }
            Target::Docker(t) => {
                self.client(join(key, "image"), &mut t.image);
                self.client_opt(join(key, "pull"), &mut t.pull);
                self.daemon_list(&join(key, "command"), &mut t.command);
                self.daemon_list(&join(key, "entrypoint"), &mut t.entrypoint);
                self.daemon_map(&join(key, "env"), &mut t.env);
                self.client_list(&join(key, "ports"), &mut t.ports);
                self.client_list(&join(key, "volumes"), &mut t.volumes);
                self.client_opt(join(key, "working_dir"), &mut t.working_dir);
                self.client_opt(join(key, "user"), &mut t.user);
                self.client_list(&join(key, "extra_hosts"), &mut t.extra_hosts);
                self.client_opt(join(key, "build"), &mut t.build);
                self.client_opt(join(key, "dockerfile"), &mut t.dockerfile);
                self.client_opt(join(key, "rootfs"), &mut t.rootfs);
            }
            Target::RemoteLan(t) | Target::Wireguard(t) => {
                self.client_opt(join(key, "host"), &mut t.host);
                self.client_list(&join(key, "hosts"), &mut t.hosts);
                self.client_opt(join(key, "user"), &mut t.user);
                self.client_opt(join(key, "ssh_key"), &mut t.ssh_key);
                self.client_opt(join(key, "package"), &mut t.package);
                if let Some(binary) = &mut t.binary {
                    self.daemon(join(key, "binary"), binary);
                }
                self.daemon_list(&join(key, "args"), &mut t.args);
                self.daemon_map(&join(key, "env"), &mut t.env);
            }
            Target::Discovered(t) => self.client_list(&join(key, "ranges"), &mut t.ranges),
            Target::External(t) => self.client(join(key, "address"), &mut t.address),
        }
    }

    fn check(&mut self, key: &str, check: &mut CheckKind) {
        match check {
            CheckKind::Http { url, .. } => self.daemon(join(key, "url"), url),
            CheckKind::Tcp { host, .. } => {
                if let Some(host) = host {
                    self.daemon(join(key, "host"), host);
                }
            }
            CheckKind::Command { command, args, .. } => {
                self.daemon(join(key, "command"), command);
                self.daemon_list(&join(key, "args"), args);
            }
            CheckKind::Script { path, args } => {
                self.daemon(join(key, "path"), path);
                self.daemon_list(&join(key, "args"), args);
            }
        }
    }
}

impl StackConfig {
    /// Expands `${VAR}` and `${VAR:-default}` from `lookup` (the caller's environment) in
    /// every field users template. References whose name holds a dot (`${db.addr}`,
    /// `${self.port}`) are left for the daemon in env values, args, binaries and health
    /// checks, and are an error in paths, images and host fields, which the daemon uses
    /// as they are. Every unresolved variable is reported, under its dotted key.
    pub fn resolve_environment(
        &mut self,
        lookup: &mut dyn FnMut(&str) -> Option<String>,
    ) -> Result<(), ConfigErrors> {
        let mut pass = Pass {
            lookup,
            errors: Vec::new(),
        };
        if let Some(subnet) = &mut self.network.wireguard_subnet {
            pass.client("network.wireguard_subnet".into(), subnet);
        }
        for (name, host) in &mut self.hosts {
            pass.host(&join("hosts", name), host);
        }
        for (name, service) in &mut self.services {
            pass.service(&join("services", name), service);
        }
        if pass.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(pass.errors))
        }
    }

    /// Makes local paths absolute against `base_dir` (the config file's directory, itself
    /// absolute) and expands a leading `~/` with `home`: env files, working directories
    /// (a process runs in `base_dir` unless told otherwise), script checks, SSH keys,
    /// known_hosts files, packages, the host side of docker bind mounts, and process
    /// binaries written with a `/` (a bare `sh` is left for the PATH lookup). Paths on
    /// remote hosts are left alone.
    pub fn resolve_paths(&mut self, base_dir: &str, home: Option<&str>) {
        let paths = Paths {
            base: base_dir.trim_end_matches('/'),
            home,
        };
        paths.fix_opt(&mut self.network.hub_key);
        for host in self.hosts.values_mut() {
            paths.fix_opt(&mut host.ssh_key);
            paths.fix_opt(&mut host.known_hosts);
        }
        for service in self.services.values_mut() {
            paths.fix_opt(&mut service.env_file);
            if let Some(HealthCheck {
                check: CheckKind::Script { path, .. },
                ..
            }) = &mut service.health_check
            {
                *path = paths.templated(path);
            }
            match &mut service.target {
                Target::Process(t) => {
                    if t.binary.contains('/') {
                        t.binary = paths.templated(&t.binary);
                    }
                    t.working_dir = Some(
                        t.working_dir
                            .take()
                            .map_or_else(|| base_dir.to_owned(), |d| paths.fix(&d)),
                    );
                }
                Target::Docker(t) => {
                    for volume in &mut t.volumes {
                        *volume = paths.bind_mount(volume);
                    }
                    paths.fix_opt(&mut t.build);
                    paths.fix_opt(&mut t.rootfs);
                }
                Target::RemoteLan(t) | Target::Wireguard(t) => {
                    paths.fix_opt(&mut t.ssh_key);
                    paths.fix_opt(&mut t.wireguard_key);
                    paths.fix_opt(&mut t.package);
                    if let Some(b) = &mut t.build {
                        b.dir = Some(
                            b.dir
                                .take()
                                .map_or_else(|| base_dir.to_owned(), |d| paths.fix(&d)),
                        );
                        paths.fix_opt(&mut b.manifest);
                        paths.fix_opt(&mut b.output);
                    }
                }
                Target::Discovered(_) | Target::External(_) => {}
            }
        }
    }
}

/// Where relative paths and `~` lead.
struct Paths<'a> {
    base: &'a str,
    home: Option<&'a str>,
}

impl Paths<'_> {
    /// `path` made absolute; absolute paths, templates (`${self...}`) and empty strings
    /// stay as they are, as does `~` without a home.
    fn fix(&self, path: &str) -> String {
        self.join(path, self.base, self.home)
    }

    fn fix_opt(&self, path: &mut Option<String>) {
        if let Some(p) = path {
            *p = self.fix(p);
        }
    }

    /// [`Self::fix`] for a field the daemon templates again: a `$` in the base or home
    /// directory must reach it as `$$`.
    fn templated(&self, path: &str) -> String {
        let base = self.base.replace('$', "$$");
        let home = self.home.map(|h| h.replace('$', "$$"));
        self.join(path, &base, home.as_deref())
    }

    fn join(&self, path: &str, base: &str, home: Option<&str>) -> String {
        if let Some(home) = home {
            if path == "~" {
                return home.to_owned();
            }
            if let Some(rest) = path.strip_prefix("~/") {
                return format!("{}/{rest}", home.trim_end_matches('/'));
            }
        }
        if path == "." {
            return base.to_owned();
        }
        if path.is_empty()
            || path.starts_with('/')
            || path.starts_with('~')
            || path.starts_with("${")
        {
            return path.to_owned();
        }
        let rest = path.strip_prefix("./").unwrap_or(path);
        format!("{base}/{rest}")
    }

    /// `./data:/var/lib/app[:ro]`: the host side when it is a path (`.`, `..` or `~`
    /// first); a named volume (`pgdata:/var/lib/...`) stays as it is.
    fn bind_mount(&self, volume: &str) -> String {
        let (host, rest) = volume.split_once(':').unwrap_or((volume, ""));
        if !(host.starts_with('.') || host.starts_with('~')) {
            return volume.to_owned();
        }
        let host = self.fix(host);
        if rest.is_empty() {
            host
        } else {
            format!("{host}:{rest}")
        }
    }
}
