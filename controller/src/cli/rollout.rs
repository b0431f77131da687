//! `wavegate rollout`: submit, approve, watch and steer rollouts.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use wavegate_domain::Report;
use wavegate_domain::text::inert;
use wavegate_proto::convert::{self, Refusal};
use wavegate_proto::v1 as pb;

use super::client::{Conn, refused};
use super::{Output, show};

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
    /// For the customer announcement: which of each customer's hosts the
    /// rollout touches, in which wave and maintenance windows, and not
    /// before when (CSV by default, or JSON).
    Notices {
        /// Rollout id.
        id: String,
        /// The inventory label that names a host's customer.
        #[arg(long, default_value = "customer")]
        label: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = super::notices::NoticeFormat::Csv)]
        output: super::notices::NoticeFormat,
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
    /// Ask to restore hosts of a halted, paused, aborted or completed
    /// rollout from their snapshots (default: every host that has one).
    /// It shows what a restore would revert on each host and waits for the
    /// approvals the rollout itself needed, from other people (`--approve`).
    Rollback {
        /// Rollout id.
        id: String,
        /// Only the hosts of this wave (1-based).
        #[arg(long, conflicts_with = "approve")]
        wave: Option<u32>,
        /// Only this host.
        #[arg(long, conflicts_with = "approve")]
        host: Option<String>,
        /// Approve the rollout's waiting rollback request (an approver or
        /// admin, not the person who asked); with every approval in, the
        /// hosts are restored.
        #[arg(long, requires = "preview")]
        approve: bool,
        /// With --approve: the preview digest you read (the request and
        /// `rollout status` show it); refused if the request changed since.
        #[arg(long, requires = "approve")]
        preview: Option<String>,
    },
}

