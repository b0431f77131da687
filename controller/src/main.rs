//! The `wavegate` binary: parse the command line, run, map the outcome to an
//! exit status (0 ok, 1 failed, 2 bad input or usage, 3 refused by a gate).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = wavegate::cli::Cli::parse();
    match wavegate::cli::run(cli) {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!("wavegate: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
