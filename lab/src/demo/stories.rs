//! The demo's stories, told as they happen: each plan submitted, approved
//! and followed wave by wave, and a summary at the end.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::time::Instant;
use wavegate_operator::client::Client;
use wavegate_proto::v1 as pb;

use super::provider::{BREAKS_SITE, CUSTOMERS, GOOD, NGINX_UPDATE, PACKAGE_FIX, REPLAY, customer_files, seed_hosts};
use crate::certs::lab_conn;
use crate::exec::exec_output;
use crate::repo::{Repo, seed_host};

async fn submit(
    client: &mut Client,
    dir: &Path,
    name: &str,
    yaml: &str,
) -> Result<std::result::Result<String, tonic::Status>> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    let req = pb::SubmitRequest {
        plan_yaml: yaml.to_owned(),
        plan_file: path.display().to_string(),
        bypass: Vec::new(),
    };
    Ok(client.submit(req).await.map(|r| r.into_inner().id))
}

/// Follow a rollout, printing every wave and host change, until it reaches
/// one of `until` (and, for a halt, until its rollback is done).
/// Submit a plan that must be accepted, and print its dry-run summaries.
async fn submit_and_show(client: &mut Client, dir: &Path, name: &str, yaml: &str, what: &str) -> Result<String> {
    let id = match submit(client, dir, name, yaml).await? {
        Ok(id) => id,
        Err(s) => bail!("{what} was refused: {}", s.message()),
    };
    let dry = client
        .dry_runs(pb::DryRunsRequest {
            id: id.clone(),
            host: String::new(),
        })
        .await?
        .into_inner();
    for line in &dry.summaries {
        println!("   {line}");
    }
    Ok(id)
}

async fn follow(client: &mut Client, id: &str, until: &[&str]) -> Result<pb::RolloutStatus> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = client
            .status(pb::RolloutRequest { id: id.to_owned() })
            .await?
            .into_inner();
        for w in &s.waves {
            let key = format!("wave {}", w.index);
            if seen.get(&key) != Some(&w.state) {
                let n = w.hosts.len();
                let what = if w.index == 1 { "canary, " } else { "" };
                let ids: Vec<&str> = w.hosts.iter().map(|h| h.id.as_str()).collect();
                if w.state == "running" || (!seen.contains_key(&key) && w.state != "pending") {
                    println!(
                        "    wave {} ({what}{n} host{}: {}) {}",
                        w.index,
                        if n == 1 { "" } else { "s" },
                        ids.join(" "),
                        w.state
                    );
                } else if w.state != "pending" {
                    println!("    wave {} {}", w.index, w.state);
                }
                seen.insert(key, w.state.clone());
            }
            for h in &w.hosts {
                let state = if h.rolled_back {
                    format!("{}, rolled back from its snapshot", h.state)
                } else {
                    h.state.clone()
                };
                let shown = matches!(h.state.as_str(), "healthy" | "failed");
                if shown && seen.get(&h.id) != Some(&state) {
                    println!("      {:<6} {state}", h.id);
                    seen.insert(h.id.clone(), state);
                }
            }
        }
        let rolled_back = s.waves.iter().flat_map(|w| &w.hosts).any(|h| h.rolled_back);
        if until.contains(&s.state.as_str()) && (s.state != "halted" || rolled_back) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("rollout {id} did not finish within 3 minutes (state {})", s.state);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Tell the stories in a running lab; returns whether each ended as it should.
