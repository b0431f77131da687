//! `wavegate demo`: a small hosting provider in a lab on this machine, and
//! three stories told with a live, plain-text display (it works in a pipe):
//! a good fix rolls out in canary waves, backups last; the 2012 update
//! program is refused by its dry-run; a plan that breaks a site halts on its
//! canary and the canary is rolled back. Everything lives in a temporary
//! lab directory, removed at the end; the machine's own files are never
//! touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::time::Instant;
use wavegate_proto::v1 as pb;

use super::PolicyArgs;
use super::lab;

/// Flags of `wavegate demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the lab running at the end (to browse the web view); stop it
    /// later with `wavegate lab down --dir DIR`.
    #[arg(long)]
    pub keep: bool,
    /// Where to build the lab (default: a new directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const CUSTOMERS: [&str; 8] = [
    "acme", "bluefin", "corvid", "dunlin", "egret", "finch", "gannet", "heron",
];

/// The demo's fleet: eight shared-hosting primaries, a backup for each in
/// another rack, two name servers, a mail relay and a management host.
fn fleet() -> String {
    let mut s = String::from("# The demo's hosting provider (written by `wavegate demo`).\nhosts:\n");
    for (i, c) in CUSTOMERS.iter().enumerate() {
        let n = i + 1;
        let rack = (i / 2) + 1;
        s.push_str(&format!(
            "  - {{id: w{n:02}, groups: [g-shared], labels: {{os: debian{}, customer: {c}}}, failure_domain: dc1-rackA{rack:02}, role: primary}}\n",
            if n % 3 == 0 { 11 } else { 12 }
        ));
    }
    for i in 0..CUSTOMERS.len() {
        let n = i + 1;
        let rack = (i / 2) + 1;
        s.push_str(&format!(
            "  - {{id: bk{n:02}, groups: [g-backup], labels: {{os: debian12}}, failure_domain: dc1-rackB{rack:02}, role: backup, backup_of: [w{n:02}]}}\n"
        ));
    }
    for (id, group) in [
        ("ns1", "g-dns"),
        ("ns2", "g-dns"),
        ("mx1", "g-mail-relay"),
        ("mgmt1", "g-mgmt"),
    ] {
        s.push_str(&format!(
            "  - {{id: {id}, groups: [{group}], labels: {{os: debian12}}, failure_domain: dc1-{id}}}\n"
        ));
    }
    s
}

const GOOD: &str = "name: openssl-fix
description: a routine OpenSSL fix for the shared-hosting tier and its backups
targets:
  groups: [g-shared, g-backup]
  expect_count: 16
steps:
  - name: patch openssl
    run: echo \"openssl patched $(date -u +%FT%TZ)\" > /etc/ssl/patch-level
    writes: [/etc/ssl/patch-level]
    timeout: 30s
waves:
  - size: 1
  - size: 25%
  - size: 50%
