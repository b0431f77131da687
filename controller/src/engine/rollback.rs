//! Rollback and snapshot sweeps: the failed hosts of a halted wave
//! restored automatically, an operator's `rollout rollback`, and the
//! release of snapshots whose retention is over.

use super::*;

/// The most path text one host's restore preview keeps.
const PREVIEW_HOST_BYTES: usize = 16 << 10;
/// The most path text one rollback request keeps, every host together.
const PREVIEW_REQUEST_BYTES: usize = 256 << 10;

/// The first of `hosts` with a command in flight.
fn in_flight<'a>(hosts_of: &BTreeMap<String, HostRecord>, hosts: &'a [String]) -> Option<&'a str> {
    hosts
        .iter()
        .find(|h| hosts_of.get(*h).is_some_and(|r| r.in_flight.is_some()))
        .map(String::as_str)
}

impl Engine {
    /// After an automatic halt with `on_failure: rollback`: restore the
    /// halted wave's failed hosts, then clear the flag.
    pub(super) async fn auto_rollback(self: &Arc<Self>, id: &str) -> Result<(), EngineError> {
        let entry = self.get(id).await?;
        let halted = entry.rollout.waves.iter().position(|w| w.state == WaveState::Halted);
        let hosts: Vec<String> = entry
            .hosts
            .values()
            .filter(|h| Some(h.wave) == halted && h.state == HostState::Failed && h.snapshot.is_some())
            .map(|h| h.host.clone())
            .collect();
        self.restore_hosts(id, &hosts, "the controller (on_failure: rollback)")
            .await;
        self.mutate(id, |e| {
            e.rollout.rollback_pending = false;
            Ok(())
        })
        .await
    }