pub(super) async fn stories(lab_dir: &Path) -> Result<bool> {
    let lab_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lab_dir.join("lab.json"))?)?;
    let url = lab_json["controller"].as_str().unwrap_or_default().to_owned();
    // The web view needs a login: its one-time link logs a browser in.
    let web = lab_json["web_login"]
        .as_str()
        .or(lab_json["web"].as_str())
        .unwrap_or_default()
        .to_owned();
    seed_hosts(lab_dir)?;
    let mut submitter = lab_conn(lab_dir, &url, "submitter").connect().await?;
    let mut approver = lab_conn(lab_dir, &url, "approver").connect().await?;
    let mut ok = true;

    println!("\n1. A routine OpenSSL fix, in canary waves, every backup after its primary");
    let id = match submit(&mut submitter, lab_dir, "openssl-fix", GOOD).await? {
        Ok(id) => id,
        Err(s) => bail!("the good plan was refused: {}", s.message()),
    };
    println!("   submitted as {id} by `submitter`; dry-run on the canary passed; approved by `approver`");
    approver
        .approve(pb::ApproveRequest {
            id: id.clone(),
            plan_hash: String::new(),
        })
        .await?;
    let s = follow(&mut submitter, &id, &["completed", "halted", "aborted"]).await?;
    let touched = s
        .waves
        .iter()
        .flat_map(|w| &w.hosts)
        .filter(|h| h.state == "healthy")
        .count();
    if s.state == "completed" {
        println!(
            "   COMPLETED: {touched} hosts patched in {} waves; backups only after their primaries' waves were confirmed",
            s.waves.len()
        );
    } else {
        println!("   unexpected: the rollout ended {}", s.state);
        ok = false;
    }

    println!("\n2. The update program of 20 June 2012: its target line is missing and it deletes /home");
    let before = customer_files(lab_dir);
    let prevented = match submit(&mut submitter, lab_dir, "vuln-fix-2012", REPLAY).await? {
        Ok(id) => {
            println!("   unexpected: the plan was accepted as {id}");
            ok = false;
            0
        }
        Err(status) => {
            let (id, dry_runs) = match wavegate_proto::convert::refusal(status.details()) {
                Some(wavegate_proto::convert::Refusal::Blocked { id, dry_runs, .. }) => (id, dry_runs),
                _ => ("?".to_owned(), Vec::new()),
            };
            let mut files = 0;
            for d in &dry_runs {
                let Some(r) = &d.report else { continue };
                files += r.outside_deleted.count;
                println!(
                    "   dry-run on {}: would delete {} files outside its write set, e.g. {}",
                    d.host,
                    r.outside_deleted.count,
                    r.outside.sample.join(", ")
                );
            }
            println!(
                "   REFUSED by its dry-run before anything ran; rollout {id} is stored refused and can never be approved"
            );
            files
        }
    };
    if customer_files(lab_dir) != before {
        println!("   unexpected: customer files changed");
        ok = false;
    }

    println!("\n3. A tuning change that breaks the sites it touches");
    let id3 = match submit(&mut submitter, lab_dir, "nginx-tuning", BREAKS_SITE).await? {
        Ok(id) => id,
        Err(s) => bail!("the tuning plan was refused: {}", s.message()),
    };
    approver
        .approve(pb::ApproveRequest {
            id: id3.clone(),
            plan_hash: String::new(),
        })
        .await?;
    let s = follow(&mut submitter, &id3, &["completed", "halted", "aborted"]).await?;
    let untouched = s
        .waves
        .iter()
        .skip(1)
        .flat_map(|w| &w.hosts)
        .filter(|h| h.state == "untouched")
        .count();
    if s.state == "halted" {
        println!("   HALTED by itself after the canary: {}", s.halt_reason);
        println!("   the canary was rolled back from its snapshot; {untouched} other hosts were never touched");
    } else {
        println!("   unexpected: the rollout ended {}", s.state);
        ok = false;
    }

    let (packages_ok, packages_line) = if crate::up::host_kind(lab_dir) == crate::up::HostKind::Container {
        nginx_story(&mut submitter, &mut approver, lab_dir).await?
    } else {
        wgtest_story(&mut submitter, &mut approver, lab_dir).await?
    };
    ok &= packages_ok;

    println!("\nSummary");
    println!("  patched:   {touched} hosts, canary first, backups last (rollout {id})");
    println!(
        "  prevented: the 2012 program's delete, refused by the dry-run on its canary, which alone would have lost {prevented} customer files"
    );
    println!("  halted:    the site-breaking change stopped at 1 host and was undone (rollout {id3})");
    println!("  packages:  {packages_line}");
    println!("  look next: the web view, logging in with {web}");
    println!("             (works once, while the lab runs: `wavegate demo --keep`)");
    println!(
        "             `. {}/identities/auditor.env; wavegate audit report {id3}`; `wavegate audit verify`",
        lab_dir.display()
    );
    Ok(ok)
}

