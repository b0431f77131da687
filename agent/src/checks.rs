//! Health checks run on the host: TCP connect, HTTP status, and a command
//! (under the host root) that must exit 0. A check that cannot run has failed.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use wavegate_domain::command::CheckResult;
use wavegate_domain::rollout::{CheckSpec as HealthCheck, ProbeSpec as Probe};

use crate::exec::run_supervised_tailed;
use crate::journal::{Job, Mode};

async fn tcp(addr: &str, timeout: Duration) -> Result<String, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(format!("connected to {addr}")),
        Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
        Err(_) => Err(format!("no connection to {addr} within {timeout:?}")),
    }
}

async fn http(url: &str, expect: u32, timeout: Duration) -> Result<String, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("{url}: only http:// checks are supported by this agent"));
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let fetch = async {
        let mut s = TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: wavegate-agent\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 1024];
        let n = s.read(&mut head).await.map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        let status: u32 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(format!("not an HTTP answer: {line:?}"))?;
        Ok::<u32, String>(status)
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(Ok(s)) if s == expect => Ok(format!("HTTP {s}")),
        Ok(Ok(s)) => Err(format!("HTTP {s}, expected {expect}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer from {url} within {timeout:?}")),
    }
}

/// Run one check.
pub async fn run(exe: &Path, check: &HealthCheck, host_root: &Path, scratch: &Path) -> CheckResult {
    run_tailed(exe, check, host_root, scratch, None).await
}

/// [`run`], an exec check's output sent live through `tail` when given.
pub async fn run_tailed(
    exe: &Path,
    check: &HealthCheck,
    host_root: &Path,
    scratch: &Path,
    tail: Option<(
        crate::output::Stream,
        &tokio::sync::mpsc::Sender<wavegate_proto::v1::AgentMessage>,
    )>,
) -> CheckResult {
    let timeout = Duration::from_millis(check.timeout_ms.max(1));
    let res = match &check.probe {
        Probe::Tcp(addr) => tcp(addr, timeout).await,
        Probe::Http { url, expect_status } => http(url, u32::from(*expect_status), timeout).await,
        Probe::Exec(cmd) => {
            // A check only looks: the host root read-only, a private /tmp.
            let mut job = Job::new(
                &format!("check-{}", check.name),
                cmd,
                check.timeout_ms.max(1),
                host_root,
                Mode::Confined,
            );
            job.check = true;
            job.network = true;
            if let Some((stream, _)) = &tail {
                job.redact.clone_from(&stream.redact);
            }
            match run_supervised_tailed(exe, scratch, &job, tail).await {
                Ok(r) if r.exit_code == 0 && r.outcome == wavegate_proto::v1::Outcome::Ok as i32 => Ok("exit 0".into()),
                Ok(r) => Err(format!(
                    "{} (exit {})",
                    if r.detail.is_empty() { "failed" } else { &r.detail },
                    r.exit_code
                )),
                Err(e) => Err(format!("could not run: {e:#}")),
            }
        }
    };
    match res {
        Ok(detail) => CheckResult {
            name: check.name.clone(),
            ok: true,
            detail,
        },
        Err(detail) => CheckResult {
            name: check.name.clone(),
            ok: false,
            detail,
        },
    }
}
