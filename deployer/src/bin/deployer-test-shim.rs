//! Test helper for deployer's integration tests, standing in for harnessd.
//!
//! `deployer-test-shim shim-server-2` is the shim server, as in `harness-shim`.
//! `deployer-test-shim spawn SPEC` spawns the service of SPEC (a JSON file) with this
//! executable as the shim server, prints the record as JSON and exits: a daemon that
//! dies right after starting a service.

use std::path::PathBuf;
use std::process::ExitCode;

use deployer::process::{self, ProcessSpec, ShimServer};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd] if cmd == process::SHIM_SERVER_COMMAND => {
            ExitCode::from(u8::try_from(process::serve_shims()).unwrap_or(1))
        }
        [cmd, spec] if cmd == "spawn" => match spawn(spec.into()) {
            Ok(record) => {
                println!("{record}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("deployer-test-shim: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!(
                "usage: deployer-test-shim {} | spawn SPEC",
                process::SHIM_SERVER_COMMAND
            );
            ExitCode::from(2)
        }
    }
}

fn spawn(spec_path: PathBuf) -> Result<String, Box<dyn std::error::Error>> {
    let spec: ProcessSpec = serde_json::from_slice(&std::fs::read(spec_path)?)?;
    let shims = ShimServer::new(&std::env::current_exe()?, "deployer-test");
    let record = smol::block_on(process::spawn(&spec, &shims))?;
    Ok(serde_json::to_string(&record)?)
}
