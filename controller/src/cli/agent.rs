//! `wavegate agent install|upgrade --ssh`: put the agent on a host over SSH
//! (the `openssh` crate over the system ssh client, strict host key
//! checking), start it, and confirm with the controller that it connected.
//! SSH is for getting agents onto hosts, never for running plans.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use openssh::{KnownHosts, Session, SessionBuilder, Stdio};
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;
use wavegate_proto::v1 as pb;

use super::client::Conn;
use crate::tls::CertDir;

/// How the agent is kept running on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Start {
    /// A systemd unit (wavegate-agent.service); the host must run systemd.
    Systemd,
    /// A detached process, for hosts without a service manager (containers,
    /// rescue systems): nothing restarts it if it dies.
    Nohup,
}

/// Where and how to install.
#[derive(Clone, Debug, Args)]
pub struct InstallArgs {
    /// USER@HOST, or a Host alias of the ssh configuration.
    #[arg(long, value_name = "USER@HOST")]
    pub ssh: String,
    /// The host's id in the inventory (its certificate names it).
    #[arg(long)]
    pub host_id: String,
    /// The host's role (primary, backup or standalone), kept by the agent
    /// on the host: a step for other roles (`only_roles`) is refused there
    /// whatever the controller's inventory says.
    #[arg(long)]
    pub role: Option<String>,
    /// SSH private key.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// SSH client configuration file.
    #[arg(long)]
    pub ssh_config: Option<PathBuf>,
    /// Known hosts file (default: the ssh client's own). Host keys are
    /// checked strictly: an unknown or changed key is refused.
    #[arg(long)]
    pub known_hosts: Option<PathBuf>,
    /// Certificate directory (`wavegate certs init`); the host's agent
    /// certificate is issued there if it does not exist yet.
    #[arg(long, default_value = "certs", env = "WAVEGATE_CERTS")]
    pub certs: PathBuf,
    /// The agent binary to copy (default: `wavegate-agent` next to this binary).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// The controller URL the agent dials (default: --controller).
    #[arg(long)]
    pub agent_controller: Option<String>,
    /// Install under this directory of the host instead of `/` (the agent's
    /// host root too); for chroots and tests.
    #[arg(long, default_value = "/")]
    pub remote_root: PathBuf,
    /// How to keep the agent running.
    #[arg(long, value_enum, default_value_t = Start::Systemd)]
    pub start: Start,
    /// How long to wait for the agent to connect to the controller.
    #[arg(long, default_value = "60s", value_parser = super::serve::duration)]
    pub wait: Duration,
}

/// `wavegate agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Install and start the agent on a host, and confirm that it connected.
    Install(InstallArgs),
    /// Replace the agent binary on a host, restart it, and confirm that it
    /// connected again. Upgrade one host at a time; a failure stops there.
    Upgrade(InstallArgs),
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Connect, naming the failure precisely.
async fn connect(a: &InstallArgs) -> Result<Session, (u8, String)> {
    let mut b = SessionBuilder::default();
    b.known_hosts_check(KnownHosts::Strict)
        .connect_timeout(Duration::from_secs(15));
    if let Some(k) = &a.identity {
        b.keyfile(k);
    }
    if let Some(c) = &a.ssh_config {
        b.config_file(c);
    }
    if let Some(k) = &a.known_hosts {
        b.user_known_hosts_file(k);
    }
    match b.connect(&a.ssh).await {
        Ok(s) => Ok(s),
        Err(e) => {
            // The crate reports only "failed to connect"; ask the system ssh
            // client itself, with the same options, for its reason.
            let why = diagnose(a).await.unwrap_or_else(|| format!("{e:#}"));
            let low = why.to_lowercase();
            Err(
                if low.contains("host identification has changed") || low.contains("host key verification failed") {
                    (
                        3,
                        format!(
                            "refused: the host key of {} is unknown or has CHANGED, so nothing was copied ({}). If the host was really reinstalled, check its new key out of band and update known_hosts",
                            a.ssh,
                            why.lines()
                                .find(|l| l.to_lowercase().contains("host"))
                                .unwrap_or("host key check failed")
                                .trim()
                        ),
                    )
                } else if low.contains("permission denied") {
                    (
                        1,
                        format!(
                            "authentication to {} was refused: check the user and --identity ({})",
                            a.ssh,
                            why.trim()
                        ),
                    )
                } else if low.contains("connection refused")
                    || low.contains("timed out")
                    || low.contains("no route")
                    || low.contains("could not resolve")
                {
                    (1, format!("cannot reach {}: {}", a.ssh, why.trim()))
                } else {
                    (1, format!("ssh to {} failed: {}", a.ssh, why.trim()))
                },
            )
        }
    }
}