/// Status as JSON (FORMATS.md "Rollout status").
pub fn status_json(s: &pb::RolloutStatus) -> serde_json::Value {
    json!({
        "id": s.id,
        "state": s.state,
        "summary": wavegate_domain::rollout::state_line(&s.state, &s.failed_hosts),
        "mirrors": s.mirrors.iter().map(|m| json!({
            "backup": m.backup,
            "primaries": m.primaries,
            "wave": m.wave,
            "state": m.state,
            "detail": m.detail,
        })).collect::<Vec<_>>(),
        "failed_hosts": s.failed_hosts,
        "halt_reason": if s.halt_reason.is_empty() { serde_json::Value::Null } else { json!(s.halt_reason) },
        "plan": s.plan_name,
        "plan_hash": s.plan_hash,
        "submitter": s.submitter,
        "approvers": s.approvers,
        "approvals_required": s.approvals_required,
        "waves": s.waves.iter().map(|w| json!({
            "index": w.index,
            "state": w.state,
            "max_in_flight": w.max_in_flight,
            "in_flight": w.in_flight,
            "windows": w.windows,
            "waits_until": if w.waits_until_ms == 0 {
                serde_json::Value::Null
            } else {
                json!(wavegate_domain::windows::utc(i64::try_from(w.waits_until_ms).unwrap_or(i64::MAX)))
            },
            "waiting": if w.waiting.is_empty() { serde_json::Value::Null } else { json!(w.waiting) },
            "hosts": w.hosts.iter().map(|h| json!({
                "id": h.id,
                "state": h.state,
                "detail": h.detail,
                "snapshot": if h.snapshot.is_empty() { serde_json::Value::Null } else { json!(h.snapshot) },
                "rolled_back": h.rolled_back,
                "activity": if h.activity.is_empty() { serde_json::Value::Null } else { json!(h.activity) },
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "events": s.events,
        "rollback_requests": s.rollback_requests.iter().map(|q| json!({
            "number": q.number,
            "state": q.state,
            "requested_by": q.requested_by,
            "hosts": q.hosts,
            "preview": q.preview.iter().map(|p| json!({
                "host": p.host,
                "total": p.total,
                "error": p.error,
                "changes": p.changes.iter().map(|c| json!({"path": c.path, "change": change_name(c)})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "preview_digest": q.preview_digest,
            "approvers": q.approvers,
            "approvals_required": q.approvals_required,
        })).collect::<Vec<_>>(),
    })
}

/// What a restore does to a path, by name (`unknown` for a kind this CLI
/// does not know).
fn change_name(c: &pb::PathChange) -> &'static str {
    convert::change(c.kind).map_or("unknown", |k| k.as_str())
}

/// The newest rollback request, for a person: what a restore would revert
/// on each host (tenant file names, made inert), and what comes next.
fn render_rollback(s: &pb::RolloutStatus) -> String {
    let mut out = String::new();
    let Some(q) = s.rollback_requests.last() else {
        return out;
    };
    let _ = writeln!(
        out,
        "rollback request {} of rollout {}: {} (asked by {}; approvals {} of {}: {})",
        q.number,
        s.id,
        q.state,
        inert(&q.requested_by),
        q.approvers.len(),
        q.approvals_required,
        inert(&q.approvers.join(", "))
    );
    for p in &q.preview {
        if !p.error.is_empty() {
            let _ = writeln!(out, "  {}: no preview: {}", inert(&p.host), inert(&p.error));
            continue;
        }
        let _ = writeln!(out, "  {}: a restore reverts {} paths", inert(&p.host), p.total);
        for c in &p.changes {
            let _ = writeln!(out, "    {:<8} {}", change_name(c), inert(&c.path));
        }
        let shown = p.changes.len() as u64;
        if p.total > shown {
            let _ = writeln!(out, "    ... and {} more", p.total - shown);
        }
    }
    let _ = writeln!(out, "  preview {}", q.preview_digest);
    if q.state == "awaiting_approval" {
        let _ = writeln!(
            out,
            "  next: another person reads it and approves with `wavegate rollout rollback {} --approve --preview {}`",
            s.id, q.preview_digest
        );
    }
    out
}

/// Status for a person. Every field is one line's part, made inert: a plan
/// name or a halt reason (which quotes a host's last output) with a newline
/// in it stays on its line.
pub fn render_status(s: &pb::RolloutStatus) -> String {
    let mut out = String::new();
    let failed = match wavegate_domain::rollout::failed_note(&s.failed_hosts) {
        Some(note) if s.state == "completed" => format!(" with {}", inert(&note)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "rollout {}  plan {}  state {}{failed}",
        inert(&s.id),
        inert(&s.plan_name),
        inert(&s.state.to_uppercase())
    );
    let approvers: Vec<_> = s.approvers.iter().map(|a| inert(a)).collect();
    let _ = writeln!(
        out,
        "submitted by {}; approvals {}/{}{}",
        inert(&s.submitter),
        s.approvers.len(),
        s.approvals_required,
        if approvers.is_empty() {
            String::new()
        } else {
            format!(" ({})", approvers.join(", "))
        }
    );
    if !s.halt_reason.is_empty() {
        let _ = writeln!(out, "HALTED: {}", inert(&s.halt_reason));
    }
    for w in &s.waves {
        let hosts: Vec<String> = w
            .hosts
            .iter()
            .map(|h| match h.activity.as_str() {
                "" => format!("{}={}", inert(&h.id), inert(&h.state)),
                doing => format!("{}={}:{}", inert(&h.id), inert(&h.state), inert(doing)),
            })
            .collect();
        let _ = writeln!(
            out,
            "  wave {:<3} {:<10} {:<16} {}",
            w.index,
            inert(&w.state),
            format!("{}/{} in flight", w.in_flight, w.max_in_flight),
            hosts.join(" ")
        );
        if !w.waiting.is_empty() {
            let _ = writeln!(out, "           {}", inert(&w.waiting));
        } else if !w.windows.is_empty() && w.state == "pending" {
            let _ = writeln!(out, "           runs only inside: {}", inert(&w.windows.join("; ")));
        }
    }
    for m in &s.mirrors {
        let _ = writeln!(
            out,
            "mirror {} (fed from {}) for wave {}: {}{}",
            inert(&m.backup),
            inert(&m.primaries.join(", ")),
            m.wave,
            inert(&m.state),
            if m.detail.is_empty() {
                String::new()
            } else {
                format!(" - {}", inert(&m.detail))
            }
        );
    }
    for q in &s.rollback_requests {
        let _ = writeln!(
            out,
            "rollback request {}: {} (asked by {} for {}; approvals {}/{})",
            q.number,
            inert(&q.state),
            inert(&q.requested_by),
            inert(&q.hosts.join(", ")),
            q.approvers.len(),
            q.approvals_required
        );
    }
    out
}

/// `rollout list` for a person: a row per rollout. A plan name with a
/// newline in it does not make a row of its own.
fn list_rows(rollouts: &[pb::RolloutStatus]) -> String {
    let mut rows = String::new();
    for s in rollouts {
        let state = match s.failed_hosts.len() {
            n if n > 0 && s.state == "completed" => format!("completed ({n} failed)"),
            _ => s.state.clone(),
        };
        let _ = writeln!(rows, "{}  {:<22} {}", inert(&s.id), inert(&state), inert(&s.plan_name));
    }
    rows
}

fn fail(status: &tonic::Status) -> u8 {
    refused(status)
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
                    let report = r.report.clone().map(Report::try_from).transpose()?;
                    let notes = report.as_ref().map(|r| r.notes.clone()).unwrap_or_default();
                    match output {
                        Output::Json | Output::Yaml => {
                            let (targets, waves) = report.map(|r| (r.targets, r.waves)).unwrap_or_default();
                            output.emit(&json!({"id": r.id, "plan_hash": r.plan_hash, "targets": targets,
                                       "waves": waves, "dry_runs": r.dry_runs, "notes": notes}))?;
                        }
                        Output::Table => {
                            let mut out = format!(
                                "submitted: rollout {} (plan {}), waiting for approval\n",
                                inert(&r.id),
                                inert(&r.plan_hash)
                            );
                            for n in &notes {
                                let _ = writeln!(out, "note: {}", inert(n));
                            }
                            if !r.dry_runs.is_empty() {
                                out.push_str("dry-run of the first wave:\n");
                                // One line per host and step, whatever paths
                                // and package names it quotes.
                                for d in &r.dry_runs {
                                    let _ = writeln!(out, "  {}", inert(d));
                                }
                            }
                            show(&out);
                        }
                    }
                    Ok(0)
                }
                Err(status) => {
                    match convert::refusal(status.details()) {
                        Some(Refusal::Blocked {
                            id,
                            halt_reason,
                            dry_runs,
                        }) => {
                            let blocked = json!({"id": id, "halt_reason": halt_reason, "dry_runs": dry_runs});
                            if !output.emit(&blocked)? {
                                show(&render_blocked(&blocked));
                            }
                        }
                        Some(Refusal::Check(report)) if !output.emit(&report)? => {
                            show(&super::plan::render(&report));
                        }
                        Some(Refusal::Check(_)) | None => {}
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
                    show(&render_status(&s.into_inner()));
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
                    Output::Table => show(&render_status(&s)),
                }
                Ok(0)
            }
            Err(status) => Ok(fail(&status)),
        },
        RolloutCommand::Watch { id } => super::watch::run(&mut client, id).await,
        RolloutCommand::Notices { id, label, output } => super::notices::run(&mut client, id, label, output).await,
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
                    Output::Table => show(&list_rows(&l.rollouts)),
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
                            let mut v = Vec::new();
                            for d in r.reports {
                                let (phase, d) = convert::dry_run_record(d)?;
                                v.push(
                                    json!({"phase": phase, "host": d.host, "step": d.step, "blocked": d.blocked,
                                              "reasons": d.reasons, "report": d.report, "fetch": d.fetch}),
                                );
                            }
                            output.emit(&v)?;
                        }
                        Output::Table => {
                            let mut out = String::new();
                            for line in &r.summaries {
                                let _ = writeln!(out, "{}", inert(line));
                            }
                            show(&out);
                        }
                    }
                    Ok(0)
                }
                Err(status) => Ok(fail(&status)),
            }
        }
        RolloutCommand::Rollback {
            id,
            wave,
            host,
            approve,
            preview,
        } => {
            let res = client
                .rollback(pb::RollbackRequest {
                    id,
                    wave: wave.unwrap_or(0),
                    host: host.unwrap_or_default(),
                    approve,
                    preview_digest: preview.unwrap_or_default(),
                })
                .await;
            match res {
                Ok(s) => {
                    show(&render_rollback(&s.into_inner()));
                    Ok(0)
                }
                Err(status) => Ok(fail(&status)),
            }
        }
        RolloutCommand::Pause { id } => control(client.pause(pb::RolloutRequest { id }).await),
        RolloutCommand::Resume { id } => control(client.resume(pb::RolloutRequest { id }).await),
        RolloutCommand::Abort { id } => control(client.abort(pb::RolloutRequest { id }).await),
    }
}

/// A refused submission's dry-run, for a person: every blocked step with
/// what it would have deleted or changed outside its write set. Paths are
/// a tenant's file names and the tail is a step's output: every field is
/// made inert on its line.
fn render_blocked(v: &serde_json::Value) -> String {
    let text = |x: &serde_json::Value, or: &'static str| inert(x.as_str().unwrap_or(or)).into_owned();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "REFUSED: rollout {} was stored refused; its first wave's dry-run was blocked.",
        text(&v["id"], "?")
    );
    for d in v["dry_runs"].as_array().into_iter().flatten() {
        let host = text(&d["host"], "?");
        let step = text(&d["step"], "?");
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
                    let _ = writeln!(out, "      {}", text(p, "?"));
                }
            }
            for p in r["packages"].as_array().into_iter().flatten() {
                let (name, from, to) = (text(&p["name"], "?"), text(&p["from"], ""), text(&p["to"], ""));
                let _ = writeln!(
                    out,
                    "    package {name} {} -> {}",
                    if from.is_empty() { "(new)" } else { &from },
                    if to.is_empty() { "(removed)" } else { &to }
                );
            }
            for a in r["services"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "    its scripts ask to {} (held back in the dry-run)",
                    text(a, "?")
                );
            }
        }
        if let Some(f) = d.get("fetch").filter(|f| !f.is_null())
            && f["outcome"] != "ok"
        {
            let _ = writeln!(
                out,
                "    its fetch {}: {}",
                text(&f["outcome"], "?"),
                text(&f["detail"], "")
            );
        }
        for reason in d["reasons"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    {}", text(reason, "?"));
        }
        let tail = d["report"]["output_tail"].as_str().unwrap_or_default().trim_end();
        if d["blocked"] == true && !tail.is_empty() {
            let _ = writeln!(out, "    its last output:");
            for l in tail.lines() {
                let _ = writeln!(out, "      | {}", inert(l));
            }
        }
    }
    out
}

