//! `wavegate snapshot`: the pre-change snapshots the controller tracks.

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use wavegate_proto::v1 as pb;

use super::Output;
use super::client::{Conn, exit_for};

/// `wavegate snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Each snapshot's host, wave, size and state (pinned, retained, released).
    List {
        /// Only this rollout.
        #[arg(long)]
        rollout: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// Run a `snapshot` subcommand.
pub async fn run(cmd: SnapshotCommand, conn: &Conn) -> Result<u8> {
    let mut client = conn.connect().await?;
    let SnapshotCommand::List { rollout, output } = cmd;
    let list = match client
        .snapshots(pb::SnapshotsRequest {
            rollout_id: rollout.unwrap_or_default(),
        })
        .await
    {
        Ok(r) => r.into_inner().snapshots,
        Err(status) => {
            eprintln!("wavegate: {}", status.message());
            return Ok(exit_for(&status));
        }
    };
    match output {
        Output::Json => {
            let v: Vec<_> = list
                .iter()
                .map(|s| {
                    json!({"rollout": s.rollout_id, "host": s.host, "wave": s.wave, "bytes": s.bytes,
                           "files": s.files, "state": s.state, "release_after_ms": s.release_after_ms})
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            println!(
                "{:<8} {:<12} {:>4} {:>12} {:>7}  STATE",
                "ROLLOUT", "HOST", "WAVE", "BYTES", "FILES"
            );
            for s in &list {
                println!(
                    "{:<8} {:<12} {:>4} {:>12} {:>7}  {}",
                    s.rollout_id, s.host, s.wave, s.bytes, s.files, s.state
                );
            }
        }
    }
    Ok(0)
}
