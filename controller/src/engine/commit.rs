//! The durable commit pipeline: changes are applied in memory in order,
//! queued, and committed in batches by one writer (one fdatasync for many
//! hosts' changes); whoever made a change acts on it only once its batch is
//! durable. A failed commit stops every dispatch (fail closed).

use super::*;
use crate::store::Batch;

/// The group-commit writer: takes every queued change at once, commits them
/// in one transaction (one fdatasync), then releases their waiters. With many
/// hosts in flight, one commit carries the changes of all of them.
pub(super) async fn writer(engine: Weak<Engine>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        loop {
            let Some(engine) = engine.upgrade() else { return };
            let (pending, headers, upto) = {
                let mut st = engine.lock();
                if st.queue.is_empty() {
                    break;
                }
                let pending = std::mem::take(&mut st.queue);
                let ids: BTreeSet<&str> = pending.iter().map(|p| p.rollout.as_str()).collect();
                let headers: Result<Vec<(String, Vec<u8>)>, serde_json::Error> = ids
                    .into_iter()
                    .filter_map(|id| st.rollouts.get(id))
                    .map(|e| Ok((e.rollout.id.clone(), serde_json::to_vec(&e.rollout)?)))
                    .collect();
                (pending, headers, st.queued)
            };
            let result = match headers {
                Ok(headers) => commit_in_parts(&*engine.store, headers, pending).await,
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(notify) => {
                    engine.durable.send_modify(|d| d.upto = upto);
                    if notify {
                        engine.notified.notify_one();
                    }
                }
                Err(e) => {
                    let why = format!(
                        "a commit to the store failed ({e:#}); nothing more is sent to any host until the controller is restarted"
                    );
                    error!("{why}");
                    // One of several controllers gives the leadership up,
                    // so that another, or this one started again, goes on.
                    if !engine.settings.leadership.is_single() {
                        engine.settings.leadership.lose(&why);
                    }
                    engine.durable.send_modify(|d| d.failed = Some(why));
                    return;
                }
            }
        }
    }
}

/// Commit the queued changes: in one transaction, or, if the store limits
/// how large one may be, in as few as fit, each holding whole changes in
/// their order, the rollout headers in the last (a crash between two
/// leaves host records ahead of their header, which a restarted driver
/// derives its next move from; nobody has acted on any of it yet; and a
/// failure stored without its halt is halted on takeover, see
/// `halt_what_is_over_budget`).
/// Returns whether a notification was queued.
async fn commit_in_parts(
    store: &dyn crate::store::StateStore,
    headers: Vec<(String, Vec<u8>)>,
    pending: Vec<Pending>,
) -> anyhow::Result<bool> {
    let limit = store.max_ops().unwrap_or(usize::MAX);
    let notify = pending.iter().any(|p| !p.outbox.is_empty());
    let mut batch = Batch::default();
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for p in pending {
        let ops = p.hosts.len() + p.bodies.len() + p.outbox.len();
        if batch.ops() > 0 && batch.ops() + ops + headers.len() > limit {
            store.commit(std::mem::take(&mut batch)).await?;
            at.clear();
        }
        // One key once per transaction (etcd refuses a Txn that puts a key
        // twice): a later change of the same host replaces the earlier.
        for (k, v) in p.hosts {
            match at.get(&k) {
                Some(&i) => batch.hosts[i].1 = v,
                None => {
                    at.insert(k.clone(), batch.hosts.len());
                    batch.hosts.push((k, v));
                }
            }
        }
        batch.audit.extend(p.bodies);
        batch.outbox.extend(p.outbox);
    }
    batch.rollouts = headers;
    store.commit(batch).await?;
    Ok(notify)
}

impl Engine {
    /// Why nothing more may be acted on, if a commit failed.
    pub(super) fn store_failed(&self) -> Option<String> {
        self.durable.borrow().failed.clone()
    }

