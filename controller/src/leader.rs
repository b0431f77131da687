//! Who may act: the one controller of an embedded store, or the leader of
//! several controllers sharing an etcd store.
//!
//! With etcd, a controller leads while it holds the leader key, which is
//! attached to a lease it keeps alive. It knows when the lease would expire
//! at the latest: the time it *sent* the last keep-alive that etcd answered,
//! plus the TTL etcd granted. It acts (sends anything to an agent) only
//! until a margin before that, so a leader cut off from etcd has stopped
//! before any standby can take the key over. Every write it makes is also
//! fenced on the leader key's creation revision (see the etcd store), so a
//! write it sent before stopping can never land after a successor started.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::etcd::{Etcd, EtcdError, created_at, put, read};

/// What this controller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The only controller of an embedded store: it always leads.
    Single,
    /// Another controller leads (its address, when known); this one
    /// serves reads and waits to take over.
    Standby {
        /// The leader's address.
        leader: Option<String>,
    },
    /// This controller leads.
    Leading,
    /// This controller held the lease but has not been able to refresh it
    /// in time: it sends nothing until it can again.
    Uncertain {
        /// Why.
        why: String,
    },
    /// The lease is gone: this controller stops leading for good (the
    /// process starts again as a standby).
    Lost {
        /// Why.
        why: String,
    },
}

impl Role {
    /// The role's name, as `/ready` and the Role call give it.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Standby { .. } => "standby",
            Role::Leading => "leader",
            Role::Uncertain { .. } => "uncertain",
            Role::Lost { .. } => "lost",
        }
    }
}

/// The leader key's value.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The leader's gRPC address, for agents and operators.
    pub url: String,
    /// The process (random, per start).
    pub instance: String,
    /// Since when, in milliseconds since the epoch.
    pub since_ms: u64,
}

/// Who may act, and until when.
pub struct Leadership {
    role: watch::Sender<Role>,
    /// Acting is allowed until then (a leader); `None`: never (a standby)
    /// or always (a single controller, see `single`).
    valid_until: Mutex<Option<Instant>>,
    single: bool,
    /// The leader key's creation revision while leading: every write is
    /// conditional on it. 0 when not leading.
    fence: AtomicI64,
    /// This process.
    instance: String,
    /// This controller's address.
    url: String,
    /// Time spent leading but unable to act, before the current stretch,
    /// and when the current stretch began: deadlines of commands sent
    /// before are stretched by it, so a lost quorum fails no host.
    stalled: Mutex<(Duration, Option<Instant>)>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("role", &*self.role.borrow())
            .finish()
    }
}

impl Leadership {
    /// The only controller: always leads.
    pub fn single() -> Arc<Leadership> {
        Arc::new(Leadership {
            role: watch::channel(Role::Single).0,
            valid_until: Mutex::new(None),
            single: true,
            fence: AtomicI64::new(0),
            instance: String::new(),
            url: String::new(),
            stalled: Mutex::new((Duration::ZERO, None)),
        })
    }

