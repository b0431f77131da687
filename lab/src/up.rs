//! `lab up`: build a lab for an inventory and start it: certificates, host
//! roots and filesystems, the controllers, one agent per host, the
//! identities and `lab.json`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::time::Instant;
use wavegate_domain::{Fleet, Source};
use wavegate_operator::policies::PolicyArgs;
use wavegate_operator::tls::CertDir;
use wavegate_proto::v1 as pb;

use crate::absolute;
use crate::certs::{IDENTITIES, env_file, lab_conn};
use crate::disks::{FsSpec, mount_disks, unmount_all};
use crate::hosts::host_root;
use crate::policies::lab_policies;
use crate::processes::{down, running, spawn};
use crate::status::fetch_fleet;

/// What a lab's hosts are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostKind {
    /// A directory each, the agent a process of the lab (the fastest).
    #[default]
    Dir,
    /// A systemd-nspawn container each, booted with systemd as PID 1 from
    /// a Debian 12 image; the agent installed over ssh and run by its unit.
    Container,
    /// A qemu virtual machine each, booting the same image's kernel (KVM
    /// when this machine can run the guest, TCG otherwise), `/home` on a
    /// virtual disk of its own; the agent installed over ssh likewise.
    Vm,
}

impl HostKind {
    /// Its name on the command line and in `lab.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            HostKind::Dir => "dir",
            HostKind::Container => "container",
            HostKind::Vm => "vm",
        }
    }
}

/// The lab's kind of hosts, as `lab.json` records it.
pub fn host_kind(dir: &Path) -> HostKind {
    if dir.join("containers.json").exists() {
        HostKind::Container
    } else if dir.join("vms.json").exists() {
        HostKind::Vm
    } else {
        HostKind::Dir
    }
}

/// Build and start a lab; returns the exit status.
pub async fn up(
    fleet_path: &Path,
    dir: &Path,
    policies: &PolicyArgs,
    agent_bin: Option<PathBuf>,
    grace: &str,
    fs: &[FsSpec],
) -> Result<u8> {
    up_with(fleet_path, dir, policies, agent_bin, grace, fs, &[]).await
}

/// [`up`] with hosts of the given kind.
pub async fn up_kind(
    fleet_path: &Path,
    dir: &Path,
    policies: &PolicyArgs,
    grace: &str,
    fs: &[FsSpec],
    kind: HostKind,
) -> Result<u8> {
    up_ha(fleet_path, dir, policies, None, grace, fs, &[], None, kind).await
}

/// A lab's controllers on an etcd store.
#[derive(Clone, Debug)]
pub struct Ha {
    /// The store URL each controller is given, in order (the first leads).
    pub stores: Vec<String>,
    /// The key prefix.
    pub prefix: String,
    /// The leadership lease.
    pub lease_ttl: String,
}

/// [`up`], with more flags for the lab's `wavegate serve`.
pub async fn up_with(
    fleet_path: &Path,
    dir: &Path,
    policies: &PolicyArgs,
    agent_bin: Option<PathBuf>,
    grace: &str,
    fs: &[FsSpec],
    serve_args: &[String],
) -> Result<u8> {
    up_ha(
        fleet_path,
        dir,
        policies,
        agent_bin,
        grace,
        fs,
        serve_args,
        None,
        HostKind::Dir,
    )
    .await
}

