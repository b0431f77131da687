//! Service actions a step asks for: restarts through the service manager.
//!
//! A step never reaches the host's service manager itself. In the jail it
//! is in a PID namespace of its own (systemd answers nobody there: "Failed
//! to connect to bus"), its dry-run has a private `/run`, and if it could
//! reach systemd it could start any unit, outside every write set. Yet a
//! package's maintainer scripts must restart its services, and they do it
//! through two Debian tools: `invoke-rc.d` and `deb-systemd-invoke`.
//!
//! So in every jail both tools are replaced (a bind mount over each, in the
//! jail's view only) by a recorder: it notes each request in the jail's
//! private `/tmp`, answers `status` from the list of units that were active
//! when the step began, and lets the script go on. After the step:
//! - a dry-run reports what would be restarted ("restart nginx.service");
//! - a real run of a package step has the agent itself, outside the jail,
//!   reload systemd and carry out the requests for the services of the
//!   packages the step changes (those built from the same source package);
//!   any other request fails the step;
//! - a plain `run` step may not act on services: its request fails its
//!   dry-run and its real run, named, rather than being silently dropped.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The tools replaced in a jail, as paths under its root.
pub const TOOLS: &[&str] = &["usr/sbin/invoke-rc.d", "usr/bin/deb-systemd-invoke"];
/// Where the recorder notes the requests, under the jail's root.
pub const REQUESTS: &str = "tmp/.wavegate-service-requests";
/// Where the recorder reads the active units, under the jail's root.
const ACTIVE: &str = "tmp/.wavegate-active-units";

/// The recorder, for `/bin/sh`. `$0` tells which tool it stands for.
const RECORDER: &str = r#"#!/bin/sh
# wavegate: this step runs in a jail that does not reach the service
# manager. This stands in for invoke-rc.d and deb-systemd-invoke: it notes
# the request, and wavegate's agent carries it out after the step (or the
# dry-run reports it).
tool=${0##*/}
log=/tmp/.wavegate-service-requests
active=/tmp/.wavegate-active-units
action=; units=
for a in "$@"; do
  case "$a" in
    --*) ;;
    *) if [ "$tool" = invoke-rc.d ]; then
         if [ -z "$units" ]; then units="$a"; elif [ -z "$action" ]; then action="$a"; fi
       else
         if [ -z "$action" ]; then action="$a"; else units="$units $a"; fi
       fi ;;
  esac
done
[ -n "$action" ] && [ -n "$units" ] || { echo "$tool: usage error (wavegate recorder)" >&2; exit 1; }
case "$action" in
  status|is-active)
    for u in $units; do
      case "$u" in *.*) ;; *) u="$u.service" ;; esac
      grep -qx "$u" "$active" 2>/dev/null || exit 3
    done
    exit 0 ;;
esac
for u in $units; do
  case "$u" in *.*) ;; *) u="$u.service" ;; esac
  printf '%s %s\n' "$action" "$u" >> "$log"
  echo "wavegate: $action of $u is noted; the agent does it after the step" >&2
done
exit 0
"#;

/// Whether `unit` is a unit name wavegate acts on: letters, digits and
/// `:_.@-`, not starting with `-`, ending in `.service` or `.socket`. No
/// glob (`*.service` would stop every service), no option, no path.
pub fn valid_unit(unit: &str) -> bool {
    let stem = unit.strip_suffix(".service").or_else(|| unit.strip_suffix(".socket"));
    stem.is_some_and(|s| {
        !s.is_empty()
            && !s.starts_with('-')
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b":_.@-".contains(&b))
    })
}

/// The most of a request file the agent reads.
const REQUESTS_MAX: u64 = 64 << 10;

/// One request: an action on a unit.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Request {
    /// `restart`, `start`, `stop`, `reload`, ... as asked.
    pub action: String,
    /// The unit, `nginx.service`.
    pub unit: String,
}

impl Request {
    /// How it reads in a report.
    pub fn describe(&self) -> String {
        format!("{} {}", self.action, self.unit)
    }

    /// What systemctl is asked to do for it (the SysV verbs a maintainer
    /// script uses are restarts to systemd).
    fn verb(&self) -> Option<&'static str> {
        match self.action.as_str() {
            "start" => Some("start"),
            "stop" => Some("stop"),
            "restart" | "upgrade" | "force-restart" => Some("restart"),
            "try-restart" => Some("try-restart"),
            "reload" | "force-reload" => Some("reload-or-restart"),
            _ => None,
        }
    }
}

