//! Checks on the canonical model (names, dependencies, cycles, targets) and the start
//! order derived from the dependency graph.
//!
//! These run on every config, whether parsed from YAML (the parser then adds lines) or
//! received over the wire by `config.apply` (no lines).

use std::collections::{BTreeMap, BTreeSet};

use super::error::{did_you_mean, ConfigError, ConfigErrors};
use super::model::*;
use super::read::join;

/// The kinds of service [`DiscoveredTarget::kind`] may name.
pub const DISCOVERY_KINDS: [&str; 4] = ["postgresql", "redis", "http", "ssh"];

/// Checks a canonical config; every problem is returned. Errors have no line numbers
/// (the config did not come from a file); `file` is the name shown in them.
pub fn validate(config: &StackConfig, file: &str) -> Result<(), ConfigErrors> {
    let problems = problems(config, file);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(problems))
    }
}

/// Why a secret of the stack (`secrets`: owning service, variable, value) would show in
/// `ps`: its value (of [`MIN_SECRET_CHARS`] or more) is in a command the harness runs for
/// `svc`. Checked on the config as written and, in the
/// daemon, on the config with `${VAR}` resolved. The message names the variable and
/// where, never the value.
fn secret_in_a_command(
    service: &str,
    svc: &ServiceConfig,
    secrets: &[(&str, &str, &str)],
) -> Option<String> {
    let health: Vec<&str> = match svc.health_check.as_ref().map(|h| &h.check) {
        Some(CheckKind::Command { command, args, .. }) => std::iter::once(command)
            .chain(args)
            .map(String::as_str)
            .collect(),
        Some(CheckKind::Script { path, args }) => std::iter::once(path)
            .chain(args)
            .map(String::as_str)
            .collect(),
        _ => Vec::new(),
    };
    let targets = std::iter::once(&svc.target).chain(&svc.placement);
    for &(owner, name, value) in secrets {
        if value.chars().count() < MIN_SECRET_CHARS {
            continue;
        }
        let place = if targets
            .clone()
            .any(|t| t.command_words().iter().any(|w| w.contains(value)))
        {
            "a command it runs"
        } else if health.iter().any(|w| w.contains(value)) {
            "its health check's command"
        } else {
            continue;
        };
        let whose = if owner == service {
            String::new()
        } else {
            format!(" (of service {owner})")
        };
        return Some(format!(
            "the value of secret {name}{whose} is in {place}, where `ps` shows it to every user of the host: pass it in the environment ({name}) and read it there"
        ));
    }
    None
}

/// Collects problems keyed by canonical dotted paths.
struct Problems<'a> {
    file: &'a str,
    list: Vec<ConfigError>,
}

impl Problems<'_> {
    fn add(&mut self, key: String, message: impl Into<String>) {
        let file = self.file.to_owned();
        self.list.push(ConfigError {
            file,
            line: None,
            column: None,
            key,
            message: message.into(),
        });
    }
}

/// Every problem of `config`, keyed by canonical paths and without lines.
pub(crate) fn problems(config: &StackConfig, file: &str) -> Vec<ConfigError> {
    let mut p = Problems {
        file,
        list: Vec::new(),
    };
    if let Some(problem) = config.name.as_deref().and_then(stack_name_problem) {
        p.add("name".into(), problem);
    }
    if config.settings.max_parallel == Some(0) {
        p.add("settings.max_parallel".into(), "must be at least 1");
    }
    check_network(&mut p, &config.network);
    check_discovery(&mut p, "discovery", &config.discovery);
    for (name, host) in &config.hosts {
        check_host(&mut p, &join("hosts", name), host);
    }
    // Every service's secrets, with their owner: one service's may not be in another's
    // commands either.
    let secrets: Vec<(&str, &str, &str)> = config
        .services
        .iter()
        .flat_map(|(owner, s)| {
            s.secret_values()
                .into_iter()
                .map(move |(name, value)| (owner.as_str(), name, value))
        })
        .collect();
    for (name, svc) in &config.services {
        check_service(&mut p, config, name, svc);
        if let Some(reason) = secret_in_a_command(name, svc, &secrets) {
            let at = if svc.secret_env.is_empty() {
                "target"
            } else {
                "secret_env"
            };
            p.add(join(&join("services", name), at), reason);
        }
        if let Some(sig) = svc
            .stop_signal
            .as_deref()
            .filter(|s| super::signal_number(s).is_none())
        {
            p.add(
                join(&join("services", name), "stop_signal"),
                format!("unknown signal {sig:?}: use a name such as TERM, INT, QUIT, HUP or KILL"),
            );
        }
    }
    for cycle in cycles(config) {
        let key = format!("services.{}.depends_on.{}", cycle[0], cycle[1]);
        p.add(key, format!("dependency cycle: {}", cycle.join(" -> ")));
    }
    p.list
}

