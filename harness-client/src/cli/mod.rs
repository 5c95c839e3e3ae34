//! The `harness` commands.

mod commands;
mod config_file;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub use commands::run;

/// `harness`: run and control stacks of services through harnessd.
#[derive(Parser)]
#[command(
    name = "harness",
    bin_name = "harness",
    version,
    about,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Options every command takes.
#[derive(Args, Clone)]
pub struct GlobalOpts {
    /// Config file (default: harness.yaml or services.yaml in the working directory).
    /// Given before the command (`harness -f FILE up`), as `-f` after `logs` means follow.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// A hosts file (named hosts, their SSH settings and the services each runs) merged
    /// into the config; relative paths in it are taken from the config file's directory.
    #[arg(long = "hosts", global = true, env = "HARNESS_HOSTS")]
    pub hosts_file: Option<PathBuf>,
    /// Stack name (default: `name:` in the config, else the config directory's name).
    #[arg(short = 'p', long = "project", global = true)]
    pub stack: Option<String>,
    /// State directory of the daemon (default: $HARNESS_STATE_DIR, $XDG_STATE_HOME/harness, ~/.local/state/harness).
    #[arg(long, global = true, env = "HARNESS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print JSON instead of tables (read commands).
    #[arg(long, global = true)]
    pub json: bool,
}

