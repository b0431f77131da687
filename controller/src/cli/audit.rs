//! `wavegate audit`: read, report, export and verify the audit log.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use ed25519_dalek::VerifyingKey;
use serde_json::json;
use wavegate_domain::audit::{self, AuditRecord, Checkpoint};
use wavegate_domain::text::{inert, inert_lines};
use wavegate_domain::units::{Scalar, parse_duration};
use wavegate_proto::v1 as pb;

use super::Output;
use super::client::{Conn, refused};
use crate::engine::utc;

/// `wavegate audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records, oldest first.
    Log {
        /// Only this rollout.
        #[arg(long)]
        rollout: Option<String>,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Only records since: a duration ago (`2h`) or a time (`2026-11-22T10:00:00Z`).
        #[arg(long)]
        since: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// A rollout's timeline, for a person.
    Report {
        /// Rollout id.
        rollout: String,
    },
    /// Write the log as JSON Lines that `audit verify --file` checks offline.
    Export {
        /// Keep only this rollout's record bodies (the chain stays whole).
        #[arg(long)]
        rollout: Option<String>,
        /// Where to write.
        #[arg(long)]
        file: PathBuf,
    },
    /// Verify the live log, or an export offline. Exit 0 when it verifies,
    /// 1 when a record was edited, removed, inserted or reordered.
    Verify {
        /// An export to verify offline (no controller needed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The controller's public key (hex), as `audit pubkey` printed it.
        /// Without it, the key written in the export is used, which proves
        /// only that the file is self-consistent.
        #[arg(long)]
        public_key: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The controller's audit public key (hex).
    Pubkey,
}

/// Parse `--since`: a duration ago, or `YYYY-MM-DDTHH:MM:SSZ`.
fn since_ms(s: &str, now_ms: u64) -> Result<u64> {
    if let Ok(d) = parse_duration(&Scalar::Text(s.to_owned())) {
        return Ok(now_ms.saturating_sub(d.as_millis() as u64));
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        s.get(r)
            .and_then(|x| x.parse().ok())
            .with_context(|| format!("`{s}`: write a duration like `2h` or a time like 2026-11-22T10:00:00Z"))
    };
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[19] != b'Z' {
        bail!("`{s}`: write a duration like `2h` or a time like 2026-11-22T10:00:00Z");
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000).max(0) as u64)
}

/// One record on one line: its text quotes hosts and plans (a step's last
/// output, a halt reason), made inert with a newline in it escaped.
fn line(r: &AuditRecord) -> String {
    match &r.body {
        Some(b) => format!(
            "{:>6}  {}  {:<8} {:<6} {:<8} {}",
            r.seq,
            utc(r.at_ms),
            inert(&b.kind),
            inert(b.rollout.as_deref().unwrap_or("-")),
            inert(b.host.as_deref().unwrap_or("-")),
            inert(&b.text)
        ),
        None => format!(
            "{:>6}  {}  (another rollout's record; hash {})",
            r.seq,
            utc(r.at_ms),
            &r.hash[..12]
        ),
    }
}

fn parse_records(resp: &pb::AuditResponse) -> Result<(Vec<AuditRecord>, Option<Checkpoint>)> {
    let records = resp
        .records_json
        .iter()
        .map(|j| serde_json::from_str(j))
        .collect::<Result<Vec<_>, _>>()?;
    let cp = if resp.checkpoint_json.is_empty() {
        None
    } else {
        Some(serde_json::from_str(&resp.checkpoint_json)?)
    };
    Ok((records, cp))
}

fn key_from_hex(hex_key: &str) -> Result<VerifyingKey> {
    let bytes = hex::decode(hex_key.trim()).context("the public key is not hex")?;
    let arr: [u8; 32] = bytes.as_slice().try_into().context("the public key is not 32 bytes")?;
    VerifyingKey::from_bytes(&arr).context("not an Ed25519 public key")
}