health:
  checks:
    - {name: patched, exec: \"test -s /etc/ssl/patch-level\"}
    - {name: sites, exec: \"ls /home/*/public_html/index.html\"}
  bake: 300ms
  interval: 100ms
";

const REPLAY: &str = "name: vuln-fix-2012-06-20
description: the update program of 20 June 2012, replayed
targets:
  groups: [g-shared, g-backup]
steps:
  - name: vulnerability fix
    run: sh /opt/update/update.sh
    writes: [/opt/update/conf]
    timeout: 30s
";

const REPLAY_SCRIPT: &str = "#!/bin/sh
# The update program. The line that named the target servers went missing,
# and nothing stops the delete: it runs against every customer's data.
set -e
TARGET_SERVERS=\"\"
echo 2012-06-20 > /opt/update/conf/version
rm -rf /home/$TARGET_SERVERS*
";

const BREAKS_SITE: &str = "name: nginx-tuning
description: a tuning change that breaks the sites it touches
targets:
  groups: [g-shared]
steps:
  - name: tune nginx
    run: echo 'location / { return 500; }' >> /etc/nginx/sites-enabled/default
    writes: [/etc/nginx/sites-enabled]
    timeout: 30s
health:
  checks:
    - {name: site answers, exec: \"! grep -q 'return 500' /etc/nginx/sites-enabled/default\"}
  bake: 300ms
  interval: 100ms
on_failure: rollback
";

const PACKAGE_FIX: &str = "name: wgtest-fix
description: the fix, as a package, through apt
targets:
  groups: [g-shared]
  expect_count: 8
steps:
  - name: upgrade wgtest
    packages: {manager: apt, upgrade: [wgtest]}
    timeout: 2m
waves:
  - size: 1
  - size: 50%
health:
  checks:
    - {name: wgtest answers, exec: \"/opt/wgtest/bin/wgtest | grep -qx 'wgtest 1.1'\"}
  bake: 300ms
  interval: 100ms
";

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// What this machine lacks for the demo, each with how to get it.
fn preflight() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root: the lab's hosts run in mount, PID and network namespaces; run `sudo wavegate demo`".into());
    }
    if !std::fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .contains("overlay")
    {
        missing.push(
            "overlayfs, for the dry-run sandbox: run `modprobe overlay` (or use a kernel with CONFIG_OVERLAY_FS)"
                .into(),
        );
    }
    for (cmd, pkg) in [
        ("unshare", "util-linux"),
        ("chroot", "coreutils"),
        ("mount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("dpkg-deb", "dpkg"),
        ("apt-get", "apt"),
        ("apt-ftparchive", "apt-utils"),
    ] {
        if !on_path(cmd) {
            missing.push(format!("`{cmd}`: install it with `apt-get install {pkg}`"));
        }
    }
    missing
}

fn seed(dir: &Path, host: &str, path: &str, text: &str) -> Result<()> {
    let p = dir
        .join("hosts")
        .join(host)
        .join("root")
        .join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().context("parent")?)?;
    std::fs::write(&p, text).with_context(|| format!("seeding {}", p.display()))
}

/// Files under /home on every host: (count, total bytes).
fn customer_files(dir: &Path) -> (usize, u64) {
    let mut out = (0, 0);
    let Ok(hosts) = std::fs::read_dir(dir.join("hosts")) else {
        return out;
    };
    for h in hosts.flatten() {
        let mut stack = vec![h.path().join("root/home")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let Ok(m) = e.path().symlink_metadata() else { continue };
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    out.0 += 1;
                    out.1 += m.len();
                }
            }
        }
    }
    out
}

async fn submit(
    client: &mut lab::Client,
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
async fn follow(client: &mut lab::Client, id: &str, until: &[&str]) -> Result<pb::RolloutStatus> {
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

/// Run the demo; returns the exit status.
pub async fn run(args: DemoArgs) -> Result<u8> {
    let missing = preflight();
    if !missing.is_empty() {
        eprintln!("wavegate demo cannot run on this machine; it needs:");
        for m in &missing {
            eprintln!("  - {m}");
        }
        return Ok(1);
    }
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("wavegate-demo-{}", std::process::id())));
    if dir.exists() {
        bail!("{} exists; give --dir a new directory", dir.display());
    }
    std::fs::create_dir_all(&dir)?;
    let dir = dir.canonicalize()?;
    println!(
        "wavegate demo: a small hosting provider in a lab under {}",
        dir.display()
    );
    println!("(20 hosts: 8 shared-hosting servers w01-w08, a backup for each bk01-bk08 in another rack,");
    println!(" name servers, a mail relay and a management host. Each keeps its customers' /home on an");
    println!(" ext4 filesystem of its own, on a loop device; nothing outside that directory is touched)\n");
    let fleet_path = dir.join("fleet.yaml");
    std::fs::write(&fleet_path, fleet())?;
    let policies = PolicyArgs { policies: None };
    let homes = lab::FsSpec::parse("/home=ext4").map_err(anyhow::Error::msg)?;
    let status = lab::up(&fleet_path, &dir.join("lab"), &policies, None, "10s", &[homes]).await?;
    if status != 0 {
        bail!("the lab did not start");
    }
    let lab_dir = dir.join("lab");
    let result = stories(&lab_dir).await;
    if args.keep {
        println!(
            "\nThe lab keeps running: `wavegate lab down --dir {}` stops it.",
            lab_dir.display()
        );
    } else {
        lab::down(&lab_dir)?;
        lab::unmount_all(&lab_dir)?;
        let _ = std::fs::remove_dir_all(&dir);
        println!("\nThe lab is stopped and removed (run `wavegate demo --keep` to browse it afterwards).");
    }
    match result {
        Ok(true) => Ok(0),
        Ok(false) => Ok(1),
        Err(e) => {
            eprintln!("wavegate demo: {e:#}");
            Ok(1)
        }
    }
}

