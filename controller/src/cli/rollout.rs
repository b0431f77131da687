//! `wavegate rollout`: submit, approve, watch and steer rollouts.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use wavegate_domain::Report;
use wavegate_proto::v1 as pb;

use super::Output;
use super::client::{Conn, exit_for};

/// `wavegate rollout ...`
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Submit a plan: it is checked exactly as `plan check` does and, if
    /// safe, becomes a rollout waiting for approval.
    Submit {
        /// The plan file.
        plan: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Always refused (and recorded): there is no way to skip the canary.
        #[arg(long)]
        skip_canary: bool,
        /// Always refused (and recorded): there is no way to skip approval.
        #[arg(long)]
        skip_approval: bool,
        /// Always refused (and recorded): a backup never shares a primary's wave.
        #[arg(long)]
        ignore_backup_rule: bool,
    },
    /// Approve someone else's rollout.
    Approve {
        /// Rollout id.
        id: String,
        /// The plan hash you reviewed; refused if the rollout runs another.
        #[arg(long)]
        plan_hash: Option<String>,
    },
    /// Show a rollout.
    Status {
        /// Rollout id.
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Follow a rollout live until it completes, halts or is aborted: on a
    /// terminal, a row per wave with its progress, hosts by state and bake
    /// countdown, then the failing hosts' last output and the halt reason;
    /// piped, plain lines. Exit 0 when it completed, 1 otherwise.
    Watch {
        /// Rollout id.
        id: String,
    },
    /// The output of a rollout's steps and health checks: one host's, or
    /// every host's with each line prefixed by its host. With -f, live
    /// until the steps end.
    Logs {
        /// Rollout id.
        id: String,
        /// Only this host.
        host: Option<String>,
        /// Only this step (or `NAME (fetch)`, or `health check NAME`).
        #[arg(long)]
        step: Option<String>,
        /// Keep following the output until the steps end.
        #[arg(short = 'f', long)]
        follow: bool,
        /// One line per host and step: bytes stored, and whether that is the
        /// whole output (its SHA-256 checked against the agent's).
        #[arg(long)]
        summary: bool,
        /// Output format (json and yaml: one document per chunk).
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List rollouts, newest first.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stop starting new hosts.
    Pause {
        /// Rollout id.
        id: String,
    },
    /// Continue a paused or halted rollout.
    Resume {
        /// Rollout id.
        id: String,
    },
    /// End a rollout; nothing more runs.
    Abort {
        /// Rollout id.
        id: String,
    },
    /// Show the dry-run reports: what each step would delete, modify and
    /// create, and what lies outside its write set.
    Dryrun {
        /// Rollout id.
        id: String,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Restore hosts of a halted, paused, aborted or completed rollout from
    /// their snapshots (default: every host that has one).
    Rollback {
        /// Rollout id.
        id: String,
        /// Only the hosts of this wave (1-based).
        #[arg(long)]
        wave: Option<u32>,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
    },
}

/// Status as JSON (FORMATS.md "Rollout status").
pub fn status_json(s: &pb::RolloutStatus) -> serde_json::Value {
    json!({
        "id": s.id,
        "state": s.state,
        "halt_reason": if s.halt_reason.is_empty() { serde_json::Value::Null } else { json!(s.halt_reason) },
        "plan": s.plan_name,
        "plan_hash": s.plan_hash,
        "submitter": s.submitter,
        "approvers": s.approvers,
        "approvals_required": s.approvals_required,
        "waves": s.waves.iter().map(|w| json!({
            "index": w.index,
            "state": w.state,
            "hosts": w.hosts.iter().map(|h| json!({
                "id": h.id,
                "state": h.state,
                "detail": h.detail,
                "snapshot": if h.snapshot.is_empty() { serde_json::Value::Null } else { json!(h.snapshot) },
                "rolled_back": h.rolled_back,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "events": s.events,
    })
}

/// Status for a person.
pub fn render_status(s: &pb::RolloutStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout {}  plan {}  state {}",
        s.id,
        s.plan_name,
        s.state.to_uppercase()
    );
    let _ = writeln!(
        out,
        "submitted by {}; approvals {}/{}{}",
        s.submitter,
        s.approvers.len(),
        s.approvals_required,
        if s.approvers.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.approvers.join(", "))
        }
    );
    if !s.halt_reason.is_empty() {
        let _ = writeln!(out, "HALTED: {}", s.halt_reason);
    }
    for w in &s.waves {
        let hosts: Vec<String> = w.hosts.iter().map(|h| format!("{}={}", h.id, h.state)).collect();
        let _ = writeln!(out, "  wave {:<3} {:<10} {}", w.index, w.state, hosts.join(" "));
    }
    out
}

fn fail(status: &tonic::Status) -> u8 {
    eprintln!("wavegate: {}", status.message());
    exit_for(status)
}

/// Run a `rollout` subcommand.
pub async fn run(cmd: RolloutCommand, conn: &Conn) -> Result<u8> {
    let mut client = conn.connect().await?;
    match cmd {
        RolloutCommand::Submit {
            plan,
            output,
            skip_canary,
            skip_approval,
            ignore_backup_rule,
        } => {
            let yaml = match std::fs::read_to_string(&plan) {
                Ok(y) => y,
                Err(e) => {
                    eprintln!("wavegate: cannot read the plan {}: {e}", plan.display());
                    return Ok(2);
                }
            };
            let bypass: Vec<String> = [
                (skip_canary, "canary"),
                (skip_approval, "approval"),
                (ignore_backup_rule, "backup rule"),
            ]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| n.to_owned())
            .collect();
            let req = pb::SubmitRequest {
                plan_yaml: yaml,
                plan_file: plan.display().to_string(),
                bypass,
            };
            match client.submit(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    match output {
                        Output::Json | Output::Yaml => {
                            let report: serde_json::Value = serde_json::from_str(&r.report_json).unwrap_or_default();
                            output.emit(
                                &json!({"id": r.id, "plan_hash": r.plan_hash, "targets": report["targets"],
                                       "waves": report["waves"], "dry_runs": r.dry_runs}),
                            )?;
                        }
                        Output::Table => {
                            println!(
                                "submitted: rollout {} (plan {}), waiting for approval",
                                r.id, r.plan_hash
                            );
                            if !r.dry_runs.is_empty() {
                                println!("dry-run of the first wave:");
                                for d in &r.dry_runs {
                                    println!("  {d}");
                                }
                            }
                        }
                    }
                    Ok(0)
                }
                Err(status) => {
                    if let Ok(blocked) = serde_json::from_slice::<serde_json::Value>(status.details())
                        && blocked.get("dry_runs").is_some()
                    {
                        if !output.emit(&blocked)? {
                            print!("{}", render_blocked(&blocked));
                        }
                    } else if let Ok(report) = serde_json::from_slice::<Report>(status.details())
                        && !output.emit(&report)?
                    {
                        print!("{}", super::plan::render(&report));
                    }
                    Ok(fail(&status))
                }
            }
        }
        RolloutCommand::Approve { id, plan_hash } => {
            match client
                .approve(pb::ApproveRequest {
                    id,
                    plan_hash: plan_hash.unwrap_or_default(),
                })
                .await
            {
                Ok(s) => {
                    print!("{}", render_status(&s.into_inner()));
                    Ok(0)
                }
                Err(status) => Ok(fail(&status)),
            }
        }
        RolloutCommand::Status { id, output } => match client.status(pb::RolloutRequest { id }).await {
            Ok(s) => {
                let s = s.into_inner();
                match output {
                    Output::Json | Output::Yaml => {
                        output.emit(&status_json(&s))?;
                    }
                    Output::Table => print!("{}", render_status(&s)),
                }
                Ok(0)
            }
            Err(status) => Ok(fail(&status)),
        },
        RolloutCommand::Watch { id } => super::watch::run(&mut client, id).await,
        RolloutCommand::Logs {
            id,
            host,
            step,
            follow,
            summary,
            output,
        } => {
            super::logs::run(
                &mut client,
                super::logs::Args {
                    id,
                    host,
                    step,
                    follow,
                    summary,
                    output,
                },
            )
            .await
        }
        RolloutCommand::List { output } => match client.list(pb::ListRequest {}).await {
            Ok(l) => {
                let l = l.into_inner();
                match output {
                    Output::Json | Output::Yaml => {
                        let all: Vec<_> = l.rollouts.iter().map(status_json).collect();
                        output.emit(&all)?;
                    }
                    Output::Table => {
                        for s in &l.rollouts {
                            println!("{}  {:<18} {}", s.id, s.state, s.plan_name);
                        }
                    }
                }
                Ok(0)
            }
            Err(status) => Ok(fail(&status)),
        },
        RolloutCommand::Dryrun { id, host, output } => {
            match client
                .dry_runs(pb::DryRunsRequest {
                    id,
                    host: host.unwrap_or_default(),
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    match output {
                        Output::Json | Output::Yaml => {
                            let v: serde_json::Value = serde_json::from_str(&r.reports_json).unwrap_or_default();
                            output.emit(&v)?;
                        }
                        Output::Table => {
                            for line in &r.summaries {
                                println!("{line}");
                            }
                        }
                    }
                    Ok(0)
                }
                Err(status) => Ok(fail(&status)),
            }
        }
        RolloutCommand::Rollback { id, wave, host } => control(
            client
                .rollback(pb::RollbackRequest {
                    id,
                    wave: wave.unwrap_or(0),
                    host: host.unwrap_or_default(),
                })
                .await,
        ),
        RolloutCommand::Pause { id } => control(client.pause(pb::RolloutRequest { id }).await),
        RolloutCommand::Resume { id } => control(client.resume(pb::RolloutRequest { id }).await),
        RolloutCommand::Abort { id } => control(client.abort(pb::RolloutRequest { id }).await),
    }
}

/// A refused submission's dry-run, for a person: every blocked step with
/// what it would have deleted or changed outside its write set.
fn render_blocked(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "REFUSED: rollout {} was stored refused; its first wave's dry-run was blocked.",
        v["id"].as_str().unwrap_or("?")
    );
    for d in v["dry_runs"].as_array().into_iter().flatten() {
        let host = d["host"].as_str().unwrap_or("?");
        let step = d["step"].as_str().unwrap_or("?");
        let verdict = if d["blocked"] == true { "BLOCKED" } else { "ok" };
        let _ = writeln!(out, "  {host} / {step}: {verdict}");
        if let Some(r) = d.get("report").filter(|r| !r.is_null()) {
            let _ = writeln!(
                out,
                "    would delete {} files ({} bytes), modify {}, create {}",
                r["deleted"]["count"], r["deleted"]["bytes"], r["modified"]["count"], r["created"]["count"]
            );
            if r["outside"]["count"].as_u64().unwrap_or(0) > 0 {
                let _ = writeln!(
                    out,
                    "    OUTSIDE the write set: {} effects, {} files deleted:",
                    r["outside"]["count"], r["outside_deleted"]["count"]
                );
                for p in r["outside"]["sample"].as_array().into_iter().flatten() {
                    let _ = writeln!(out, "      {}", p.as_str().unwrap_or("?"));
                }
            }
            for p in r["packages"].as_array().into_iter().flatten() {
                let (name, from, to) = (
                    p["name"].as_str().unwrap_or("?"),
                    p["from"].as_str().unwrap_or(""),
                    p["to"].as_str().unwrap_or(""),
                );
                let _ = writeln!(
                    out,
                    "    package {name} {} -> {}",
                    if from.is_empty() { "(new)" } else { from },
                    if to.is_empty() { "(removed)" } else { to }
                );
            }
        }
        if let Some(f) = d.get("fetch").filter(|f| !f.is_null())
            && f["outcome"] != "ok"
        {
            let _ = writeln!(
                out,
                "    its fetch {}: {}",
                f["outcome"].as_str().unwrap_or("?"),
                f["detail"].as_str().unwrap_or("")
            );
        }
        for reason in d["reasons"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    {}", reason.as_str().unwrap_or("?"));
        }
        let tail = d["report"]["output_tail"].as_str().unwrap_or_default().trim_end();
        if d["blocked"] == true && !tail.is_empty() {
            let _ = writeln!(out, "    its last output:");
            for l in tail.lines() {
                let _ = writeln!(out, "      | {l}");
            }
        }
    }
    out
}

fn control(res: Result<tonic::Response<pb::RolloutStatus>, tonic::Status>) -> Result<u8> {
    match res {
        Ok(s) => {
            print!("{}", render_status(&s.into_inner()));
            Ok(0)
        }
        Err(status) => Ok(fail(&status)),
    }
}
