//! The `wavegate` binary: parse the command line, start telemetry, run, map
//! the outcome to an exit status (0 ok, 1 failed, 2 bad input or usage, 3
//! refused by a gate).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // Like every Unix tool: a reader that went away (`wavegate rollout list
    // | head -1`) ends the program quietly, and a standard output that
    // cannot be written says so in one line, never with a backtrace.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.starts_with("failed printing to stdout") {
            if msg.contains("Broken pipe") {
                std::process::exit(141);
            }
            eprintln!(
                "wavegate: cannot write to standard output: {}",
                msg.trim_start_matches("failed printing to stdout: ")
            );
            std::process::exit(1);
        }
        default_hook(info);
    }));
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