/// Story 4 on directory hosts: the test package wgtest through apt.
async fn wgtest_story(submitter: &mut Client, approver: &mut Client, lab_dir: &Path) -> Result<(bool, String)> {
    let mut ok = true;
    println!("\n4. The fix as a package, through apt, from a local repository on loopback");
    let repo = Repo::start(&lab_dir.join("repo"))?;
    let shared: Vec<String> = (1..=CUSTOMERS.len()).map(|n| format!("w{n:02}")).collect();
    for h in &shared {
        seed_host(lab_dir, h, &repo, "good", None)?;
    }
    println!("   wgtest 1.0 is installed on the {} shared servers", shared.len());
    let id4 = submit_and_show(submitter, lab_dir, "wgtest-fix", PACKAGE_FIX, "the package plan").await?;
    approver
        .approve(pb::ApproveRequest {
            id: id4.clone(),
            plan_hash: String::new(),
        })
        .await?;
    let s = follow(submitter, &id4, &["completed", "halted", "aborted"]).await?;
    let mut upgraded = 0;
    for h in &shared {
        let cmd: Vec<String> = ["dpkg-query", "-W", "-f", "${Version}", "wgtest"]
            .map(str::to_owned)
            .to_vec();
        if let Ok((0, out, _)) = exec_output(lab_dir, h, None, &cmd)
            && out == b"1.1"
        {
            upgraded += 1;
        }
    }
    if s.state == "completed" && upgraded == shared.len() {
        println!(
            "   COMPLETED: dpkg says wgtest 1.1 on all {upgraded} servers; fetched with the network, dry-run and run without it"
        );
    } else {
        println!(
            "   unexpected: the rollout ended {}, {upgraded} hosts upgraded",
            s.state
        );
        ok = false;
    }

    Ok((
        ok,
        format!("wgtest 1.0 -> 1.1 through apt on {upgraded} hosts, each dry-run offline first (rollout {id4})"),
    ))
}

/// A command's trimmed output on a lab host (empty when it failed).
fn on(lab_dir: &Path, host: &str, cmd: &str) -> String {
    let cmd: Vec<String> = vec!["sh".into(), "-c".into(), cmd.into()];
    match exec_output(lab_dir, host, None, &cmd) {
        Ok((0, out, _)) => String::from_utf8_lossy(&out).trim().to_owned(),
        _ => String::new(),
    }
}

/// Story 4 on booted hosts: Debian's own nginx, rebuilt with a new
/// version, through apt; its maintainer scripts' restart held back in the
/// dry-run and done by the agent in the real run.
async fn nginx_story(submitter: &mut Client, approver: &mut Client, lab_dir: &Path) -> Result<(bool, String)> {
    let mut ok = true;
    println!("\n4. A real nginx update through apt, on hosts booted with systemd");
    let containers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab_dir.join("containers.json"))?)?;
    let gateway = containers["gateway"].as_str().unwrap_or("127.0.0.1");
    let repo = crate::repo::ServiceRepo::start(&lab_dir.join("repo"), gateway)?;
    let shared: Vec<String> = (1..=CUSTOMERS.len()).map(|n| format!("w{n:02}")).collect();
    for h in &shared {
        on(
            lab_dir,
            h,
            &format!(
                "printf '%s' '{}' > /etc/apt/sources.list.d/wavegate-lab.list",
                repo.source("good").trim()
            ),
        );
    }
    let pid = |h: &str| on(lab_dir, h, "systemctl show --property=MainPID --value nginx");
    let before: Vec<String> = shared.iter().map(|h| pid(h)).collect();
    println!(
        "   nginx {} runs under systemd on the {} shared servers; the repository offers {}",
        repo.installed,
        shared.len(),
        repo.good
    );
    let id4 = submit_and_show(submitter, lab_dir, "nginx-update", NGINX_UPDATE, "the nginx plan").await?;
    let canary = &shared[0];
    let after_dry = pid(canary);
    println!(
        "   after the dry-run, {canary}'s live nginx still has main PID {after_dry} (was {})",
        before[0]
    );
    ok &= after_dry == before[0];
    approver
        .approve(pb::ApproveRequest {
            id: id4.clone(),
            plan_hash: String::new(),
        })
        .await?;
    let s = follow(submitter, &id4, &["completed", "halted", "aborted"]).await?;
    let mut restarted = 0;
    for (h, b) in shared.iter().zip(&before) {
        let version = on(lab_dir, h, "dpkg-query -W -f '${Version}' nginx");
        let now = pid(h);
        if version == repo.good && now != *b && now != "0" {
            restarted += 1;
        }
    }
    if s.state == "completed" && restarted == shared.len() {
        println!(
            "   COMPLETED: nginx {} on all {restarted} servers, each restarted by the agent (a new main PID), answering over HTTP",
            repo.good
        );
    } else {
        println!(
            "   unexpected: the rollout ended {}, {restarted} hosts upgraded and restarted",
            s.state
        );
        ok = false;
    }
    Ok((
        ok,
        format!(
            "nginx {} -> {} through apt on {restarted} booted hosts, restarted by systemd only in the real run (rollout {id4})",
            repo.installed, repo.good
        ),
    ))
}
