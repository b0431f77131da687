//! The agent hub: which agents are connected, and the commands waiting for
//! their answers.
//!
//! A command keeps its id until it is answered. When an agent reconnects (or
//! the controller restarts and the engine asks again), the same id is sent
//! again; the agent's journal answers it without running it twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use wavegate_domain::command::{Command, CommandResult};
use wavegate_proto::v1::{self as pb, ControllerMessage, controller_message};

/// Messages to one agent's session.
pub type AgentTx = mpsc::Sender<Result<ControllerMessage, tonic::Status>>;

struct Link {
    session: u64,
    tx: AgentTx,
}

#[derive(Default)]
struct Inner {
    agents: HashMap<String, Link>,
    /// The boot id each host last said Hello with (kept while it is away,
    /// as when it reboots).
    boots: HashMap<String, String>,
    /// Each host's updaters outside the rollout, as its agent last
    /// reported them (kept while it is away).
    updaters: HashMap<String, Vec<wavegate_domain::updaters::Updater>>,
    /// Commands waiting for their result: the host each was sent to, and
    /// where its result goes.
    waiters: HashMap<String, (String, oneshot::Sender<(CommandResult, Instant)>)>,
    next_session: u64,
}

/// Why a command got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No answer before the deadline (agent silent, gone, or too slow).
    #[error("no answer from the agent within {0:?}")]
    NoAnswer(Duration),
    /// The gate refused right before sending (the rollout halted, paused or
    /// was aborted meanwhile); nothing was sent this time.
    #[error("not sent: {0}")]
    NotSent(String),
}

/// How often a held-up send asks again whether it may go.
const HELD_UP_POLL: Duration = Duration::from_millis(100);

