//! `harness-shim shim SPEC`: the supervisor of one local service (see
//! `deployer::process`). harnessd starts it; it is a binary of its own, not a mode of
//! harnessd, because it is exec'd once per service start and a small binary starts
//! several times faster than the daemon's.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, spec] if cmd == "shim" => {
            let code = deployer::process::run_shim(spec.as_ref());
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        _ => {
            eprintln!("usage: harness-shim shim SPEC (started by harnessd, not by hand)");
            ExitCode::from(2)
        }
    }
}
