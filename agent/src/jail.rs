//! The jail every step runs in: its dry-run, its fetch and its confined
//! real run.
//!
//! A chroot with every capability is no sandbox: a step that chroots into a
//! subdirectory and climbs out with `..` reaches the host's real root, and
//! with `CAP_SYS_ADMIN`, `CAP_MKNOD` and `CAP_DAC_READ_SEARCH` it can mount,
//! write a raw disk or open any file by handle. So a step gets, in order:
//!
//! - its own mount namespace, and `pivot_root` into the tree prepared for
//!   it, with the old root detached: there is no path back;
//! - a fresh `/proc` of its own PID namespace (with `kcore`,
//!   `sysrq-trigger` and the like masked, `/proc/sys` read-only), a minimal
//!   `/dev` (null, zero, full, random, urandom, tty, a private `pts` and
//!   `shm`: no block devices, no `mem`, no `kmsg`) and `/sys` read-only;
//! - no inherited file descriptor that reaches a file beyond its output
//!   (checked: one left open by mistake would be a way out, so the jail
//!   refuses to start);
//! - `no_new_privs`, and the capabilities a maintenance step never needs
//!   dropped from the bounding set (so the shell it execs never has them);
//! - in a confined real run and a fetch, Landlock: writes only beneath the
//!   declared write set, `/tmp` (its private scratch) and `/dev`, whatever
//!   symlinks, bind mounts or `..` a step or a tenant puts in the way;
//! - a seccomp filter that answers `EPERM` (an error in the step's output,
//!   not a kill) to what a maintenance step never needs: mounting, new
//!   namespaces, kexec, modules, bpf, ptrace, `open_by_handle_at`, keys,
//!   `userfaultfd`, reboot, swap, raw I/O ports.
//!
//! A kernel without Landlock or seccomp fails the jail (the step is
//! blocked, naming what is missing) unless the job accepts the weaker
//! confinement by name. The jail is `wavegate-agent jail SPEC`, started by
//! util-linux `unshare` with the PID (and for dry-runs network) namespaces;
//! it execs `/bin/sh -c` as its last act.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};

/// The exit status of a jail that could not be set up (the step never ran).
pub const SETUP_FAILED: i32 = 125;
/// The line a jail that could not be set up prints first.
pub const SETUP_FAILED_LINE: &str = "wavegate sandbox: could not be set up:";

/// What a jail runs, and how.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spec {
    /// The tree to pivot into (a mount point).
    pub root: PathBuf,
    /// Command line for `/bin/sh -c`.
    pub run: String,
    /// Landlock: the only paths (inside the jail) it may write beneath;
    /// `None` for a dry-run, whose overlay already keeps every write.
    #[serde(default)]
    pub writable: Option<Vec<String>>,
    /// Weaker confinement the site accepts by name (`landlock`, `seccomp`)
    /// on a kernel that lacks it.
    #[serde(default)]
    pub accept_weaker: Vec<String>,
    /// Paths inside `root` no step may see: the agent's own state (journal
    /// with unmasked output, snapshots) and its key and certificate.
    #[serde(default)]
    pub hide: Vec<PathBuf>,
}

/// What the site decides for every jail: its redact patterns, and the
/// weaker confinement it accepts by name on a kernel that lacks Landlock or
/// seccomp.
#[derive(Clone, Debug, Default)]
pub struct Site {
    /// Redact patterns on top of the built-in ones.
    pub redact: Vec<String>,
    /// `landlock`, `seccomp`.
    pub accept_weaker: Vec<String>,
    /// Host paths no step may see (the agent's own files).
    pub hide: Vec<PathBuf>,
}

/// Capabilities no maintenance step needs (dropped from the bounding set).
/// Kept: chown, dac_override, fowner, fsetid, kill, setuid, setgid,
/// setpcap, net_bind_service, net_broadcast, ipc_lock, ipc_owner,
/// sys_chroot, sys_nice, sys_resource, lease, audit_write, setfcap:
/// what apt, dpkg, adduser and service restarts use.
const DROPPED: &[caps::Capability] = &[
    caps::Capability::CAP_SYS_ADMIN,
    caps::Capability::CAP_SYS_MODULE,
    caps::Capability::CAP_SYS_RAWIO,
    caps::Capability::CAP_SYS_PTRACE,
    caps::Capability::CAP_SYS_BOOT,
    caps::Capability::CAP_SYS_TIME,
    caps::Capability::CAP_SYS_PACCT,
    caps::Capability::CAP_SYS_TTY_CONFIG,
    caps::Capability::CAP_MAC_ADMIN,
    caps::Capability::CAP_MAC_OVERRIDE,
    caps::Capability::CAP_NET_ADMIN,
    caps::Capability::CAP_NET_RAW,
    caps::Capability::CAP_BPF,
    caps::Capability::CAP_PERFMON,
    caps::Capability::CAP_DAC_READ_SEARCH,
    caps::Capability::CAP_MKNOD,
    caps::Capability::CAP_SYSLOG,
    caps::Capability::CAP_WAKE_ALARM,
    caps::Capability::CAP_BLOCK_SUSPEND,
    caps::Capability::CAP_AUDIT_CONTROL,
    caps::Capability::CAP_AUDIT_READ,
    caps::Capability::CAP_CHECKPOINT_RESTORE,
    caps::Capability::CAP_LINUX_IMMUTABLE,
];