/// The hub.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<Inner>,
    changed: Notify,
    /// Asked before every send: only a controller that may act sends.
    leadership: std::sync::OnceLock<std::sync::Arc<crate::leader::Leadership>>,
    /// The site's redact patterns, sent with every command.
    redact: std::sync::OnceLock<Vec<String>>,
    /// The weaker confinement the site accepts, sent with every command.
    accept_weaker: std::sync::OnceLock<Vec<String>>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere; the data is still usable.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Send nothing unless `leadership` says this controller may act.
    pub fn set_leadership(&self, leadership: std::sync::Arc<crate::leader::Leadership>) {
        let _ = self.leadership.set(leadership);
    }

    /// Send the site's redact patterns with every command.
    pub fn set_redact(&self, patterns: Vec<String>) {
        let _ = self.redact.set(patterns);
    }

    /// Send the weaker confinement the site accepts with every command.
    pub fn set_accept_weaker(&self, names: Vec<String>) {
        let _ = self.accept_weaker.set(names);
    }

    fn stalled(&self) -> Duration {
        self.leadership.get().map_or(Duration::ZERO, |l| l.stalled())
    }

    /// Whether this controller may send anything now.
    pub fn may_send(&self) -> Result<(), String> {
        self.leadership.get().map_or(Ok(()), |l| l.may_act())
    }

    /// End every session (a controller that stopped leading): each agent
    /// dials again and finds the leader.
    pub fn disconnect_all(&self) -> usize {
        let n = {
            let mut inner = self.lock();
            let n = inner.agents.len();
            inner.agents.clear();
            n
        };
        self.changed.notify_waiters();
        n
    }

    /// Register a session for `host`, replacing an older one. Returns the
    /// session number to pass to [`Hub::disconnect`].
    pub fn connect(&self, host: &str, tx: AgentTx) -> u64 {
        self.connect_boot(host, tx, "")
    }

    /// [`Hub::connect`] for an agent that said which boot of its host this
    /// is.
    pub fn connect_boot(&self, host: &str, tx: AgentTx, boot_id: &str) -> u64 {
        let session = {
            let mut inner = self.lock();
            inner.next_session += 1;
            let session = inner.next_session;
            inner.agents.insert(host.to_owned(), Link { session, tx });
            if !boot_id.is_empty() {
                inner.boots.insert(host.to_owned(), boot_id.to_owned());
            }
            session
        };
        self.changed.notify_waiters();
        session
    }

    /// What `host`'s agent reported of its updaters outside the rollout
    /// (`None`: it could not look, so they are unknown again).
    pub fn set_updaters(&self, host: &str, found: Option<Vec<wavegate_domain::updaters::Updater>>) {
        let mut inner = self.lock();
        match found {
            Some(list) => inner.updaters.insert(host.to_owned(), list),
            None => inner.updaters.remove(host),
        };
    }

    /// `host`'s updaters, as last reported; `None` when its agent never
    /// reported (to this controller).
    pub fn updaters(&self, host: &str) -> Option<Vec<wavegate_domain::updaters::Updater>> {
        self.lock().updaters.get(host).cloned()
    }

    /// Every host's reported updaters.
    pub fn all_updaters(&self) -> HashMap<String, Vec<wavegate_domain::updaters::Updater>> {
        self.lock().updaters.clone()
    }

    /// Forget a session, unless a newer one has replaced it.
    pub fn disconnect(&self, host: &str, session: u64) {
        {
            let mut inner = self.lock();
            if inner.agents.get(host).is_some_and(|l| l.session == session) {
                inner.agents.remove(host);
            }
        }
        self.changed.notify_waiters();
    }

    /// The boot id `host` last said Hello with.
    pub fn boot_id(&self, host: &str) -> Option<String> {
        self.lock().boots.get(host).cloned()
    }

    /// Wait until `host` is connected in a boot other than `from`, until
    /// `deadline`; returns the new boot id.
    pub async fn wait_new_boot(&self, host: &str, from: &str, deadline: Instant) -> Option<String> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let inner = self.lock();
                if inner.agents.contains_key(host)
                    && let Some(b) = inner.boots.get(host).filter(|b| b.as_str() != from)
                {
                    return Some(b.clone());
                }
            }
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Hosts with a live session, sorted.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().agents.keys().cloned().collect();
        v.sort();
        v
    }

    /// Deliver a result from `host`'s agent. A session speaks only for its
    /// own host: a result for a command that was sent to another host is
    /// refused ([`Delivery::Foreign`]) and the command keeps waiting for
    /// its own host's answer. `Late`: nobody waits for it (a late or
    /// duplicate answer).
    pub fn deliver(&self, host: &str, result: CommandResult) -> Delivery {
        let received = Instant::now();
        let mut inner = self.lock();
        match inner.waiters.get(&result.command_id) {
            Some((to, _)) if to != host => Delivery::Foreign,
            Some(_) => match inner.waiters.remove(&result.command_id) {
                Some((_, tx)) => {
                    if tx.send((result, received)).is_ok() {
                        Delivery::Taken
                    } else {
                        Delivery::Late
                    }
                }
                None => Delivery::Late,
            },
            None => Delivery::Late,
        }
    }

    /// Whether command `id` was sent to `host` and is waiting for its
    /// result (output is accepted only for such a command).
    pub fn expects(&self, host: &str, id: &str) -> bool {
        self.lock().waiters.get(id).is_some_and(|(to, _)| to == host)
    }

    /// Whether command `id` is waiting for another host than `host`.
    pub fn sent_elsewhere(&self, host: &str, id: &str) -> bool {
        self.lock().waiters.get(id).is_some_and(|(to, _)| to != host)
    }

    /// Send `cmd` to `host` and wait for its result, resending it (same id)
    /// whenever the agent reconnects, until `deadline`.
    pub async fn execute(&self, host: &str, cmd: Command, deadline: Instant) -> Result<CommandResult, ExecError> {
        self.execute_gated(host, cmd, deadline, || Ok::<(), String>(()))
            .await
            .map(|(r, _)| r)
    }

    /// [`Hub::execute`], asking `gate` right before every send. What the
    /// gate returns (a lock guard) is held while the command is handed to
    /// the session, so a halt taken under that lock and this send cannot
    /// interleave; when the gate refuses, nothing is sent. Returns the
    /// result and when it arrived.
    pub async fn execute_gated<G>(
        &self,
        host: &str,
        cmd: Command,
        deadline: Instant,
        gate: impl Fn() -> Result<G, String>,
    ) -> Result<(CommandResult, Instant), ExecError> {
        let mut cmd = cmd;
        cmd.redact = self.redact.get().cloned().unwrap_or_default();
        cmd.accept_weaker = self.accept_weaker.get().cloned().unwrap_or_default();
        // Converted to the wire once: this module and the session handler
        // are where wire types live.
        let wire = pb::Command::from(cmd.clone());
        let (tx, mut rx) = oneshot::channel();
        self.lock().waiters.insert(cmd.id.clone(), (host.to_owned(), tx));
        let started = Instant::now();
        // Time a leader spends unable to act (etcd out of reach) does not
        // count against the deadline: nothing could be sent or answered.
        let stalled_before = self.stalled();
        let mut sent_on: Option<u64> = None;
        let outcome = loop {
            let stalled_now = self.stalled();
            let deadline = deadline + stalled_now.saturating_sub(stalled_before);
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Err(why) = self.may_send() {
                if !self.leadership.get().is_some_and(|l| l.held_up()) {
                    break Err(ExecError::NotSent(why));
                }
                // Held up: wait for the lease to come back (or go).
                tokio::select! {
                    r = &mut rx => match r {
                        Ok(result) => break Ok(result),
                        Err(_) => break Err(ExecError::NoAnswer(started.elapsed())),
                    },
                    () = tokio::time::sleep(HELD_UP_POLL) => continue,
                }
            }
            let link = self.lock().agents.get(host).map(|l| (l.session, l.tx.clone()));
            // Waiting for room in a session's queue counts against the
            // deadline too: an agent that stopped reading is a silent one.
            if let Some((session, link_tx)) = link
                && sent_on != Some(session)
                && let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, link_tx.reserve()).await
            {
                match self.may_send().and_then(|()| gate()) {
                    Ok(guard) => {
                        permit.send(Ok(ControllerMessage {
                            body: Some(controller_message::Body::Command(wire.clone())),
                        }));
                        drop(guard);
                        sent_on = Some(session);
                    }
                    Err(_) if self.may_send().is_err() => continue,
                    Err(why) => break Err(ExecError::NotSent(why)),
                }
            }
            tokio::select! {
                r = &mut rx => match r {
                    Ok(result) => break Ok(result),
                    // The waiter was replaced by a second execute of the same
                    // id; that one will get the answer.
                    Err(_) => break Err(ExecError::NoAnswer(started.elapsed())),
                },
                () = &mut changed => {}
                () = tokio::time::sleep_until(deadline) => {
                    // Unless a stall moved the deadline meanwhile.
                    if self.stalled() == stalled_now {
                        break Err(ExecError::NoAnswer(deadline - started));
                    }
                }
            }
        };
        self.lock().waiters.remove(&cmd.id);
        outcome
    }
}

