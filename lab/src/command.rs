//! The `wavegate lab` command line: its subcommands and flags, and what
//! each one runs.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use wavegate_operator::output::Output;
use wavegate_operator::policies::PolicyArgs;

use crate::absolute;
use crate::boot::boot;
use crate::disks::{FsSpec, unmount_all};
use crate::exec::exec;
use crate::processes::down;
use crate::status::status;
use crate::up::{Ha, HostKind, up_ha};

/// `wavegate lab ...`
#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per command; boxing `up`'s flags would only make the match harder to read"
)]
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
        /// What each host is: `dir` (a directory, the agent a process of
        /// the lab; the fastest) or `container` (a systemd-nspawn container
        /// booted with systemd from a Debian 12 image built with
        /// mmdebstrap, the agent installed over ssh and run by its unit).
        #[arg(long, value_enum, default_value_t = HostKind::Dir)]
        hosts: HostKind,
    },
    /// Show the lab's controller and which agents are connected.
    Status {
        /// The lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
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
    /// Build (or find in the cache) the booted hosts' Debian image and the
    /// VM disk made of it; prints where they are. `lab up --hosts
    /// container|vm` does this itself; this is for doing it ahead.
    Image,
    /// Internal: carry one connection between stdin/stdout and a TCP
    /// address (qemu runs it for each connection a VM makes to the
    /// controller's forwarded address).
    #[command(hide = true)]
    Relay {
        /// HOST:PORT to connect to.
        addr: String,
    },
    /// Internal: one container host's machine. Runs systemd-nspawn, and
    /// again whenever the container reboots.
    #[command(hide = true)]
    Machine {
        /// systemd-nspawn's command line.
        #[arg(last = true, required = true)]
        nspawn: Vec<String>,
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
            hosts,
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
                hosts,
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
        LabCommand::Machine { nspawn } => crate::container::machine(&nspawn),
        LabCommand::Relay { addr } => crate::vm::relay(&addr),
        LabCommand::Image => {
            let root = crate::image::ensure()?;
            let disk = crate::image::vm_disk(&root)?;
            println!(
                "image {} (Debian {}): root {}",
                crate::image::input_hash(),
                crate::image::SUITE,
                root.display()
            );
            println!("  VM disk {}", disk.display());
            println!("  kept packages {}", crate::image::debs_dir().display());
            Ok(0)
        }
        LabCommand::Down { dir } => {
            let dir = absolute(&dir)?;
            let n = down(&dir)?;
            let (mounts, loops) = unmount_all(&dir)?;
            let nets = crate::container::remove_network(&dir)?;
            println!(
                "lab in {} stopped ({n} processes, {mounts} filesystems unmounted, {loops} loop devices detached, {nets} host network namespaces removed)",
                dir.display()
            );
            Ok(0)
        }
    }
}