fn check_network(p: &mut Problems<'_>, network: &NetworkConfig) {
    if network.listen_port == Some(0) {
        p.add("network.listen_port".into(), bad_port_message("0"));
    }
    if let Some(subnet) = &network.wireguard_subnet {
        if !is_cidr(subnet) {
            p.add(
                "network.wireguard_subnet".into(),
                format!("bad subnet {subnet:?}: expected an address/prefix such as 10.42.0.0/16"),
            );
        }
    }
}

fn check_discovery(p: &mut Problems<'_>, key: &str, d: &DiscoveryOptions) {
    for (i, s) in d.strategies.iter().enumerate() {
        if !DISCOVERY_STRATEGIES.contains(&s.as_str()) {
            let message = format!(
                "unknown strategy {s:?}: expected one of {}",
                DISCOVERY_STRATEGIES.join(", ")
            );
            p.add(format!("{key}.strategies[{i}]"), message);
        }
    }
    check_ranges(p, &join(key, "ranges"), &d.ranges);
    for (i, server) in d.dns_servers.iter().enumerate() {
        if dns_server_address(server).is_none() {
            let message = format!("bad DNS server {server:?}: expected an IP address or ip:port");
            p.add(format!("{key}.dns_servers[{i}]"), message);
        }
    }
    if d.concurrency == Some(0) {
        p.add(join(key, "concurrency"), "must be at least 1");
    }
}

fn check_ranges(p: &mut Problems<'_>, key: &str, ranges: &[String]) {
    for (i, range) in ranges.iter().enumerate() {
        if let Err(e) = super::AddressRange::parse(range) {
            p.add(format!("{key}[{i}]"), e);
        }
    }
}

/// A DNS server given as `ip` (port 53) or `ip:port` / `[v6]:port`.
pub fn dns_server_address(text: &str) -> Option<std::net::SocketAddr> {
    let text = text.trim();
    text.parse::<std::net::SocketAddr>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, 53))
    })
}

fn check_host(p: &mut Problems<'_>, key: &str, host: &HostConfig) {
    if host.address.trim().is_empty() {
        p.add(
            join(key, "address"),
            "a host needs `address` (an IP address or host name)",
        );
    }
    if host.port == Some(0) {
        p.add(join(key, "port"), bad_port_message("0"));
    }
    if let Some(policy) = &host.host_key_checking {
        if !HOST_KEY_POLICIES.contains(&policy.as_str()) {
            p.add(
                join(key, "host_key_checking"),
                format!("bad host_key_checking {policy:?}: use `strict` or `accept-new`"),
            );
        }
    }
}

/// Values of `host_key_checking`.
pub const HOST_KEY_POLICIES: [&str; 2] = ["strict", "accept-new"];

fn check_service(p: &mut Problems<'_>, config: &StackConfig, name: &str, svc: &ServiceConfig) {
    let key = join("services", name);
    if !is_service_name(name) {
        let message = format!(
            "bad service name {name:?}: use lower-case letters, digits, `-` and `_`, starting with a letter or digit (names become environment variable and file names)"
        );
        p.add(key.clone(), message);
    }
    if svc.port == Some(PortSpec::Fixed(0)) {
        p.add(join(&key, "port"), bad_port_message("0"));
    }
    if svc.reuse_if_running && !matches!(svc.port, Some(PortSpec::Fixed(_))) {
        p.add(
            join(&key, "reuse_if_running"),
            "reuse_if_running needs a fixed `port:`, where a running instance would answer",
        );
    }
    for dep in svc.depends_on.keys() {
        let dep_key = format!("{key}.depends_on.{dep}");
        if dep == name {
            p.add(dep_key, format!("`{name}` depends on itself"));
        } else if !config.services.contains_key(dep) {
            let others = config
                .services
                .keys()
                .map(String::as_str)
                .filter(|s| *s != name);
            let hint = did_you_mean(dep, others)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            p.add(dep_key, format!("unknown dependency `{dep}`{hint}"));
        }
    }
    check_env(p, &join(&key, "env"), &svc.env);
    if svc.placement.is_empty() {
        check_target(p, &join(&key, "target"), &svc.target);
    }
    for (i, target) in svc.placement.iter().enumerate() {
        let at = format!("{key}.target[{i}]");
        if let Target::RemoteLan(t) | Target::Wireguard(t) = target {
            if !t.hosts.is_empty() {
                let message = "a target in a placement list runs on one host: use `host:`";
                p.add(join(&join(&at, target.backend()), "hosts"), message);
            }
        }
        check_target(p, &at, target);
    }
    if let Some(check) = &svc.health_check {
        check_health(p, &join(&key, "health_check"), check);
    }
}