    /// Restore hosts from their snapshots and run their health checks again.
    pub(super) async fn restore_hosts(self: &Arc<Self>, id: &str, hosts: &[String], who: &str) -> Vec<(String, bool)> {
        let Ok(entry) = self.get(id).await else {
            return Vec::new();
        };
        let checks = entry.rollout.checks.clone();
        let mut tasks = Vec::new();
        for host in hosts.iter().cloned() {
            let engine = Arc::clone(self);
            let (id, who, checks) = (id.to_owned(), who.to_owned(), checks.clone());
            tasks.push(tokio::spawn(async move {
                let cmd = Command::new(
                    format!("{id}:{host}:restore:{}", nonce()),
                    CommandKind::RestoreSnapshot {
                        rollout_id: id.clone(),
                        preview: false,
                    },
                );
                let deadline = Instant::now() + Duration::from_secs(600) + engine.settings.agent_grace;
                let (ok, mut detail) = match engine.hub.execute(&host, cmd, deadline).await {
                    Ok(r) if r.ok() => (true, "rolled back from its snapshot".to_string()),
                    Ok(r) => (false, format!("rollback FAILED: {}", r.detail)),
                    Err(e) => (false, format!("rollback FAILED: {e}")),
                };
                if ok {
                    crate::failpoint::hit("rollback-restored");
                }
                if ok && !checks.is_empty() {
                    let cmd = checks_command(format!("{id}:{host}:after-restore:{}", nonce()), &checks);
                    let deadline = Instant::now() + checks_timeout(&checks) + engine.settings.agent_grace;
                    detail.push_str(match engine.hub.execute(&host, cmd, deadline).await {
                        Ok(r) if r.ok() => "; health checks pass",
                        _ => "; health checks still FAIL",
                    });
                }
                let _ = engine
                    .mutate(&id, |e| {
                        if let Ok(h) = e.host_mut(&host) {
                            h.rolled_back |= ok;
                            if ok {
                                // Back to its state before the first step: a
                                // resume runs its steps again, from the start.
                                h.next_step = 0;
                                h.in_flight = None;
                            }
                            h.detail = format!("{} ({detail})", h.detail);
                            if let Some(s) = h.snapshot.as_mut() {
                                s.apply(&SnapshotEvent::Restored);
                            }
                        }
                        event(e.rollout, format!("host {host} {detail}; by {who}"));
                        Ok(())
                    })
                    .await;
                (host, ok)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                out.push(r);
            }
        }
        out
    }

    /// An operator's `rollout rollback`: not a restore but a request for
    /// one, a change like any other. It names the hosts, shows what a
    /// restore would revert on each (asked of the agents now), and waits
    /// for the approvals the rollout itself needed, from people other than
    /// the one who asked. A request still waiting is replaced by a new one.
    pub async fn request_rollback(
        self: &Arc<Self>,
        who: &str,
        person: &str,
        id: &str,
        wave: Option<usize>,
        host: Option<&str>,
    ) -> Result<Entry, EngineError> {
        if person.is_empty() {
            return Err(EngineError::Denied(format!(
                "the certificate of {who} names no person; have it issued again with `--person`"
            )));
        }
        let entry = self.get(id).await?;
        if matches!(
            entry.rollout.state,
            RolloutState::Running | RolloutState::AwaitingApproval
        ) {
            return Err(EngineError::Denied(format!(
                "rollout {id} is {}; pause or abort it before rolling hosts back",
                entry.rollout.state
            )));
        }
        let hosts: Vec<String> = entry
            .hosts
            .values()
            .filter(|h| wave.is_none_or(|w| h.wave + 1 == w) && host.is_none_or(|x| h.host == x))
            .filter(|h| h.snapshot.as_ref().is_some_and(|s| s.state != SnapshotState::Released))
            .map(|h| h.host.clone())
            .collect();
        if hosts.is_empty() {
            return Err(EngineError::Denied(
                "no host of that selection has a snapshot to restore".into(),
            ));
        }
        if let Some(busy) = in_flight(entry.hosts(), &hosts) {
            return Err(EngineError::Denied(format!(
                "host {busy} still has a step running (the rollout is paused, not stopped); wait for it, then ask"
            )));
        }
        let mut previews = Vec::new();
        for host in &hosts {
            let engine = Arc::clone(self);
            let (id, host) = (id.to_owned(), host.clone());
            previews.push(tokio::spawn(async move { engine.preview_restore(&id, &host).await }));
        }
        let mut preview = Vec::new();
        let mut bytes = 0usize;
        for p in previews {
            let mut p = p.await.map_err(|e| EngineError::Store(anyhow::anyhow!(e)))?;
            // Past a bound for the whole request, hosts keep their counts
            // and lose their path lists.
            bytes += p.changes.iter().map(|(a, b)| a.len() + b.len()).sum::<usize>();
            if bytes > PREVIEW_REQUEST_BYTES {
                p.changes.clear();
            }
            preview.push(p);
        }
        let digest = hex::encode(Sha256::digest(
            serde_json::to_vec(&(&hosts, &preview)).map_err(anyhow::Error::from)?,
        ));
        let total: u64 = preview.iter().map(|p| p.total).sum();
        let unknown: Vec<String> = preview
            .iter()
            .filter(|p| !p.error.is_empty())
            .map(|p| p.host.clone())
            .collect();
        self.mutate(id, |e| {
            let r = &mut e.rollout;
            let number = r.rollback_requests.len() as u32 + 1;
            for old in r
                .rollback_requests
                .iter_mut()
                .filter(|q| q.state == RollbackState::AwaitingApproval)
            {
                old.state = RollbackState::Done;
                let n = old.number;
                r.events.push(format!(
                    "{} rollback request {n} withdrawn: replaced by request {number} of {who}",
                    utc(now_ms())
                ));
            }
            let required = r.approvals_required.max(1);
            r.rollback_requests.push(RollbackRequest {
                number,
                state: RollbackState::AwaitingApproval,
                requested_by: who.to_owned(),
                requester_person: person.to_owned(),
                hosts: hosts.clone(),
                preview,
                digest: digest.clone(),
                approvals: Vec::new(),
                approvals_required: required,
                at_ms: now_ms(),
            });
            let unknown = if unknown.is_empty() {
                String::new()
            } else {
                format!("; no preview from {}", unknown.join(", "))
            };
            event(
                r,
                format!(
                    "rollback request {number} by {who} ({person}): restore {} from their snapshots, \
                     reverting {total} paths{unknown}; preview {digest}; needs {required} approvals of other people",
                    hosts.join(", ")
                ),
            );
            Ok(())
        })
        .await?;
        self.get(id).await
    }

    /// What a restore would change on `host` now, as its agent sees it.
    async fn preview_restore(&self, id: &str, host: &str) -> HostPreview {
        let cmd = Command::new(
            format!("{id}:{host}:preview:{}", nonce()),
            CommandKind::RestoreSnapshot {
                rollout_id: id.to_owned(),
                preview: true,
            },
        );
        let deadline = Instant::now() + Duration::from_secs(120) + self.settings.agent_grace;
        let mut p = HostPreview {
            host: host.to_owned(),
            ..HostPreview::default()
        };
        match self.hub.execute(host, cmd, deadline).await {
            Ok(r) if r.ok() => {
                // What a host sends is bounded here too: the request is
                // stored with the rollout.
                let mut bytes = 0usize;
                for c in r.changes {
                    bytes += c.path.len() + c.kind.as_str().len();
                    if bytes > PREVIEW_HOST_BYTES || p.changes.len() >= 200 {
                        break;
                    }
                    p.changes.push((c.path, c.kind.as_str().to_owned()));
                }
                p.total = r.changes_total;
            }
            Ok(r) => p.error = r.detail,
            Err(e) => p.error = e.to_string(),
        }
        p
    }

    /// Approve the rollout's waiting rollback request, bound to the preview
    /// digest the approver read (empty: the current one). With every
    /// approval in, its hosts are restored, and the request is done.
    pub async fn approve_rollback(
        self: &Arc<Self>,
        who: &str,
        person: &str,
        id: &str,
        digest: &str,
    ) -> Result<Entry, EngineError> {
        if digest.is_empty() {
            return Err(EngineError::Denied(format!(
                "give the preview digest you read (`rollout status {id}` shows it): --preview DIGEST"
            )));
        }
        let approved = self
            .mutate(id, |e| {
                // Checked again in the commit that may start the restore: a
                // rollout resumed, or a step started, since the request.
                if matches!(
                    e.rollout.state,
                    RolloutState::Running | RolloutState::AwaitingApproval
                ) {
                    return Err(EngineError::Denied(format!(
                        "rollout {id} is {}; a rollback is approved only while it stands still",
                        e.rollout.state
                    )));
                }
                let waiting = e
                    .rollout
                    .rollback_requests
                    .iter()
                    .rev()
                    .find(|q| q.state == RollbackState::AwaitingApproval)
                    .map(|q| q.hosts.clone())
                    .unwrap_or_default();
                if let Some(busy) = in_flight(e.hosts(), &waiting) {
                    return Err(EngineError::Denied(format!(
                        "host {busy} has a step running; a restore now would race it"
                    )));
                }
                let r = &mut e.rollout;
                let q = r
                    .rollback_requests
                    .iter_mut()
                    .rev()
                    .find(|q| q.state == RollbackState::AwaitingApproval)
                    .ok_or_else(|| {
                        EngineError::Denied(format!(
                            "rollout {id} has no rollback request waiting for approval; ask for one with `rollout rollback {id}`"
                        ))
                    })?;
                let started = q
                    .approve(Approval {
                        who: who.to_owned(),
                        person: person.to_owned(),
                        plan_hash: String::new(),
                        dry_run_digest: digest.to_owned(),
                        at_ms: now_ms(),
                    })
                    .map_err(EngineError::Denied)?;
                let (number, have, need, hosts) =
                    (q.number, q.approvals.len(), q.approvals_required, q.hosts.clone());
                event(
                    r,
                    format!("rollback request {number} approved by {who} ({person}; {have} of {need})"),
                );
                Ok(started.then_some((number, hosts)))
            })
            .await;
        let approved = match approved {
            Err(EngineError::Denied(msg)) => {
                self.refuse(&format!("rollback approval of {id} by {who}: {msg}")).await;
                let _ = self
                    .mutate(id, |e| {
                        event(e.rollout, format!("refused rollback approval by {who}: {msg}"));
                        Ok(())
                    })
                    .await;
                return Err(EngineError::Denied(msg));
            }
            other => other?,
        };
        if let Some((number, hosts)) = approved {
            // In a task of its own: a client that goes away while the hosts
            // are restored does not cut the request short.
            let engine = Arc::clone(self);
            let rid = id.to_owned();
            tokio::spawn(async move { engine.carry_out_rollback(&rid, number, hosts).await })
                .await
                .map_err(|e| EngineError::Store(anyhow::anyhow!("the rollback task failed: {e}")))??;
        }
        self.get(id).await
    }

    /// Restore the hosts of approved rollback request `number`, then end
    /// it. A restore can be run again: a request found running after a
    /// restart is carried out from the start (see [`Engine::start`]).
    pub(super) async fn carry_out_rollback(
        self: &Arc<Self>,
        id: &str,
        number: u32,
        hosts: Vec<String>,
    ) -> Result<(), EngineError> {
        let results = self
            .restore_hosts(id, &hosts, &format!("rollback request {number}"))
            .await;
        let failed: Vec<&str> = results.iter().filter(|(_, ok)| !ok).map(|(h, _)| h.as_str()).collect();
        let failed = failed.join(", ");
        self.mutate(id, |e| {
            if let Some(q) = e.rollout.rollback_requests.iter_mut().find(|q| q.number == number) {
                q.state = RollbackState::Done;
            }
            let how = if failed.is_empty() {
                "every host restored".to_owned()
            } else {
                format!("NOT restored: {failed}")
            };
            event(e.rollout, format!("rollback request {number} done: {how}"));
            Ok(())
        })
        .await
    }

    /// Every dry-run record of a rollout: (phase, record).
    pub async fn dry_runs(&self, id: &str) -> Result<Vec<(&'static str, DryRunRecord)>, EngineError> {
        let e = self.get(id).await?;
        let mut out: Vec<(&'static str, DryRunRecord)> =
            e.rollout.dry_runs.iter().map(|d| ("submit", d.clone())).collect();
        for h in e.hosts().values() {
            out.extend(h.dry_runs.iter().map(|d| ("before-step", d.clone())));
        }
        Ok(out)
    }

    /// Release every retained snapshot whose retention is over. Pinned
    /// snapshots are never touched here.
    pub(super) async fn sweep_snapshots(self: &Arc<Self>) {
        let due: Vec<(String, String)> = self
            .lock()
            .rollouts
            .values()
            .flat_map(|e| {
                e.hosts().values().filter_map(|h| {
                    let mut s = h.snapshot.clone()?;
                    s.apply(&SnapshotEvent::Tick { now_ms: now_ms() })
                        .then(|| (e.rollout.id.clone(), h.host.clone()))
                })
            })
            .collect();
        for (id, host) in due {
            let cmd = Command::new(
                format!("{id}:{host}:release:{}", nonce()),
                CommandKind::ReleaseSnapshot { rollout_id: id.clone() },
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            if let Ok(r) = self.hub.execute(&host, cmd, deadline).await
                && r.ok()
            {
                let _ = self
                    .mutate(&id, |e| {
                        if let Some(s) = e.host_mut(&host).ok().and_then(|h| h.snapshot.as_mut()) {
                            s.apply(&SnapshotEvent::Tick { now_ms: now_ms() });
                        }
                        event(e.rollout, format!("host {host}: snapshot released after its retention"));
                        Ok(())
                    })
                    .await;
            }
        }
    }
}