/// System calls refused with `EPERM`.
const REFUSED: &[(i64, &str)] = &[
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_mount_setattr, "mount_setattr"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_acct, "acct"),
];

/// Namespace flags a `clone` may not carry.
const NEW_NAMESPACES: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// What the jail refuses, for people (the operator guide, a report).
pub fn refused_names() -> Vec<&'static str> {
    REFUSED.iter().map(|(_, n)| *n).collect()
}

fn filters() -> Result<Vec<seccompiler::BpfProgram>> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    let arch = seccompiler::TargetArch::x86_64;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = REFUSED.iter().map(|(n, _)| (*n, Vec::new())).collect();
    let clone_rules = NEW_NAMESPACES
        .iter()
        .map(|&flag| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let refuse = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    // clone3 passes its flags in memory a filter cannot read: "not here",
    // so the C library falls back to clone, whose flags it can.
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(vec![refuse.try_into()?, clone3.try_into()?])
}

/// Where a jail that could not be set up says why: beside its spec, opened
/// before anything else (a step cannot forge it by what it prints).
pub fn failure_file(spec_file: &Path) -> PathBuf {
    spec_file.with_extension("failed")
}

/// Enter the jail described by the spec file and exec the step; returns
/// only on failure, after writing why to [`failure_file`] (the caller
/// prints it and exits [`SETUP_FAILED`]).
pub fn enter(spec_file: &Path) -> Result<std::convert::Infallible> {
    let _ = std::fs::remove_file(failure_file(spec_file));
    let mut status = std::fs::File::create(failure_file(spec_file)).context("the jail's status file")?;
    // Its own descriptor is close-on-exec: the step never has it.
    let own = std::os::fd::AsRawFd::as_raw_fd(&status);
    let Err(e) = enter_inner(spec_file, own);
    let _ = std::io::Write::write_all(&mut status, format!("{e:#}").as_bytes());
    Err(e)
}

fn enter_inner(spec_file: &Path, own_fd: i32) -> Result<std::convert::Infallible> {
    let spec: Spec = serde_json::from_slice(&std::fs::read(spec_file).context("reading the jail's spec")?)?;
    let root = &spec.root;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("a mount namespace of its own")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    proc_fs(root)?;
    dev_fs(root)?;
    let sys = root.join("sys");
    if sys.is_dir() && Path::new("/sys").is_dir() {
        // Every mount below it too (cgroup2, debugfs, tracefs, efivarfs...):
        // read-only, or a step could kill every service through cgroups.
        crate::mounts::bind(Path::new("/sys"), &sys, true).context("a read-only /sys")?;
        crate::mounts::readonly_tree(&sys).context("every mount under /sys read-only")?;
    }
    hide(root, &spec.hide)?;
    // No path back: the old root is stacked under the new one and detached.
    std::env::set_current_dir(root).with_context(|| format!("entering {}", root.display()))?;
    nix::unistd::pivot_root(".", ".").context("pivot_root into the prepared tree")?;
    umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
    std::env::set_current_dir("/")?;
    no_inherited_fds(own_fd)?;
    if let Some(w) = &spec.writable {
        landlock(w, &spec.accept_weaker)?;
    }
    for c in DROPPED {
        // A capability the kernel does not know is not there to drop.
        if caps::has_cap(None, caps::CapSet::Bounding, *c).unwrap_or(false) {
            caps::drop(None, caps::CapSet::Bounding, *c).with_context(|| format!("dropping {c}"))?;
        }
    }
    caps::clear(None, caps::CapSet::Inheritable).context("clearing inheritable capabilities")?;
    let _ = caps::clear(None, caps::CapSet::Ambient);
    nix::sys::prctl::set_no_new_privs().context("no_new_privs")?;
    match filters() {
        Ok(progs) => {
            for p in &progs {
                if let Err(e) = seccompiler::apply_filter(p) {
                    if spec.accept_weaker.iter().any(|a| a == "seccomp") {
                        break;
                    }
                    bail!(
                        "this kernel refused the seccomp filter ({e}); a site policy can accept the weaker confinement by name (seccomp)"
                    );
                }
            }
        }
        Err(e) => bail!("building the seccomp filter: {e}"),
    }
    let err = std::process::Command::new("/bin/sh").arg("-c").arg(&spec.run).exec();
    Err(err).context("starting /bin/sh in the jail")
}