fn check_env(p: &mut Problems<'_>, key: &str, env: &BTreeMap<String, String>) {
    for name in env.keys().filter(|n| !is_env_name(n)) {
        let message = format!(
            "bad variable name {name:?}: use letters, digits and `_`, not starting with a digit"
        );
        p.add(join(key, name), message);
    }
}

fn check_target(p: &mut Problems<'_>, key: &str, target: &Target) {
    let key = join(key, target.backend());
    match target {
        Target::Process(t) => {
            if t.binary.trim().is_empty() {
                p.add(
                    join(&key, "binary"),
                    "a process target needs `binary` (the program to run)",
                );
            }
            check_env(p, &join(&key, "env"), &t.env);
        }
        Target::Docker(t) => {
            if t.image.trim().is_empty() {
                p.add(join(&key, "image"), "a docker target needs `image`");
            }
            if let Some(pull) = t
                .pull
                .as_deref()
                .filter(|s| !["never", "missing", "always"].contains(s))
            {
                p.add(
                    join(&key, "pull"),
                    format!("bad pull policy {pull:?}: expected never, missing or always"),
                );
            }
            for (i, port) in t.ports.iter().enumerate() {
                if let Err(e) = PortMapping::parse(port) {
                    p.add(join(&key, &format!("ports[{i}]")), e);
                }
            }
            if t.build.is_some() && t.rootfs.is_some() {
                p.add(
                    join(&key, "rootfs"),
                    "give either `build` or `rootfs`, not both",
                );
            }
            check_env(p, &join(&key, "env"), &t.env);
        }
        Target::RemoteLan(t) | Target::Wireguard(t) => {
            check_remote(p, &key, t);
            if matches!(target, Target::RemoteLan(_)) && t.wireguard_key.is_some() {
                p.add(
                    join(&key, "wireguard_key"),
                    "`wireguard_key` is for `wireguard` targets: a remote_lan service is not on the mesh",
                );
            }
        }
        Target::Discovered(t) => {
            if !DISCOVERY_KINDS.contains(&t.kind.as_str()) {
                let hint = did_you_mean(&t.kind, DISCOVERY_KINDS)
                    .map(|s| format!("did you mean `{s}`? "))
                    .unwrap_or_default();
                let message = format!(
                    "unknown discovery type {:?}: {hint}expected one of {}",
                    t.kind,
                    DISCOVERY_KINDS.join(", ")
                );
                p.add(join(&key, "type"), message);
            }
            check_ranges(p, &join(&key, "ranges"), &t.ranges);
        }
        Target::External(t) => {
            if !is_host_port(&t.address) {
                p.add(
                    join(&key, "address"),
                    format!("bad address {:?}: expected host:port", t.address),
                );
            }
        }
    }
}

