//! Container hosts (`lab up --hosts container`): each host is a
//! systemd-nspawn container booted with systemd as PID 1 from the lab's
//! Debian image ([`crate::image`]), in a network namespace of its own on a
//! bridge the lab makes. The lab reaches a host only over that bridge: its
//! sshd, through which the agent is installed (`wavegate agent install
//! --ssh`) and then run by the shipped systemd unit, exactly as on a server.
//!
//! Layout under `DIR/hosts/<id>/`: `root` (an overlay of the image, the
//! host's `/`), `upper` and `work` (the overlay's own), `disks` (its `--fs`
//! filesystems). `DIR/ssh/` holds the lab's key, `known_hosts` and an ssh
//! configuration with one `Host` entry per host; `DIR/containers.json`
//! names the bridge, the namespaces and every host's address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// The exit status systemd-nspawn gives when the container rebooted.
const NSPAWN_REBOOT: i32 = 133;

fn ip(args: &[&str]) -> Result<String> {
    let out = crate::run_command(Command::new("ip").args(args), &format!("ip {}", args.join(" ")))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// One container host's place on the lab's network.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its id in the inventory.
    pub id: String,
    /// Its address on the lab bridge.
    pub addr: String,
    /// Its network namespace (`/run/netns/<name>`).
    pub netns: String,
    /// The host end of its veth pair.
    pub veth: String,
}

/// The lab's network: a bridge with the controller's address, one
/// namespace per host.
#[derive(Clone, Debug)]
pub struct Net {
    /// The bridge.
    pub bridge: String,
    /// The lab machine's address on it (the controller listens there).
    pub gateway: String,
    /// The hosts, by id.
    pub nodes: BTreeMap<String, Node>,
}

/// inotify instances the machine allows each user, at least: every booted
/// host's systemd, journald and D-Bus take a dozen or more, all as root,
/// and the kernel's default of 128 runs out at about eight hosts (they then
/// fail to boot with "Too many open files"). LXD and Kubernetes nodes are
/// set up the same way.
const INOTIFY_INSTANCES: u64 = 8192;
const INOTIFY_SYSCTL: &str = "/proc/sys/fs/inotify/max_user_instances";

/// Raise the machine's inotify instance limit for booted hosts if it is
/// lower than [`INOTIFY_INSTANCES`] (a kernel setting, not a file: it
/// lasts until the machine reboots). Says so when it does.
pub fn enough_inotify() -> Result<()> {
    let now: u64 = std::fs::read_to_string(INOTIFY_SYSCTL)
        .context("reading fs.inotify.max_user_instances")?
        .trim()
        .parse()
        .context("fs.inotify.max_user_instances is not a number")?;
    if now < INOTIFY_INSTANCES {
        std::fs::write(INOTIFY_SYSCTL, INOTIFY_INSTANCES.to_string())
            .context("raising fs.inotify.max_user_instances for the booted hosts")?;
        println!(
            "lab: raised fs.inotify.max_user_instances from {now} to {INOTIFY_INSTANCES}: every booted host's systemd needs a dozen"
        );
    }
    Ok(())
}

/// A short tag for names the kernel limits to 15 bytes.
fn tag(dir: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(dir.display().to_string().as_bytes()))[..6].to_owned()
}