async fn diagnose(a: &InstallArgs) -> Option<String> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "ConnectTimeout=10",
    ]);
    if let Some(c) = &a.ssh_config {
        cmd.arg("-F").arg(c);
    }
    if let Some(k) = &a.identity {
        cmd.arg("-i").arg(k);
    }
    if let Some(k) = &a.known_hosts {
        cmd.arg("-o").arg(format!("UserKnownHostsFile={}", k.display()));
    }
    let out = cmd
        .arg(&a.ssh)
        .arg("true")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()?;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    (!err.is_empty()).then_some(err)
}

async fn run_remote(s: &Session, script: &str) -> Result<String> {
    let out = s
        .command("sh")
        .arg("-c")
        .arg(script)
        .output()
        .await
        .context("running a command over ssh")?;
    if !out.status.success() {
        bail!(
            "`{script}` failed on the host: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Write `bytes` to `path` on the host atomically, with `mode`.
async fn upload(s: &Session, path: &Path, bytes: &[u8], mode: &str) -> Result<()> {
    let p = shell_quote(&path.display().to_string());
    let dir = shell_quote(&path.parent().unwrap_or(Path::new("/")).display().to_string());
    let script = format!("umask 077 && mkdir -p {dir} && cat > {p}.new && chmod {mode} {p}.new && mv -f {p}.new {p}");
    let mut child = s
        .command("sh")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::piped())
        .spawn()
        .await?;
    {
        let mut stdin = child.stdin().take().context("ssh stdin")?;
        stdin.write_all(bytes).await?;
        stdin.shutdown().await?;
    }
    let status = child.wait().await?;
    if !status.success() {
        bail!("writing {} on the host failed", path.display());
    }
    Ok(())
}

/// The shipped unit (`deploy/systemd/wavegate-agent.service`), installed as
/// it is; what differs per host goes into a drop-in beside it.
const SHIPPED_UNIT: &str = include_str!("../../../deploy/systemd/wavegate-agent.service");

/// The drop-in that gives the shipped unit this host's command line.
fn drop_in(bin: &Path, root: &Path, etc: &Path, url: &str, host: &str, role: Option<&str>) -> String {
    format!(
        "# Written by `wavegate agent install`: this host's controller, identity and paths.\n[Service]\nExecStart=\n\
         ExecStart={} --controller {url} --ca {etc}/ca.pem --cert {etc}/agent.pem --key {etc}/agent.key --host-id {host}{} --host-root {} --state-dir {}\n",
        bin.display(),
        role.map(|r| format!(" --role {r}")).unwrap_or_default(),
        root.display(),
        root.join("var/lib/wavegate-agent").display(),
        etc = etc.display(),
    )
}

/// Install or upgrade; returns the exit status.
pub async fn install(a: &InstallArgs, conn: &Conn, upgrade: bool) -> Result<u8> {
    let fail = |code: u8, msg: String| {
        eprintln!("wavegate: {msg}");
        code
    };
    if !wavegate_domain::fleet::is_valid_host_id(&a.host_id) {
        return Ok(fail(2, format!("`{}` is not a valid host id", a.host_id)));
    }
    if let Some(r) = &a.role
        && wavegate_domain::fleet::Role::parse(r).is_none()
    {
        return Ok(fail(
            2,
            format!("--role: `{r}` is not a role; write primary, backup or standalone"),
        ));
    }
    let Some(url) = a.agent_controller.clone().or_else(|| conn.controller.clone()) else {
        return Ok(fail(
            2,
            "no controller URL: give --agent-controller or --controller (or WAVEGATE_CONTROLLER)".into(),
        ));
    };
    let agent_bin = match &a.agent_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("wavegate-agent"),
    };
    let binary =
        std::fs::read(&agent_bin).with_context(|| format!("reading the agent binary {}", agent_bin.display()))?;
    let certs = CertDir::new(&a.certs);
    let pair = certs.agent(&a.host_id);
    if !pair.cert.exists() {
        certs.issue_agent(&a.host_id)?;
    }
    let session = match connect(a).await {
        Ok(s) => s,
        Err((code, msg)) => return Ok(fail(code, msg)),
    };
    let arch = run_remote(&session, "uname -m").await?;
    if arch != std::env::consts::ARCH {
        return Ok(fail(
            1,
            format!(
                "wrong architecture: {} is {arch}, this agent binary is for {}",
                a.ssh,
                std::env::consts::ARCH
            ),
        ));
    }
    if a.start == Start::Systemd
        && run_remote(&session, "test -d /run/systemd/system && echo yes || echo no").await? != "yes"
    {
        return Ok(fail(
            1,
            format!(
                "no systemd on {}: use --start nohup to run the agent without a service manager",
                a.ssh
            ),
        ));
    }
    let root = a.remote_root.clone();
    let bin = root.join("usr/local/bin/wavegate-agent");
    let etc = root.join("etc/wavegate-agent");
    println!(
        "{} {} ({arch}) as {}",
        if upgrade { "upgrading" } else { "installing on" },
        a.ssh,
        a.host_id
    );
    upload(&session, &bin, &binary, "0755").await?;
    if !upgrade {
        upload(&session, &etc.join("ca.pem"), &std::fs::read(certs.ca())?, "0644").await?;
        upload(&session, &etc.join("agent.pem"), &std::fs::read(&pair.cert)?, "0644").await?;
        upload(&session, &etc.join("agent.key"), &std::fs::read(&pair.key)?, "0600").await?;
    }
    match a.start {
        Start::Systemd => {
            upload(
                &session,
                &root.join("etc/systemd/system/wavegate-agent.service"),
                SHIPPED_UNIT.as_bytes(),
                "0644",
            )
            .await?;
            let d = drop_in(&bin, &root, &etc, &url, &a.host_id, a.role.as_deref());
            upload(
                &session,
                &root.join("etc/systemd/system/wavegate-agent.service.d/install.conf"),
                d.as_bytes(),
                "0644",
            )
            .await?;
            run_remote(
                &session,
                "systemctl daemon-reload && systemctl enable wavegate-agent && systemctl restart wavegate-agent",
            )
            .await?;
        }
        Start::Nohup => {
            let state = root.join("var/lib/wavegate-agent");
            let log = root.join("var/log/wavegate-agent.log");
            let q = |p: &Path| shell_quote(&p.display().to_string());
            let pid = root.join("var/lib/wavegate-agent/agent.pid");
            // The previous agent (an upgrade) is found by its pid file, not
            // by a pattern that would also match this very shell.
            let script = format!(
                "mkdir -p {state} {logdir}; if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null || true; sleep 0.3; fi; \
                 cd / && setsid nohup {bin} --controller {url} --ca {ca} --cert {cert} --key {key} --host-id {host}{role} --host-root {root} --state-dir {state} </dev/null >{log} 2>&1 & echo $! > {pid}",
                state = q(&state),
                logdir = q(log.parent().unwrap_or(Path::new("/"))),
                pid = q(&pid),
                bin = q(&bin),
                url = shell_quote(&url),
                ca = q(&etc.join("ca.pem")),
                cert = q(&etc.join("agent.pem")),
                key = q(&etc.join("agent.key")),
                host = shell_quote(&a.host_id),
                role = a.role.as_deref().map(|r| format!(" --role {r}")).unwrap_or_default(),
                root = q(&root),
                log = q(&log),
            );
            run_remote(&session, &script).await?;
        }
    }
    let _ = session.close().await;
    // Confirmed only when the controller itself sees the agent.
    let deadline = Instant::now() + a.wait;
    loop {
        if let Ok(mut client) = conn.connect().await
            && let Ok(f) = client.fleet(pb::FleetRequest {}).await
            && f.into_inner().hosts.iter().any(|h| h.id == a.host_id && h.connected)
        {
            println!("agent {} on {} is connected to the controller", a.host_id, a.ssh);
            return Ok(0);
        }
        if Instant::now() > deadline {
            return Ok(fail(
                1,
                format!(
                    "the agent on {} started but did not connect within {:?}; see its log on the host",
                    a.ssh, a.wait
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Run an `agent` subcommand.
pub async fn run(cmd: AgentCommand, conn: &Conn) -> Result<u8> {
    match cmd {
        AgentCommand::Install(a) => install(&a, conn, false).await,
        AgentCommand::Upgrade(a) => install(&a, conn, true).await,
    }
}