fn check_remote(p: &mut Problems<'_>, key: &str, t: &RemoteTarget) {
    match (&t.binary, &t.package) {
        (None, None) => p.add(key.to_owned(), "a remote target needs `binary` (a program on the host) or `package` (a package to deploy)"),
        (Some(_), Some(_)) => p.add(join(key, "package"), "give either `binary` or `package`, not both"),
        _ => {}
    }
    match (&t.host, t.hosts.is_empty()) {
        (None, true) => p.add(
            key.to_owned(),
            "a remote target needs `host` (or `hosts: [...]` for several)",
        ),
        (Some(_), false) => p.add(
            join(key, "hosts"),
            "give either `host` or `hosts`, not both",
        ),
        _ => {}
    }
    if !t.args.is_empty() && t.binary.is_none() {
        p.add(
            join(key, "args"),
            "`args` go with `binary`; a package names its own command",
        );
    }
    check_env(p, &join(key, "env"), &t.env);
    if t.package.is_none() {
        for (name, set) in [
            ("pre_install", !t.pre_install.is_empty()),
            ("post_install", !t.post_install.is_empty()),
            ("keep_releases", t.keep_releases.is_some()),
        ] {
            if set {
                p.add(
                    join(key, name),
                    format!("`{name}` goes with `package`: releases are what it acts on"),
                );
            }
        }
    }
    if let Some(b) = &t.build {
        let bkey = join(key, "build");
        if t.package.is_none() {
            p.add(
                bkey.clone(),
                "`build` makes the program of a package: give `package:` a package directory",
            );
        }
        match b.kind.as_str() {
            "cargo" => {}
            "command" if b.command.is_none() || b.output.is_none() => p.add(
                bkey,
                "a `type: command` build needs `command` (what to run) and `output` (the program it makes)",
            ),
            "command" => {}
            other => p.add(
                join(&bkey, "type"),
                format!("bad build type {other:?}: use `cargo` or `command`"),
            ),
        }
    }
    if let Some(l) = &t.lifecycle {
        if !["simple", "systemd"].contains(&l.as_str()) {
            p.add(
                join(key, "lifecycle"),
                format!("bad lifecycle {l:?}: use `simple` or `systemd`"),
            );
        }
    }
    if t.keep_releases == Some(0) {
        p.add(
            join(key, "keep_releases"),
            "keep_releases must be at least 1 (the current release)",
        );
    }
}

fn check_health(p: &mut Problems<'_>, key: &str, check: &HealthCheck) {
    match &check.check {
        CheckKind::Http { url, .. } if url.trim().is_empty() => {
            p.add(join(key, "url"), "an http check needs `url`")
        }
        CheckKind::Tcp { port: Some(0), .. } => p.add(join(key, "port"), bad_port_message("0")),
        CheckKind::Command { command, .. } if command.trim().is_empty() => {
            p.add(join(key, "command"), "a command check needs `command`")
        }
        CheckKind::Script { path, .. } if path.trim().is_empty() => {
            p.add(join(key, "path"), "a script check needs `path`")
        }
        _ => {}
    }
    for (field, value) in [
        ("interval", check.interval_ms),
        ("timeout", check.timeout_ms),
    ] {
        if value == Some(0) {
            p.add(join(key, field), format!("`{field}` must be more than 0"));
        }
    }
}

fn bad_port_message(shown: &str) -> String {
    format!("bad port {shown}: expected a port number from 1 to 65535")
}

/// Longest stack name, in bytes.
pub const MAX_STACK_NAME_BYTES: usize = 64;

/// Why `name` cannot name a stack, if it cannot. A stack name is a directory name in
/// the state directory (its services' run files), so it must be one path component:
/// not empty, `.` or `..`, without `/` or control characters, and at most
/// [`MAX_STACK_NAME_BYTES`] bytes. Anything else goes, so that a stack can be named
/// after the directory its config is in.
pub fn stack_name_problem(name: &str) -> Option<String> {
    let why = if name.is_empty() {
        "it is empty".to_owned()
    } else if name == "." || name == ".." {
        "it is a relative directory".to_owned()
    } else if name.contains('/') {
        "it has a `/`".to_owned()
    } else if name.chars().any(char::is_control) {
        "it has a control character".to_owned()
    } else if name.len() > MAX_STACK_NAME_BYTES {
        format!("it is longer than {MAX_STACK_NAME_BYTES} bytes")
    } else {
        return None;
    };
    Some(format!(
        "bad stack name {name:?}: {why} (a stack name becomes a directory name in the state directory; pick another with `name:` or -p)"
    ))
}