    /// One of several controllers, starting as a standby.
    pub fn elected(url: &str) -> Arc<Leadership> {
        Arc::new(Leadership {
            role: watch::channel(Role::Standby { leader: None }).0,
            valid_until: Mutex::new(None),
            single: false,
            fence: AtomicI64::new(0),
            instance: hex::encode(rand::random::<[u8; 8]>()),
            url: url.to_owned(),
            stalled: Mutex::new((Duration::ZERO, None)),
        })
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Follow the role.
    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// This process's random id (in the leader key).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// How long this controller has led without being able to act, in
    /// all (the current stretch included).
    pub fn stalled(&self) -> Duration {
        let s = self.stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.0 + s.1.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Whether this is the one controller of an embedded store.
    pub fn is_single(&self) -> bool {
        self.single
    }

    /// Whether acting is only held up for now (the lease may come back),
    /// rather than over.
    pub fn held_up(&self) -> bool {
        !self.single && matches!(self.role(), Role::Leading | Role::Uncertain { .. })
    }

    /// This controller's address (empty for a single controller).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this controller may send anything to an agent right now;
    /// if not, why. A leader may act until a margin before its lease could
    /// have expired, whatever it has heard since.
    pub fn may_act(&self) -> Result<(), String> {
        if self.single {
            return Ok(());
        }
        let until = *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (self.role(), until) {
            (Role::Leading, Some(t)) if Instant::now() < t => Ok(()),
            (Role::Leading, _) => {
                // Held up from now on, for the deadlines the hub stretches
                // (unless a renewal came in since `until` was read).
                let mut s = self.stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let renewed = self
                    .valid_until
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some_and(|t| Instant::now() < t);
                if s.1.is_none() && !renewed {
                    s.1 = Some(Instant::now());
                }
                Err("this controller could not refresh its leadership lease in time".into())
            }
            (Role::Standby { leader }, _) => Err(standby_why(leader.as_deref())),
            (Role::Uncertain { why } | Role::Lost { why }, _) => Err(why),
            (Role::Single, _) => Ok(()),
        }
    }

    /// Whether this controller leads (or is the only one), even if it
    /// cannot act this moment.
    pub fn leads(&self) -> bool {
        matches!(self.role(), Role::Single | Role::Leading | Role::Uncertain { .. })
    }

    /// The revision every write is fenced on, while leading.
    pub fn fence(&self) -> Option<i64> {
        match self.fence.load(Ordering::SeqCst) {
            0 => None,
            r => Some(r),
        }
    }

    /// The leadership is gone for good (a fenced write failed, or the lease
    /// expired).
    pub fn lose(&self, why: &str) {
        self.fence.store(0, Ordering::SeqCst);
        *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        warn!(why, "Leadership lost.");
        self.role.send_replace(Role::Lost { why: why.to_owned() });
    }

    fn set_valid_until(&self, t: Instant) {
        // A lost leadership stays lost, whatever answer comes in late.
        if self.fence().is_none() {
            return;
        }
        *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(t);
    }

    fn set(&self, role: Role) {
        {
            let mut s = self.stalled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match (&role, s.1) {
                (Role::Uncertain { .. }, None) => s.1 = Some(Instant::now()),
                (Role::Leading, Some(t)) => {
                    s.0 += t.elapsed();
                    s.1 = None;
                }
                _ => {}
            }
        }
        self.role.send_if_modified(|r| {
            if *r == role || matches!(r, Role::Lost { .. }) {
                false
            } else {
                *r = role;
                true
            }
        });
    }
}

/// Why a standby does not act.
pub fn standby_why(leader: Option<&str>) -> String {
    match leader {
        Some(url) => format!("this controller is a standby; the leader is {url}"),
        None => "this controller is a standby; no leader is elected right now".into(),
    }
}

/// How long before the lease could expire a leader stops acting.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(500))
}

/// Campaign for the leader key under `prefix` and, once elected, keep the
/// lease alive, until the leadership is lost. Runs until then.
pub async fn campaign(etcd: Arc<Etcd>, key: Vec<u8>, ttl: Duration, me: Arc<Leadership>) {
    let ttl_s = i64::try_from(ttl.as_secs().max(1)).unwrap_or(10);
    let poll = (ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(1));
    let record = LeaderRecord {
        url: me.url.clone(),
        instance: me.instance.clone(),
        since_ms: crate::store::now_ms(),
    };
    let value = serde_json::to_vec(&record).unwrap_or_default();
    // Standby: wait for the key to be free, then take it.
    let (lease, mut valid_until) = loop {
        match etcd.get(&key).await {
            Ok(Some(kv)) => {
                let leader: Option<LeaderRecord> = serde_json::from_slice(&kv.value).ok();
                me.set(Role::Standby {
                    leader: leader.map(|l| l.url),
                });
            }
            Ok(None) => {
                if let Some(won) = try_take(&etcd, &key, &value, ttl_s, &me, ttl).await {
                    break won;
                }
            }
            Err(e) => {
                warn!(error = %e, "Cannot read the leader key.");
                me.set(Role::Standby { leader: None });
            }
        }
        tokio::time::sleep(poll).await;
    };
    info!(lease, "Elected leader.");
    me.set_valid_until(valid_until);
    me.set(Role::Leading);
    // Leading: refresh the lease every third of its TTL.
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every.min(Duration::from_secs(5))).await;
        if matches!(me.role(), Role::Lost { .. }) {
            return;
        }
        let sent = Instant::now();
        match etcd.keep_alive(lease).await {
            Ok(granted) if granted > 0 => {
                let granted = Duration::from_secs(u64::try_from(granted).unwrap_or(0));
                valid_until = sent + granted - margin(granted);
                me.set_valid_until(valid_until);
                me.set(Role::Leading);
            }
            Ok(_) => {
                me.lose("the leadership lease expired in etcd");
                return;
            }
            // A refusal is an answer: etcd is there. If the key is no
            // longer held with this lease, the leadership is over.
            Err(e @ EtcdError::Refused(_)) if !holds(&etcd, &key, lease).await => {
                me.lose(&format!(
                    "the leadership lease was refused ({e}) and the leader key is not this controller's"
                ));
                return;
            }
            Err(e) => {
                if Instant::now() >= valid_until {
                    me.set(Role::Uncertain {
                        why: format!(
                            "this controller cannot refresh its leadership lease ({e}); it sends nothing until it can"
                        ),
                    });
                }
            }
        }
    }
}