/// Make the lab's bridge and one namespace per host, on a /24 of
/// 10.213.0.0/16 that no interface of this machine uses yet.
pub fn network(dir: &Path, hosts: &[String]) -> Result<Net> {
    if hosts.len() > 240 {
        bail!("a container lab holds at most 240 hosts ({} given)", hosts.len());
    }
    let t = tag(dir);
    let bridge = format!("wgb{t}");
    // One lab at a time picks its subnet.
    let lock = std::fs::File::create(std::env::temp_dir().join("wavegate-lab-net.lock"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking the lab network: {e}"))?;
    let _ = ip(&["link", "del", &bridge]);
    let used = ip(&["-4", "-o", "addr"])?;
    let Some(n) = (1..=254).find(|n| !used.contains(&format!(" 10.213.{n}."))) else {
        bail!("no free /24 in 10.213.0.0/16 for the lab's bridge");
    };
    let gateway = format!("10.213.{n}.1");
    // Written first, so that `lab down` removes whatever of it was made
    // even if making the rest fails.
    let planned: BTreeMap<String, Node> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            (
                h.clone(),
                Node {
                    id: h.clone(),
                    addr: format!("10.213.{n}.{}", i + 10),
                    netns: format!("wg{t}-{}", i + 1),
                    veth: format!("wgv{t}{}", i + 1),
                },
            )
        })
        .collect();
    write_record(dir, &bridge, &gateway, &planned)?;
    ip(&["link", "add", &bridge, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge])?;
    ip(&["link", "set", &bridge, "up"])?;
    for node in planned.values() {
        let (netns, veth, addr) = (&node.netns, &node.veth, &node.addr);
        let _ = ip(&["netns", "del", netns]);
        ip(&["netns", "add", netns])?;
        ip(&[
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        ip(&["link", "set", veth, "master", &bridge, "up"])?;
        ip(&["-n", netns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&["-n", netns, "route", "add", "default", "via", &gateway])?;
    }
    Ok(Net {
        bridge,
        gateway,
        nodes: planned,
    })
}

/// `DIR/containers.json`: the bridge, its address and every host's place.
fn write_record(dir: &Path, bridge: &str, gateway: &str, nodes: &BTreeMap<String, Node>) -> Result<()> {
    std::fs::write(
        dir.join("containers.json"),
        serde_json::to_string_pretty(&json!({
            "bridge": bridge,
            "gateway": gateway,
            "hosts": nodes.values().map(|n| (n.id.clone(), json!({"addr": n.addr, "netns": n.netns, "veth": n.veth}))).collect::<serde_json::Map<_, _>>(),
        }))?,
    )?;
    Ok(())
}

/// Remove what [`network`] made for the lab in `dir` (nothing if it made
/// nothing). Returns how many namespaces went.
pub fn remove_network(dir: &Path) -> Result<usize> {
    let Ok(text) = std::fs::read_to_string(dir.join("containers.json")) else {
        return Ok(0);
    };
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let mut n = 0;
    if let Some(hosts) = v["hosts"].as_object() {
        for h in hosts.values() {
            if let Some(ns) = h["netns"].as_str()
                && ip(&["netns", "del", ns]).is_ok()
            {
                n += 1;
            }
        }
    }
    if let Some(b) = v["bridge"].as_str() {
        let _ = ip(&["link", "del", b]);
    }
    Ok(n)
}

/// The hosts of a lab that are reached over ssh (container or VM hosts;
/// `None` for a lab of directory hosts).
pub fn ssh_hosts(dir: &Path) -> Option<Vec<String>> {
    if let Some(ports) = crate::vm::ssh_ports(dir) {
        return Some(ports.into_keys().collect());
    }
    addresses(dir).map(|a| a.into_keys().collect())
}

/// Read a lab's container hosts' addresses (`None` for a lab of
/// directory hosts).
pub fn addresses(dir: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(dir.join("containers.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v["hosts"]
            .as_object()?
            .iter()
            .filter_map(|(k, h)| Some((k.clone(), h["addr"].as_str()?.to_owned())))
            .collect(),
    )
}

/// The lab's ssh files: one key for every host, their host keys pinned.
pub fn ssh_dir(dir: &Path) -> PathBuf {
    dir.join("ssh")
}

pub(crate) fn keygen(path: &Path, comment: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path.with_extension("pub"));
    crate::run_command(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
        "ssh-keygen (package openssh-client)",
    )?;
    Ok(())
}

/// Give each host its root: an overlay of the image at `DIR/hosts/<id>/root`,
/// its name, its own sshd host key (pinned in the lab's known_hosts) and the
/// lab's key for root.
pub fn roots(dir: &Path, image: &Path, net: &Net) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let ssh = ssh_dir(dir);
    std::fs::create_dir_all(&ssh)?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
    if !ssh.join("id").exists() {
        keygen(&ssh.join("id"), "wavegate-lab")?;
    }
    let lab_key = std::fs::read_to_string(ssh.join("id.pub"))?;
    let mut known = String::new();
    let mut config = String::new();
    for node in net.nodes.values() {
        let host_dir = dir.join("hosts").join(&node.id);
        let root = host_dir.join("root");
        // A fresh upper layer: one left by an earlier lab in this
        // directory holds whatever its guests put there (links where this
        // code writes next).
        for d in ["upper", "work"] {
            let p = host_dir.join(d);
            if p.symlink_metadata().is_ok() {
                std::fs::remove_dir_all(&p).with_context(|| format!("clearing {}", p.display()))?;
            }
        }
        for d in ["root", "upper", "work"] {
            std::fs::create_dir_all(host_dir.join(d))?;
        }
        // redirect_dir=on: directories of the image can be renamed and
        // swapped, as on a disk (a restore swaps a restored tree in).
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=on",
            image.display(),
            host_dir.join("upper").display(),
            host_dir.join("work").display()
        );
        crate::run_command(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&root),
            &format!("mounting {}'s root", node.id),
        )?;
        std::fs::write(root.join("etc/hostname"), format!("{}\n", node.id))?;
        std::fs::write(
            root.join("etc/hosts"),
            format!(
                "127.0.0.1\tlocalhost\n127.0.1.1\t{id}\n{gw}\twavegate-lab\n",
                id = node.id,
                gw = net.gateway
            ),
        )?;
        let dot_ssh = root.join("root/.ssh");
        std::fs::create_dir_all(&dot_ssh)?;
        std::fs::set_permissions(&dot_ssh, std::fs::Permissions::from_mode(0o700))?;
        std::fs::write(dot_ssh.join("authorized_keys"), &lab_key)?;
        std::fs::set_permissions(dot_ssh.join("authorized_keys"), std::fs::Permissions::from_mode(0o600))?;
        let host_key = root.join("etc/ssh/ssh_host_ed25519_key");
        keygen(&host_key, &format!("root@{}", node.id))?;
        let public = std::fs::read_to_string(host_key.with_extension("pub"))?;
        let mut parts = public.split_whitespace();
        let (kind, key) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        known.push_str(&format!("{} {kind} {key}\n", node.addr));
        config.push_str(&format!(
            "Host {id}\n  HostName {addr}\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 10\n  LogLevel ERROR\n",
            id = node.id,
            addr = node.addr,
            key = ssh.join("id").display(),
            known = ssh.join("known_hosts").display(),
        ));
    }
    std::fs::write(ssh.join("known_hosts"), known)?;
    std::fs::write(ssh.join("config"), config)?;
    Ok(())
}

