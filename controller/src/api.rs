//! The gRPC services: the agent session and the operator API. Wire types are
//! converted here and nowhere else; domain errors become `tonic::Status` in
//! one function.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;
use wavegate_domain::command::{ChangeKind, CommandResult, Outcome, OutputChunk, PathChange};
use wavegate_domain::rollout::RolloutState;
use wavegate_proto::convert;
use wavegate_proto::v1 as pb;
use wavegate_proto::v1::agent_service_server::AgentService;
use wavegate_proto::v1::operator_service_server::OperatorService;

use crate::engine::{Engine, EngineError, Entry};
use crate::tls::{Identity, Role, peer_identity};

/// How callers prove who they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Mutual TLS: the verified client certificate.
    MutualTls,
    /// Local development only: an `x-wavegate-identity` header, unverified.
    InsecurePlaintextForLocalDev,
}

/// Both services share the engine.
#[derive(Clone)]
pub struct Api {
    engine: Arc<Engine>,
    auth: Auth,
}

impl Api {
    /// The services over an engine.
    pub fn new(engine: Arc<Engine>, auth: Auth) -> Api {
        Api { engine, auth }
    }

    /// The caller's identity (nothing is awaited while the request is
    /// borrowed; [`Api::operator`] records a refusal).
    fn identity<T>(&self, req: &Request<T>) -> Result<Identity, Status> {
        match self.auth {
            Auth::MutualTls => peer_identity(req).map_err(|e| Status::unauthenticated(e.to_string())),
            Auth::InsecurePlaintextForLocalDev => req
                .metadata()
                .get("x-wavegate-identity")
                .and_then(|v| v.to_str().ok())
                .and_then(Identity::from_uri)
                .ok_or_else(|| Status::unauthenticated("no x-wavegate-identity header")),
        }
    }

    /// The person the caller's certificate names (empty when none: such a
    /// certificate cannot approve). In local development, an
    /// `x-wavegate-person` header, or the name.
    fn person<T>(&self, req: &Request<T>, name: &str) -> String {
        match self.auth {
            Auth::MutualTls => crate::tls::peer_person(req).unwrap_or_default(),
            Auth::InsecurePlaintextForLocalDev => req
                .metadata()
                .get("x-wavegate-person")
                .and_then(|v| v.to_str().ok())
                .filter(|p| crate::tls::is_valid_person(p))
                .unwrap_or(name)
                .to_owned(),
        }
    }

    /// An identity, or the refusal of a caller without one, recorded.
    async fn known(&self, id: Result<Identity, Status>) -> Result<Identity, Status> {
        if let Err(e) = &id {
            self.engine
                .refuse(&format!("a caller without a usable identity: {}", e.message()))
                .await;
        }
        id
    }

    /// The operator's name, if their role is one of `allowed`; a refusal
    /// is recorded otherwise.
    async fn operator(&self, id: Result<Identity, Status>, allowed: &[Role], what: &str) -> Result<String, Status> {
        match self.known(id).await? {
            Identity::Operator { name, role } if allowed.contains(&role) => Ok(name),
            Identity::Operator { name, role } => {
                self.engine
                    .refuse(&format!("{name} ({}) tried {what}", role.as_str()))
                    .await;
                Err(Status::permission_denied(format!(
                    "{name} is {}; {what} needs {}",
                    role.as_str(),
                    roles(allowed)
                )))
            }
            Identity::Agent(h) => Err(Status::permission_denied(format!(
                "agent {h} cannot use the operator API"
            ))),
        }
    }

    /// Changes go to the leader: a standby says where it is.
    fn leader_only(&self) -> Result<(), Status> {
        self.engine.leading().map_err(to_status)
    }
}

fn roles(allowed: &[Role]) -> String {
    allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ")
}

const CHANGERS: &[Role] = &[Role::Submitter, Role::Approver, Role::Admin];
const READERS: &[Role] = &[Role::Submitter, Role::Approver, Role::Admin, Role::Auditor];

