//! `harness-shim shim-server-2`: the shim server of one harnessd, which forks the
//! supervisor of each local service (see `deployer::process`). It is a binary of its
//! own, not a mode of harnessd, so that what every shim is forked from is small.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd] if cmd == deployer::process::SHIM_SERVER_COMMAND => {
            ExitCode::from(u8::try_from(deployer::process::serve_shims()).unwrap_or(1))
        }
        _ => {
            eprintln!(
                "usage: harness-shim {} (started by harnessd of the same version, not by hand)",
                deployer::process::SHIM_SERVER_COMMAND
            );
            ExitCode::from(2)
        }
    }
}
