//! `harness-shim shim-server`: the shim server of one harnessd, which forks the
//! supervisor of each local service (see `deployer::process`). It is a binary of its
//! own, not a mode of harnessd, so that what every shim is forked from is small.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd] if cmd == "shim-server" => {
            ExitCode::from(u8::try_from(deployer::process::serve_shims()).unwrap_or(1))
        }
        _ => {
            eprintln!("usage: harness-shim shim-server (started by harnessd, not by hand)");
            ExitCode::from(2)
        }
    }
}