/// [`up_with`], the controllers on an etcd store when `ha` says so.
#[allow(clippy::too_many_arguments)]
pub async fn up_ha(
    fleet_path: &Path,
    dir: &Path,
    policies: &PolicyArgs,
    agent_bin: Option<PathBuf>,
    grace: &str,
    fs: &[FsSpec],
    serve_args: &[String],
    ha: Option<&Ha>,
    kind: HostKind,
) -> Result<u8> {
    let dir = absolute(dir)?;
    let fleet_path = absolute(fleet_path)?;
    let text = std::fs::read_to_string(&fleet_path).with_context(|| format!("reading {}", fleet_path.display()))?;
    let name = fleet_path.display().to_string();
    let fleet = match Fleet::parse(Source {
        name: &name,
        text: &text,
    }) {
        Ok(f) => f,
        Err(v) => {
            for x in &v {
                eprintln!("{x}");
            }
            return Ok(wavegate_domain::exit_status(&v));
        }
    };
    if dir.join("lab.json").exists() && !running(&dir)?.is_empty() {
        bail!(
            "a lab is already running in {}; run `wavegate lab down --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    let me = std::env::current_exe()?;
    let agent_bin = match agent_bin {
        Some(b) => b,
        None => me.parent().map(|p| p.join("wavegate-agent")).unwrap_or_default(),
    };
    if !agent_bin.exists() {
        bail!(
            "no agent binary at {}; build it (cargo build --workspace) or give --agent-bin",
            agent_bin.display()
        );
    }
    for sub in ["logs", "identities", "hosts", "controller"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    // Each agent is told its host's role on its own command line, as an
    // operator's unit would: the agent, not the controller, checks a step's
    // `only_roles` against it.
    let role_of = |h: &str| {
        fleet
            .lookup(h)
            .map_or(wavegate_domain::fleet::Role::Standalone, |i| fleet.host(i).role)
            .to_string()
    };
    let hosts: Vec<String> = {
        let mut v: Vec<String> = fleet.hosts().map(|h| fleet.id(h).to_owned()).collect();
        v.sort();
        v
    };
    if (!fs.is_empty() || kind != HostKind::Dir) && !nix::unistd::geteuid().is_root() {
        bail!("--fs, container and VM hosts need root (loop devices, mounts, namespaces)");
    }
    if kind == HostKind::Vm && fs.iter().any(|f| f.path != "/home") {
        bail!(
            "a VM host has /home on a virtual disk of its own; other --fs filesystems are for dir and container hosts"
        );
    }
    let mut vm_image = None;
    let vms = match kind {
        HostKind::Vm => {
            let image = crate::image::ensure()?;
            let vms = crate::vm::prepare(&dir, &image, &hosts)?;
            vm_image = Some(image);
            Some(vms)
        }
        _ => None,
    };
    // Container hosts: the image, the bridge the controller listens on
    // and every host's root, before the certificates name that address.
    let net = match kind {
        HostKind::Dir | HostKind::Vm => None,
        HostKind::Container => {
            let image = crate::image::ensure()?;
            crate::container::enough_inotify()?;
            let net = crate::container::network(&dir, &hosts)?;
            if let Err(e) = crate::container::roots(&dir, &image, &net) {
                let _ = unmount_all(&dir);
                let _ = crate::container::remove_network(&dir);
                return Err(e);
            }
            Some(net)
        }
    };
    let listen = net
        .as_ref()
        .map_or("127.0.0.1:0".to_owned(), |n| format!("{}:0", n.gateway));
    let certs = CertDir::new(dir.join("certs"));
    if !certs.ca().exists() {
        let names: Vec<String> = net.iter().map(|n| n.gateway.clone()).collect();
        certs.init(&names)?;
    }
    for h in &hosts {
        certs.issue_agent(h)?;
        if kind == HostKind::Dir {
            host_root(&dir.join("hosts").join(h).join("root"))?;
            std::fs::create_dir_all(dir.join("hosts").join(h).join("agent"))?;
        }
    }
    // Every host's filesystems, before any agent starts (a VM's are
    // virtual disks, made with it).
    for h in hosts.iter().filter(|_| vms.is_none()) {
        if let Err(e) = mount_disks(&dir.join("hosts").join(h), fs) {
            let _ = unmount_all(&dir);
            return Err(e.context(format!("giving host {h} its filesystems")));
        }
    }
    let mut identities = Vec::new();
    for (stem, name, role) in IDENTITIES {
        // Each lab identity is a person of its own.
        identities.push((*stem, certs.issue_operator(name, *role, &format!("{name}@lab"))?));
    }

    // The controllers: one, or (on etcd) the first, elected, then the
    // standbys, every one with the first one's audit signing key.
    let policy_dir = match &policies.policies {
        Some(p) => absolute(p)?,
        None => lab_policies(&dir)?,
    };
    let count = ha.map_or(1, |h| h.stores.len());
    let mut urls = Vec::new();
    let mut webs = Vec::new();
    let mut web_logins = Vec::new();
    for i in 1..=count {
        let suffix = if i == 1 { String::new() } else { format!("-{i}") };
        let data = dir.join(format!("controller{suffix}"));
        std::fs::create_dir_all(&data)?;
        if i > 1 {
            std::fs::copy(dir.join("controller/audit-ed25519.key"), data.join("audit-ed25519.key"))
                .context("sharing the first controller's audit key")?;
        }
        let addr_file = dir.join(format!("controller{suffix}.addr"));
        let web_file = dir.join(format!("web{suffix}.addr"));
        let login_file = dir.join(format!("web{suffix}.login"));
        let _ = std::fs::remove_file(&addr_file);
        let _ = std::fs::remove_file(&web_file);
        let _ = std::fs::remove_file(&login_file);
        let server = certs.controller();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data".into(),
            data.display().to_string(),
            "--fleet".into(),
            fleet_path.display().to_string(),
            "--listen".into(),
            listen.clone(),
            "--addr-file".into(),
            addr_file.display().to_string(),
            "--ca".into(),
            certs.ca().display().to_string(),
            "--cert".into(),
            server.cert.display().to_string(),
            "--key".into(),
            server.key.display().to_string(),
            "--agent-grace".into(),
            grace.to_owned(),
            "--web-listen".into(),
            "127.0.0.1:0".into(),
            "--web-addr-file".into(),
            web_file.display().to_string(),
            "--web-login-file".into(),
            login_file.display().to_string(),
            "--policies".into(),
            policy_dir.display().to_string(),
        ];
        if let Some(h) = ha {
            args.extend([
                "--store".into(),
                h.stores[i - 1].clone(),
                "--store-prefix".into(),
                h.prefix.clone(),
                "--lease-ttl".into(),
                h.lease_ttl.clone(),
            ]);
        }
        args.extend(serve_args.iter().cloned());
        let controller_log = dir.join(format!("logs/controller{suffix}.log"));
        spawn(&me, &args, &controller_log)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a.trim().to_owned();
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&controller_log).unwrap_or_default();
                let _ = down(&dir);
                let _ = unmount_all(&dir);
                bail!("controller {i} did not start within 30 s; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let url = format!("https://{addr}");
        if ha.is_some() && i == 1 {
            // The first one leads before any other starts.
            let admin = lab_conn(&dir, &url, "admin");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let role = match admin.connect_to(&url).await {
                    Ok(mut c) => c.role(pb::RoleRequest {}).await.map(|r| r.into_inner().role).ok(),
                    Err(_) => None,
                };
                if role.as_deref() == Some("leader") {
                    break;
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(&controller_log).unwrap_or_default();
                    let _ = down(&dir);
                    let _ = unmount_all(&dir);
                    bail!("the first controller was not elected within 30 s; its log:\n{log}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let web_url = match std::fs::read_to_string(&web_file) {
            Ok(a) => format!("https://{}", a.trim()),
            Err(_) => bail!("controller {i} did not report its web address"),
        };
        // Written before the address files: there by now.
        let login = match std::fs::read_to_string(&login_file) {
            Ok(l) => l.trim().to_owned(),
            Err(_) => bail!("controller {i} did not write its web login link"),
        };
        urls.push(url);
        webs.push(web_url);
        web_logins.push((login, login_file));
    }
    let url = urls.join(",");

    // One agent per host: booted hosts get theirs over ssh, under its unit.
    if net.is_some() || vms.is_some() {
        let mut endpoints = Vec::new();
        if let Some(net) = &net {
            for node in net.nodes.values() {
                let mut args: Vec<String> = vec!["lab".into(), "machine".into(), "--".into()];
                args.extend(crate::container::nspawn_args(&dir, node));
                spawn(&me, &args, &dir.join(format!("logs/console-{}.log", node.id)))?;
                endpoints.push((node.id.clone(), node.addr.clone(), 22));
            }
        }
        if let (Some(vms), Some(image)) = (&vms, &vm_image) {
            for (h, port) in &vms.ssh_ports {
                let mut args: Vec<String> = vec!["lab".into(), "machine".into(), "--".into()];
                args.extend(crate::vm::qemu_args(&dir, image, h, *port, &urls[0])?);
                spawn(&me, &args, &dir.join(format!("logs/console-{h}.log")))?;
                endpoints.push((h.clone(), "127.0.0.1".to_owned(), *port));
            }
        }
        let agent_url = if vms.is_some() {
            crate::vm::agent_url()
        } else {
            url.clone()
        };
        let boot_within = Duration::from_secs(if vms.is_some() { 300 } else { 120 });
        let started = async {
            crate::container::wait_for_sshd(&endpoints, boot_within).await?;
            let pair = certs.operator("admin");
            let env = [
                ("WAVEGATE_CONTROLLER".to_owned(), url.clone()),
                ("WAVEGATE_CA".to_owned(), certs.ca().display().to_string()),
                ("WAVEGATE_CERT".to_owned(), pair.cert.display().to_string()),
                ("WAVEGATE_KEY".to_owned(), pair.key.display().to_string()),
            ];
            let with_roles: Vec<(String, String)> = hosts.iter().map(|h| (h.clone(), role_of(h))).collect();
            crate::container::install_agents(&dir, &me, &agent_bin, &agent_url, &env, &with_roles).await
        };
        if let Err(e) = started.await {
            let _ = down(&dir);
            let _ = unmount_all(&dir);
            let _ = crate::container::remove_network(&dir);
            return Err(e);
        }
    }
    for h in hosts.iter().filter(|_| kind == HostKind::Dir) {
        let pair = certs.agent(h);
        let host_dir = dir.join("hosts").join(h);
        let mut args: Vec<String> = vec![
            "lab".into(),
            "boot".into(),
            "--host-dir".into(),
            host_dir.display().to_string(),
            "--boot-id-file".into(),
            host_dir.join("boot-id").display().to_string(),
            "--".into(),
            agent_bin.display().to_string(),
            "--controller".into(),
            url.clone(),
            "--ca".into(),
            certs.ca().display().to_string(),
            "--cert".into(),
            pair.cert.display().to_string(),
            "--key".into(),
            pair.key.display().to_string(),
            "--host-id".into(),
            h.clone(),
            "--role".into(),
            role_of(h),
            "--host-root".into(),
            host_dir.join("root").display().to_string(),
            "--state-dir".into(),
            host_dir.join("agent").display().to_string(),
            "--boot-id-file".into(),
            host_dir.join("boot-id").display().to_string(),
            "--lab-reboot".into(),
        ];
        args.shrink_to_fit();
        spawn(&me, &args, &dir.join(format!("logs/agent-{h}.log")))?;
    }
    for (stem, pair) in &identities {
        std::fs::write(
            dir.join("identities").join(format!("{stem}.env")),
            env_file(&url, &certs.ca(), pair),
        )?;
    }
    std::fs::write(
        dir.join("lab.json"),
        serde_json::to_string_pretty(&json!({
            "controller": urls[0],
            "controllers": urls,
            "web": webs[0],
            "webs": webs,
            // The first login link, used up by its first use; each
            // controller's file always holds its current one.
            "web_login": web_logins[0].0,
            "web_login_files": web_logins.iter().map(|(_, f)| f.display().to_string()).collect::<Vec<_>>(),
            "store": ha.map(|h| json!({"urls": h.stores, "prefix": h.prefix})),
            "hosts": kind.as_str(),
        }))?,
    )?;

    // Wait for every agent.
    let admin = lab_conn(&dir, &url, "admin");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fleet = fetch_fleet(&admin).await;
        let missing: Vec<String> = match &fleet {
            Ok(f) => f.hosts.iter().filter(|h| !h.connected).map(|h| h.id.clone()).collect(),
            Err(_) => hosts.clone(),
        };
        if missing.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "agents not connected after 60 s: {} (see {}/logs)",
                missing.join(", "),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "lab up in {}: controller {url}, {} agents connected",
        dir.display(),
        hosts.len()
    );
    if let Some(net) = &net {
        println!(
            "  every host is a container booted with systemd on bridge {} ({}/24); `ssh -F {}/ssh/config HOST` reaches it",
            net.bridge,
            net.gateway,
            dir.display()
        );
    }
    if vms.is_some() {
        println!(
            "  every host is a qemu VM ({}) booted with systemd, /home on its own virtual disk; `ssh -F {}/ssh/config HOST` reaches it",
            if crate::vm::kvm_usable() {
                "KVM"
            } else {
                "TCG: no KVM for this guest here"
            },
            dir.display()
        );
    }
    println!(
        "  web view: {} (log in once with {}; the next link is then in {})",
        webs[0],
        web_logins[0].0,
        web_logins[0].1.display()
    );
    if let Some(h) = ha {
        println!(
            "  {} controllers on {} (prefix {}); the first leads, `wavegate controllers` shows each one's role",
            h.stores.len(),
            h.stores[0],
            h.prefix
        );
    }
    for spec in fs {
        println!(
            "  every host has {} on its own {} filesystem ({} MiB, a loop device)",
            spec.path,
            spec.fstype,
            spec.bytes >> 20
        );
    }
    println!(
        "  policies: {} (the shipped set; in a lab the bake minimum is lifted)",
        policy_dir.display()
    );
    println!(
        "  . {}/identities/submitter.env   # then: wavegate rollout submit PLAN",
        dir.display()
    );
    println!(
        "  . {}/identities/approver.env    # then: wavegate rollout approve ID",
        dir.display()
    );
    Ok(0)
}
