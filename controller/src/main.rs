//! The `wavegate` binary: parse the command line, start telemetry, run, map
//! the outcome to an exit status (0 ok, 1 failed, 2 bad input or usage, 3
//! refused by a gate).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = wavegate::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match wavegate::cli::run(cli).await {
        Ok(status) => ExitCode::from(status),
        Err(err) => {
            eprintln!("wavegate: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
