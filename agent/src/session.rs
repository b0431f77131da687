//! The session with the controller: dial out, say Hello, send heartbeats,
//! run what arrives, send results; on any failure reconnect with jittered
//! backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tracing::{error, info, warn};
use wavegate_domain::command::{ChangeKind, Command, CommandKind, PathChange};
use wavegate_domain::effects::StepReport;
use wavegate_domain::plan::Reboot;
use wavegate_proto::convert;
use wavegate_proto::v1::{self as pb, agent_message, agent_service_client::AgentServiceClient, controller_message};

use crate::exec::{run_step_once, run_supervised};
use crate::journal::{Job, Journal, Mode};
use crate::snapshot;

/// The agent's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The controller of the current session.
    pub controller: String,
    /// Every controller's URL: sessions go to each in turn until one (the
    /// leader) takes it.
    pub controllers: Vec<String>,
    /// CA, certificate and key files (PEM).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// This host's id.
    pub host_id: String,
    /// This host's role as the host itself was told (`--role`); `None`:
    /// not told, so no step that names its roles runs here.
    pub role: Option<wavegate_domain::fleet::Role>,
    /// Root under which steps and exec checks run.
    pub host_root: PathBuf,
    /// Journal and scratch space.
    pub state_dir: PathBuf,
    /// The agent binary, whose `exec-step` mode supervises each step.
    pub exe: PathBuf,
    /// This boot of the host.
    pub boot_id: String,
    /// In a lab: a reboot ends the agent with [`LAB_REBOOT_EXIT`], and the
    /// lab's host starts it again with a new boot id; no machine reboots.
    pub lab_reboot: bool,
}

/// The exit code with which an agent started by `wavegate lab` asks its lab
/// host for a reboot (`wavegate-agent --lab-reboot`): the lab kills every
/// process of the host and starts the agent again with a new boot id.
pub const LAB_REBOOT_EXIT: i32 = 194;

/// The host's boot id: `/proc/sys/kernel/random/boot_id`, or a lab's file.
pub fn boot_id(file: Option<&Path>) -> Result<String> {
    let path = file.unwrap_or(Path::new("/proc/sys/kernel/random/boot_id"));
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading the boot id from {}", path.display()))?
        .trim()
        .to_owned())
}

/// Whether the host says it needs a reboot: Debian's `/run/reboot-required`,
/// or `needs-restarting -r` (dnf-utils) exiting 1 on the machine itself.
fn reboot_required(host_root: &Path) -> bool {
    if host_root.join("run/reboot-required").exists() {
        return true;
    }
    host_root == Path::new("/")
        && std::process::Command::new("needs-restarting")
            .arg("-r")
            .status()
            .is_ok_and(|s| s.code() == Some(1))
}

/// Reboot the host (journaled by the caller first).
fn reboot(cfg: &Config) {
    warn!(host = %cfg.host_id, "Rebooting after a step that asked for it.");
    if cfg.lab_reboot {
        std::process::exit(LAB_REBOOT_EXIT);
    }
    for cmd in [&["systemctl", "reboot"][..], &["/sbin/reboot"][..]] {
        if std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .status()
            .is_ok_and(|s| s.success())
        {
            return;
        }
    }
    error!(host = %cfg.host_id, "Could not reboot: neither `systemctl reboot` nor /sbin/reboot worked.");
}