/// The one conversion from engine errors to gRPC statuses. A refusal's
/// report travels as a protobuf `Refusal` in the status details.
pub fn to_status(e: EngineError) -> Status {
    let details = |kind| convert::refusal_bytes(&pb::Refusal { kind: Some(kind) }).into();
    match e {
        EngineError::BadPlan(report) => Status::with_details(
            tonic::Code::InvalidArgument,
            "the plan is not valid",
            details(pb::refusal::Kind::Check((*report).into())),
        ),
        EngineError::Refused(report) => Status::with_details(
            tonic::Code::FailedPrecondition,
            "the plan was refused by the safety rules",
            details(pb::refusal::Kind::Check((*report).into())),
        ),
        EngineError::DryRunBlocked(entry) => {
            let id = entry.rollout.id.clone();
            let blocked = pb::BlockedSubmit {
                id: entry.rollout.id.clone(),
                halt_reason: entry.rollout.halt_reason.clone().unwrap_or_default(),
                dry_runs: entry
                    .rollout
                    .dry_runs
                    .iter()
                    .cloned()
                    .map(|d| convert::dry_run_record_to("submit", d))
                    .collect(),
            };
            Status::with_details(
                tonic::Code::FailedPrecondition,
                format!("refused: the first wave's dry-run was blocked; rollout {id} can never be approved"),
                details(pb::refusal::Kind::Blocked(blocked)),
            )
        }
        EngineError::Denied(m) => Status::permission_denied(m),
        EngineError::NotFound(m) => Status::not_found(format!("no rollout `{m}`")),
        EngineError::Transition(t) => Status::failed_precondition(t.to_string()),
        EngineError::State(e) => Status::internal(e.to_string()),
        EngineError::Store(e) => Status::internal(format!("the store failed: {e:#}")),
        EngineError::Standby(why) => Status::unavailable(why),
    }
}