fn control(res: Result<tonic::Response<pb::RolloutStatus>, tonic::Status>) -> Result<u8> {
    match res {
        Ok(s) => {
            show(&render_status(&s.into_inner()));
            Ok(0)
        }
        Err(status) => Ok(fail(&status)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rollout whose plan name, submitter, host and halt reason carry
    /// what a hostile plan or host would write.
    fn hostile() -> pb::RolloutStatus {
        pb::RolloutStatus {
            id: "r0007".into(),
            state: "halted".into(),
            plan_name: "fix\nr0008  completed          all-good".into(),
            submitter: "ops\u{1b}]0;pwned\u{7}".into(),
            approvers: vec!["ann\u{202e}".into()],
            halt_reason: "w1: step failed; last output: \u{1b}[2J\rALL HEALTHY\u{9b}31m".into(),
            waves: vec![pb::WaveStatus {
                index: 1,
                state: "halted".into(),
                hosts: vec![pb::HostStatus {
                    id: "w1\nw2=healthy".into(),
                    state: "failed".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn assert_inert(text: &str) {
        assert!(
            !text.chars().any(|c| wavegate_domain::text::is_active(c) && c != '\n'),
            "{text:?}"
        );
    }

    #[test]
    fn a_status_keeps_its_lines_whatever_the_plan_and_hosts_say() {
        let text = render_status(&hostile());
        assert_inert(&text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[0],
            "rollout r0007  plan fix\\nr0008  completed          all-good  state HALTED"
        );
        assert!(lines[1].contains("ops\\x1b]0;pwned\\x07") && lines[1].contains("ann\\u{202e}"));
        assert_eq!(
            lines[2],
            "HALTED: w1: step failed; last output: \\x1b[2J\\rALL HEALTHY\\x9b31m"
        );
        assert!(lines[3].ends_with("w1\\nw2=healthy=failed"), "{}", lines[3]);
    }

    #[test]
    fn a_plan_name_with_a_newline_does_not_forge_a_row_of_the_list() {
        let rows = list_rows(&[hostile()]);
        assert_eq!(rows.lines().count(), 1, "{rows}");
        assert!(rows.starts_with("r0007  halted"), "{rows}");
    }

    #[test]
    fn a_blocked_dry_run_shows_paths_and_output_inert() {
        let blocked = json!({"id": "r0009", "dry_runs": [{
            "host": "w1", "step": "spill", "blocked": true, "reasons": ["it wrote \u{1b}[31moutside"],
            "report": {"deleted": {"count": 0, "bytes": 0}, "modified": {"count": 0}, "created": {"count": 1},
                       "outside": {"count": 1, "sample": ["/srv/a\nb\u{202e}"]}, "outside_deleted": {"count": 0},
                       "output_tail": "fine\n\u{1b}]8;;http://x/\u{1b}\\link\rALL GOOD\n"},
        }]});
        let text = render_blocked(&blocked);
        assert_inert(&text);
        assert!(text.contains("      /srv/a\\nb\\u{202e}\n"), "{text}");
        assert!(text.contains("    it wrote \\x1b[31moutside\n"), "{text}");
        assert!(
            text.contains("      | fine\n      | \\x1b]8;;http://x/\\x1b\\link\\rALL GOOD\n"),
            "{text}"
        );
    }
}