/// `[a-z0-9][a-z0-9_-]*`: service names become env var prefixes and file names.
fn is_service_name(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.chars().next().is_some_and(ok) && name.chars().all(|c| ok(c) || c == '-' || c == '_')
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `host:port` with a non-empty host and a port from 1 to 65535. A value holding a
/// `${VAR}` reference passes: it is checked again, resolved, when the daemon gets it.
fn is_host_port(address: &str) -> bool {
    if address.contains("${") {
        return true;
    }
    ExternalTarget {
        address: address.to_owned(),
    }
    .host_port()
    .is_some()
}

/// `address/prefix` for IPv4 or IPv6 (or a `${VAR}` reference, see [`is_host_port`]).
fn is_cidr(subnet: &str) -> bool {
    if subnet.contains("${") {
        return true;
    }
    let Some((addr, prefix)) = subnet.split_once('/') else {
        return false;
    };
    let Ok(addr) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u8>().is_ok_and(|p| p <= max)
}

/// The dependencies of `name` that exist and are not itself (others are reported
/// elsewhere and must not stop ordering).
fn deps<'a>(config: &'a StackConfig, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    config.services[name]
        .depends_on
        .keys()
        .map(String::as_str)
        .filter(move |d| *d != name && config.services.contains_key(*d))
}

/// Each dependency cycle once, as `[a, b, a]`, found by a depth-first walk in name order.
fn cycles(config: &StackConfig) -> Vec<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Active,
        Done,
    }
    fn walk<'a>(
        config: &'a StackConfig,
        name: &'a str,
        marks: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
        found: &mut Vec<Vec<String>>,
    ) {
        marks.insert(name, Mark::Active);
        stack.push(name);
        for dep in deps(config, name) {
            match marks.get(dep) {
                None => walk(config, dep, marks, stack, found),
                Some(Mark::Active) => {
                    // 1. The cycle is the part of the stack from `dep` to here...
                    let start = stack.iter().position(|n| *n == dep).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        stack[start..].iter().map(|s| s.to_string()).collect();
                    // 2. ...closed by the edge back to `dep`.
                    cycle.push(dep.to_owned());
                    found.push(cycle);
                }
                Some(Mark::Done) => {}
            }
        }
        stack.pop();
        marks.insert(name, Mark::Done);
    }
    let mut marks = BTreeMap::new();
    let mut found = Vec::new();
    for name in config.services.keys() {
        if !marks.contains_key(name.as_str()) {
            walk(config, name, &mut marks, &mut Vec::new(), &mut found);
        }
    }
    found
}

/// Services in the order they start: each after its dependencies, alphabetical among
/// those ready at the same time. Services caught in a cycle (which `validate` rejects)
/// come last, alphabetically, so none is ever lost.
pub fn start_order(config: &StackConfig) -> Vec<String> {
    // Kahn's algorithm with the ready set kept sorted; each service's dependents are
    // found once, so the daemon's every `up` of a large stack stays cheap.
    let mut waiting: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for name in config.services.keys() {
        let mut count = 0;
        for dep in deps(config, name) {
            count += 1;
            dependents.entry(dep).or_default().push(name);
        }
        waiting.insert(name, count);
    }
    let mut ready: BTreeSet<&str> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(s, _)| *s)
        .collect();
    let mut order = Vec::with_capacity(config.services.len());
    while let Some(next) = ready.pop_first() {
        waiting.remove(next);
        order.push(next.to_owned());
        for dependent in dependents.get(next).into_iter().flatten() {
            if let Some(count) = waiting.get_mut(dependent) {
                *count -= 1;
                if *count == 0 {
                    ready.insert(dependent);
                }
            }
        }
    }
    order.extend(waiting.into_keys().map(str::to_owned));
    order
}

/// Services grouped in waves that may start together: wave 0 has no dependencies, wave
/// N depends only on earlier waves; each wave is sorted. Services in a cycle form a last
/// wave.
pub fn dependency_waves(config: &StackConfig) -> Vec<Vec<String>> {
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut waves = Vec::new();
    while placed.len() < config.services.len() {
        let wave: Vec<&str> = config
            .services
            .keys()
            .map(String::as_str)
            .filter(|n| !placed.contains(n) && deps(config, n).all(|d| placed.contains(d)))
            .collect();
        if wave.is_empty() {
            let rest = config
                .services
                .keys()
                .map(String::as_str)
                .filter(|n| !placed.contains(n));
            waves.push(rest.map(str::to_owned).collect());
            break;
        }
        placed.extend(wave.iter().copied());
        waves.push(wave.into_iter().map(str::to_owned).collect());
    }
    waves
}