/// Whether the host runs systemd as its service manager (the agent sees it
/// as `/`).
fn systemd_host(host_root: &Path) -> bool {
    host_root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

/// Units active on the host now (none where systemd does not run it).
fn active_units(host_root: &Path) -> Vec<String> {
    if !systemd_host(host_root) {
        return Vec::new();
    }
    let Ok(out) = std::process::Command::new("systemctl")
        .args([
            "list-units",
            "--type=service",
            "--state=active",
            "--no-legend",
            "--plain",
        ])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Put the recorder in place in the jail's view at `view` (already its own
/// mount namespace): the script and the active units under `work`, bound
/// over each tool that exists in the view. The view's `/tmp` must be the
/// jail's private one.
pub fn install(view: &Path, host_root: &Path, work: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(work)?;
    let script = work.join("service-recorder");
    std::fs::write(&script, RECORDER)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    // A dry-run's /run is its own: maintainer scripts that look for systemd
    // there must take the branch they take on the real host.
    if systemd_host(host_root) && !view.join("run/systemd/system").exists() {
        let _ = std::fs::create_dir_all(view.join("run/systemd/system"));
    }
    let tmp = view.join("tmp");
    if tmp.is_dir() {
        let mut units = active_units(host_root).join("\n");
        units.push('\n');
        std::fs::write(view.join(ACTIVE), units).context("listing the active units for the jail")?;
        let _ = std::fs::remove_file(view.join(REQUESTS));
    }
    for tool in TOOLS {
        let at = view.join(tool);
        // Through a symlink (merged /usr) the mount lands on its target,
        // which is the same file in the same view.
        if at.metadata().map(|m| m.is_file()).unwrap_or(false) {
            crate::mounts::bind(&script, &at, true).with_context(|| format!("standing in for /{tool}"))?;
        }
    }
    Ok(())
}

/// The requests noted in the jail whose view is `view`, in order, each
/// once.
pub fn requests(view: &Path) -> Vec<Request> {
    // The step owns the file: never follow a link it put there, never
    // block on a FIFO, never read more than a request list's worth.
    let text = {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32 | rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(view.join(REQUESTS));
        match file {
            Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => {
                let mut t = String::new();
                let _ = f.take(REQUESTS_MAX).read_to_string(&mut t);
                t
            }
            _ => String::new(),
        }
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((action, unit)) = line.split_once(' ') else {
            continue;
        };
        let r = Request {
            action: action.to_owned(),
            unit: unit.trim().to_owned(),
        };
        if seen.insert(r.clone()) {
            out.push(r);
        }
    }
    out
}

/// Why a request may not be carried out, or `None` when it may: its unit
/// must be one of `allowed` (the services of the packages the step
/// changes) and its action one systemctl knows.
pub fn refusal(r: &Request, allowed: &BTreeSet<String>, package_step: bool) -> Option<String> {
    if !package_step {
        return Some(format!(
            "the step asks to {} {}; a run step may not act on services (a package step's maintainer scripts may, for their own package's services)",
            r.action, r.unit
        ));
    }
    if !valid_unit(&r.unit) {
        return Some(format!(
            "the step asks to {} `{}`, which is not a unit name wavegate acts on",
            r.action,
            r.unit.escape_debug()
        ));
    }
    if r.verb().is_none() {
        return Some(format!(
            "the step asks to `{}` {}, an action wavegate does not carry out",
            r.action, r.unit
        ));
    }
    if !allowed.contains(&r.unit) {
        return Some(format!(
            "the step asks to {} {}, which is not a service of the packages it changes ({})",
            r.action,
            r.unit,
            if allowed.is_empty() {
                "they have none".to_owned()
            } else {
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            }
        ));
    }
    None
}

/// A unit's main PID (0 when it has none), for the step's output.
fn main_pid(unit: &str) -> String {
    std::process::Command::new("systemctl")
        .args(["show", "--property=MainPID", "--value", "--", unit])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Carry out a real run's requests on the host, outside the jail, noting
/// each in the step's `output` and each unit acted on in `touched` (a
/// rollback restarts them again after the restore). Refused requests and
/// failed actions are errors (the step fails, named).
pub fn perform(
    host_root: &Path,
    requests: &[Request],
    allowed: &BTreeSet<String>,
    output: &Path,
    touched: &Path,
) -> Result<()> {
    if requests.is_empty() {
        return Ok(());
    }
    let mut out = std::fs::OpenOptions::new().append(true).create(true).open(output)?;
    let problems: Vec<String> = requests.iter().filter_map(|r| refusal(r, allowed, true)).collect();
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    if !systemd_host(host_root) {
        writeln!(
            out,
            "wavegate: no service manager runs this host; not done: {}",
            requests.iter().map(Request::describe).collect::<Vec<_>>().join(", ")
        )?;
        return Ok(());
    }
    let reload = std::process::Command::new("systemctl")
        .arg("daemon-reload")
        .status()
        .context("running systemctl")?;
    if !reload.success() {
        anyhow::bail!("systemctl daemon-reload failed after the step");
    }
    for r in requests {
        let verb = r.verb().unwrap_or("restart");
        let mut t = std::fs::OpenOptions::new().append(true).create(true).open(touched)?;
        writeln!(t, "{}", r.unit)?;
        t.sync_all()?;
        let before = main_pid(&r.unit);
        let res = std::process::Command::new("systemctl")
            .args([verb, "--", &r.unit])
            .output()
            .context("running systemctl")?;
        let after = main_pid(&r.unit);
        writeln!(
            out,
            "wavegate: systemctl {verb} {} (asked: {}); main PID {before} -> {after}",
            r.unit, r.action
        )?;
        if !res.status.success() {
            anyhow::bail!(
                "systemctl {verb} {} failed: {}",
                r.unit,
                String::from_utf8_lossy(&res.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Where the agent keeps, per rollout, the units its steps acted on.
fn rollout_file(state_dir: &Path, rollout_id: &str) -> PathBuf {
    // A rollout id from the wire is never a path.
    state_dir
        .join("service-actions")
        .join(crate::snapshot::safe_name(rollout_id))
}

/// After a real run: add the units the job acted on (`touched`) to its
/// rollout's list.
pub fn remember(state_dir: &Path, rollout_id: &str, touched: &Path) -> Result<()> {
    let Ok(units) = std::fs::read_to_string(touched) else {
        return Ok(());
    };
    let file = rollout_file(state_dir, rollout_id);
    std::fs::create_dir_all(file.parent().unwrap_or(state_dir))?;
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(&file)?;
    f.write_all(units.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// After a restore: restart every unit the rollout's steps acted on, so
/// that the services run the restored files again. Returns what it did.
pub fn after_restore(state_dir: &Path, host_root: &Path, rollout_id: &str) -> Result<String> {
    let Ok(text) = std::fs::read_to_string(rollout_file(state_dir, rollout_id)) else {
        return Ok(String::new());
    };
    let units: BTreeSet<&str> = text.lines().map(str::trim).filter(|l| valid_unit(l)).collect();
    if units.is_empty() || !systemd_host(host_root) {
        return Ok(String::new());
    }
    let reload = std::process::Command::new("systemctl").arg("daemon-reload").status()?;
    if !reload.success() {
        anyhow::bail!("restored, but systemctl daemon-reload failed");
    }
    for u in &units {
        let res = std::process::Command::new("systemctl")
            .args(["restart", "--", u])
            .output()?;
        if !res.status.success() {
            anyhow::bail!(
                "restored, but systemctl restart {u} failed: {}",
                String::from_utf8_lossy(&res.stderr).trim()
            );
        }
    }
    Ok(format!(
        "; restarted {} as the rollout's steps had",
        units.into_iter().collect::<Vec<_>>().join(", ")
    ))
}

/// When a rollout's snapshot is released: forget its units.
pub fn forget(state_dir: &Path, rollout_id: &str) {
    let _ = std::fs::remove_file(rollout_file(state_dir, rollout_id));
}

/// Where a job keeps the recorder.
pub fn work_dir(job_dir: &Path) -> PathBuf {
    job_dir.join("services")
}

/// Where a job notes the units it acted on.
pub fn touched_file(job_dir: &Path) -> PathBuf {
    job_dir.join("services-touched")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(a: &str, u: &str) -> Request {
        Request {
            action: a.into(),
            unit: u.into(),
        }
    }

    #[test]
    fn only_a_package_steps_own_services_may_be_acted_on() {
        let allowed: BTreeSet<String> = ["nginx.service".to_owned()].into();
        assert_eq!(refusal(&req("upgrade", "nginx.service"), &allowed, true), None);
        let other = refusal(&req("restart", "ssh.service"), &allowed, true).expect("refused");
        assert!(
            other.contains("ssh.service") && other.contains("nginx.service"),
            "{other}"
        );
        let run = refusal(&req("restart", "nginx.service"), &allowed, false).expect("refused");
        assert!(run.contains("a run step may not"), "{run}");
        assert!(refusal(&req("mask", "nginx.service"), &allowed, true).is_some());
    }

    #[test]
    fn a_rollout_id_from_the_wire_never_leaves_the_agents_directory() {
        let state = Path::new("/var/lib/wavegate-agent");
        for id in ["../../etc/passwd", "/etc/shadow", "r0001-abc/../.."] {
            let f = rollout_file(state, id);
            assert_eq!(
                f.parent(),
                Some(state.join("service-actions").as_path()),
                "{id}: {}",
                f.display()
            );
        }
        assert_eq!(
            rollout_file(state, "r0001-abc"),
            state.join("service-actions/r0001-abc")
        );
    }

    #[test]
    fn only_plain_unit_names_are_acted_on() {
        for ok in ["nginx.service", "postfix@-.service", "php8.2-fpm.service", "ssh.socket"] {
            assert!(valid_unit(ok), "{ok}");
        }
        for bad in [
            "*.service",
            "-.service",
            "--now.service",
            "../x.service",
            "a b.service",
            "nginx",
            ".service",
            "x.timer",
        ] {
            assert!(!valid_unit(bad), "{bad}");
        }
        let allowed: BTreeSet<String> = ["*.service".to_owned()].into();
        assert!(refusal(&req("stop", "*.service"), &allowed, true).is_some());
    }

    #[test]
    fn requests_are_read_in_order_once_each() {
        let dir = std::env::temp_dir().join(format!("wg-services-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tmp")).expect("dir");
        std::fs::write(
            dir.join(REQUESTS),
            "upgrade nginx.service\nrestart nginx.service\nupgrade nginx.service\nbroken\n",
        )
        .expect("write");
        assert_eq!(
            requests(&dir),
            vec![req("upgrade", "nginx.service"), req("restart", "nginx.service")]
        );
        // A link the step leaves there is not followed.
        std::fs::remove_file(dir.join(REQUESTS)).expect("rm");
        std::fs::write(dir.join("elsewhere"), "restart ssh.service\n").expect("write");
        std::os::unix::fs::symlink(dir.join("elsewhere"), dir.join(REQUESTS)).expect("symlink");
        assert_eq!(requests(&dir), Vec::new());
        // Nor does a FIFO make the agent wait for a writer that never comes.
        std::fs::remove_file(dir.join(REQUESTS)).expect("rm");
        nix::unistd::mkfifo(&dir.join(REQUESTS), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        assert_eq!(requests(&dir), Vec::new());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_recorder_notes_requests_and_answers_status_from_the_active_list() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("wg-recorder-{}", std::process::id()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("dir");
        // The recorder writes to /tmp by its absolute path: run it on a
        // copy that writes under this test's directory instead.
        let script = RECORDER
            .replace(
                "/tmp/.wavegate-service-requests",
                &dir.join("requests").display().to_string(),
            )
            .replace("/tmp/.wavegate-active-units", &dir.join("active").display().to_string());
        for tool in ["invoke-rc.d", "deb-systemd-invoke"] {
            std::fs::write(bin.join(tool), &script).expect("write");
            std::fs::set_permissions(bin.join(tool), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::write(dir.join("active"), "nginx.service\n").expect("active");
        let run = |tool: &str, args: &[&str]| {
            std::process::Command::new(bin.join(tool))
                .args(args)
                .output()
                .expect("run")
                .status
                .code()
        };
        assert_eq!(run("invoke-rc.d", &["--quiet", "nginx", "status"]), Some(0));
        assert_eq!(run("invoke-rc.d", &["--quiet", "postfix", "status"]), Some(3));
        assert_eq!(run("invoke-rc.d", &["nginx", "upgrade"]), Some(0));
        assert_eq!(
            run("deb-systemd-invoke", &["restart", "nginx.service", "ssh.service"]),
            Some(0)
        );
        let log = std::fs::read_to_string(dir.join("requests")).expect("log");
        assert_eq!(
            log,
            "upgrade nginx.service\nrestart nginx.service\nrestart ssh.service\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
