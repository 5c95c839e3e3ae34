//! `harness`: the thin CLI over the harnessd protocol. See `harness --help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let opts = cli::Cli::parse();
    match smol::block_on(cli::run(opts)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
