//! `wavegate lab`: a controller and one agent per inventory host on this
//! machine, each host with its own root directory, laid out as FORMATS.md's
//! "Lab layout" says. It never touches the machine's own files: hosts see the
//! machine's system directories read-only and their own /etc, /home, /srv,
//! /var and /tmp.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::json;
use tokio::time::Instant;
use wavegate_domain::{Fleet, Source};
use wavegate_proto::v1 as pb;

use super::PolicyArgs;
pub use super::client::Client;
use super::client::Conn;
use crate::tls::{CertDir, Pair, Role};

/// `wavegate lab ...`
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build and start a lab for an inventory.
    Up {
        /// The fleet inventory.
        #[arg(long)]
        fleet: PathBuf,
        /// The lab directory (created).
        #[arg(long)]
        dir: PathBuf,
        /// Site policies for the lab's controller (default: the shipped set).
        #[command(flatten)]
        policies: PolicyArgs,
        /// The agent binary (default: `wavegate-agent` next to this binary).
        #[arg(long, env = "WAVEGATE_AGENT_BIN")]
        agent_bin: Option<PathBuf>,
        /// How long the controller waits past a step's timeout for a silent agent.
        #[arg(long, default_value = "20s")]
        agent_grace: String,
        /// Give every host its own filesystem at PATH (inside its root):
        /// `PATH=TYPE[:SIZE]`, TYPE ext4, xfs or btrfs, SIZE like 64M or 1G
        /// (default 64M), on a loop device whose image lies under
        /// `DIR/hosts/<id>/disks/`. Repeatable.
        #[arg(long = "fs", value_name = "PATH=TYPE[:SIZE]", value_parser = FsSpec::parse)]
        fs: Vec<FsSpec>,
        /// Notifications for the lab's controller (`serve --webhook`).
        #[arg(long, value_name = "URL")]
        webhook: Option<String>,
        /// Their signing secret (`serve --webhook-secret-file`).
        #[arg(long, value_name = "FILE")]
        webhook_secret_file: Option<PathBuf>,
        /// Run the lab's controllers on an etcd store (`serve --store`),
        /// like etcd://127.0.0.1:23791,127.0.0.1:23793,127.0.0.1:23795
        /// (`scripts/etcd-cluster start DIR` starts one on loopback).
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// The lab's key prefix in etcd (default: /wavegate-lab/ and the
        /// lab directory's name).
        #[arg(long, value_name = "PREFIX", requires = "store")]
        store_prefix: Option<String>,
        /// How many controllers share the etcd store (the first leads; the
        /// others stand by). Agents and identities get every address.
        #[arg(long, default_value_t = 1, requires = "store")]
        controllers: usize,
        /// The leadership lease (`serve --lease-ttl`).
        #[arg(long, default_value = "3s", requires = "store")]
        lease_ttl: String,
        /// Controller N (from 1) reaches the store at URL instead (a test
        /// routes one controller through a proxy it can cut).
        #[arg(long, value_name = "N=URL", hide = true)]
        controller_store: Vec<String>,
    },
    /// Show the lab's controller and which agents are connected.
    Status {
        /// The lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = super::Output::Table)]
        output: super::Output,
    },
    /// Run a command on a lab host as its steps see it (its own root, the
    /// machine's system directories read-only), outside any rollout: to
    /// prepare or inspect a host (`wavegate lab exec --dir D p1 -- dpkg -s
    /// postfix`). Exits with the command's status.
    Exec {
        /// The lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// The host.
        host: String,
        /// The agent binary (default: `wavegate-agent` next to this binary).
        #[arg(long, env = "WAVEGATE_AGENT_BIN")]
        agent_bin: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Internal: one lab host's machine. Runs its agent with a fresh boot id
    /// at every start; when the agent asks for a reboot, every process of
    /// the host is killed and the agent starts again in a new boot.
    #[command(hide = true)]
    Boot {
        /// The host's directory (`DIR/hosts/<id>`): a process whose command
        /// line or root directory is in it belongs to the host.
        #[arg(long)]
        host_dir: PathBuf,
        /// Where the agent reads its boot id.
        #[arg(long)]
        boot_id_file: PathBuf,
        /// The agent's command line.
        #[arg(last = true, required = true)]
        agent: Vec<String>,
    },
    /// Stop everything the lab started, unmount its filesystems and detach
    /// their loop devices (its files stay for inspection). Works on a lab
    /// that never finished starting.
    Down {
        /// The lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Run a `lab` subcommand.
pub async fn run(cmd: LabCommand) -> Result<u8> {
    match cmd {
        LabCommand::Up {
            fleet,
            dir,
            policies,
            agent_bin,
            agent_grace,
            fs,
            webhook,
            webhook_secret_file,
            store,
            store_prefix,
            controllers,
            lease_ttl,
            controller_store,
        } => {
            let mut extra = Vec::new();
            if let Some(url) = webhook {
                extra.extend(["--webhook".to_owned(), url]);
            }
            if let Some(f) = webhook_secret_file {
                extra.extend(["--webhook-secret-file".to_owned(), absolute(&f)?.display().to_string()]);
            }
            let ha = match store {
                None => None,
                Some(url) => {
                    let dir = absolute(&dir)?;
                    let name = dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let mut stores = vec![url; controllers.max(1)];
                    for o in &controller_store {
                        let Some((n, u)) = o.split_once('=') else {
                            bail!("--controller-store `{o}` is not N=URL");
                        };
                        let n: usize = n
                            .parse()
                            .with_context(|| format!("--controller-store `{o}`: N is a number from 1"))?;
                        let Some(slot) = n.checked_sub(1).and_then(|i| stores.get_mut(i)) else {
                            bail!("--controller-store `{o}`: there are {controllers} controllers");
                        };
                        *slot = u.to_owned();
                    }
                    Some(Ha {
                        stores,
                        prefix: store_prefix.unwrap_or_else(|| format!("/wavegate-lab/{name}")),
                        lease_ttl,
                    })
                }
            };
            up_ha(
                &fleet,
                &dir,
                &policies,
                agent_bin,
                &agent_grace,
                &fs,
                &extra,
                ha.as_ref(),
            )
            .await
        }
        LabCommand::Status { dir, output } => status(&dir, output).await,
        LabCommand::Exec {
            dir,
            host,
            agent_bin,
            cmd,
        } => exec(&absolute(&dir)?, &host, agent_bin, &cmd),
        LabCommand::Boot {
            host_dir,
            boot_id_file,
            agent,
        } => boot(&host_dir, &boot_id_file, &agent),
        LabCommand::Down { dir } => {
            let dir = absolute(&dir)?;
            let n = down(&dir)?;
            let (mounts, loops) = unmount_all(&dir)?;
            println!(
                "lab in {} stopped ({n} processes, {mounts} filesystems unmounted, {loops} loop devices detached)",
                dir.display()
            );
            Ok(0)
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// Identities written for a lab: (file stem, name, role).
const IDENTITIES: &[(&str, &str, Role)] = &[
    ("submitter", "submitter", Role::Submitter),
    ("approver", "approver", Role::Approver),
    ("auditor", "auditor", Role::Auditor),
    ("admin", "admin", Role::Admin),
];

fn env_file(url: &str, ca: &Path, pair: &Pair) -> String {
    format!(
        "# wavegate lab identity: source this file, then run wavegate commands.\nexport WAVEGATE_CONTROLLER='{url}'\nexport WAVEGATE_CA='{}'\nexport WAVEGATE_CERT='{}'\nexport WAVEGATE_KEY='{}'\n",
        ca.display(),
        pair.cert.display(),
        pair.key.display()
    )
}

/// System directories a lab host sees read-only from the machine.
pub const SYSTEM_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
const OWN_DIRS: &[&str] = &[
    "etc", "home", "srv", "var", "var/log", "var/tmp", "var/lib", "tmp", "root", "run", "opt", "dev", "proc",
];
const ETC_SEED: &[&str] = &["passwd", "group", "hosts", "nsswitch.conf", "resolv.conf", "os-release"];

/// Create a host root if it does not exist yet (files already there stay).
fn host_root(root: &Path) -> Result<()> {
    for d in OWN_DIRS {
        std::fs::create_dir_all(root.join(d))?;
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    for d in SYSTEM_DIRS {
        let machine = Path::new("/").join(d);
        let here = root.join(d);
        if here.symlink_metadata().is_ok() {
            continue;
        }
        match std::fs::read_link(&machine) {
            // Merged /usr: /bin -> usr/bin and the like.
            Ok(target) => std::os::unix::fs::symlink(target, &here)?,
            Err(_) if machine.is_dir() => std::fs::create_dir_all(&here)?,
            Err(_) => {}
        }
    }
    for f in ETC_SEED {
        let src = Path::new("/etc").join(f);
        let dst = root.join("etc").join(f);
        if !dst.exists() && src.exists() {
            std::fs::copy(&src, &dst).with_context(|| format!("seeding {}", dst.display()))?;
        }
    }
    Ok(())
}

fn spawn(bin: &Path, args: &[String], log: &Path) -> Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = std::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        // Its own process group: it outlives this command and ignores the
        // terminal's signals; `lab down` stops it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(child.id())
}

/// A filesystem every lab host gets (`--fs PATH=TYPE[:SIZE]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsSpec {
    /// Where it is mounted, inside each host's root.
    pub path: String,
    /// ext4, xfs or btrfs.
    pub fstype: String,
    /// Size of its image, bytes.
    pub bytes: u64,
}

/// Filesystem types a lab host can have, and the package with their mkfs.
const LAB_FS: &[(&str, &str)] = &[("ext4", "e2fsprogs"), ("xfs", "xfsprogs"), ("btrfs", "btrfs-progs")];

impl FsSpec {
    /// Parse `PATH=TYPE[:SIZE]`.
    pub fn parse(s: &str) -> Result<FsSpec, String> {
        let usage = "write --fs PATH=TYPE[:SIZE], like --fs /home=ext4 or --fs /var/lib/mysql=xfs:256M";
        let (path, rest) = s.split_once('=').ok_or_else(|| format!("`{s}` has no `=`; {usage}"))?;
        let path = wavegate_domain::plan::normalise_write_path(path)
            .map_err(|why| format!("the path `{path}` {why}; {usage}"))?;
        let (fstype, size) = match rest.split_once(':') {
            Some((t, z)) => (t, Some(z)),
            None => (rest, None),
        };
        if !LAB_FS.iter().any(|(t, _)| *t == fstype) {
            return Err(format!(
                "`{fstype}` is not a filesystem type a lab host can have; use one of: {}",
                LAB_FS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
            ));
        }
        let bytes = match size {
            None => 64 << 20,
            Some(z) => parse_size(z).ok_or_else(|| format!("`{z}` is not a size; write it like 64M, 512M or 2G"))?,
        };
        if bytes < 16 << 20 {
            return Err(format!(
                "{bytes} bytes is too small for a filesystem; give at least 16M"
            ));
        }
        Ok(FsSpec {
            path,
            fstype: fstype.to_owned(),
            bytes,
        })
    }

    /// The image file of this filesystem for a host.
    fn image(&self, host_dir: &Path) -> PathBuf {
        host_dir.join("disks").join(format!(
            "{}.{}.img",
            self.path.trim_start_matches('/').replace('/', "-"),
            self.fstype
        ))
    }
}

fn parse_size(z: &str) -> Option<u64> {
    let (num, unit) = z.split_at(z.find(|c: char| !c.is_ascii_digit()).unwrap_or(z.len()));
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "K" | "k" => 1 << 10,
        "M" | "m" | "" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn sh(cmd: &mut std::process::Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Make (once) and mount every `--fs` filesystem of one host, shallowest
/// first. An image that exists already keeps its files.
fn mount_disks(host_dir: &Path, specs: &[FsSpec]) -> Result<()> {
    let mut specs: Vec<&FsSpec> = specs.iter().collect();
    specs.sort_by_key(|s| s.path.matches('/').count());
    std::fs::create_dir_all(host_dir.join("disks"))?;
    for spec in specs {
        let img = spec.image(host_dir);
        if !img.exists() {
            let f = std::fs::File::create(&img).with_context(|| format!("creating {}", img.display()))?;
            f.set_len(spec.bytes)?;
            drop(f);
            let mut mkfs = std::process::Command::new(format!("mkfs.{}", spec.fstype));
            match spec.fstype.as_str() {
                // xfsprogs refuses new filesystems under 300 MB unless it is
                // making them for a test suite, as xfstests does.
                "xfs" => mkfs
                    .args(["-q", "-f"])
                    .env("TEST_DIR", "1")
                    .env("TEST_DEV", "1")
                    .env("QA_CHECK_FS", "1"),
                // Mixed block groups: what btrfs-progs advises under 1 GiB.
                "btrfs" if spec.bytes < 1 << 30 => mkfs.args(["-q", "-f", "--mixed"]),
                "btrfs" => mkfs.args(["-q", "-f"]),
                _ => mkfs.args(["-q", "-F"]),
            };
            let package = LAB_FS.iter().find(|(t, _)| *t == spec.fstype).map_or("", |(_, p)| *p);
            sh(
                mkfs.arg(&img),
                &format!(
                    "making a {} filesystem (mkfs.{} from {package})",
                    spec.fstype, spec.fstype
                ),
            )?;
        }
        let point = host_dir.join("root").join(spec.path.trim_start_matches('/'));
        std::fs::create_dir_all(&point)?;
        sh(
            std::process::Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&point),
            &format!("mounting {} at {}", img.display(), point.display()),
        )?;
    }
    Ok(())
}

/// Unmount every filesystem mounted under `dir` (deepest first) and detach
/// every loop device whose image lies under it, whatever state the lab is
/// in. Returns how many of each.
pub fn unmount_all(dir: &Path) -> Result<(usize, usize)> {
    let prefix = dir.display().to_string();
    let inside = |p: &str| p == prefix || p.starts_with(&format!("{prefix}/"));
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| inside(p))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    points.dedup();
    let mut mounts = 0;
    for p in &points {
        use nix::mount::{MntFlags, umount2};
        if umount2(p.as_str(), MntFlags::empty()).is_err() {
            // Something still holds it: detach it now, it goes when released.
            umount2(p.as_str(), MntFlags::MNT_DETACH).with_context(|| format!("unmounting {p}"))?;
        }
        mounts += 1;
    }
    let mut loops = 0;
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if inside(backing.trim()) {
            sh(
                std::process::Command::new("losetup").args(["-d", &format!("/dev/{name}")]),
                &format!("detaching /dev/{name}"),
            )?;
            loops += 1;
        }
    }
    Ok((mounts, loops))
}

/// Quote an argument for /bin/sh.
fn sh_quote(a: &str) -> String {
    if !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return a.to_owned();
    }
    format!("'{}'", a.replace('\'', "'\\''"))
}

/// `lab exec`: one command on one host, through the agent's own supervisor
/// (the way the agent runs anything on its host).
fn exec(dir: &Path, host: &str, agent_bin: Option<PathBuf>, cmd: &[String]) -> Result<u8> {
    let (code, output, detail) = exec_output(dir, host, agent_bin, cmd)?;
    use std::io::Write as _;
    std::io::stdout().write_all(&output)?;
    if code != 0 && !detail.is_empty() {
        eprintln!("wavegate lab exec: {detail}");
    }
    Ok(code)
}

/// Run a command on a lab host as its steps see it; returns its exit
/// status, its output and, when it failed, why.
pub fn exec_output(
    dir: &Path,
    host: &str,
    agent_bin: Option<PathBuf>,
    cmd: &[String],
) -> Result<(u8, Vec<u8>, String)> {
    let host_dir = dir.join("hosts").join(host);
    let root = host_dir.join("root");
    if !root.is_dir() {
        bail!("{} has no host `{host}` (no {})", dir.display(), root.display());
    }
    let agent = match agent_bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .map(|p| p.join("wavegate-agent"))
            .unwrap_or_default(),
    };
    let job_dir =
        host_dir
            .join("agent")
            .join("lab-exec")
            .join(format!("{}-{:x}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&job_dir)?;
    let run = cmd.iter().map(|a| sh_quote(a)).collect::<Vec<_>>().join(" ");
    let job = json!({
        "command_id": format!("lab-exec-{}", job_dir.display()),
        "run": run,
        "timeout_ms": 600_000,
        "host_root": root,
        "mode": "plain",
    });
    std::fs::write(job_dir.join("job.json"), serde_json::to_vec(&job)?)?;
    let status = std::process::Command::new(&agent)
        .arg("exec-step")
        .arg(&job_dir)
        .status()
        .with_context(|| format!("starting {}", agent.display()))?;
    let output = std::fs::read(job_dir.join("output.log")).unwrap_or_default();
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir.join("result.json")).unwrap_or_default()).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&job_dir);
    if !status.success() {
        bail!("the agent's supervisor failed on {host}: {}", result["detail"]);
    }
    let code = result["exit_code"].as_i64().unwrap_or(1);
    Ok((
        u8::try_from(code).unwrap_or(1),
        output,
        result["detail"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// A new boot id, in the kernel's format.
fn new_boot_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Every process of a lab host but the caller: its command line or its root
/// directory lies in the host's directory (every step runs chrooted there).
fn host_processes(host_dir: &Path) -> Vec<i32> {
    let needle = format!("{}/", host_dir.display());
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let root = std::fs::read_link(entry.path().join("root"))
            .map(|r| format!("{}/", r.display()))
            .unwrap_or_default();
        if cmdline.contains(&needle) || root.starts_with(&needle) {
            out.push(pid);
        }
    }
    out
}

/// Whether a process is a zombie (dead, waiting to be reaped).
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Reap every child that has ended (this process is the host's subreaper,
/// so the host's orphans are its children).
fn reap() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(s) = waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// `lab boot`: run the host's agent, boot after boot. It is the child
/// subreaper of everything the host starts, so after a reboot no process of
/// the old boot is left, not even as a zombie.
fn boot(host_dir: &Path, boot_id_file: &Path, agent: &[String]) -> Result<u8> {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::{WaitStatus, waitpid};
    use nix::unistd::Pid;
    let Some((bin, args)) = agent.split_first() else {
        bail!("give the agent's command line after --");
    };
    nix::sys::prctl::set_child_subreaper(true).context("becoming the host's subreaper")?;
    loop {
        std::fs::write(boot_id_file, format!("{}\n", new_boot_id()))
            .with_context(|| format!("writing {}", boot_id_file.display()))?;
        let child = std::process::Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let agent_pid = Pid::from_raw(child.id() as i32);
        // Every child is waited for here (orphans of the host come to this
        // process); the agent's end decides what happens next.
        let code = loop {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == agent_pid => break Some(code),
                Ok(WaitStatus::Signaled(pid, ..)) if pid == agent_pid => break None,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => bail!("waiting for the agent: {e}"),
            }
        };
        if code != Some(wavegate_domain::LAB_REBOOT_EXIT) {
            return Ok(code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1));
        }
        // A reboot: nothing of the host's survives it, not its steps, not
        // what they started; nothing else is touched.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            reap();
            let left: Vec<i32> = host_processes(host_dir).into_iter().filter(|p| !zombie(*p)).collect();
            if left.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        reap();
        eprintln!("lab: {} rebooted", host_dir.display());
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
    up_ha(fleet_path, dir, policies, agent_bin, grace, fs, serve_args, None).await
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
    let certs = CertDir::new(dir.join("certs"));
    if !certs.ca().exists() {
        certs.init(&[])?;
    }
    let hosts: Vec<String> = {
        let mut v: Vec<String> = fleet.hosts().map(|h| fleet.id(h).to_owned()).collect();
        v.sort();
        v
    };
    if !fs.is_empty() && !nix::unistd::geteuid().is_root() {
        bail!("--fs needs root (loop devices and mounts)");
    }
    for h in &hosts {
        certs.issue_agent(h)?;
        host_root(&dir.join("hosts").join(h).join("root"))?;
        std::fs::create_dir_all(dir.join("hosts").join(h).join("agent"))?;
    }
    // Every host's filesystems, before any agent starts.
    for h in &hosts {
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
            "127.0.0.1:0".into(),
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

    // One agent per host.
    for h in &hosts {
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

/// The lab's own copy of the shipped policies, written to `DIR/policies` so
/// it can be read: every rule as shipped, except that the bake minimum is
/// lifted, because lab plans bake for seconds, not minutes.
pub fn lab_policies(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("policies");
    std::fs::create_dir_all(&out)?;
    for (name, text) in crate::policies::SHIPPED {
        let file = Path::new(name)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("default.yaml"));
        let lab = text.replace(
            "    min: 5m\n",
            "    # lab: lowered from the shipped 5m, so lab plans may bake for seconds\n    min: 0s\n",
        );
        std::fs::write(out.join(file), lab)?;
    }
    Ok(out)
}

/// A connection to a lab controller as one of its identities.
pub fn lab_conn(dir: &Path, url: &str, who: &str) -> Conn {
    let certs = CertDir::new(dir.join("certs"));
    let pair = certs.operator(who);
    Conn {
        controller: Some(url.to_owned()),
        ca: Some(certs.ca()),
        cert: Some(pair.cert),
        key: Some(pair.key),
    }
}

async fn fetch_fleet(conn: &Conn) -> Result<pb::FleetResponse> {
    let mut client = conn.connect().await?;
    Ok(client.fleet(pb::FleetRequest {}).await?.into_inner())
}

async fn status(dir: &Path, output: super::Output) -> Result<u8> {
    let dir = absolute(dir)?;
    let lab: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("lab.json")).with_context(|| format!("no lab in {}", dir.display()))?,
    )?;
    let url = match lab["controllers"].as_array() {
        Some(all) => all.iter().filter_map(|u| u.as_str()).collect::<Vec<_>>().join(","),
        None => lab["controller"].as_str().unwrap_or_default().to_owned(),
    };
    let fleet = fetch_fleet(&lab_conn(&dir, &url, "admin")).await?;
    let up = fleet.hosts.iter().filter(|h| h.connected).count();
    let doc = json!({
        "controller": url,
        "web": lab["web"],
        "hosts": fleet.hosts.iter().map(|h| json!({"id": h.id, "role": h.role, "connected": h.connected})).collect::<Vec<_>>(),
    });
    if output.emit(&doc)? {
        return Ok(if up == fleet.hosts.len() { 0 } else { 1 });
    }
    println!("controller {url}: {up} of {} agents connected", fleet.hosts.len());
    for h in &fleet.hosts {
        println!(
            "  {:<12} {:<10} {}",
            h.id,
            h.role,
            if h.connected { "connected" } else { "DISCONNECTED" }
        );
    }
    Ok(if up == fleet.hosts.len() { 0 } else { 1 })
}

/// Processes whose command line mentions the lab directory (the controller,
/// the agents and any step they left running).
fn running(dir: &Path) -> Result<Vec<i32>> {
    let needle = dir.display().to_string();
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Not a lab command run by hand (this one, or an `up` or `status`);
        // the hosts' own `lab boot` processes are the lab's.
        let by_hand = [" lab up ", " lab down ", " lab status ", " lab exec "]
            .iter()
            .any(|c| cmdline.contains(c));
        if cmdline.contains(&needle) && !by_hand {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Stop every process of the lab: SIGTERM, then SIGKILL after 5 s.
pub fn down(dir: &Path) -> Result<usize> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pids = running(dir)?;
    for p in &pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = running(dir)?;
        if left.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pids.len())
}

#[cfg(test)]
mod tests {
    use super::FsSpec;

    #[test]
    fn fs_specs() {
        let s = FsSpec::parse("/var/lib/mysql=xfs:256M").expect("valid");
        assert_eq!(
            (s.path.as_str(), s.fstype.as_str(), s.bytes),
            ("/var/lib/mysql", "xfs", 256 << 20)
        );
        assert_eq!(FsSpec::parse("/home/=ext4").expect("valid").bytes, 64 << 20);
        assert_eq!(FsSpec::parse("/home=btrfs:1G").expect("valid").bytes, 1 << 30);
        for (bad, says) in [
            ("/home", "no `=`"),
            ("home=ext4", "relative"),
            ("/=ext4", "whole filesystem"),
            ("/home=zfs", "not a filesystem type"),
            ("/home=ext4:lots", "not a size"),
            ("/home=ext4:1M", "too small"),
        ] {
            let e = FsSpec::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