/// Cover each of `paths` (inside `root`): an empty read-only tmpfs over a
/// directory, /dev/null over a file.
fn hide(root: &Path, paths: &[PathBuf]) -> Result<()> {
    for p in paths {
        let Ok(rel) = p.strip_prefix("/") else { continue };
        let at = root.join(rel);
        let Ok(m) = at.symlink_metadata() else { continue };
        if m.is_dir() {
            mount(
                Some("tmpfs"),
                &at,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
                Some("size=4k,mode=0700"),
            )
            .with_context(|| format!("hiding {}", p.display()))?;
        } else if m.is_file() {
            crate::mounts::bind_one(Path::new("/dev/null"), &at, true)
                .with_context(|| format!("hiding {}", p.display()))?;
        }
    }
    Ok(())
}

/// A fresh /proc of the jail's PID namespace, with what could reach the
/// host masked and /proc/sys read-only.
fn proc_fs(root: &Path) -> Result<()> {
    let p = root.join("proc");
    if !p.is_dir() {
        return Ok(());
    }
    mount(
        Some("proc"),
        &p,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("a fresh /proc")?;
    for masked in [
        "kcore",
        "sysrq-trigger",
        "timer_list",
        "timer_stats",
        "kallsyms",
        "kmsg",
        "keys",
        "latency_stats",
        "sched_debug",
        "kpagecount",
        "kpageflags",
        "kpagecgroup",
    ] {
        let at = p.join(masked);
        if at.exists() {
            crate::mounts::bind_one(Path::new("/dev/null"), &at, true)
                .with_context(|| format!("masking /proc/{masked}"))?;
        }
    }
    for ro in ["sys", "irq", "bus", "fs", "acpi", "scsi"] {
        let at = p.join(ro);
        if at.is_dir() {
            crate::mounts::bind(&at, &at, true).with_context(|| format!("/proc/{ro} read-only"))?;
        }
    }
    Ok(())
}

/// A minimal /dev: a few character devices bound from the machine's, a
/// private pts and shm; no block devices, no mem, no kmsg.
fn dev_fs(root: &Path) -> Result<()> {
    let d = root.join("dev");
    if !d.is_dir() {
        return Ok(());
    }
    mount(
        Some("tmpfs"),
        &d,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .context("a minimal /dev")?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        let src = Path::new("/dev").join(n);
        if !src.exists() {
            continue;
        }
        let dst = d.join(n);
        std::fs::File::create(&dst)?;
        crate::mounts::bind_one(&src, &dst, false).with_context(|| format!("/dev/{n}"))?;
    }
    let pts = d.join("pts");
    std::fs::create_dir(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .context("/dev/pts")?;
    std::os::unix::fs::symlink("pts/ptmx", d.join("ptmx"))?;
    let shm = d.join("shm");
    std::fs::create_dir(&shm)?;
    mount(
        Some("tmpfs"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )
    .context("/dev/shm")?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, d.join(link))?;
    }
    // Nothing more can be made in it (mknod is gone with CAP_MKNOD too).
    mount(
        None::<&str>,
        &d,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .context("/dev read-only")?;
    Ok(())
}

/// A descriptor inherited beyond stdin, stdout and stderr that reaches a
/// file (a directory, a regular file, a device, a socket that could talk to
/// a host service) would be a way out of the jail: refuse to start. The
/// agent opens everything close-on-exec; what a supervisor above it leaks
/// (a build tool's jobserver pipe, /dev/null) reaches nothing and passes.
/// Closing them outright needs a raw close(2), which safe Rust gives only
/// to the owner of a descriptor, and this workspace forbids `unsafe`.
fn no_inherited_fds(own_fd: i32) -> Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut open = Vec::new();
    // Numbers only: a directory entry keeps the listing itself open.
    let listing: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .context("listing open descriptors")?
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    for n in listing {
        if n <= 2 || n == own_fd {
            continue;
        }
        // The listing's own descriptor is gone by the time it is read.
        let path = PathBuf::from(format!("/proc/self/fd/{n}"));
        let (Ok(target), Ok(meta)) = (std::fs::read_link(&path), std::fs::metadata(&path)) else {
            continue;
        };
        let t = meta.file_type();
        let harmless = t.is_fifo() || (t.is_char_device() && target == Path::new("/dev/null"));
        if !harmless {
            open.push(format!("{n} ({})", target.display()));
        }
    }
    if !open.is_empty() {
        bail!(
            "descriptors that reach files were inherited into the jail: {}",
            open.join(", ")
        );
    }
    Ok(())
}

/// Landlock: reading and running anywhere, writing only beneath `writable`,
/// /tmp and /dev.
fn landlock(writable: &[String], accept_weaker: &[String]) -> Result<()> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
    };
    let abi = ABI::V5;
    let existing: Vec<&str> = writable
        .iter()
        .map(String::as_str)
        .chain(["/tmp"])
        .filter(|p| Path::new(p).symlink_metadata().is_ok())
        .collect();
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        // ABI 6: no abstract unix socket and no signal outside the jail.
        .scope(landlock::Scope::AbstractUnixSocket | landlock::Scope::Signal)?
        .create()?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(
            ["/dev"],
            AccessFs::from_read(abi) | AccessFs::WriteFile | AccessFs::IoctlDev,
        ))?
        .add_rules(path_beneath_rules(existing, AccessFs::from_all(abi)))?
        .restrict_self()
        .context("Landlock")?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(()),
        _ if accept_weaker.iter().any(|a| a == "landlock") => Ok(()),
        // An older Landlock (Debian 12's 6.1 kernel has ABI 2): every
        // write outside the write set is still refused (ABI 1 on). What it
        // lacks is covered by the jail's other walls: truncation (ABI 3) by
        // the read-only mounts; device ioctls (ABI 5) by the minimal /dev
        // (a device node elsewhere on a read-only mount is not covered);
        // abstract unix sockets and signals (ABI 6) by a step's own network
        // and PID namespaces. A fetch and a health check keep the host's
        // network, so there they can reach abstract sockets.
        RulesetStatus::PartiallyEnforced => Ok(()),
        _ => match std::fs::read_to_string("/run/systemd/container") {
            // In a container the kernel may well have it, and the
            // container's system call filter refuses it.
            Ok(manager) => bail!(
                "Landlock is not available in this {} container: its system call filter must allow landlock_create_ruleset, landlock_add_rule and landlock_restrict_self (systemd-nspawn: --system-call-filter=landlock_create_ruleset landlock_add_rule landlock_restrict_self), or the kernel lacks it (lsm=landlock); a site policy can accept the weaker confinement by name (landlock)",
                manager.trim()
            ),
            Err(_) => bail!(
                "this kernel has no Landlock (it is not built in or not enabled at boot: lsm=landlock); a site policy can accept the weaker confinement by name (landlock)"
            ),
        },
    }
}

