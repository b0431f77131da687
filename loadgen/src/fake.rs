//! Fake agents: real mutual-TLS gRPC sessions, each with its own host
//! certificate, answering every command at once from memory instead of
//! running anything. One process plays thousands of hosts this way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use wavegate::tls::CertDir;
use wavegate_domain::command::{Command, CommandResult, Outcome};
use wavegate_lab::fake::Script;
use wavegate_proto::v1::{self as pb, agent_message, agent_service_client::AgentServiceClient, command};

/// What kind of command a fake agent received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A dry-run.
    DryRun,
    /// Take a snapshot.
    Snapshot,
    /// A real step.
    Step,
    /// Health checks.
    Checks,
    /// Restore, release or anything else.
    Other,
}

fn kind_of(cmd: &pb::Command) -> Kind {
    match cmd.kind {
        Some(command::Kind::DryRun(_)) => Kind::DryRun,
        Some(command::Kind::TakeSnapshot(_)) => Kind::Snapshot,
        Some(command::Kind::RunStep(_)) => Kind::Step,
        Some(command::Kind::RunChecks(_)) => Kind::Checks,
        _ => Kind::Other,
    }
}

/// One command as a fake agent saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Host.
    pub host: Arc<str>,
    /// Command kind.
    pub kind: Kind,
    /// When it arrived.
    pub at: Instant,
    /// When the answer was handed to the session.
    pub answered: Instant,
}

/// Shared by every fake agent.
#[derive(Default)]
pub struct Fleet {
    /// Agents with an open session.
    pub connected: AtomicUsize,
    /// Every command received, in arrival order.
    pub seen: Mutex<Vec<Seen>>,
    /// What each fake agent answers: the one fake agent of the tests.
    pub script: Script,
    /// When that failure was handed to the session, and on which host.
    pub failed: Mutex<Option<(Instant, String)>>,
}

impl Fleet {
    /// The first real step to arrive on one of `hosts` fails (once).
    pub fn fail_first_step_of(&self, hosts: impl IntoIterator<Item = String>) {
        *lock(&self.failed) = None;
        self.script.fail_first_step_of(hosts);
    }

    /// Forget every command seen so far.
    pub fn clear(&self) {
        lock(&self.seen).clear();
    }

    /// Copy of the commands seen.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Start one fake agent per host, at most `parallel` handshakes at a time.
/// Returns once every session is open.
pub async fn start(url: &str, certs: &CertDir, hosts: &[String], fleet: &Arc<Fleet>, parallel: usize) -> Result<()> {
    start_on(&[url.to_owned()], certs, hosts, fleet, parallel, false).await
}

/// `start`, given every controller: with `follow`, an agent whose session
/// ends (its controller died or stands by) dials the next controller until
/// one takes it, as `wavegate-agent --controller a,b` does.
pub async fn start_on(
    urls: &[String],
    certs: &CertDir,
    hosts: &[String],
    fleet: &Arc<Fleet>,
    parallel: usize,
    follow: bool,
) -> Result<()> {
    let ca = Certificate::from_pem(std::fs::read(certs.ca()).context("reading the CA")?);
    let gate = Arc::new(Semaphore::new(parallel));
    let (done_tx, mut done_rx) = mpsc::channel::<Result<()>>(hosts.len().max(1));
    for host in hosts {
        let pair = certs.agent(host);
        let identity = Identity::from_pem(std::fs::read(&pair.cert)?, std::fs::read(&pair.key)?);
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca.clone())
            .identity(identity)
            .domain_name("localhost");
        let endpoints = urls
            .iter()
            .map(|u| {
                Ok(Endpoint::from_shared(u.clone())?
                    .connect_timeout(Duration::from_secs(30))
                    .tls_config(tls.clone())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let (host, fleet, gate, done_tx) = (
            Arc::<str>::from(host.as_str()),
            Arc::clone(fleet),
            Arc::clone(&gate),
            done_tx.clone(),
        );
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let opened = open(&endpoints[0], &host).await;
            drop(permit);
            let (mut tx, mut inbound) = match opened {
                Ok(s) => s,
                Err(e) => {
                    let _ = done_tx.send(Err(e.context(format!("fake agent {host}")))).await;
                    return;
                }
            };
            fleet.connected.fetch_add(1, Ordering::SeqCst);
            let _ = done_tx.send(Ok(())).await;
            let mut next = 0;
            loop {
                serve(Arc::clone(&host), tx, inbound, &fleet).await;
                fleet.connected.fetch_sub(1, Ordering::SeqCst);
                if !follow {
                    return;
                }
                (tx, inbound) = loop {
                    next = (next + 1) % endpoints.len();
                    if let Ok(s) = open(&endpoints[next], &host).await {
                        break s;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                fleet.connected.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    drop(done_tx);
    for _ in hosts {
        done_rx.recv().await.context("a fake agent task vanished")??;
    }
    Ok(())
}

type Inbound = tonic::Streaming<pb::ControllerMessage>;

async fn open(endpoint: &Endpoint, host: &str) -> Result<(mpsc::Sender<pb::AgentMessage>, Inbound)> {
    let channel = endpoint.connect().await.context("connecting")?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::AgentMessage {
        body: Some(agent_message::Body::Hello(pb::Hello {
            host_id: host.to_owned(),
            agent_version: "loadgen".into(),
            boot_id: "loadgen".into(),
            protocol: wavegate_proto::PROTOCOL,
            updaters: Vec::new(),
            updaters_unknown: false,
        })),
    })
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .context("opening the session")?
        .into_inner();
    // The controller answers Hello with Welcome once the session is registered.
    match inbound.message().await? {
        Some(pb::ControllerMessage {
            body: Some(pb::controller_message::Body::Welcome(_)),
        }) => Ok((tx, inbound)),
        other => anyhow::bail!("expected Welcome, got {other:?}"),
    }
}

async fn serve(host: Arc<str>, tx: mpsc::Sender<pb::AgentMessage>, mut inbound: Inbound, fleet: &Fleet) {
    while let Ok(Some(msg)) = inbound.message().await {
        let Some(pb::controller_message::Body::Command(cmd)) = msg.body else {
            continue;
        };
        let at = Instant::now();
        // A command this fake cannot read is answered as a real agent
        // would: refused.
        let result = match Command::try_from(cmd.clone()) {
            Ok(c) => fleet.script.answer(&host, &c),
            Err(e) => CommandResult::new(cmd.id.clone(), Outcome::Refused, e.to_string()),
        };
        let failed = result.outcome == Outcome::Failed;
        let result = pb::CommandResult::from(result);
        let answered = Instant::now();
        if failed {
            *lock(&fleet.failed) = Some((answered, host.to_string()));
        }
        lock(&fleet.seen).push(Seen {
            host: Arc::clone(&host),
            kind: kind_of(&cmd),
            at,
            answered,
        });
        let msg = pb::AgentMessage {
            body: Some(agent_message::Body::Result(result)),
        };
        if tx.send(msg).await.is_err() {
            break;
        }
    }
}

/// Per-host first arrival of each kind.
pub fn first_of(seen: &[Seen], kind: Kind) -> HashMap<Arc<str>, Instant> {
    let mut out: HashMap<Arc<str>, Instant> = HashMap::new();
    for s in seen.iter().filter(|s| s.kind == kind) {
        out.entry(Arc::clone(&s.host)).or_insert(s.at);
    }
    out
}