/// A rollout as the operator API shows it.
pub fn to_status_message(e: &Entry) -> pb::RolloutStatus {
    let r = &e.rollout;
    let failed = wavegate_domain::rollout::failed_hosts(e.hosts.values());
    pb::RolloutStatus {
        id: r.id.clone(),
        state: r.state.as_str().into(),
        halt_reason: r.halt_reason.clone().unwrap_or_default(),
        plan_name: r.plan_name.clone(),
        plan_hash: r.plan_hash.clone(),
        submitter: r.submitter.clone(),
        approvers: r.approvals.iter().map(|a| a.who.clone()).collect(),
        approvals_required: r.approvals_required,
        waves: r
            .waves
            .iter()
            .map(|w| pb::WaveStatus {
                index: w.index as u32,
                state: w.state.as_str().into(),
                max_in_flight: w.max_in_flight() as u64,
                in_flight: w.in_flight(&e.hosts) as u64,
                windows: w.window_lines(),
                waits_until_ms: w.waits_until_ms.unwrap_or(0),
                waiting: w.waiting().unwrap_or_default(),
                window_sets: w.windows.iter().map(convert::window_set_to).collect(),
                expected_ms: w.expected_ms,
                bake_ends_ms: if w.state == wavegate_domain::rollout::WaveState::Baking {
                    w.bake_ends_ms.unwrap_or(0)
                } else {
                    0
                },
                hosts: w
                    .hosts
                    .iter()
                    .filter_map(|h| e.hosts.get(h))
                    .map(|h| pb::HostStatus {
                        id: h.host.clone(),
                        state: h.state.as_str().into(),
                        detail: h.detail.clone(),
                        step: h.results.last().map(|s| s.step.clone()).unwrap_or_default(),
                        snapshot: h
                            .snapshot
                            .as_ref()
                            .map(|s| s.state.as_str().to_owned())
                            .unwrap_or_default(),
                        rolled_back: h.rolled_back,
                        activity: e.activity.get(&h.host).map(|a| (*a).to_owned()).unwrap_or_default(),
                        last_output: h
                            .results
                            .last()
                            .map(|s| {
                                let lines: Vec<&str> = s.output_tail.trim_end().lines().rev().take(3).collect();
                                lines.into_iter().rev().collect::<Vec<_>>().join("\n")
                            })
                            .unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
        events: r.events.clone(),
        failed_hosts: failed.clone(),
        mirrors: r
            .mirrors
            .iter()
            .map(|m| pb::MirrorStatus {
                backup: m.backup.clone(),
                primaries: m.primaries.clone(),
                wave: m.wave as u32 + 1,
                state: m.state.as_str().into(),
                detail: m.detail.clone(),
            })
            .collect(),
        summary: wavegate_domain::rollout::state_line(r.state.as_str(), &failed),
        rollback_requests: r
            .rollback_requests
            .iter()
            .map(|q| pb::RollbackRequestStatus {
                number: q.number,
                state: q.state.as_str().into(),
                requested_by: q.requested_by.clone(),
                hosts: q.hosts.clone(),
                preview: q
                    .preview
                    .iter()
                    .map(|p| pb::HostPreview {
                        host: p.host.clone(),
                        changes: p
                            .changes
                            .iter()
                            .map(|(path, change)| match ChangeKind::parse(change) {
                                Some(kind) => convert::path_change_to(PathChange {
                                    path: path.clone(),
                                    kind,
                                }),
                                // Not a name this controller writes: shown as
                                // unknown, never as a harmless kind.
                                None => pb::PathChange {
                                    path: path.clone(),
                                    kind: pb::ChangeKind::Unspecified as i32,
                                },
                            })
                            .collect(),
                        total: p.total,
                        error: p.error.clone(),
                    })
                    .collect(),
                preview_digest: q.digest.clone(),
                approvers: q.approvals.iter().map(|a| a.who.clone()).collect(),
                approvals_required: q.approvals_required,
            })
            .collect(),
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Api {
    type SessionStream = Stream_<pb::ControllerMessage>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        self.leader_only()?;
        if let Err(why) = self.engine.leadership().may_act() {
            return Err(Status::unavailable(why));
        }
        let id = self.identity(&req);
        let Identity::Agent(cert_host) = self.known(id).await? else {
            return Err(Status::permission_denied(
                "only an agent certificate may open an agent session",
            ));
        };
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message of a session must be Hello")),
        };
        if hello.host_id != cert_host {
            self.engine
                .refuse(&format!(
                    "agent with the certificate of {cert_host} claimed host {}",
                    hello.host_id
                ))
                .await;
            return Err(Status::permission_denied(format!(
                "this certificate is for host `{cert_host}`, not `{}`",
                hello.host_id
            )));
        }
        if hello.protocol != wavegate_proto::PROTOCOL {
            self.engine
                .refuse(&format!(
                    "agent {cert_host} (version {}) speaks protocol {}, this controller {}",
                    hello.agent_version,
                    hello.protocol,
                    wavegate_proto::PROTOCOL
                ))
                .await;
            return Err(Status::failed_precondition(format!(
                "this agent speaks version {} of the agent protocol and this controller version {}: install the agent of the controller's release",
                hello.protocol,
                wavegate_proto::PROTOCOL
            )));
        }
        if self.engine.fleet().lookup(&cert_host).is_none() {
            self.engine
                .refuse(&format!("agent for {cert_host}, which is not in the inventory"))
                .await;
            return Err(Status::permission_denied(format!(
                "host `{cert_host}` is not in the inventory"
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        let welcome = pb::ControllerMessage {
            body: Some(pb::controller_message::Body::Welcome(pb::Welcome {
                heartbeat_ms: 5_000,
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::unavailable("session closed"))?;
        let hub = Arc::clone(self.engine.hub());
        let engine = Arc::clone(&self.engine);
        hub.set_updaters(
            &cert_host,
            (!hello.updaters_unknown).then(|| hello.updaters.into_iter().map(convert::updater).collect()),
        );
        let session = hub.connect_boot(&cert_host, tx, &hello.boot_id);
        info!(host = %cert_host, version = %hello.agent_version, boot = %hello.boot_id, "Agent connected.");
        tokio::spawn(async move {
            // A session speaks only for its own host: a result or output
            // for a command not sent to it is refused, counted, and the
            // first of each session recorded in the audit log.
            let mut foreign = 0u64;
            while let Ok(Some(msg)) = inbound.message().await {
                let refused = match msg.body {
                    Some(pb::agent_message::Body::Result(r)) => {
                        let id = r.command_id.clone();
                        // An answer this controller cannot read (an outcome
                        // or a report part it does not know) is a failure of
                        // that command, never a success by default.
                        let r = CommandResult::try_from(r).unwrap_or_else(|e| {
                            CommandResult::new(
                                id.clone(),
                                Outcome::Failed,
                                format!("the agent's answer could not be read: {e}"),
                            )
                        });
                        (hub.deliver(&cert_host, r) == crate::hub::Delivery::Foreign).then_some(("a result", id))
                    }
                    Some(pb::agent_message::Body::Output(chunk)) => {
                        // Output of a command sent to this host, for the
                        // rollout the command belongs to (a submit's
                        // dry-run has none yet, and its output is not kept).
                        // The rollout a chunk names must be its command's
                        // own (the id's first part), not a longer prefix of
                        // it that would count as a rollout of its own
                        // against the output caps.
                        let rollout_ok = chunk.rollout_id.is_empty()
                            || chunk.command_id.split(':').next() == Some(chunk.rollout_id.as_str());
                        if hub.expects(&cert_host, &chunk.command_id) && rollout_ok {
                            engine.accept_output(&cert_host, OutputChunk::from(chunk)).await;
                            None
                        } else if hub.sent_elsewhere(&cert_host, &chunk.command_id) || !rollout_ok {
                            Some(("output", chunk.command_id))
                        } else if !chunk.rollout_id.is_empty() && engine.get(&chunk.rollout_id).await.is_err() {
                            Some(("output for a rollout that does not exist", chunk.command_id))
                        } else {
                            // Late output of its own command (the controller
                            // stopped waiting): not stored.
                            None
                        }
                    }
                    Some(pb::agent_message::Body::Heartbeat(pb::Heartbeat {
                        updaters: Some(scan), ..
                    })) => {
                        hub.set_updaters(
                            &cert_host,
                            (!scan.unknown).then(|| scan.found.into_iter().map(convert::updater).collect()),
                        );
                        None
                    }
                    _ => None,
                };
                if let Some((what, id)) = refused {
                    engine.metrics().foreign_messages.inc();
                    foreign += 1;
                    if foreign == 1 {
                        engine
                            .refuse(&format!(
                                "agent for {cert_host} sent {what} for command {id}, which was not sent to it"
                            ))
                            .await;
                    }
                }
            }
            if foreign > 1 {
                engine
                    .refuse(&format!(
                        "agent for {cert_host} sent {foreign} results or output chunks for commands not sent to it"
                    ))
                    .await;
            }
            hub.disconnect(&cert_host, session);
            info!(host = %cert_host, "Agent disconnected.");
        });
        // A command queued while this controller could act still goes on
        // the wire only if it can act now: once its lease may have run out,
        // the session ends instead, and the agent goes to find the leader.
        let leadership = Arc::clone(self.engine.leadership());
        let out = tokio_stream::StreamExt::take_while(ReceiverStream::new(rx), move |_| leadership.may_act().is_ok());
        Ok(Response::new(Box::pin(out)))
    }
}

#[tonic::async_trait]
impl OperatorService for Api {
    type WatchStream = Stream_<pb::RolloutStatus>;

    async fn submit(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        self.leader_only()?;
        let who = self
            .operator(
                self.identity(&req),
                &[Role::Submitter, Role::Admin],
                "submitting a plan",
            )
            .await?;
        let person = self.person(&req, &who);
        let r = req.into_inner();
        let file = if r.plan_file.is_empty() {
            "plan.yaml".to_owned()
        } else {
            r.plan_file
        };
        let (entry, report) = self
            .engine
            .submit(&who, &person, &file, &r.plan_yaml, &r.bypass)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::SubmitResponse {
            id: entry.rollout.id.clone(),
            plan_hash: entry.rollout.plan_hash.clone(),
            report: Some(pb::CheckReport::from(report)),
            dry_runs: entry.rollout.dry_runs.iter().map(|d| d.summary()).collect(),
        }))
    }

    async fn approve(&self, req: Request<pb::ApproveRequest>) -> Result<Response<pb::RolloutStatus>, Status> {
        self.leader_only()?;
        let who = self
            .operator(self.identity(&req), &[Role::Approver, Role::Admin], "approving")
            .await?;
        let person = self.person(&req, &who);
        let r = req.into_inner();
        let entry = self
            .engine
            .approve(&who, &person, &self.engine.full_id(&r.id), &r.plan_hash)
            .await
            .map_err(to_status)?;
        Ok(Response::new(to_status_message(&entry)))
    }

    async fn status(&self, req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutStatus>, Status> {
        self.operator(self.identity(&req), READERS, "reading status").await?;
        let entry = self
            .engine
            .show(&self.engine.full_id(&req.into_inner().id))
            .await
            .map_err(to_status)?;
        Ok(Response::new(to_status_message(&entry)))
    }

    async fn watch(&self, req: Request<pb::RolloutRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.operator(self.identity(&req), READERS, "watching").await?;
        let id = self.engine.full_id(&req.into_inner().id);
        let engine = Arc::clone(&self.engine);
        engine.show(&id).await.map_err(to_status)?;
        let mut changes = engine.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<pb::RolloutStatus> = None;
            loop {
                let Ok(entry) = engine.show(&id).await else { break };
                let status = to_status_message(&entry);
                if last.as_ref() != Some(&status) {
                    if tx.send(Ok(status.clone())).await.is_err() {
                        break;
                    }
                    last = Some(status);
                }
                if matches!(
                    entry.rollout.state,
                    RolloutState::Completed | RolloutState::Aborted | RolloutState::Halted
                ) {
                    break;
                }
                if changes.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        self.operator(self.identity(&req), READERS, "listing rollouts").await?;
        let rollouts = self.engine.list().await.iter().map(to_status_message).collect();
        Ok(Response::new(pb::ListResponse { rollouts }))
    }

    async fn pause(&self, req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutStatus>, Status> {
        self.leader_only()?;
        let who = self.operator(self.identity(&req), CHANGERS, "pausing").await?;
        let entry = self
            .engine
            .control(
                &who,
                &self.engine.full_id(&req.into_inner().id),
                wavegate_domain::rollout::Control::Pause,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(to_status_message(&entry)))
    }

    async fn resume(&self, req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutStatus>, Status> {
        self.leader_only()?;
        let who = self.operator(self.identity(&req), CHANGERS, "resuming").await?;
        let entry = self
            .engine
            .control(
                &who,
                &self.engine.full_id(&req.into_inner().id),
                wavegate_domain::rollout::Control::Resume,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(to_status_message(&entry)))
    }

    async fn fleet(&self, req: Request<pb::FleetRequest>) -> Result<Response<pb::FleetResponse>, Status> {
        self.operator(self.identity(&req), READERS, "reading the fleet").await?;
        let connected: std::collections::HashSet<String> = self.engine.hub().connected().into_iter().collect();
        let fleet = self.engine.fleet();
        let mut hosts: Vec<pb::FleetHost> = fleet
            .hosts()
            .map(|h| {
                let host = fleet.host(h);
                let updaters = self.engine.hub().updaters(&host.id);
                pb::FleetHost {
                    id: host.id.clone(),
                    role: host.role.to_string(),
                    connected: connected.contains(&host.id),
                    updaters_known: updaters.is_some(),
                    labels: host.labels.clone().into_iter().collect(),
                    updaters: updaters.iter().flatten().map(convert::updater_to).collect(),
                }
            })
            .collect();
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::FleetResponse { hosts }))
    }

    async fn dry_runs(&self, req: Request<pb::DryRunsRequest>) -> Result<Response<pb::DryRunsResponse>, Status> {
        self.operator(self.identity(&req), READERS, "reading dry-run reports")
            .await?;
        let r = req.into_inner();
        let records = self
            .engine
            .dry_runs(&self.engine.full_id(&r.id))
            .await
            .map_err(to_status)?;
        let records: Vec<_> = records
            .into_iter()
            .filter(|(_, d)| r.host.is_empty() || d.host == r.host)
            .collect();
        let summaries = records
            .iter()
            .map(|(phase, d)| format!("[{phase}] {}", d.summary()))
            .collect();
        let reports = records
            .into_iter()
            .map(|(phase, d)| convert::dry_run_record_to(phase, d))
            .collect();
        Ok(Response::new(pb::DryRunsResponse { summaries, reports }))
    }

    async fn rollback(&self, req: Request<pb::RollbackRequest>) -> Result<Response<pb::RolloutStatus>, Status> {
        self.leader_only()?;
        let approving = req.get_ref().approve;
        let who = if approving {
            self.operator(
                self.identity(&req),
                &[Role::Approver, Role::Admin],
                "approving a rollback",
            )
            .await?
        } else {
            self.operator(self.identity(&req), CHANGERS, "rolling back").await?
        };
        let person = self.person(&req, &who);
        let r = req.into_inner();
        let id = self.engine.full_id(&r.id);
        let entry = if approving {
            self.engine
                .approve_rollback(&who, &person, &id, &r.preview_digest)
                .await
        } else {
            let wave = (r.wave > 0).then_some(r.wave as usize);
            let host = (!r.host.is_empty()).then_some(r.host.as_str());
            self.engine.request_rollback(&who, &person, &id, wave, host).await
        }
        .map_err(to_status)?;
        Ok(Response::new(to_status_message(&entry)))
    }

    async fn snapshots(&self, req: Request<pb::SnapshotsRequest>) -> Result<Response<pb::SnapshotsResponse>, Status> {
        self.operator(self.identity(&req), READERS, "listing snapshots").await?;
        let want = self.engine.full_id(&req.into_inner().rollout_id);
        let mut snapshots = Vec::new();
        for e in self.engine.list().await.iter().rev() {
            if !want.is_empty() && e.rollout.id != want {
                continue;
            }
            for h in e.hosts.values() {
                if let Some(s) = &h.snapshot {
                    snapshots.push(pb::SnapshotInfo {
                        rollout_id: e.rollout.id.clone(),
                        host: h.host.clone(),
                        wave: h.wave as u32 + 1,
                        bytes: s.bytes,
                        files: s.files,
                        state: s.state.as_str().into(),
                        release_after_ms: match s.state {
                            wavegate_domain::snapshot::SnapshotState::Retained { release_after_ms } => release_after_ms,
                            _ => 0,
                        },
                        parts: s
                            .parts
                            .iter()
                            .map(|p| pb::SnapshotPart {
                                backend: convert::backend_to(Some(p.backend)),
                                mount: p.mount.clone(),
                                fstype: p.fstype.clone(),
                                roots: p.roots.clone(),
                                files: p.files,
                                bytes: p.bytes,
                                note: p.note.clone(),
                            })
                            .collect(),
                    });
                }
            }
        }
        Ok(Response::new(pb::SnapshotsResponse { snapshots }))
    }

    type LogsStream = Stream_<pb::LogChunk>;

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        self.operator(self.identity(&req), READERS, "reading output").await?;
        let mut r = req.into_inner();
        r.id = self.engine.full_id(&r.id);
        let engine = Arc::clone(&self.engine);
        let entry = engine.show(&r.id).await.map_err(to_status)?;
        if !r.host.is_empty() && !entry.hosts.contains_key(&r.host) {
            return Err(Status::not_found(format!(
                "host `{}` is not in rollout {}",
                r.host, r.id
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let host = (!r.host.is_empty()).then_some(r.host.clone());
            let step = (!r.step.is_empty()).then_some(r.step.clone());
            if r.summary {
                for c in engine.output_summary(&r.id, host.as_deref(), step.as_deref()).await {
                    if tx.send(Ok(pb::LogChunk::from(c))).await.is_err() {
                        return;
                    }
                }
                return;
            }
            let mut from: std::collections::HashMap<(String, String), u64> = std::collections::HashMap::new();
            let mut changes = engine.output_changes();
            let mut states = engine.subscribe();
            loop {
                // Whether it ended is asked before the read, so what came
                // before the end is always read.
                let ended = engine.output_ended(&r.id, host.as_deref(), step.as_deref()).await;
                loop {
                    let q = crate::store::OutputQuery {
                        rollout: r.id.clone(),
                        host: host.clone(),
                        step: step.clone(),
                        from: from.clone(),
                        max_bytes: 4 << 20,
                    };
                    let Ok(pieces) = engine.store().read_output(q).await else {
                        return;
                    };
                    if pieces.is_empty() {
                        break;
                    }
                    let bytes: usize = pieces.iter().map(|p| p.data.len()).sum();
                    for p in pieces {
                        let key = (p.host.clone(), p.step.clone());
                        let missing = p.offset.saturating_sub(from.get(&key).copied().unwrap_or(0));
                        from.insert(key, p.offset + p.data.len() as u64);
                        let chunk = pb::LogChunk {
                            host: p.host,
                            step: p.step,
                            offset: p.offset,
                            missing,
                            data: p.data,
                            stored: 0,
                            verified: String::new(),
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    if bytes < 4 << 20 {
                        break;
                    }
                }
                if !r.follow || ended {
                    return;
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = states.changed() => {}
                    () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<pb::AuditResponse>, Status> {
        self.operator(self.identity(&req), READERS, "reading the audit log")
            .await?;
        let want = self.engine.full_id(&req.into_inner().rollout_id);
        let store = self.engine.store();
        let (mut records, cp) = store.audit().await.map_err(|e| Status::internal(format!("{e:#}")))?;
        if !want.is_empty() {
            for r in &mut records {
                if r.body.as_ref().and_then(|b| b.rollout.as_deref()) != Some(want.as_str()) {
                    r.body = None;
                }
            }
        }
        Ok(Response::new(pb::AuditResponse {
            records_json: records
                .iter()
                .map(|r| serde_json::to_string(r).unwrap_or_default())
                .collect(),
            checkpoint_json: cp
                .map(|c| serde_json::to_string(&c).unwrap_or_default())
                .unwrap_or_default(),
            public_key_hex: hex::encode(store.public_key().to_bytes()),
        }))
    }

    async fn audit_verify(
        &self,
        req: Request<pb::AuditVerifyRequest>,
    ) -> Result<Response<pb::AuditVerifyResponse>, Status> {
        self.operator(self.identity(&req), READERS, "verifying the audit log")
            .await?;
        let store = self.engine.store();
        let verdict = store
            .verify_audit()
            .await
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        let key = hex::encode(store.public_key().to_bytes());
        Ok(Response::new(match verdict {
            Ok(n) => pb::AuditVerifyResponse {
                ok: true,
                records: n as u64,
                first_bad_seq: 0,
                detail: String::new(),
                public_key_hex: key,
            },
            Err(t) => pb::AuditVerifyResponse {
                ok: false,
                records: 0,
                first_bad_seq: t.seq,
                detail: t.to_string(),
                public_key_hex: key,
            },
        }))
    }

    async fn role(&self, req: Request<pb::RoleRequest>) -> Result<Response<pb::RoleResponse>, Status> {
        self.operator(self.identity(&req), READERS, "asking for the controller's role")
            .await?;
        let l = self.engine.leadership();
        let role = l.role();
        let leader = match &role {
            crate::leader::Role::Standby { leader } => leader.clone().unwrap_or_default(),
            crate::leader::Role::Leading | crate::leader::Role::Uncertain { .. } => l.url().to_owned(),
            _ => String::new(),
        };
        Ok(Response::new(pb::RoleResponse {
            role: role.name().to_owned(),
            leader,
            url: l.url().to_owned(),
            why: l.may_act().err().unwrap_or_default(),
            store: self.engine.store().describe(),
        }))
    }

    async fn abort(&self, req: Request<pb::RolloutRequest>) -> Result<Response<pb::RolloutStatus>, Status> {
        self.leader_only()?;
        let who = self.operator(self.identity(&req), CHANGERS, "aborting").await?;
        let entry = self
            .engine
            .control(
                &who,
                &self.engine.full_id(&req.into_inner().id),
                wavegate_domain::rollout::Control::Abort,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(to_status_message(&entry)))
    }
}
