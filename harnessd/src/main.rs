//! `harnessd`: the harness daemon binary. `harnessd` runs the daemon in the foreground;
//! `harnessd shim-server-2` forks the supervisor of each local service (started by the
//! daemon itself when `harness-shim` is not installed beside it).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "harnessd",
    bin_name = "harnessd",
    version,
    about = "The harness daemon"
)]
struct Opts {
    /// State directory (default: $HARNESS_STATE_DIR, $XDG_STATE_HOME/harness, ~/.local/state/harness).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7461 for the default state directory, 127.0.0.1:0 otherwise).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// CA certificate (PEM) for mutual TLS: clients on other machines must present a
    /// certificate it signed. Required to listen on anything but loopback.
    #[arg(long, value_name = "CA.pem")]
    client_ca: Option<PathBuf>,
    /// A name (DNS or IP) remote clients use for this daemon, for its certificate
    /// (repeatable; a specific --listen address is added on its own).
    #[arg(long = "server-name", value_name = "NAME")]
    server_names: Vec<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fork the supervisor of each local service (internal: harnessd starts it).
    #[command(name = deployer::process::SHIM_SERVER_COMMAND, hide = true)]
    ShimServer,
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    if let Some(Cmd::ShimServer) = &opts.cmd {
        let code = deployer::process::serve_shims();
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HARNESS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let (default_dir, is_default) = protocol::state_dir_from_env(&|k| std::env::var(k).ok());
    let state_dir = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| default_dir.clone());
    // The shim server: the small `harness-shim` installed beside harnessd (each shim
    // is a fork of it), else harnessd itself (`harnessd shim-server-2`) through
    // /proc/self/exe, which keeps working when the file on disk was replaced by a
    // rebuild or an upgrade.
    let shim_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("harness-shim")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    let daemon_opts = harnessd::DaemonOpts {
        default_state_dir: is_default && state_dir == default_dir,
        state_dir,
        listen: opts.listen,
        shim_exe,
        client_ca: opts.client_ca.clone(),
        server_names: opts.server_names.clone(),
    };
    match harnessd::run(daemon_opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("harnessd: {e}");
            match e {
                // A distinct code, so `harness up` racing another start knows to wait
                // for the winner instead of failing.
                harnessd::DaemonError::Registry(registry::RegistryError::Locked { .. }) => {
                    ExitCode::from(protocol::EXIT_STATE_DIR_LOCKED)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}