/// The command line that boots one host (`lab machine` runs it, again
/// after every reboot).
pub fn nspawn_args(dir: &Path, node: &Node) -> Vec<String> {
    let root = dir.join("hosts").join(&node.id).join("root");
    vec![
        "systemd-nspawn".into(),
        "--boot".into(),
        // No systemd on this machine to register with or to run a scope.
        "--register=no".into(),
        "--keep-unit".into(),
        // Never link the container's journal into this machine's.
        "--link-journal=no".into(),
        "--console=read-only".into(),
        // The agent confines real runs with Landlock, which nspawn's own
        // system call filter refuses unless told.
        "--system-call-filter=landlock_create_ruleset landlock_add_rule landlock_restrict_self".into(),
        format!("--network-namespace-path=/run/netns/{}", node.netns),
        format!("--machine={}", node.id),
        "-D".into(),
        root.display().to_string(),
    ]
}

/// `lab machine`: one container host's machine. Boots it, and boots it
/// again when it reboots (systemd-nspawn ends with 133 then), as the
/// `systemd-nspawn@.service` unit does.
pub fn machine(nspawn: &[String]) -> Result<u8> {
    let Some((bin, args)) = nspawn.split_first() else {
        bail!("give systemd-nspawn's command line after --");
    };
    loop {
        let status = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("starting {bin} (package systemd-container)"))?;
        match status.code() {
            Some(NSPAWN_REBOOT) => {
                eprintln!("lab: the container rebooted; booting it again");
            }
            Some(c) => return Ok(u8::try_from(c).unwrap_or(1)),
            None => return Ok(1),
        }
    }
}

/// Wait until every host's sshd answers with its banner (a forwarded
/// port accepts before the guest listens, so a connection alone proves
/// nothing). `hosts` are (id, address, port).
pub async fn wait_for_sshd(hosts: &[(String, String, u16)], within: Duration) -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + within;
    for (id, addr, port) in hosts {
        loop {
            let probe = tokio::time::timeout(Duration::from_secs(3), async {
                let mut s = tokio::net::TcpStream::connect((addr.as_str(), *port)).await?;
                let mut banner = [0u8; 4];
                s.read_exact(&mut banner).await?;
                Ok::<bool, std::io::Error>(&banner == b"SSH-")
            })
            .await;
            if matches!(probe, Ok(Ok(true))) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("host {id} did not boot to sshd ({addr}:{port}) within {within:?}; see its console log");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

/// Install the agent on every host over its sshd with `wavegate agent
/// install --ssh`, run by the shipped systemd unit, as an operator would.
pub async fn install_agents(
    dir: &Path,
    me: &Path,
    agent_bin: &Path,
    url: &str,
    admin_env: &[(String, String)],
    hosts: &[(String, String)],
) -> Result<()> {
    let ssh = ssh_dir(dir);
    let mut running = Vec::new();
    for (id, role) in hosts {
        let log = std::fs::File::create(dir.join(format!("logs/install-{id}.log")))?;
        let child = tokio::process::Command::new(me)
            .args(["agent", "install", "--ssh", id, "--host-id", id, "--role", role])
            .arg("--ssh-config")
            .arg(ssh.join("config"))
            .arg("--certs")
            .arg(dir.join("certs"))
            .arg("--agent-bin")
            .arg(agent_bin)
            .args(["--agent-controller", url, "--start", "systemd", "--wait", "90s"])
            .envs(admin_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting `wavegate agent install`")?;
        running.push((id.clone(), child));
    }
    let mut failed = Vec::new();
    for (id, mut child) in running {
        if !child.wait().await?.success() {
            failed.push(id);
        }
    }
    if !failed.is_empty() {
        bail!(
            "installing the agent over ssh failed on {} (see {}/logs/install-*.log)",
            failed.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// Run a command on a container host over its sshd, as root, the way an
/// operator would (`ssh HOST -- CMD`). Returns its status, its output and
/// what it printed on stderr.
pub fn ssh_exec(dir: &Path, host: &str, cmd: &[String]) -> Result<(u8, Vec<u8>, String)> {
    let line = cmd
        .iter()
        .map(|a| crate::exec::sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("ssh")
        .arg("-F")
        .arg(ssh_dir(dir).join("config"))
        .arg(host)
        .arg("--")
        .arg(line)
        .stdin(Stdio::null())
        .output()
        .context("running ssh (package openssh-client)")?;
    Ok((
        out.status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(255),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    ))
}