    /// Wait until every change up to `seq` is committed.
    pub(super) async fn durable_upto(&self, seq: u64) -> Result<(), EngineError> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.upto >= seq || d.failed.is_some())
            .await
            .map_err(|_| EngineError::Store(anyhow::anyhow!("the store writer stopped")))?
            .clone();
        match d.failed {
            Some(why) if d.upto < seq => Err(EngineError::Store(anyhow::anyhow!(why))),
            _ => Ok(()),
        }
    }

    /// `durable_upto` for a reader (the API): a leader that cannot reach
    /// its store may wait for a commit as long as the outage lasts, so once
    /// it may no longer act, the reader is told to ask the leader instead.
    pub(super) async fn durable_for_reader(&self, seq: u64) -> Result<(), EngineError> {
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(250), self.durable_upto(seq)).await {
                Ok(r) => return r,
                Err(_) => {
                    if let Err(why) = self.settings.leadership.may_act() {
                        return Err(EngineError::Standby(format!(
                            "{why}; what this controller shows is not yet committed"
                        )));
                    }
                }
            }
        }
    }

    /// Read a rollout under the lock, and return once what was read is
    /// committed: callers never see a state a power cut could take back.
    pub(super) async fn read_durable<R>(&self, id: &str, f: impl FnOnce(&Entry) -> R) -> Result<R, EngineError> {
        let (out, seq) = {
            let st = self.lock();
            let e = st
                .rollouts
                .get(id)
                .ok_or_else(|| EngineError::NotFound(id.to_owned()))?;
            (f(e), st.queued)
        };
        self.durable_upto(seq).await?;
        Ok(out)
    }

    /// The dispatch gate of a rollout: open while it runs and the store
    /// works. The guard it returns is the engine's lock, so a halt cannot
    /// slip in between the check and the send.
    pub(super) fn gate<'a>(
        &'a self,
        id: &'a str,
    ) -> impl Fn() -> Result<std::sync::MutexGuard<'a, State>, String> + 'a {
        move || {
            let st = self.lock();
            if let Some(why) = self.store_failed() {
                return Err(why);
            }
            self.settings.leadership.may_act()?;
            match st.rollouts.get(id).map(|e| e.rollout.state) {
                Some(RolloutState::Running) => Ok(st),
                Some(state) => Err(format!("rollout {id} is {state}")),
                None => Err(format!("no rollout {id}")),
            }
        }
    }

    /// The dispatch gate of a real step: [`Engine::gate`], and when it
    /// opens, the step's command id is noted as sent, under the same lock
    /// a halt is taken under.
    pub(super) fn step_gate<'a>(
        &'a self,
        id: &'a str,
        cmd_id: &'a str,
    ) -> impl Fn() -> Result<std::sync::MutexGuard<'a, State>, String> + 'a {
        let gate = self.gate(id);
        move || {
            let mut st = gate()?;
            st.sent.insert(cmd_id.to_owned());
            Ok(st)
        }
    }

    /// Apply `f` to a rollout in memory, queue the header and the hosts it
    /// names for the next group commit, and return once that commit is
    /// durable, so nobody acts on the change before a power cut would keep
    /// it. Changes are committed in the order they were made. `f` must not
    /// change anything before it returns an error.
    pub(super) async fn mutate<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Change<'_>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        self.leading()?;
        self.mutate_leading(id, f).await
    }

    /// `mutate` for the takeover itself: it needs the leadership, not the
    /// end of the takeover.
    pub(super) async fn mutate_leading<R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Change<'_>) -> Result<R, EngineError>,
    ) -> Result<R, EngineError> {
        if !self.settings.leadership.leads() {
            return Err(EngineError::Standby(
                self.settings.leadership.may_act().err().unwrap_or_default(),
            ));
        }
        let (out, seq) = {
            let mut st = self.lock();
            if let Some(why) = self.store_failed() {
                return Err(EngineError::Store(anyhow::anyhow!(why)));
            }
            let State {
                rollouts,
                queue,
                queued,
                host_digests,
                sent,
            } = &mut *st;
            let entry = rollouts
                .get_mut(id)
                .ok_or_else(|| EngineError::NotFound(id.to_owned()))?;
            let events_before = entry.rollout.events.len();
            let state_before = entry.rollout.state;
            let requests_before = entry.rollout.rollback_requests.clone();
            let (out, changed) = {
                let mut change = Change::new(entry, sent);
                let out = f(&mut change)?;
                (out, change.touched())
            };
            // A state worth a person's attention is announced in the same
            // commit as the change that reached it.
            let mut outbox = Vec::new();
            if self.settings.notify
                && entry.rollout.state != state_before
                && let Some(ev) = crate::notify::event_of(entry.rollout.state)
            {
                outbox.push(crate::notify::body(
                    &entry.rollout,
                    entry.hosts.values(),
                    ev,
                    &utc(now_ms()),
                ));
            }
            // The audit records of this change go into the same commit.
            let mut bodies: Vec<AuditBody> = entry.rollout.events[events_before.min(entry.rollout.events.len())..]
                .iter()
                .map(|text| AuditBody {
                    kind: "event".into(),
                    rollout: Some(id.to_owned()),
                    host: None,
                    actor: None,
                    text: text.clone(),
                    data: serde_json::Value::Null,
                })
                .collect();
            // A rollback request is its own entry, with everything an
            // auditor asks of it: who asked, for which hosts, what it would
            // revert, who approved.
            for q in &entry.rollout.rollback_requests {
                if requests_before.iter().any(|b| b == q) {
                    continue;
                }
                let actor = q.approvals.last().map_or(&q.requested_by, |a| &a.who);
                bodies.push(AuditBody {
                    kind: "rollback_request".into(),
                    rollout: Some(id.to_owned()),
                    host: None,
                    actor: Some(actor.clone()),
                    text: format!(
                        "rollback request {} {} (asked by {}, {} of {} approvals)",
                        q.number,
                        q.state.as_str(),
                        q.requested_by,
                        q.approvals.len(),
                        q.approvals_required
                    ),
                    data: serde_json::to_value(q).unwrap_or_default(),
                });
            }
            let mut hosts = Vec::new();
            for name in changed.iter().collect::<BTreeSet<_>>() {
                let Some(h) = entry.hosts.get(name) else { continue };
                let json = serde_json::to_vec(h).map_err(anyhow::Error::from)?;
                let key = host_key(id, name);
                let digest: [u8; 32] = Sha256::digest(&json).into();
                if host_digests.get(&key) == Some(&digest) {
                    continue;
                }
                host_digests.insert(key.clone(), digest);
                bodies.push(AuditBody {
                    kind: "host".into(),
                    rollout: Some(id.to_owned()),
                    host: Some(h.host.clone()),
                    actor: None,
                    text: format!("{}: {} ({})", h.host, h.state.as_str(), h.detail),
                    data: serde_json::to_value(h).unwrap_or_default(),
                });
                hosts.push((key, json));
            }
            *queued += 1;
            queue.push(Pending {
                rollout: id.to_owned(),
                hosts,
                bodies,
                outbox,
            });
            (out, *queued)
        };
        self.wake.notify_one();
        self.durable_upto(seq).await?;
        self.changes.send_modify(|n| *n += 1);
        Ok(out)
    }
}