/// What became of a result an agent sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// It answered a command sent to its host.
    Taken,
    /// Nobody waits for it any more.
    Late,
    /// The command was sent to another host: refused.
    Foreign,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tokio::time::Instant;
    use wavegate_domain::command::{Command, CommandKind, CommandResult, Outcome};
    use wavegate_proto::v1::ControllerMessage;

    use super::{Delivery, ExecError, Hub};

    /// Before: a full session queue made `execute` wait for room with no
    /// deadline, so a host whose agent stopped reading was never failed.
    #[tokio::test(start_paused = true)]
    async fn a_session_that_stops_reading_is_silent_not_stuck() {
        let hub = Hub::default();
        let (tx, _never_read) = mpsc::channel(1);
        tx.try_send(Ok(ControllerMessage::default())).expect("room for one");
        hub.connect("h1", tx);
        let cmd = Command::new(
            "c1",
            CommandKind::ReleaseSnapshot {
                rollout_id: "r1".into(),
            },
        );
        let r = hub.execute("h1", cmd, Instant::now() + Duration::from_secs(5)).await;
        assert!(matches!(r, Err(ExecError::NoAnswer(_))), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebooted_host_is_seen_by_its_new_boot_id_and_a_silent_one_times_out() {
        let hub = std::sync::Arc::new(Hub::default());
        let (tx, _rx) = mpsc::channel(4);
        hub.connect_boot("h1", tx.clone(), "boot-a");
        let deadline = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            hub.wait_new_boot("h1", "boot-a", deadline).await,
            None,
            "the same boot is not back"
        );
        let h = std::sync::Arc::clone(&hub);
        let waiter = tokio::spawn(async move {
            h.wait_new_boot("h1", "boot-a", Instant::now() + Duration::from_secs(60))
                .await
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        hub.connect_boot("h1", tx, "boot-b");
        assert_eq!(waiter.await.expect("join").as_deref(), Some("boot-b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_gate_sends_nothing() {
        let hub = Hub::default();
        let (tx, mut rx) = mpsc::channel(4);
        hub.connect("h1", tx);
        let cmd = Command::new(
            "c2",
            CommandKind::ReleaseSnapshot {
                rollout_id: "r1".into(),
            },
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = hub
            .execute_gated("h1", cmd, deadline, || Err::<(), String>("halted".into()))
            .await;
        assert!(matches!(r, Err(ExecError::NotSent(_))), "{r:?}");
        assert!(rx.try_recv().is_err(), "nothing reached the session");
    }

    /// Before: any session's result was delivered by command id alone, so
    /// h1's agent could answer (and pass) h2's failed canary step.
    #[tokio::test]
    async fn a_session_speaks_only_for_its_own_host() {
        let hub = std::sync::Arc::new(Hub::default());
        let (tx1, _rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        hub.connect("h1", tx1);
        hub.connect("h2", tx2);
        let cmd = Command::new(
            "r1:1:h2:step0",
            CommandKind::ReleaseSnapshot {
                rollout_id: "r1".into(),
            },
        );
        let h = std::sync::Arc::clone(&hub);
        let waiting = tokio::spawn(async move { h.execute("h2", cmd, Instant::now() + Duration::from_secs(30)).await });
        let _sent = rx2.recv().await.expect("sent to h2");
        assert!(hub.expects("h2", "r1:1:h2:step0"));
        assert!(
            !hub.expects("h1", "r1:1:h2:step0"),
            "h1's output for it is not expected"
        );
        let forged = CommandResult::new("r1:1:h2:step0", Outcome::Ok, "");
        assert_eq!(hub.deliver("h1", forged), Delivery::Foreign);
        let own = CommandResult::new("r1:1:h2:step0", Outcome::Failed, "");
        assert_eq!(hub.deliver("h2", own), Delivery::Taken);
        let r = waiting.await.expect("join").expect("answered");
        assert_eq!(r.outcome, Outcome::Failed, "h2's own answer counts");
        assert_eq!(
            hub.deliver("h2", CommandResult::new("r1:1:h2:step0", Outcome::Ok, "")),
            Delivery::Late
        );
    }
}