/// `harness package …`
#[derive(Subcommand)]
pub enum PackageCmd {
    /// Make NAME-VERSION.tar.zst from a package directory (manifest.yaml, bin/, scripts/start.sh...).
    Build {
        /// The package directory.
        dir: PathBuf,
        /// Where to write the package (default: beside the directory).
        #[arg(short = 'o', long)]
        output_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Write a commented harness.yaml to start from.
    Init,
    /// Check the config file and print the start order.
    Validate,
    /// Translate a docker compose file into a harness.yaml, naming what is not translated.
    Import {
        /// The compose file (e.g. docker-compose.yml).
        compose_file: PathBuf,
        /// Where to write the harness config (default: print it).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Apply the config and start services (all by default) with their dependencies; wait until healthy.
    Up {
        /// Services to start (default: all).
        services: Vec<String>,
    },
    /// `up` for the services on SSH hosts: package, send, install and start them, host by host in parallel.
    Deploy {
        /// Services (default: every service with a remote_lan target).
        services: Vec<String>,
        /// Only the instances on these hosts (names from `hosts:`).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Most hosts deployed to at once (default: the stack's max_parallel).
        #[arg(long)]
        max_concurrent: Option<usize>,
        /// Print every step and command without running any.
        #[arg(long)]
        dry_run: bool,
    },
    /// Find services that already run: tcp port scan, http endpoints, DNS SRV, mDNS.
    /// Options come from flags, else the DISCOVERY_* variables, else the config's
    /// `discovery:` section; with no range given only 127.0.0.1 is scanned.
    Discover(Box<DiscoverArgs>),
    /// Stop services (all by default); with no names, also forget the stack.
    Down {
        /// Services to stop and reset (default: the whole stack).
        services: Vec<String>,
        /// Also remove what they left on SSH hosts: run directories and releases.
        #[arg(long)]
        purge: bool,
    },
    /// Start services (and their dependencies) without re-applying the config.
    Start {
        /// Services (default: all).
        services: Vec<String>,
    },
    /// Stop services (and what depends on them).
    Stop {
        /// Services (default: all).
        services: Vec<String>,
    },
    /// Stop then start services.
    Restart {
        /// Services (default: all).
        services: Vec<String>,
    },
    /// Stop services and forget their runs (pids, ports, exit codes).
    Rm {
        /// Services.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// List services with state, health, backend, address and pid.
    #[command(alias = "status")]
    Ps,
    /// Print a service's log.
    Logs {
        /// Service.
        service: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end to start with.
        #[arg(short = 'n', long, default_value_t = 100)]
        tail: usize,
    },
    /// Run a command with a service's environment and working directory.
    Exec {
        /// Service.
        service: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Run health checks now.
    Health {
        /// Services (default: all).
        services: Vec<String>,
    },
    /// Print events as they happen.
    Events {
        /// Replay from this seq first.
        #[arg(long)]
        since: Option<u64>,
        /// Only these topics (service, daemon).
        #[arg(long)]
        topic: Vec<String>,
    },
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Make service packages.
    #[command(subcommand)]
    Package(PackageCmd),
    /// Control the daemon.
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// The stack's networks, its address table, and a reachability test.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// The WireGuard mesh: its peers, and cutting a node off.
    #[command(subcommand)]
    Mesh(MeshCmd),
    /// Print a one-time login link to the browser dashboard.
    Ui,
    /// Print a shell completion script (e.g. `harness completions bash > /etc/bash_completion.d/harness`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (harness.1 and one per command) into a directory.
    Man {
        /// Where to write them.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

/// `harness discover` options.
#[derive(Args, Clone, Default)]
pub struct DiscoverArgs {
    /// Strategies to run: tcp, http, dns, mdns (default: tcp and http, plus dns with
    /// --srv and mdns with --mdns-interface).
    #[arg(long = "strategy", value_delimiter = ',')]
    pub strategies: Vec<String>,
    /// CIDR ranges or addresses to scan (IPv4, at most a /16 in all).
    #[arg(
        long = "range",
        value_delimiter = ',',
        env = "DISCOVERY_NETWORK_RANGES"
    )]
    pub ranges: Vec<String>,
    /// Ports the tcp strategy tries.
    #[arg(long = "ports", value_delimiter = ',', env = "DISCOVERY_TCP_PORTS")]
    pub tcp_ports: Vec<u16>,
    /// Ports the http strategy asks for /health and /ready.
    #[arg(
        long = "http-ports",
        value_delimiter = ',',
        env = "DISCOVERY_HTTP_PORTS"
    )]
    pub http_ports: Vec<u16>,
    /// Connect timeout per probe: seconds, or a duration such as 200ms.
    #[arg(long = "timeout", env = "DISCOVERY_TCP_TIMEOUT", value_parser = parse_timeout)]
    pub tcp_timeout_ms: Option<u64>,
    /// Timeout of an HTTP request: seconds, or a duration.
    #[arg(long = "http-timeout", env = "DISCOVERY_HTTP_TIMEOUT", value_parser = parse_timeout)]
    pub http_timeout_ms: Option<u64>,
    /// Most connects in flight at once (default 256).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Probe every port, also of on-link addresses where no host answers ARP.
    #[arg(long)]
    pub probe_all: bool,
    /// DNS servers asked for SRV records (ip or ip:port; default: /etc/resolv.conf's).
    #[arg(long = "dns-server", value_delimiter = ',')]
    pub dns_servers: Vec<String>,
    /// SRV names to look up, e.g. _postgresql._tcp.example.internal.
    #[arg(long = "srv", value_delimiter = ',')]
    pub srv_names: Vec<String>,
    /// Interfaces to browse mDNS on.
    #[arg(long = "mdns-interface", value_delimiter = ',')]
    pub mdns_interfaces: Vec<String>,
    /// mDNS service types, e.g. _postgresql._tcp.local.
    #[arg(long = "mdns-type", value_delimiter = ',')]
    pub mdns_types: Vec<String>,
    /// How long to listen for mDNS answers: seconds, or a duration.
    #[arg(long = "mdns-wait", value_parser = parse_timeout)]
    pub mdns_wait_ms: Option<u64>,
    /// Look again even when the daemon has a fresh result of the same search.
    #[arg(long)]
    pub refresh: bool,
    /// Also write what was found as harness services (external targets) to FILE.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

/// `2` (seconds, as the DISCOVERY_*_TIMEOUT variables give it) or `200ms`, in ms.
fn parse_timeout(text: &str) -> Result<u64, String> {
    if let Ok(secs) = text.trim().parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok((secs * 1000.0).round() as u64);
        }
    }
    humantime::parse_duration(text.trim())
        .map(|d| d.as_millis() as u64)
        .map_err(|e| format!("expected seconds or a duration such as 200ms: {e}"))
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// The config as the daemon stores it (or as the file resolves when not applied).
    Show,
    /// The environment a service gets.
    Env {
        /// Service.
        service: String,
    },
    /// The config file with ${VAR}s and paths resolved, as `up` would apply it.
    Resolve,
    /// Dependencies and start order.
    Deps,
}

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// The networks the stack's services are on (host, docker, LAN hosts, mesh).
    List,
    /// Every service's address as a caller on the host, in a container, on a LAN host
    /// or on a mesh node reaches it.
    Show,
    /// Connect to those addresses for real: from this host to every service, and from
    /// each LAN or mesh service's host to its dependencies. Fails when one fails.
    Test,
}

#[derive(Subcommand)]
pub enum MeshCmd {
    /// The hub's peers: node, service, mesh address, handshake age, bytes.
    Peers,
    /// Cut a node off the mesh at once (its peer removed) and stop its services.
    Revoke {
        /// The node: its name in `hosts:`.
        node: String,
    },
}

#[derive(Subcommand)]
pub enum DaemonCmd {
    /// Start harnessd in the background (no-op when it runs).
    Start,
    /// Stop harnessd; services keep running unless --stop-services.
    Stop {
        /// Stop every service first.
        #[arg(long)]
        stop_services: bool,
    },
    /// Show whether harnessd runs, and where.
    Status,
}

/// Exit code for a failed command whose message was already printed.
pub fn failure() -> ExitCode {
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
