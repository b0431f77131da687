//! `wavegate rollout notices`: for the customer announcement, which of each
//! customer's hosts a rollout touches, in which wave, inside which
//! maintenance windows, and not before when.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use clap::ValueEnum;
use serde_json::json;
use wavegate_domain::text::inert;
use wavegate_proto::v1 as pb;

use super::client::{Client, refused};
use super::show;

/// How the notices are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NoticeFormat {
    /// One row per host: customer,host,wave,state,windows,not_before.
    Csv,
    /// One object per customer, with its hosts.
    Json,
    /// For people.
    Table,
}

/// One host's line of a notice.
struct Row {
    customer: String,
    host: String,
    wave: u32,
    state: String,
    windows: String,
    not_before: String,
}

/// A CSV field: quoted when it holds a comma, a quote or a line break.
fn csv(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// When a wave may start at the earliest, as far as its windows say: the
/// time it waits for, or the next time its expected length fits.
fn not_before(w: &pb::WaveStatus, sets: &[wavegate_domain::windows::WindowSet], expected_ms: u64) -> String {
    if w.state != "pending" {
        return "started".into();
    }
    if w.waits_until_ms > 0 {
        return wavegate_domain::windows::utc(i64::try_from(w.waits_until_ms).unwrap_or(i64::MAX));
    }
    if sets.is_empty() {
        return "when its turn comes".into();
    }
    wavegate_domain::windows::next_start(sets, now_ms(), std::time::Duration::from_millis(expected_ms))
        .map_or_else(|| "no window fits it".into(), |(s, _)| wavegate_domain::windows::utc(s))
}

/// Run `rollout notices`.
pub async fn run(client: &mut Client, id: String, label: String, format: NoticeFormat) -> Result<u8> {
    let status = match client.status(pb::RolloutRequest { id: id.clone() }).await {
        Ok(s) => s.into_inner(),
        Err(status) => return Ok(refused(&status)),
    };
    let fleet = match client.fleet(pb::FleetRequest {}).await {
        Ok(f) => f.into_inner().hosts,
        Err(status) => return Ok(refused(&status)),
    };
    let labels: BTreeMap<&str, &str> = fleet
        .iter()
        .filter_map(|h| h.labels.get(&label).map(|v| (h.id.as_str(), v.as_str())))
        .collect();
    let mut rows = Vec::new();
    for w in &status.waves {
        let sets: Vec<_> = w
            .window_sets
            .iter()
            .cloned()
            .map(wavegate_proto::convert::window_set)
            .collect();
        let when = not_before(w, &sets, w.expected_ms);
        for h in &w.hosts {
            rows.push(Row {
                customer: labels.get(h.id.as_str()).copied().unwrap_or("").to_owned(),
                host: h.id.clone(),
                wave: w.index,
                state: h.state.clone(),
                windows: if w.windows.is_empty() {
                    "any time".into()
                } else {
                    w.windows.join("; ")
                },
                not_before: when.clone(),
            });
        }
    }
    rows.sort_by(|a, b| (&a.customer, a.wave, &a.host).cmp(&(&b.customer, b.wave, &b.host)));
    let unlabelled: Vec<&str> = rows
        .iter()
        .filter(|r| r.customer.is_empty())
        .map(|r| r.host.as_str())
        .collect();
    if !unlabelled.is_empty() {
        eprintln!(
            "wavegate: {} host(s) have no `{label}` label, so no customer to tell: {}",
            unlabelled.len(),
            inert(&unlabelled.join(", "))
        );
    }
    match format {
        NoticeFormat::Csv => {
            let mut out = String::from("customer,host,wave,state,windows,not_before\n");
            for r in &rows {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{}",
                    csv(&r.customer),
                    csv(&r.host),
                    r.wave,
                    csv(&r.state),
                    csv(&r.windows),
                    csv(&r.not_before)
                );
            }
            show(&out);
        }
        NoticeFormat::Json => {
            let mut by: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
            for r in &rows {
                by.entry(r.customer.as_str()).or_default().push(json!({
                    "host": r.host,
                    "wave": r.wave,
                    "state": r.state,
                    "windows": r.windows,
                    "not_before": r.not_before,
                }));
            }
            let v: Vec<_> = by
                .into_iter()
                .map(|(c, hosts)| json!({"customer": if c.is_empty() { serde_json::Value::Null } else { json!(c) }, "hosts": hosts}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"rollout": status.id, "label": label, "customers": v}))?
            );
        }
        NoticeFormat::Table => {
            let mut out = format!("rollout {}: hosts by `{}`\n", inert(&status.id), inert(&label));
            for r in &rows {
                let _ = writeln!(
                    out,
                    "{:<16} {:<12} wave {:<3} {:<10} {}  not before {}",
                    inert(if r.customer.is_empty() { "-" } else { &r.customer }),
                    inert(&r.host),
                    r.wave,
                    inert(&r.state),
                    inert(&r.windows),
                    inert(&r.not_before)
                );
            }
            show(&out);
        }
    }
    Ok(0)
}