/// SHA-256 over a fetch's write set: every path under it with its kind,
/// size and modification time. A cache that matches it needs no new fetch.
pub fn cache_digest(root: &Path, paths: &[String]) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let mut lines = Vec::new();
    for p in paths {
        let mut stack = vec![root.join(p.trim_start_matches('/'))];
        while let Some(at) = stack.pop() {
            let Ok(m) = at.symlink_metadata() else { continue };
            lines.push(format!(
                "{}\0{:o}\0{}\0{}.{}",
                at.strip_prefix(root).unwrap_or(&at).display(),
                m.mode(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ));
            if m.is_dir()
                && let Ok(rd) = std::fs::read_dir(&at)
            {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    lines.sort();
    hex::encode(sha2::Sha256::digest(lines.join("\n").as_bytes()))
}

/// Run forever: keep a session open, reconnecting with jittered backoff.
/// With several controllers, a failed or ended session moves on to the
/// next one at once; the backoff applies once every one was tried.
pub async fn run(cfg: Config) -> Result<()> {
    let journal = Arc::new(Journal::open(&cfg.state_dir)?);
    let controllers = if cfg.controllers.is_empty() {
        vec![cfg.controller.clone()]
    } else {
        cfg.controllers.clone()
    };
    let mut backoff = Duration::from_millis(100);
    let mut at = 0;
    let mut failed_in_a_row = 0;
    loop {
        let mut this = cfg.clone();
        this.controller.clone_from(&controllers[at % controllers.len()]);
        match session(&this, &journal).await {
            Ok(()) => {
                info!(controller = %this.controller, "Controller closed the session; reconnecting.");
                backoff = Duration::from_millis(100);
                failed_in_a_row = 0;
            }
            Err(e) => {
                warn!(controller = %this.controller, error = %format!("{e:#}"), "Session failed; reconnecting.");
                failed_in_a_row += 1;
            }
        }
        if controllers.len() > 1 {
            at += 1;
            if failed_in_a_row % controllers.len() != 0 {
                continue;
            }
        }
        let jitter = rand::random_range(0.5..1.5);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        // A group's leader may move at any time: keep looking quickly.
        let cap = if controllers.len() > 1 { 1 } else { 5 };
        backoff = (backoff * 2).min(Duration::from_secs(cap));
    }
}

async fn session(cfg: &Config, journal: &Arc<Journal>) -> Result<()> {
    let mut endpoint = Endpoint::from_shared(cfg.controller.clone())?.connect_timeout(Duration::from_secs(5));
    if let Some((ca, cert, key)) = &cfg.tls {
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca)?))
            .identity(Identity::from_pem(read(cert)?, read(key)?))
            .domain_name("localhost");
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect().await.context("connecting to the controller")?;
    let mut client = AgentServiceClient::new(channel);
    // Outbound messages go through a bounded buffer.
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(256);
    let scan = |cfg: &Config| {
        let (root, state) = (cfg.host_root.clone(), cfg.state_dir.clone());
        async move {
            // `None`: the scan itself failed; reported as unknown, never
            // as "nothing updates this host".
            tokio::task::spawn_blocking(move || crate::updaters::scan(&root, &state))
                .await
                .ok()
        }
    };
    let mut reported = scan(cfg).await;
    let hello = pb::Hello {
        host_id: cfg.host_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        boot_id: cfg.boot_id.clone(),
        protocol: wavegate_proto::PROTOCOL,
        updaters: reported
            .iter()
            .flatten()
            .map(wavegate_proto::convert::updater_to)
            .collect(),
        updaters_unknown: reported.is_none(),
    };
    tx.send(pb::AgentMessage {
        body: Some(agent_message::Body::Hello(hello)),
    })
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .context("opening the session")?
        .into_inner();
    info!(host = %cfg.host_id, "Connected to the controller.");
    let heartbeat_tx = tx.clone();
    let heartbeat_cfg = cfg.clone();
    let heartbeat = tokio::spawn(async move {
        let mut seq = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            seq += 1;
            // The updaters go again only when they changed (a hold, an
            // administrator switching one on).
            let now = scan(&heartbeat_cfg).await;
            let updaters = (now != reported).then(|| pb::UpdaterScan {
                found: now.iter().flatten().map(wavegate_proto::convert::updater_to).collect(),
                unknown: now.is_none(),
            });
            reported = now;
            let hb = pb::AgentMessage {
                body: Some(agent_message::Body::Heartbeat(pb::Heartbeat { seq, updaters })),
            };
            if heartbeat_tx.send(hb).await.is_err() {
                break;
            }
        }
    });
    let result = async {
        while let Some(msg) = inbound.message().await? {
            if let Some(controller_message::Body::Command(cmd)) = msg.body {
                let (cfg, journal, tx) = (cfg.clone(), Arc::clone(journal), tx.clone());
                tokio::spawn(async move {
                    let (result, reboot_now) = handle(&cfg, &journal, cmd, &tx).await;
                    let sent = tx
                        .send(pb::AgentMessage {
                            body: Some(agent_message::Body::Result(result)),
                        })
                        .await;
                    if reboot_now {
                        // The result goes out first: the reboot is journaled,
                        // and the controller waits for the new boot id.
                        if sent.is_ok() {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        reboot(&cfg);
                    }
                });
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    heartbeat.abort();
    result
}

/// The agent's own files as host paths, when they live under the host
/// root: a step never changes them, whatever its write set.
/// The agent's own files as host paths: its state directory (the journal
/// keeps output unmasked, the snapshots hold customers' files) and its TLS
/// files. No step sees them, before or after approval.
fn hidden(cfg: &Config) -> Vec<String> {
    let mut paths = vec![cfg.state_dir.clone()];
    if let Some((ca, cert, key)) = &cfg.tls {
        paths.extend([ca.clone(), cert.clone(), key.clone()]);
    }
    paths
        .iter()
        .filter_map(|p| p.strip_prefix(&cfg.host_root).ok())
        .map(|rel| format!("/{}", rel.display()))
        .filter(|p| p != "/")
        .collect()
}

fn own_paths(cfg: &Config) -> Vec<String> {
    match cfg.state_dir.strip_prefix(&cfg.host_root) {
        Ok(rel) => vec![format!("/{}", rel.display())],
        Err(_) => Vec::new(),
    }
}

fn result_of(id: &str, s: crate::journal::Stored, replayed: bool) -> pb::CommandResult {
    // A dry-run's reports are kept in the journal as JSON (the agent's own
    // file); on the wire they are typed.
    let report = (!s.report.is_empty())
        .then(|| serde_json::from_str::<Vec<StepReport>>(&s.report).ok())
        .flatten()
        .map(|steps| {
            pb::command_result::Report::DryRuns(pb::DryRunReports {
                steps: steps.into_iter().map(pb::StepReport::from).collect(),
            })
        });
    pb::CommandResult {
        boot_id: s.boot_id,
        command_id: id.to_owned(),
        outcome: s.outcome,
        exit_code: s.exit_code,
        duration_ms: s.duration_ms,
        output_sha256: s.output_sha256,
        output_tail: s.output_tail,
        checks: Vec::new(),
        replayed,
        detail: s.detail,
        report,
        ..Default::default()
    }
}

fn fetch_report(digest: String, ran: bool, stage: String, adopted: bool) -> Option<pb::command_result::Report> {
    Some(pb::command_result::Report::Fetch(pb::FetchReport {
        digest,
        ran,
        stage,
        adopted,
    }))
}

/// Answer one command; the bool asks for a reboot once the answer is sent.
async fn handle(
    cfg: &Config,
    journal: &Journal,
    cmd: pb::Command,
    tx: &mpsc::Sender<pb::AgentMessage>,
) -> (pb::CommandResult, bool) {
    let mut reboot_now = false;
    let mut r = answer(cfg, journal, cmd, &mut reboot_now, tx).await;
    if r.boot_id.is_empty() {
        r.boot_id.clone_from(&cfg.boot_id);
    }
    (r, reboot_now)
}

/// Run a step-like job once, its output sent live (again from the start on
/// a replay, so a controller that lost part of it gets all of it).
async fn run_streamed(
    cfg: &Config,
    journal: &Journal,
    job: Job,
    s: crate::output::Stream,
    tx: &mpsc::Sender<pb::AgentMessage>,
) -> anyhow::Result<(crate::journal::Stored, bool)> {
    let path = journal.job_dir(&job.command_id).join("output.log");
    crate::output::while_running(path, s, tx, run_step_once(&cfg.exe, journal, job)).await
}

/// Why a step that names the roles it is for may not run on this host: the
/// agent's own role (given on the host, never by the controller) is not one
/// of them, or the agent was not told its role. A gate that cannot decide
/// says no.
pub fn role_refusal(
    host: &str,
    own: Option<wavegate_domain::fleet::Role>,
    step: &wavegate_domain::command::Step,
) -> Option<String> {
    if step.only_roles.is_empty() {
        return None;
    }
    let wanted = step.only_roles.join(", ");
    match own {
        Some(role) if step.only_roles.iter().any(|r| r == role.as_str()) => None,
        Some(role) => Some(format!(
            "refused by the agent: step `{}` is only for {wanted} hosts, and {host} is a {role} (its agent's --role); the controller's inventory says otherwise, so check it",
            step.name
        )),
        None => Some(format!(
            "refused by the agent: step `{}` is only for {wanted} hosts, and the agent on {host} was not told its role; start it with --role (or WAVEGATE_ROLE)",
            step.name
        )),
    }
}

/// How many paths a restore preview names (it counts them all).
const PREVIEW_PATHS: usize = 200;

async fn answer(
    cfg: &Config,
    journal: &Journal,
    cmd: pb::Command,
    reboot_now: &mut bool,
    tx: &mpsc::Sender<pb::AgentMessage>,
) -> pb::CommandResult {
    let id = cmd.id.clone();
    let refused = |detail: String| pb::CommandResult {
        command_id: id.clone(),
        outcome: pb::Outcome::Refused as i32,
        exit_code: -1,
        detail,
        ..Default::default()
    };
    // Read into domain types; a value this agent does not know (a newer
    // controller's reboot mode, package manager or backend) refuses the
    // command instead of being taken for another.
    let cmd = match Command::try_from(cmd) {
        Ok(cmd) => cmd,
        Err(e) => return refused(format!("refused: {e}; upgrade the agent")),
    };
    let scratch = cfg.state_dir.join("scratch");
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        return refused(format!("cannot create {}: {e}", scratch.display()));
    }
    // The site's redact patterns: every output line is masked with them
    // (and the built-in ones) before anything of it leaves this host.
    let redact = cmd.redact.clone();
    let accept_weaker = cmd.accept_weaker.clone();
    // Every path a command names is checked here too, whatever the
    // controller checked: absolute, no `.` or `..`, no wildcard.
    let paths: Vec<&String> = match &cmd.kind {
        CommandKind::RunStep(s) => s
            .step
            .writes
            .iter()
            .chain(s.create_dirs.iter())
            .chain(s.create_files.iter())
            .collect(),
        CommandKind::Fetch(f) => f.writes.iter().collect(),
        CommandKind::DryRun(d) => d
            .steps
            .iter()
            .flat_map(|s| s.writes.iter())
            .chain(d.untouchable.iter())
            .collect(),
        CommandKind::TakeSnapshot { paths, untouchable, .. } => paths.iter().chain(untouchable.iter()).collect(),
        _ => Vec::new(),
    };
    for p in paths {
        if let Err(why) = wavegate_domain::plan::normalise_write_path(p) {
            return refused(format!("refused: the path `{p}` {why}"));
        }
    }
    if let Err(e) = wavegate_domain::redact::Redactor::new(&redact) {
        return refused(format!("refused: {e}"));
    }
    // A fetch is checked as its step is: it runs the plan's command with
    // the network, before any dry-run.
    let fetched = match &cmd.kind {
        CommandKind::Fetch(f) => Some(wavegate_domain::command::Step {
            name: f.step_name.clone(),
            only_roles: f.only_roles.clone(),
            ..Default::default()
        }),
        _ => None,
    };
    let steps: Vec<&wavegate_domain::command::Step> = match &cmd.kind {
        CommandKind::RunStep(s) => vec![&s.step],
        CommandKind::DryRun(d) => d.steps.iter().collect(),
        _ => fetched.iter().collect(),
    };
    if let Some(why) = steps.into_iter().find_map(|s| role_refusal(&cfg.host_id, cfg.role, s)) {
        warn!(command = %id, "{why}");
        return refused(why);
    }
    // A mirror's pause and resume run unconfined: only on a host that says
    // it is a backup.
    if let CommandKind::Mirror { purpose, .. } = &cmd.kind
        && cfg.role != Some(wavegate_domain::fleet::Role::Backup)
    {
        let why = format!(
            "refused by the agent: a mirror {purpose} runs only on a backup, and {} is {} (its agent's --role)",
            cfg.host_id,
            cfg.role.map_or("not told its role".to_owned(), |r| format!("a {r}"))
        );
        warn!(command = %id, "{why}");
        return refused(why);
    }
    match cmd.kind {
        CommandKind::RunStep(run) => {
            let step = run.step;
            // Real steps are always confined to their write set.
            let mut job = Job::new(&id, &step.run, step.timeout_ms, &cfg.host_root, Mode::Confined);
            job.redact.clone_from(&redact);
            job.accept_weaker.clone_from(&accept_weaker);
            job.hide = hidden(cfg);
            job.from.clone_from(&cfg.controller);
            job.writes = step.writes;
            job.packages.clone_from(&step.packages);
            job.create_dirs = run.create_dirs;
            job.create_files = run.create_files;
            job.untouchable = run.untouchable;
            job.protect = own_paths(cfg);
            job.boot_id.clone_from(&cfg.boot_id);
            let stream = crate::output::Stream {
                redact: redact.clone(),
                command_id: id.clone(),
                rollout_id: run.rollout_id.clone(),
                step: step.name.clone(),
            };
            let outcome = run_streamed(cfg, journal, job, stream, tx).await;
            // Units its package's scripts had the agent restart: a rollback
            // restarts them after the restore.
            let touched = crate::services::touched_file(&journal.job_dir(&id));
            if touched.exists()
                && let Err(e) = crate::services::remember(&cfg.state_dir, &run.rollout_id, &touched)
            {
                warn!(command = %id, error = %format!("{e:#}"), "Could not note the services the step restarted.");
            }
            match outcome {
                Ok((s, replayed)) => {
                    info!(command = %id, outcome = s.outcome, replayed, "Step finished.");
                    let ok = s.outcome == pb::Outcome::Ok as i32;
                    let mut r = result_of(&id, s, replayed);
                    // A reboot is journaled before it happens, happens only
                    // right after the step ran, and never again: a replayed
                    // answer says it is pending and does nothing.
                    let marker = journal.job_dir(&id).join("reboot.json");
                    if ok && !replayed && step.reboot != Reboot::Never && !marker.exists() {
                        let wanted = step.reboot == Reboot::Always || reboot_required(&cfg.host_root);
                        if wanted {
                            let note =
                                serde_json::json!({"boot_id": r.boot_id, "mode": step.reboot.as_str()}).to_string();
                            match crate::journal::write_durably(&marker, note.as_bytes()) {
                                Ok(()) => *reboot_now = true,
                                Err(e) => {
                                    r.outcome = pb::Outcome::Failed as i32;
                                    r.detail = format!("the step ran, but its reboot could not be journaled: {e:#}");
                                }
                            }
                        }
                    }
                    r.reboot_pending = marker.exists();
                    r
                }
                Err(e) => refused(format!("{e:#}")),
            }
        }
        CommandKind::Fetch(f) => {
            let key = crate::fetch::key(&f.run, &f.writes);
            let stream = crate::output::Stream {
                redact: redact.clone(),
                command_id: id.clone(),
                rollout_id: f.rollout_id.clone(),
                step: format!("{} (fetch)", f.step_name),
            };
            if f.stage {
                // Before approval: nothing real. The fetch runs over the
                // sandbox's view; what it writes is kept in a staging cache.
                let mut job = Job::new(&id, &f.run, f.timeout_ms, &cfg.host_root, Mode::FetchStaged);
                job.redact.clone_from(&redact);
                job.accept_weaker.clone_from(&accept_weaker);
                job.hide = hidden(cfg);
                job.from.clone_from(&cfg.controller);
                job.writes = f.writes.clone();
                job.stage_out = Some(crate::fetch::tree(&cfg.state_dir, &key));
                job.boot_id.clone_from(&cfg.boot_id);
                return match run_streamed(cfg, journal, job, stream, tx).await {
                    Ok((s, replayed)) => {
                        let ok = s.outcome == pb::Outcome::Ok as i32;
                        let mut r = result_of(&id, s, replayed);
                        if ok {
                            let (tree, writes) = (crate::fetch::tree(&cfg.state_dir, &key), f.writes.clone());
                            match tokio::task::spawn_blocking(move || crate::fetch::digest(&tree, &writes)).await {
                                Ok(Ok(d)) => {
                                    r.detail = "fetched into a staging cache; nothing on the host changed".into();
                                    r.report = fetch_report(d, !replayed, key, false);
                                }
                                Ok(Err(e)) => return refused(format!("reading the staged fetch: {e:#}")),
                                Err(e) => return refused(e.to_string()),
                            }
                        }
                        r
                    }
                    Err(e) => refused(format!("{e:#}")),
                };
            }
            if !f.adopt_digest.is_empty() && crate::fetch::tree(&cfg.state_dir, &key).is_dir() {
                // After approval: the staging cache checked at submit is put
                // in place, after its digest is checked again.
                let (tree, root, writes, want) = (
                    crate::fetch::tree(&cfg.state_dir, &key),
                    cfg.host_root.clone(),
                    f.writes.clone(),
                    f.adopt_digest.clone(),
                );
                let res = tokio::task::spawn_blocking(move || {
                    let n = crate::fetch::adopt(&tree, &root, &writes, &want)?;
                    Ok::<_, anyhow::Error>((n, cache_digest(&root, &writes)))
                })
                .await;
                return match res {
                    Ok(Ok((n, after))) => {
                        let _ = std::fs::remove_dir_all(crate::fetch::dir(&cfg.state_dir, &key));
                        pb::CommandResult {
                            command_id: id.clone(),
                            outcome: pb::Outcome::Ok as i32,
                            detail: format!("the fetch staged at submit is in place ({n} paths); not fetched again"),
                            report: fetch_report(after, false, String::new(), true),
                            ..Default::default()
                        }
                    }
                    Ok(Err(e)) => refused(format!("{e:#}")),
                    Err(e) => refused(e.to_string()),
                };
            }
            // After approval, with no staging cache (another host, or one
            // lost): fetched for real, confined to its write set.
            let (root, writes) = (cfg.host_root.clone(), f.writes.clone());
            let before = tokio::task::spawn_blocking(move || cache_digest(&root, &writes))
                .await
                .unwrap_or_default();
            if !f.skip_if_digest.is_empty() && before == f.skip_if_digest {
                return pb::CommandResult {
                    command_id: id.clone(),
                    outcome: pb::Outcome::Ok as i32,
                    detail: "the cache matches the last fetch; not fetched again".into(),
                    report: fetch_report(before, false, String::new(), false),
                    ..Default::default()
                };
            }
            let mut job = Job::new(&id, &f.run, f.timeout_ms, &cfg.host_root, Mode::Confined);
            job.redact.clone_from(&redact);
            job.accept_weaker.clone_from(&accept_weaker);
            job.hide = hidden(cfg);
            job.from.clone_from(&cfg.controller);
            job.writes = f.writes.clone();
            job.network = true;
            job.protect = own_paths(cfg);
            job.boot_id.clone_from(&cfg.boot_id);
            match run_streamed(cfg, journal, job, stream, tx).await {
                Ok((s, replayed)) => {
                    let (root, writes) = (cfg.host_root.clone(), f.writes.clone());
                    let after = tokio::task::spawn_blocking(move || cache_digest(&root, &writes))
                        .await
                        .unwrap_or_default();
                    let mut r = result_of(&id, s, replayed);
                    r.report = fetch_report(after, !replayed, String::new(), false);
                    r
                }
                Err(e) => refused(format!("{e:#}")),
            }
        }
        CommandKind::DryRun(d) => {
            let mut job = Job::new(&id, "", 0, &cfg.host_root, Mode::DryRun);
            job.redact.clone_from(&redact);
            job.accept_weaker.clone_from(&accept_weaker);
            job.hide = hidden(cfg);
            job.from.clone_from(&cfg.controller);
            job.untouchable = d.untouchable.clone();
            job.stages = d
                .fetch_stages
                .iter()
                .filter(|k| k.len() == 32 && k.chars().all(|c| c.is_ascii_hexdigit()))
                .map(|k| crate::fetch::tree(&cfg.state_dir, k))
                .filter(|t| t.is_dir())
                .collect();
            job.steps = d.steps;
            match run_supervised(&cfg.exe, &scratch, &job).await {
                Ok(s) => result_of(&id, s, false),
                Err(e) => refused(format!("dry-run blocked: {e:#}")),
            }
        }
        CommandKind::TakeSnapshot {
            rollout_id,
            paths,
            untouchable,
            backend,
        } => {
            let (state, host, root) = (cfg.state_dir.clone(), cfg.host_id.clone(), cfg.host_root.clone());
            let force = backend;
            let res = tokio::task::spawn_blocking(move || {
                snapshot::take(&snapshot::Request {
                    state_dir: &state,
                    host: &host,
                    root: &root,
                    rollout: &rollout_id,
                    writes: &paths,
                    untouchable: &untouchable,
                    force,
                })
            })
            .await;
            snapshot_result(&id, res, "snapshot taken and verified")
        }
        CommandKind::RestoreSnapshot {
            rollout_id,
            preview: true,
        } => {
            let (state, host, root) = (cfg.state_dir.clone(), cfg.host_id.clone(), cfg.host_root.clone());
            let res = tokio::task::spawn_blocking(move || {
                snapshot::changes(&state, &host, &root, &rollout_id, PREVIEW_PATHS)
            })
            .await;
            match res {
                Ok(Ok((changes, total))) => pb::CommandResult {
                    command_id: id.clone(),
                    outcome: pb::Outcome::Ok as i32,
                    detail: format!("a restore would change {total} paths"),
                    changes: changes
                        .into_iter()
                        .filter_map(|(path, change)| {
                            ChangeKind::parse(change).map(|kind| convert::path_change_to(PathChange { path, kind }))
                        })
                        .collect(),
                    changes_total: total,
                    ..Default::default()
                },
                Ok(Err(e)) => refused(format!("{e:#}")),
                Err(e) => refused(e.to_string()),
            }
        }
        CommandKind::RestoreSnapshot {
            rollout_id,
            preview: false,
        } => {
            let (state, host, root) = (cfg.state_dir.clone(), cfg.host_id.clone(), cfg.host_root.clone());
            let res = tokio::task::spawn_blocking(move || {
                let m = snapshot::restore(&state, &host, &root, &rollout_id)?;
                let restarted = crate::services::after_restore(&state, &root, &rollout_id)?;
                Ok((m, restarted))
            })
            .await;
            let restarted = match &res {
                Ok(Ok((_, r))) => r.clone(),
                _ => String::new(),
            };
            let res = res.map(|r| r.map(|(m, _)| m));
            snapshot_result(&id, res, &format!("restored from the snapshot{restarted}"))
        }
        CommandKind::Mirror {
            rollout_id,
            purpose,
            run,
            timeout_ms,
        } => {
            // The inventory's own command, run as the host is: it stops and
            // starts the services that feed this backup.
            let mut job = Job::new(&id, &run, timeout_ms, &cfg.host_root, Mode::Plain);
            job.redact.clone_from(&redact);
            job.from.clone_from(&cfg.controller);
            let stream = crate::output::Stream {
                redact: redact.clone(),
                command_id: id.clone(),
                rollout_id,
                step: format!("mirror {purpose}"),
            };
            match run_streamed(cfg, journal, job, stream, tx).await {
                Ok((s, _)) => {
                    let ok = s.outcome == pb::Outcome::Ok as i32;
                    pb::CommandResult {
                        command_id: id.clone(),
                        outcome: s.outcome,
                        exit_code: s.exit_code,
                        detail: if ok {
                            format!("mirror {purpose}: done")
                        } else {
                            format!(
                                "mirror {purpose} failed (exit {}): {}",
                                s.exit_code,
                                String::from_utf8_lossy(&s.output_tail).trim()
                            )
                        },
                        ..Default::default()
                    }
                }
                Err(e) => refused(format!("mirror {purpose}: {e:#}")),
            }
        }
        CommandKind::HoldUpdaters { rollout_id, hold } => {
            let (state, root) = (cfg.state_dir.clone(), cfg.host_root.clone());
            let done = tokio::task::spawn_blocking(move || {
                if hold {
                    crate::updaters::hold(&root, &state, &rollout_id)
                } else {
                    crate::updaters::release(&root, &state, &rollout_id)
                }
            })
            .await;
            match done {
                Ok(Ok(lines)) => pb::CommandResult {
                    command_id: id.clone(),
                    outcome: pb::Outcome::Ok as i32,
                    detail: if lines.is_empty() {
                        "nothing to do".into()
                    } else {
                        lines.join("; ")
                    },
                    ..Default::default()
                },
                Ok(Err(e)) => refused(format!("{e:#}")),
                Err(e) => refused(e.to_string()),
            }
        }
        CommandKind::ReleaseSnapshot { rollout_id } => {
            crate::services::forget(&cfg.state_dir, &rollout_id);
            let (state, root) = (cfg.state_dir.clone(), cfg.host_root.clone());
            match tokio::task::spawn_blocking(move || snapshot::release(&state, &root, &rollout_id)).await {
                Ok(Ok(())) => pb::CommandResult {
                    command_id: id.clone(),
                    outcome: pb::Outcome::Ok as i32,
                    ..Default::default()
                },
                Ok(Err(e)) => refused(format!("{e:#}")),
                Err(e) => refused(e.to_string()),
            }
        }
        CommandKind::RunChecks { rollout_id, checks } => {
            let started = std::time::Instant::now();
            let mut results = Vec::new();
            for c in &checks {
                let stream = crate::output::Stream {
                    redact: redact.clone(),
                    command_id: id.clone(),
                    rollout_id: rollout_id.clone(),
                    step: format!("health check {}", c.name),
                };
                results
                    .push(crate::checks::run_tailed(&cfg.exe, c, &cfg.host_root, &scratch, Some((stream, tx))).await);
            }
            let ok = results.iter().all(|r| r.ok);
            pb::CommandResult {
                command_id: id.clone(),
                outcome: if ok { pb::Outcome::Ok } else { pb::Outcome::Failed } as i32,
                exit_code: if ok { 0 } else { 1 },
                duration_ms: started.elapsed().as_millis() as u64,
                checks: results.into_iter().map(pb::CheckResult::from).collect(),
                ..Default::default()
            }
        }
    }
}

fn snapshot_result(
    id: &str,
    res: Result<anyhow::Result<snapshot::Manifest>, tokio::task::JoinError>,
    what: &str,
) -> pb::CommandResult {
    match res {
        Ok(Ok(m)) => pb::CommandResult {
            command_id: id.to_owned(),
            outcome: pb::Outcome::Ok as i32,
            detail: format!("{what}: {}", m.describe()),
            report: Some(pb::command_result::Report::Snapshot(m.summary().into())),
            ..Default::default()
        },
        Ok(Err(e)) => pb::CommandResult {
            command_id: id.to_owned(),
            outcome: pb::Outcome::Failed as i32,
            exit_code: -1,
            detail: format!("{e:#}"),
            ..Default::default()
        },
        Err(e) => pb::CommandResult {
            command_id: id.to_owned(),
            outcome: pb::Outcome::Failed as i32,
            exit_code: -1,
            detail: e.to_string(),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(manager: Option<i32>) -> pb::Command {
        pb::Command {
            id: "c".into(),
            kind: Some(pb::command::Kind::DryRun(pb::DryRun {
                steps: vec![pb::Step {
                    name: "patch".into(),
                    run: "true".into(),
                    kind: manager.map(|m| {
                        pb::step::Kind::Packages(pb::PackageSpec {
                            manager: m,
                            upgrade: vec!["nginx".into()],
                            ..Default::default()
                        })
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// Before: a package manager this agent did not know turned a package
    /// step into a plain step; now the command is refused when it is read.
    #[test]
    fn a_step_for_other_roles_or_an_agent_without_one_is_refused() {
        use wavegate_domain::fleet::Role;
        let mut step = wavegate_domain::command::Step {
            name: "wipe the replica".into(),
            ..Default::default()
        };
        // A step for every role runs anywhere, told or not.
        assert_eq!(role_refusal("db1", None, &step), None);
        step.only_roles = vec!["backup".into()];
        assert_eq!(role_refusal("db2", Some(Role::Backup), &step), None);
        let on_primary = role_refusal("db1", Some(Role::Primary), &step).expect("refused on a primary");
        assert!(on_primary.contains("db1 is a primary"), "{on_primary}");
        let untold = role_refusal("db1", None, &step).expect("refused when the agent has no role");
        assert!(untold.contains("--role"), "{untold}");
        step.only_roles = vec!["backup".into(), "standalone".into()];
        assert_eq!(role_refusal("s1", Some(Role::Standalone), &step), None);
    }

    #[test]
    fn an_unknown_package_manager_is_refused_not_run_as_a_plain_step() {
        let Ok(Command {
            kind: CommandKind::DryRun(d),
            ..
        }) = Command::try_from(step(Some(pb::PackageManager::Apt as i32)))
        else {
            panic!("apt is known")
        };
        assert!(d.steps[0].packages.is_some());
        let plain = Command::try_from(step(None)).expect("a plain step");
        assert!(matches!(plain.kind, CommandKind::DryRun(d) if d.steps[0].packages.is_none()));
        let err = Command::try_from(step(Some(9))).expect_err("an unknown manager");
        assert!(err.to_string().contains("package manager 9"), "{err}");
        let err = Command::try_from(step(Some(0))).expect_err("an unspecified manager");
        assert!(err.to_string().contains("never run as a plain command"), "{err}");
    }

    #[test]
    fn an_unknown_reboot_mode_is_refused() {
        let cmd = |reboot| pb::Command {
            id: "c".into(),
            kind: Some(pb::command::Kind::RunStep(pb::RunStep {
                step: Some(pb::Step {
                    reboot,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        for known in [pb::Reboot::Never, pb::Reboot::Always, pb::Reboot::IfRequired] {
            assert!(Command::try_from(cmd(known as i32)).is_ok(), "{known:?}");
        }
        assert!(Command::try_from(cmd(7)).is_err(), "not guessed at");
    }
}
