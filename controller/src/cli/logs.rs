//! `wavegate rollout logs`: the output of a rollout's steps and health
//! checks, of one host or of every host (each line prefixed by its host, as
//! `kubectl logs -l` does), as the controller stored it; with `-f`, live
//! until the steps end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context, Result};
use serde_json::json;
use wavegate_domain::text::inert;
use wavegate_proto::v1 as pb;

use super::client::{Client, refused};
use super::{Output, show};

/// What to show.
pub struct Args {
    /// Rollout id.
    pub id: String,
    /// Only this host.
    pub host: Option<String>,
    /// Only this step.
    pub step: Option<String>,
    /// Keep following.
    pub follow: bool,
    /// One line per host and step instead of the output.
    pub summary: bool,
    /// Output format.
    pub output: Output,
}

/// Run `rollout logs`.
pub async fn run(client: &mut Client, a: Args) -> Result<u8> {
    let req = pb::LogsRequest {
        id: a.id.clone(),
        host: a.host.clone().unwrap_or_default(),
        step: a.step.clone().unwrap_or_default(),
        follow: a.follow && !a.summary,
        summary: a.summary,
    };
    // Following a rollout that has not started: say so, then wait.
    if req.follow
        && let Ok(s) = client.status(pb::RolloutRequest { id: a.id.clone() }).await
        && s.get_ref().state == "awaiting_approval"
    {
        let s = s.into_inner();
        eprintln!(
            "rollout {} is awaiting approval ({}/{} approvals) and has not started; waiting for its output (Ctrl-C to stop)",
            inert(&s.id),
            s.approvers.len(),
            s.approvals_required
        );
    }
    let mut stream = match client.logs(req).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Ok(refused(&status)),
    };
    if a.summary {
        let mut rows = Vec::new();
        while let Some(c) = stream.message().await.context("the controller closed the stream")? {
            rows.push(c);
        }
        let v: Vec<_> = rows
            .iter()
            .map(|c| json!({"host": c.host, "step": c.step, "stored": c.stored, "verified": c.verified}))
            .collect();
        if !a.output.emit(&v)? {
            let mut out = format!("{:<12} {:<32} {:>12}  VERIFIED\n", "HOST", "STEP", "STORED");
            for c in &rows {
                // A check has no result to hold its output against.
                let verified = if c.verified.is_empty() { "-" } else { &c.verified };
                let _ = writeln!(
                    out,
                    "{:<12} {:<32} {:>12}  {}",
                    inert(&c.host),
                    inert(&c.step),
                    c.stored,
                    inert(verified)
                );
            }
            show(&out);
        }
        return Ok(0);
    }
    let prefix = a.host.is_none();
    let mut out = std::io::stdout().lock();
    // Partial lines wait for their end, per host and step.
    let mut partial: HashMap<(String, String), Vec<u8>> = HashMap::new();
    let mut last_step: HashMap<String, String> = HashMap::new();
    while let Some(c) = stream.message().await.context("the controller closed the stream")? {
        if a.output != Output::Table {
            let text = String::from_utf8_lossy(&c.data);
            let v = json!({"host": c.host, "step": c.step, "offset": c.offset, "missing": c.missing, "text": text});
            let line = a.output.record(&v)?.unwrap_or_default();
            if writeln!(out, "{line}").is_err() {
                return Ok(0);
            }
            continue;
        }
        // Every line shown below is made inert where it is built: a line
        // of output ends at its newline, and the host and step names are
        // parts of lines.
        let lead = if prefix {
            format!("{} | ", inert(&c.host))
        } else {
            String::new()
        };
        if last_step.get(&c.host) != Some(&c.step) && a.step.is_none() {
            let _ = writeln!(out, "{lead}--- {} ---", inert(&c.step));
            last_step.insert(c.host.clone(), c.step.clone());
        }
        if c.missing > 0 {
            let _ = writeln!(
                out,
                "{lead}[{} bytes missing here: dropped on the way or over the cap; the agent's journal has them]",
                c.missing
            );
        }
        let buf = partial.entry((c.host.clone(), c.step.clone())).or_default();
        buf.extend_from_slice(&c.data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            // What a host printed is shown, never obeyed by the terminal.
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            if writeln!(out, "{lead}{}", inert(&text)).is_err() {
                return Ok(0);
            }
        }
        let _ = out.flush();
    }
    for ((host, _), rest) in partial {
        if !rest.is_empty() {
            let lead = if prefix {
                format!("{} | ", inert(&host))
            } else {
                String::new()
            };
            let _ = writeln!(out, "{lead}{}", inert(&String::from_utf8_lossy(&rest)));
        }
    }
    Ok(0)
}
