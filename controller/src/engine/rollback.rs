//! Rollback and snapshot sweeps: the failed hosts of a halted wave
//! restored automatically, an operator's `rollout rollback`, and the
//! release of snapshots whose retention is over.

use super::*;

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
            Ok(((), Vec::new()))
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
                let cmd = pb::Command {
                    redact: Vec::new(),
                    accept_weaker: Vec::new(),
                    id: format!("{id}:{host}:restore:{}", now_ms()),
                    kind: Some(pb::command::Kind::RestoreSnapshot(pb::RestoreSnapshot {
                        rollout_id: id.clone(),
                    })),
                };
                let deadline = Instant::now() + Duration::from_secs(600) + engine.settings.agent_grace;
                let (ok, mut detail) = match engine.hub.execute(&host, cmd, deadline).await {
                    Ok(r) if r.outcome == pb::Outcome::Ok as i32 => (true, "rolled back from its snapshot".to_string()),
                    Ok(r) => (false, format!("rollback FAILED: {}", r.detail)),
                    Err(e) => (false, format!("rollback FAILED: {e}")),
                };
                if ok {
                    crate::failpoint::hit("rollback-restored");
                }
                if ok && !checks.is_empty() {
                    let cmd = checks_command(format!("{id}:{host}:after-restore:{}", now_ms()), &checks);
                    let deadline = Instant::now() + checks_timeout(&checks) + engine.settings.agent_grace;
                    detail.push_str(match engine.hub.execute(&host, cmd, deadline).await {
                        Ok(r) if r.outcome == pb::Outcome::Ok as i32 => "; health checks pass",
                        _ => "; health checks still FAIL",
                    });
                }
                let _ = engine
                    .mutate(&id, |e| {
                        if let Some(h) = e.hosts.get_mut(&host) {
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
                        event(&mut e.rollout, format!("host {host} {detail}; by {who}"));
                        Ok(((), vec![host.clone()]))
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

    /// Restore hosts on an operator's request (`rollout rollback`).
    pub async fn rollback(
        self: &Arc<Self>,
        who: &str,
        id: &str,
        wave: Option<usize>,
        host: Option<&str>,
    ) -> Result<Entry, EngineError> {
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
        self.restore_hosts(id, &hosts, who).await;
        self.get(id).await
    }

    /// Every dry-run record of a rollout: (phase, record).
    pub async fn dry_runs(&self, id: &str) -> Result<Vec<(&'static str, DryRunRecord)>, EngineError> {
        let e = self.get(id).await?;
        let mut out: Vec<(&'static str, DryRunRecord)> =
            e.rollout.dry_runs.iter().map(|d| ("submit", d.clone())).collect();
        for h in e.hosts.values() {
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
                e.hosts.values().filter_map(|h| {
                    let mut s = h.snapshot.clone()?;
                    s.apply(&SnapshotEvent::Tick { now_ms: now_ms() })
                        .then(|| (e.rollout.id.clone(), h.host.clone()))
                })
            })
            .collect();
        for (id, host) in due {
            let cmd = pb::Command {
                redact: Vec::new(),
                accept_weaker: Vec::new(),
                id: format!("{id}:{host}:release:{}", now_ms()),
                kind: Some(pb::command::Kind::ReleaseSnapshot(pb::ReleaseSnapshot {
                    rollout_id: id.clone(),
                })),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            if let Ok(r) = self.hub.execute(&host, cmd, deadline).await
                && r.outcome == pb::Outcome::Ok as i32
            {
                let _ = self
                    .mutate(&id, |e| {
                        if let Some(s) = e.hosts.get_mut(&host).and_then(|h| h.snapshot.as_mut()) {
                            s.apply(&SnapshotEvent::Tick { now_ms: now_ms() });
                        }
                        event(
                            &mut e.rollout,
                            format!("host {host}: snapshot released after its retention"),
                        );
                        Ok(((), vec![host.clone()]))
                    })
                    .await;
            }
        }
    }
}