/// Verify an export file; prints the verdict and returns the exit status.
pub fn verify_file(path: &Path, public_key: Option<&str>) -> Result<u8> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut records = Vec::new();
    let mut cp: Option<Checkpoint> = None;
    let mut file_key: Option<String> = None;
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(l).with_context(|| format!("{}:{}: not a JSON line", path.display(), i + 1))?;
        match v["type"].as_str() {
            Some("wavegate-audit-export") => file_key = v["public_key"].as_str().map(str::to_owned),
            Some("record") => records.push(
                serde_json::from_value::<AuditRecord>(v)
                    .with_context(|| format!("{}:{}: not an audit record", path.display(), i + 1))?,
            ),
            Some("checkpoint") => {
                cp = Some(
                    serde_json::from_value(v)
                        .with_context(|| format!("{}:{}: bad checkpoint", path.display(), i + 1))?,
                )
            }
            _ => bail!("{}:{}: unknown line type", path.display(), i + 1),
        }
    }
    let key_hex = match (public_key, &file_key) {
        (Some(k), _) => k.to_owned(),
        (None, Some(k)) => {
            eprintln!(
                "note: using the public key written in the export; pass --public-key to check it is the controller's"
            );
            k.clone()
        }
        (None, None) => bail!("no public key: pass --public-key (see `wavegate audit pubkey`)"),
    };
    let Some(cp) = cp else {
        println!("TAMPERED: the export has no signed checkpoint");
        return Ok(1);
    };
    match audit::verify(&records, &cp, &key_from_hex(&key_hex)?) {
        Ok(n) => {
            println!(
                "OK: {n} records verified; the checkpoint at record {} is signed by {key_hex}",
                cp.seq
            );
            Ok(0)
        }
        Err(t) => {
            println!("TAMPERED: {}", inert(&t.to_string()));
            Ok(1)
        }
    }
}