/// Whether the leader key is held with `lease` (an unreadable key: yes,
/// for now; the next refresh asks again).
async fn holds(etcd: &Etcd, key: &[u8], lease: i64) -> bool {
    match etcd.get(key).await {
        Ok(Some(kv)) => kv.lease == lease,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Grant a lease and try to create the leader key with it; on success,
/// this controller leads until the returned instant.
async fn try_take(
    etcd: &Etcd,
    key: &[u8],
    value: &[u8],
    ttl_s: i64,
    me: &Leadership,
    ttl: Duration,
) -> Option<(i64, Instant)> {
    let sent = Instant::now();
    let (lease, granted) = match etcd.grant(ttl_s).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "Cannot grant a leadership lease.");
            return None;
        }
    };
    let granted = Duration::from_secs(u64::try_from(granted).unwrap_or(0)).max(ttl.min(Duration::from_secs(1)));
    let mut op = put(key.to_vec(), value.to_vec());
    if let Some(wavegate_proto::etcd::request_op::Request::RequestPut(p)) = &mut op.request {
        p.lease = lease;
    }
    let txn = wavegate_proto::etcd::TxnRequest {
        compare: vec![created_at(key.to_vec(), 0)],
        success: vec![op],
        failure: vec![read(key.to_vec())],
    };
    let won = match etcd.txn(txn).await {
        Ok(r) if r.succeeded => r.header.map(|h| h.revision),
        Ok(_) => None,
        // Maybe applied: the key says.
        Err(_) => match etcd.get(key).await {
            Ok(Some(kv)) if kv.value == value && kv.lease == lease => Some(kv.create_revision),
            _ => None,
        },
    };
    match won {
        Some(revision) => {
            me.fence.store(revision, Ordering::SeqCst);
            Some((lease, sent + granted - margin(granted)))
        }
        None => {
            let _ = etcd.revoke(lease).await;
            None
        }
    }
}

/// Give the leadership up (a clean shutdown): stop acting first, then
/// end the lease so a standby takes over at once.
pub async fn resign(etcd: &Etcd, key: &[u8], me: &Leadership) {
    if me.fence().is_none() {
        return;
    }
    me.lose("this controller is shutting down");
    if let Ok(Some(kv)) = etcd.get(key).await
        && kv.lease != 0
        && let Ok(rec) = serde_json::from_slice::<LeaderRecord>(&kv.value)
        && rec.instance == me.instance
    {
        let _ = etcd.revoke(kv.lease).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_leadership_stays_lost_whatever_answer_comes_in_late() {
        let me = Leadership::elected("https://a:7443");
        me.fence.store(42, Ordering::SeqCst);
        me.set_valid_until(Instant::now() + Duration::from_secs(10));
        me.set(Role::Leading);
        assert!(me.may_act().is_ok(), "a fresh leader acts");
        me.lose("a fenced write was refused");
        // A keepalive answer that was already on its way:
        me.set_valid_until(Instant::now() + Duration::from_secs(10));
        me.set(Role::Leading);
        assert!(matches!(me.role(), Role::Lost { .. }), "{:?}", me.role());
        assert!(me.may_act().is_err(), "a lost leader never acts again");
        assert_eq!(me.fence(), None);
    }

    #[test]
    fn a_leader_stops_well_before_its_lease_could_expire() {
        assert_eq!(margin(Duration::from_secs(10)), Duration::from_secs(2));
        assert_eq!(margin(Duration::from_secs(2)), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_acts_only_until_its_lease_could_have_expired() {
        let me = Leadership::elected("https://c1:7443");
        assert!(
            me.may_act().expect_err("a standby may not act").contains("standby"),
            "a standby never acts"
        );
        me.fence.store(7, Ordering::SeqCst);
        me.set_valid_until(Instant::now() + Duration::from_secs(2));
        me.set(Role::Leading);
        assert_eq!(me.may_act(), Ok(()));
        tokio::time::advance(Duration::from_secs(3)).await;
        let why = me.may_act().expect_err("past the lease");
        assert!(why.contains("lease"), "{why}");
        me.lose("test");
        assert_eq!(me.fence(), None, "a lost leader fences nothing more");
        assert!(me.may_act().is_err());
        assert_eq!(Leadership::single().may_act(), Ok(()));
    }
}
