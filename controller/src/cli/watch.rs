//! `wavegate rollout watch`: a rollout, live. On a terminal: one row per
//! wave with a progress bar, its hosts counted by state, the bake's
//! countdown, then the failing hosts with their last output lines and the
//! halt reason, redrawn in place. Piped: one plain block per change. Exits
//! 0 when the rollout completes, 1 when it halts, is aborted or refused.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use wavegate_domain::text::inert;
use wavegate_proto::v1 as pb;

use super::client::{Client, refused};
use super::rollout::render_status;

/// Run `rollout watch`.
pub async fn run(client: &mut Client, id: String) -> Result<u8> {
    let stream = match client.watch(pb::RolloutRequest { id }).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Ok(refused(&status)),
    };
    let last = if std::io::stdout().is_terminal() {
        live(stream, std::env::var_os("NO_COLOR").is_none()).await?
    } else {
        plain(stream).await?
    };
    Ok(match last.as_ref().map(|s| s.state.as_str()) {
        Some("completed") => 0,
        _ => 1,
    })
}

async fn plain(mut stream: tonic::Streaming<pb::RolloutStatus>) -> Result<Option<pb::RolloutStatus>> {
    let mut last = None;
    while let Some(s) = stream.message().await.context("the controller closed the watch")? {
        super::show(&format!("{}\n", render_status(&s)));
        last = Some(s);
    }
    Ok(last)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A wave's row: hosts counted by state, and how long its bake has left.
fn wave_message(w: &pb::WaveStatus, color: bool) -> String {
    // A host in its dry-run or its snapshot has not had a real step yet,
    // but it is not idle either: it is counted by what it is doing.
    let count = |s: &str| w.hosts.iter().filter(|h| h.state == s && h.activity.is_empty()).count();
    let doing = |a: &str| w.hosts.iter().filter(|h| h.activity == a).count();
    let mut parts = Vec::new();
    for (state, n) in [
        ("healthy", count("healthy")),
        ("failed", count("failed")),
        ("dry-running", doing("dry-run")),
        ("snapshotting", doing("snapshot")),
        ("running", count("running") + count("succeeded")),
        ("untouched", count("untouched")),
    ] {
        if n > 0 {
            let word = format!("{n} {state}");
            parts.push(if color && state == "failed" {
                format!("\x1b[31m{word}\x1b[0m")
            } else {
                word
            });
        }
    }
    let mut msg = format!("{:<9} {}", inert(&w.state), parts.join(", "));
    if w.state == "running" && w.max_in_flight > 0 {
        msg.push_str(&format!(" ({}/{} at once)", w.in_flight, w.max_in_flight));
    }
    if w.waits_until_ms > 0 {
        let left = w.waits_until_ms.saturating_sub(now_ms());
        msg.push_str(&format!(
            ", waits for its maintenance window ({} left)",
            wavegate_domain::units::format_duration(Duration::from_secs(left.div_ceil(1000)))
        ));
    }
    if w.state == "baking" && w.bake_ends_ms > 0 {
        let left = w.bake_ends_ms.saturating_sub(now_ms());
        msg.push_str(&format!(", bake {:.1}s left", left as f64 / 1000.0));
    }
    msg
}

/// The lines under the waves: failing hosts with their last output, and
/// the halt reason. What hosts said is made inert, line by line, before
/// the colour goes in: the only escape sequences here are our own.
fn footer(s: &pb::RolloutStatus, color: bool) -> String {
    let mut lines = Vec::new();
    for h in s.waves.iter().flat_map(|w| &w.hosts).filter(|h| h.state == "failed") {
        let id = inert(&h.id);
        let name = if color {
            format!("\x1b[31m{id}\x1b[0m")
        } else {
            id.into_owned()
        };
        lines.push(format!("FAILED {name}: {}", inert(&h.detail)));
        for l in h.last_output.lines() {
            lines.push(format!("    | {}", inert(l)));
        }
    }
    if !s.halt_reason.is_empty() {
        lines.push(format!("HALTED: {}", inert(&s.halt_reason)));
    }
    lines.join("\n")
}

async fn live(mut stream: tonic::Streaming<pb::RolloutStatus>, color: bool) -> Result<Option<pb::RolloutStatus>> {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let header = multi.add(ProgressBar::new_spinner());
    header.set_style(ProgressStyle::with_template("{msg}")?);
    let style = ProgressStyle::with_template("{prefix:<14} [{bar:30}] {pos:>3}/{len:<3} {msg}")?.progress_chars("=>-");
    let mut bars: Vec<ProgressBar> = Vec::new();
    let tail = multi.add(ProgressBar::new_spinner());
    tail.set_style(ProgressStyle::with_template("{msg}")?);
    let mut last: Option<pb::RolloutStatus> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let draw = |s: &pb::RolloutStatus, bars: &mut Vec<ProgressBar>| {
        let failed = match wavegate_domain::rollout::failed_note(&s.failed_hosts) {
            Some(note) if s.state == "completed" => format!(" with {}", inert(&note)),
            _ => String::new(),
        };
        header.set_message(format!(
            "rollout {}  plan {}  {}{failed}  (approvals {}/{})",
            inert(&s.id),
            inert(&s.plan_name),
            inert(&s.state.to_uppercase()),
            s.approvers.len(),
            s.approvals_required
        ));
        while bars.len() < s.waves.len() {
            let w = &s.waves[bars.len()];
            let b = multi.insert_before(&tail, ProgressBar::new(w.hosts.len() as u64));
            b.set_style(style.clone());
            b.set_prefix(if w.index == 1 {
                "wave 1 canary".to_owned()
            } else {
                format!("wave {}", w.index)
            });
            bars.push(b);
        }
        for (w, b) in s.waves.iter().zip(bars.iter()) {
            let done = w
                .hosts
                .iter()
                .filter(|h| h.state == "healthy" || h.state == "failed")
                .count();
            b.set_position(done as u64);
            b.set_message(wave_message(w, color));
        }
        tail.set_message(footer(s, color));
    };
    loop {
        tokio::select! {
            msg = stream.message() => match msg.context("the controller closed the watch")? {
                Some(s) => {
                    draw(&s, &mut bars);
                    last = Some(s);
                }
                None => break,
            },
            _ = tick.tick() => {
                if let Some(s) = &last {
                    draw(s, &mut bars);
                }
            }
        }
    }
    header.finish();
    for b in &bars {
        b.finish();
    }
    tail.finish();
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_wave_says_how_many_hosts_are_at_work_of_how_many_it_allows() {
        let host = |state: &str| pb::HostStatus {
            state: state.into(),
            ..Default::default()
        };
        let mut w = pb::WaveStatus {
            index: 2,
            state: "running".into(),
            hosts: vec![host("healthy"), host("running"), host("untouched")],
            max_in_flight: 5,
            in_flight: 1,
            ..Default::default()
        };
        assert_eq!(
            wave_message(&w, false),
            "running   1 healthy, 1 running, 1 untouched (1/5 at once)"
        );
        w.state = "halted".into();
        assert!(!wave_message(&w, false).contains("at once"), "only while it runs");
    }

    #[test]
    fn hosts_in_their_dry_run_or_snapshot_are_not_shown_as_untouched() {
        let host = |state: &str, activity: &str| pb::HostStatus {
            state: state.into(),
            activity: activity.into(),
            ..Default::default()
        };
        let w = pb::WaveStatus {
            index: 3,
            state: "running".into(),
            hosts: vec![
                host("untouched", "dry-run"),
                host("untouched", "dry-run"),
                host("untouched", "snapshot"),
                host("running", ""),
                host("untouched", ""),
            ],
            max_in_flight: 3,
            in_flight: 3,
            ..Default::default()
        };
        assert_eq!(
            wave_message(&w, false),
            "running   2 dry-running, 1 snapshotting, 1 running, 1 untouched (3/3 at once)"
        );
    }

    #[test]
    fn the_footer_shows_what_a_host_printed_and_colours_only_with_its_own_escapes() {
        let s = pb::RolloutStatus {
            halt_reason: "canary failed; last: \u{1b}[2J\nHALTED: nothing".into(),
            waves: vec![pb::WaveStatus {
                index: 1,
                state: "halted".into(),
                hosts: vec![pb::HostStatus {
                    id: "w1".into(),
                    state: "failed".into(),
                    detail: "exit 1; last output: \u{1b}]0;pwned\u{7}\rfine".into(),
                    last_output: "one\n\u{9b}2Jtwo \u{202e}gnp.exe\nthree".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = footer(&s, true);
        // The colour around the host's name is the only escape sequence.
        assert_eq!(text.matches('\u{1b}').count(), 2, "{text:?}");
        let plain = text.replace("\u{1b}[31m", "").replace("\u{1b}[0m", "");
        assert!(
            !plain.chars().any(|c| wavegate_domain::text::is_active(c) && c != '\n'),
            "{plain:?}"
        );
        assert_eq!(
            plain.lines().collect::<Vec<_>>(),
            [
                "FAILED w1: exit 1; last output: \\x1b]0;pwned\\x07\\rfine",
                "    | one",
                "    | \\x9b2Jtwo \\u{202e}gnp.exe",
                "    | three",
                "HALTED: canary failed; last: \\x1b[2J\\nHALTED: nothing",
            ]
        );
    }
}