/// The command that starts a jail: `unshare` gives it new PID, IPC and
/// UTS namespaces (and a network of its own for a dry-run), then the agent
/// binary enters the jail.
pub fn command(exe: &Path, spec_file: &Path, own_network: bool) -> std::process::Command {
    // By its absolute path: a step whose write set holds /usr/local must not
    // be able to plant an `unshare` that every later jail would run.
    let mut cmd = std::process::Command::new("/usr/bin/unshare");
    cmd.args(["--pid", "--ipc", "--uts", "--fork", "--kill-child"]);
    if own_network {
        cmd.arg("--net");
    }
    cmd.arg(exe).arg("jail").arg(spec_file);
    cmd
}

/// Whether a jail could not be set up: its status file (written by the
/// agent before the step could run, never by the step) says why.
pub fn setup_failed(exit_code: i32, spec_file: &Path) -> Option<String> {
    if exit_code != SETUP_FAILED {
        return None;
    }
    std::fs::read_to_string(failure_file(spec_file))
        .ok()
        .filter(|why| !why.trim().is_empty())
        .map(|why| why.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_machine() {
        let f = filters().expect("filters");
        assert_eq!(f.len(), 2);
        assert!(refused_names().contains(&"open_by_handle_at"));
    }

    #[test]
    fn a_setup_failure_is_told_apart_from_a_step_that_failed() {
        let dir = std::env::temp_dir().join(format!("wavegate-jail-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let spec = dir.join("jail.json");
        // A step that exits 125 and prints the line itself is not a setup
        // failure: only the status file counts, and it stays empty.
        std::fs::write(failure_file(&spec), "").expect("status");
        assert_eq!(setup_failed(SETUP_FAILED, &spec), None);
        std::fs::write(failure_file(&spec), "no Landlock").expect("status");
        assert_eq!(setup_failed(SETUP_FAILED, &spec).as_deref(), Some("no Landlock"));
        assert_eq!(setup_failed(1, &spec), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