/// Run an `audit` subcommand.
pub async fn run(cmd: AuditCommand, conn: &Conn) -> Result<u8> {
    if let AuditCommand::Verify {
        file: Some(file),
        public_key,
        ..
    } = &cmd
    {
        return verify_file(file, public_key.as_deref());
    }
    let mut client = conn.connect().await?;
    let fetch = |rollout: Option<String>| pb::AuditRequest {
        rollout_id: rollout.unwrap_or_default(),
    };
    match cmd {
        AuditCommand::Pubkey => match client.audit(fetch(None)).await {
            Ok(r) => {
                println!("{}", r.into_inner().public_key_hex);
                Ok(0)
            }
            Err(s) => Ok(fail(&s)),
        },
        AuditCommand::Verify { output, .. } => match client.audit_verify(pb::AuditVerifyRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                let doc = serde_json::json!({"ok": r.ok, "records": r.records, "first_bad_seq": r.first_bad_seq,
                                             "detail": r.detail, "public_key": r.public_key_hex});
                if output.emit(&doc)? {
                    return Ok(if r.ok { 0 } else { 1 });
                }
                if r.ok {
                    println!(
                        "OK: {} records verified; checkpoint signed by {}",
                        r.records, r.public_key_hex
                    );
                    Ok(0)
                } else {
                    println!("TAMPERED: {}", inert(&r.detail));
                    Ok(1)
                }
            }
            Err(s) => Ok(fail(&s)),
        },
        AuditCommand::Export { rollout, file } => {
            let resp = match client.audit(fetch(rollout.clone())).await {
                Ok(r) => r.into_inner(),
                Err(s) => return Ok(fail(&s)),
            };
            let (records, cp) = parse_records(&resp)?;
            let mut out = String::new();
            let _ = writeln!(
                out,
                "{}",
                json!({"type": "wavegate-audit-export", "public_key": resp.public_key_hex, "rollout": rollout})
            );
            for r in &records {
                let mut v = serde_json::to_value(r)?;
                v["type"] = json!("record");
                let _ = writeln!(out, "{v}");
            }
            if let Some(cp) = cp {
                let mut v = serde_json::to_value(&cp)?;
                v["type"] = json!("checkpoint");
                let _ = writeln!(out, "{v}");
            }
            std::fs::write(&file, out).with_context(|| format!("writing {}", file.display()))?;
            println!("wrote {} records to {}", records.len(), file.display());
            Ok(0)
        }
        AuditCommand::Log {
            rollout,
            host,
            since,
            output,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let since = match since.as_deref().map(|s| since_ms(s, now)) {
                Some(Err(e)) => {
                    eprintln!("wavegate: --since {e:#}");
                    return Ok(2);
                }
                Some(Ok(t)) => t,
                None => 0,
            };
            let resp = match client.audit(fetch(None)).await {
                Ok(r) => r.into_inner(),
                Err(s) => return Ok(fail(&s)),
            };
            let (records, _) = parse_records(&resp)?;
            let keep = |r: &&AuditRecord| {
                r.at_ms >= since
                    && r.body.as_ref().is_some_and(|b| {
                        // The controller resolved a short id (`r0007`) and
                        // left only that rollout's bodies.
                        rollout.as_ref().is_none_or(|x| {
                            b.rollout
                                .as_deref()
                                .is_some_and(|r| r == x || r.starts_with(&format!("{x}-")))
                        }) && host
                            .as_ref()
                            .is_none_or(|x| b.host.as_ref() == Some(x) || b.text.contains(x.as_str()))
                    })
            };
            let mut out = std::io::stdout().lock();
            for r in records.iter().filter(keep) {
                // One record per line (JSON) or per document (YAML), so a
                // long log streams.
                let text = match output.record(r)? {
                    Some(doc) => doc,
                    None => line(r),
                };
                // A reader that stops early (`| head`) is not an error.
                if writeln!(out, "{text}").is_err() {
                    break;
                }
            }
            Ok(0)
        }
        AuditCommand::Report { rollout } => {
            let resp = match client.audit(fetch(Some(rollout.clone()))).await {
                Ok(r) => r.into_inner(),
                Err(s) => return Ok(fail(&s)),
            };
            let (records, _) = parse_records(&resp)?;
            let mine: Vec<&AuditRecord> = records.iter().filter(|r| r.body.is_some()).collect();
            if mine.is_empty() {
                eprintln!("wavegate: no audit records for rollout {rollout}");
                return Ok(2);
            }
            let mut report = format!("Audit report for rollout {rollout} ({} records)\n\n", mine.len());
            for r in mine {
                let Some(b) = &r.body else { continue };
                match b.kind.as_str() {
                    "submit" => {
                        let _ = writeln!(
                            report,
                            "{}  SUBMITTED by {}",
                            utc(r.at_ms),
                            inert(b.actor.as_deref().unwrap_or("?"))
                        );
                        let _ = writeln!(
                            report,
                            "      plan hash  {}",
                            inert(b.data["plan_hash"].as_str().unwrap_or("?"))
                        );
                        let _ = writeln!(report, "      targets    {}", inert(&b.data["targets"].to_string()));
                        for w in b.data["waves"].as_array().into_iter().flatten() {
                            let _ = writeln!(
                                report,
                                "      wave {:<4}  {}",
                                inert(&w["index"].to_string()),
                                inert(&w["hosts"].to_string())
                            );
                        }
                    }
                    "host" => {
                        let last = &b.data["results"]
                            .as_array()
                            .and_then(|a| a.last().cloned())
                            .unwrap_or_default();
                        let extra = if last.is_null() {
                            String::new()
                        } else {
                            let sha = last["output_sha256"].as_str().unwrap_or("");
                            format!(
                                " [step `{}` {} exit {} in {} ms, output sha256 {}]",
                                inert(last["step"].as_str().unwrap_or("?")),
                                inert(last["outcome"].as_str().unwrap_or("?")),
                                inert(&last["exit_code"].to_string()),
                                inert(&last["duration_ms"].to_string()),
                                inert(sha.get(..12).unwrap_or(sha))
                            )
                        };
                        let _ = writeln!(report, "{}  host  {}{extra}", utc(r.at_ms), inert(&b.text));
                    }
                    _ => {
                        // Rollout events carry their own timestamp first.
                        let text = b
                            .text
                            .split_once(' ')
                            .map(|(_, rest)| rest)
                            .filter(|_| b.text.starts_with("20"))
                            .unwrap_or(&b.text);
                        let _ = writeln!(report, "{}  {}", utc(r.at_ms), inert(text));
                    }
                }
            }
            // Each record's text is one line's part, made inert above; the
            // report as a whole once more, whatever built it.
            let _ = std::io::stdout().lock().write_all(inert_lines(&report).as_bytes());
            Ok(0)
        }
    }
}

fn fail(status: &tonic::Status) -> u8 {
    refused(status)
}

#[cfg(test)]
mod tests {
    use super::since_ms;

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(since_ms("1h", 10_000_000).ok(), Some(10_000_000 - 3_600_000));
        assert_eq!(since_ms("2012-06-20T09:00:00Z", 0).ok(), Some(1_340_182_800_000));
        assert!(since_ms("yesterday", 0).is_err());
    }
}
