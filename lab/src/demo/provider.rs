//! The demo's hosting provider: its fleet, its customers' files, and the
//! plans its stories submit.

use std::path::Path;

use anyhow::{Context, Result};

pub(super) const CUSTOMERS: [&str; 8] = [
    "acme", "bluefin", "corvid", "dunlin", "egret", "finch", "gannet", "heron",
];

/// The demo's fleet: eight shared-hosting primaries, a backup for each in
/// another rack, two name servers, a mail relay and a management host.
pub(super) fn fleet() -> String {
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

pub(super) const GOOD: &str = "name: openssl-fix
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

pub(super) const REPLAY: &str = "name: vuln-fix-2012-06-20
description: the update program of 20 June 2012, replayed
targets:
  groups: [g-shared, g-backup]
steps:
  - name: vulnerability fix
    run: sh /opt/update/update.sh
    writes: [/opt/update/conf]
    timeout: 30s
";

/// The 2012 update program: it writes its new version to `version_file`,
/// and the line that named the target servers went missing, so nothing
/// stops the delete: it runs against every customer's data. The demo and
/// the tests replay this one script.
pub fn update_2012(version_file: &str) -> String {
    format!(
        "#!/bin/sh
# The update program. The line that named the target servers went missing,
# and nothing stops the delete: it runs against every customer's data.
set -e
TARGET_SERVERS=\"\"
echo 2012-06-20 > {version_file}
rm -rf /home/$TARGET_SERVERS*
"
    )
}

pub(super) const BREAKS_SITE: &str = "name: nginx-tuning
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

pub(super) const NGINX_UPDATE: &str = "name: nginx-update
description: Debian's nginx, a new build, through apt; the shared servers only
targets:
  groups: [g-shared]
  expect_count: 8
steps:
  - name: upgrade nginx
    packages: {manager: apt, upgrade: [nginx]}
    timeout: 2m
waves:
  - size: 1
  - size: 50%
health:
  checks:
    - {name: site answers, http: \"http://127.0.0.1/\", expect_status: 200}
  bake: 300ms
  interval: 100ms
on_failure: rollback
";

pub(super) const PACKAGE_FIX: &str = "name: wgtest-fix
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

fn seed(dir: &Path, host: &str, path: &str, text: &str) -> Result<()> {
    let p = dir
        .join("hosts")
        .join(host)
        .join("root")
        .join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().context("parent")?)?;
    // A file of its own, not through a symlink a booted host's package
    // put there (nginx's sites-enabled/default).
    let _ = std::fs::remove_file(&p);
    std::fs::write(&p, text).with_context(|| format!("seeding {}", p.display()))
}

/// Files under /home on every host: (count, total bytes).
pub(super) fn customer_files(dir: &Path) -> (usize, u64) {
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

/// Every primary and backup server with its customers' sites and mail,
/// and the files the stories' plans change.
pub(super) fn seed_hosts(lab_dir: &Path) -> Result<()> {
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
                "server { listen 80 default_server; root /home; autoindex on; }\n",
            )?;
            seed(lab_dir, &host, "/opt/update/conf/version", "2012-06-01\n")?;
            seed(
                lab_dir,
                &host,
                "/opt/update/update.sh",
                &update_2012("/opt/update/conf/version"),
            )?;
        }
    }
    Ok(())
}
