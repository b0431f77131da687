//! `wavegate fleet`: the inventory's hosts as the controller sees them:
//! role, whether the agent is connected, and what updates each host
//! outside wavegate.

use std::fmt::Write as _;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use wavegate_domain::text::inert;
use wavegate_proto::v1 as pb;

use super::client::{Conn, refused};
use super::{Output, show};

/// `wavegate fleet ...`
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Every host (or one, with its evidence): its role, its agent, and the
    /// updaters outside the rollout its agent reported (unattended-upgrades,
    /// apt and dnf timers, snapd, cron jobs that run a package manager).
    Status {
        /// Only this host, with where each updater was found.
        host: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

fn updater_json(u: &pb::Updater) -> serde_json::Value {
    json!({
        "kind": u.kind,
        "what": u.what,
        "evidence": u.evidence,
        "holdable": u.holdable,
        "held_by": if u.held_by.is_empty() { serde_json::Value::Null } else { json!(u.held_by) },
    })
}

/// The updaters column: `unattended-upgrades, apt-daily (held by r0002)`.
fn summary(h: &pb::FleetHost) -> String {
    if !h.updaters_known {
        return "unknown (its agent has not reported)".into();
    }
    if h.updaters.is_empty() {
        return "none".into();
    }
    let mut kinds: Vec<String> = Vec::new();
    for u in &h.updaters {
        let k = if u.held_by.is_empty() {
            u.kind.clone()
        } else {
            format!("{} (held by {})", u.kind, u.held_by)
        };
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    kinds.join(", ")
}

/// Run a `fleet` subcommand.
pub async fn run(cmd: FleetCommand, conn: &Conn) -> Result<u8> {
    let mut client = conn.connect().await?;
    let FleetCommand::Status { host, output } = cmd;
    let mut hosts = match client.fleet(pb::FleetRequest {}).await {
        Ok(r) => r.into_inner().hosts,
        Err(status) => return Ok(refused(&status)),
    };
    if let Some(only) = &host {
        hosts.retain(|h| &h.id == only);
        if hosts.is_empty() {
            eprintln!("wavegate: the inventory has no host `{}`", inert(only));
            return Ok(2);
        }
    }
    let v: Vec<_> = hosts
        .iter()
        .map(|h| {
            json!({
                "id": h.id,
                "role": h.role,
                "connected": h.connected,
                "updaters_known": h.updaters_known,
                "updaters": h.updaters.iter().map(updater_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    if output.emit(&v)? {
        return Ok(0);
    }
    let mut out = String::new();
    if host.is_some() {
        for h in &hosts {
            let _ = writeln!(
                out,
                "host {}  role {}  agent {}",
                inert(&h.id),
                inert(&h.role),
                if h.connected { "connected" } else { "away" }
            );
            let _ = writeln!(out, "updaters outside the rollout: {}", summary(h));
            for u in &h.updaters {
                let _ = writeln!(
                    out,
                    "  {} {}: {}{}{}",
                    inert(&u.kind),
                    inert(&u.what),
                    inert(&u.evidence),
                    if u.holdable { "" } else { " (cannot be held)" },
                    if u.held_by.is_empty() {
                        String::new()
                    } else {
                        format!(", held by rollout {}", inert(&u.held_by))
                    }
                );
            }
        }
    } else {
        let _ = writeln!(
            out,
            "{:<16} {:<11} {:<10} UPDATERS OUTSIDE THE ROLLOUT",
            "HOST", "ROLE", "AGENT"
        );
        for h in &hosts {
            let _ = writeln!(
                out,
                "{:<16} {:<11} {:<10} {}",
                inert(&h.id),
                inert(&h.role),
                if h.connected { "connected" } else { "away" },
                inert(&summary(h))
            );
        }
        let with: usize = hosts
            .iter()
            .filter(|h| h.updaters.iter().any(|u| u.held_by.is_empty()))
            .count();
        if with > 0 {
            let _ = writeln!(
                out,
                "\n{with} host(s) change on their own schedule, outside every canary; `wavegate fleet status HOST` shows where"
            );
        }
    }
    show(&out);
    Ok(0)
}
