//! `wavegate snapshot`: the pre-change snapshots the controller tracks.

use std::fmt::Write as _;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use wavegate_domain::text::inert;
use wavegate_proto::v1 as pb;

use super::client::{Conn, refused};
use super::{Output, show};

/// `wavegate snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Each snapshot's host, wave, size, state (pinned, retained, released)
    /// and the backend of each filesystem it covers.
    List {
        /// Only this rollout.
        #[arg(long)]
        rollout: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// A part's backend by name (`unknown` for one this CLI does not know).
fn backend_name(p: &pb::SnapshotPart) -> &'static str {
    match wavegate_proto::convert::backend(p.backend) {
        Ok(Some(b)) => b.as_str(),
        Ok(None) | Err(_) => "unknown",
    }
}

/// `btrfs:/home, tar+zstd:/`: each part's backend and mount.
fn backends(s: &pb::SnapshotInfo) -> String {
    if s.parts.is_empty() {
        return "tar+zstd".into();
    }
    s.parts
        .iter()
        .map(|p| format!("{}:{}", backend_name(p), p.mount))
        .collect::<Vec<_>>()
        .join(", ")
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
        Err(status) => return Ok(refused(&status)),
    };
    match output {
        Output::Json | Output::Yaml => {
            let v: Vec<_> = list
                .iter()
                .map(|s| {
                    let parts: Vec<_> = s
                        .parts
                        .iter()
                        .map(|p| {
                            json!({"backend": backend_name(p), "mount": p.mount, "fstype": p.fstype, "roots": p.roots,
                                   "files": p.files, "bytes": p.bytes, "note": p.note})
                        })
                        .collect();
                    json!({"rollout": s.rollout_id, "host": s.host, "wave": s.wave, "bytes": s.bytes,
                           "files": s.files, "state": s.state, "release_after_ms": s.release_after_ms,
                           "backend": backends(s), "parts": parts})
                })
                .collect();
            output.emit(&v)?;
        }
        Output::Table => {
            // A row per snapshot, a line per note: a mount path from a host
            // stays on its line.
            let mut out = format!(
                "{:<8} {:<12} {:>4} {:>12} {:>7}  {:<9} BACKEND\n",
                "ROLLOUT", "HOST", "WAVE", "BYTES", "FILES", "STATE"
            );
            for s in &list {
                let _ = writeln!(
                    out,
                    "{:<8} {:<12} {:>4} {:>12} {:>7}  {:<9} {}",
                    inert(&s.rollout_id),
                    inert(&s.host),
                    s.wave,
                    s.bytes,
                    s.files,
                    inert(&s.state),
                    inert(&backends(s))
                );
                for p in s.parts.iter().filter(|p| !p.note.is_empty()) {
                    let _ = writeln!(out, "{:>46} {}: {}", "", inert(&p.mount), inert(&p.note));
                }
            }
            show(&out);
        }
    }
    Ok(0)
}