async fn stories(lab_dir: &Path) -> Result<bool> {
    let lab_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lab_dir.join("lab.json"))?)?;
    let url = lab_json["controller"].as_str().unwrap_or_default().to_owned();
    // The web view needs a login: its one-time link logs a browser in.
    let web = lab_json["web_login"]
        .as_str()
        .or(lab_json["web"].as_str())
        .unwrap_or_default()
        .to_owned();
    for i in 0..CUSTOMERS.len() {
        for host in [format!("w{:02}", i + 1), format!("bk{:02}", i + 1)] {
            // A shared server hosts several customers' sites and mail.
            for c in [CUSTOMERS[i], CUSTOMERS[(i + 1) % 8], CUSTOMERS[(i + 2) % 8]] {
                seed(
                    lab_dir,
                    &host,
                    &format!("/home/{c}/public_html/index.html"),
                    &format!("<h1>{c}</h1>\n"),
                )?;
                seed(
                    lab_dir,
                    &host,
                    &format!("/home/{c}/Maildir/cur/1001.eml"),
                    &format!("From: orders@{c}.example\n\nOrder 1001\n"),
                )?;
            }
            seed(lab_dir, &host, "/etc/ssl/openssl.cnf", "# openssl\n")?;
            seed(
                lab_dir,
                &host,
                "/etc/nginx/sites-enabled/default",
                "server { listen 80; root /home; }\n",
            )?;
            seed(lab_dir, &host, "/opt/update/conf/version", "2012-06-01\n")?;
            seed(lab_dir, &host, "/opt/update/update.sh", REPLAY_SCRIPT)?;
        }
    }
    let mut submitter = lab::lab_conn(lab_dir, &url, "submitter").connect().await?;
    let mut approver = lab::lab_conn(lab_dir, &url, "approver").connect().await?;
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

    println!("\n4. The fix as a package, through apt, from a local repository on loopback");
    let repo = crate::repo::Repo::start(&lab_dir.join("repo"))?;
    let shared: Vec<String> = (1..=CUSTOMERS.len()).map(|n| format!("w{n:02}")).collect();
    for h in &shared {
        crate::repo::seed_host(lab_dir, h, &repo, "good", None)?;
    }
    println!("   wgtest 1.0 is installed on the {} shared servers", shared.len());
    let id4 = match submit(&mut submitter, lab_dir, "wgtest-fix", PACKAGE_FIX).await? {
        Ok(id) => id,
        Err(s) => bail!("the package plan was refused: {}", s.message()),
    };
    let dry = submitter
        .dry_runs(pb::DryRunsRequest {
            id: id4.clone(),
            host: String::new(),
        })
        .await?
        .into_inner();
    for line in &dry.summaries {
        println!("   {line}");
    }
    approver
        .approve(pb::ApproveRequest {
            id: id4.clone(),
            plan_hash: String::new(),
        })
        .await?;
    let s = follow(&mut submitter, &id4, &["completed", "halted", "aborted"]).await?;
    let mut upgraded = 0;
    for h in &shared {
        let cmd: Vec<String> = ["dpkg-query", "-W", "-f", "${Version}", "wgtest"]
            .map(str::to_owned)
            .to_vec();
        if let Ok((0, out, _)) = lab::exec_output(lab_dir, h, None, &cmd)
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

    println!("\nSummary");
    println!("  patched:   {touched} hosts, canary first, backups last (rollout {id})");
    println!(
        "  prevented: the 2012 program's delete, refused by the dry-run on its canary, which alone would have lost {prevented} customer files"
    );
    println!("  halted:    the site-breaking change stopped at 1 host and was undone (rollout {id3})");
    println!(
        "  packages:  wgtest 1.0 -> 1.1 through apt on {upgraded} hosts, each dry-run offline first (rollout {id4})"
    );
    println!("  look next: the web view, logging in with {web}");
    println!("             (works once, while the lab runs: `wavegate demo --keep`)");
    println!(
        "             `. {}/identities/auditor.env; wavegate audit report {id3}`; `wavegate audit verify`",
        lab_dir.display()
    );
    Ok(ok)
}
