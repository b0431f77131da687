//! Holding the targets' updaters outside the rollout (unattended-upgrades,
//! apt and dnf timers) for a rollout whose site rule says so: taken before
//! its first step, on every target, and released when it ends.
//!
//! Each host is recorded as held before its agent is told, so a release
//! after a crash reaches every host that may have been held (a release of
//! nothing is harmless). A host that cannot be held halts the rollout
//! before any step: the gate fails closed.

use super::*;

/// How long a host's agent has to answer a hold or a release.
const HOLD_WITHIN: Duration = Duration::from_secs(60);

/// `lead` and `h1 (what), h2 (what)`, or nothing for no host.
fn listed<'a>(lead: &str, hosts: impl Iterator<Item = &'a (String, String)>) -> String {
    let items: Vec<String> = hosts.map(|(h, w)| format!("{h} ({w})")).collect();
    if items.is_empty() {
        String::new()
    } else {
        format!("{lead}{}", items.join(", "))
    }
}

/// Each host's answer to a hold or a release.
type Answers = tokio::task::JoinSet<(String, Result<CommandResult, crate::hub::ExecError>)>;

impl Engine {
    /// Ask every host at once to hold (or release) its updaters.
    fn ask_all(self: &Arc<Self>, id: &str, hosts: Vec<String>, hold: bool) -> Answers {
        let mut tasks = tokio::task::JoinSet::new();
        for host in hosts {
            let engine = Arc::clone(self);
            let what = if hold { "hold" } else { "release" };
            let cmd = Command::new(
                format!("{id}:{host}:{what}-updaters:{}", nonce()),
                CommandKind::HoldUpdaters {
                    rollout_id: id.to_owned(),
                    hold,
                },
            );
            tasks.spawn(async move {
                let r = engine.hub.execute(&host, cmd, Instant::now() + HOLD_WITHIN).await;
                (host, r)
            });
        }
        tasks
    }

    /// Hold every target's updaters; halts the rollout when one cannot be.
    pub(super) async fn hold_updaters(self: &Arc<Self>, id: &str) -> Result<(), EngineError> {
        let (hosts, rule) = self.with(id, |e| {
            (
                e.hosts.keys().cloned().collect::<Vec<_>>(),
                e.rollout.hold_updaters.clone().unwrap_or_default(),
            )
        })?;
        // Recorded first: whatever happens next, the release reaches them.
        self.mutate(id, |e| {
            e.rollout.updaters_held = hosts.clone();
            Ok(())
        })
        .await?;
        let mut tasks = self.ask_all(id, hosts, true);
        let mut failed = Vec::new();
        let mut held = Vec::new();
        while let Some(done) = tasks.join_next().await {
            // A task that did not finish is a host that may not be held.
            let Ok((host, r)) = done else {
                failed.push(format!(
                    "a hold task failed: {}",
                    done.err().map(|e| e.to_string()).unwrap_or_default()
                ));
                continue;
            };
            match r {
                Ok(r) if r.outcome == Outcome::Ok => held.push((host, r.detail)),
                Ok(r) => failed.push(format!("{host}: {}", r.detail)),
                Err(e) => failed.push(format!("{host}: {e}")),
            }
        }
        held.sort();
        failed.sort();
        self.mutate(id, |e| {
            for (host, what) in &held {
                e.host_mut(host)?.detail = format!("updaters outside the rollout held: {what}");
            }
            let doing: Vec<&(String, String)> = held.iter().filter(|(_, w)| w != "nothing to do").collect();
            event(
                e.rollout,
                format!(
                    "updaters outside the rollout held on {} of {} targets (site rule {rule}){}",
                    doing.len(),
                    held.len() + failed.len(),
                    listed(": ", doing.iter().copied())
                ),
            );
            // Taken only when every target is held: after a halt and a
            // resume, the hold is asked for again before any step.
            e.rollout.updaters_hold_taken = failed.is_empty();
            if !failed.is_empty() && e.rollout.state == RolloutState::Running {
                e.rollout.halt(
                    0,
                    format!(
                        "halted before any step: the updaters of {} target(s) could not be held: {}",
                        failed.len(),
                        failed.join("; ")
                    ),
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Release the hold on every host it may have reached. A host that
    /// cannot be reached now stays listed, and is tried again at the next
    /// start of this controller.
    pub(super) async fn release_updaters(self: &Arc<Self>, id: &str) -> Result<(), EngineError> {
        let hosts = self.with(id, |e| e.rollout.updaters_held.clone())?;
        let mut tasks = self.ask_all(id, hosts, false);
        let mut released = Vec::new();
        let mut left = Vec::new();
        let asked: Vec<String> = self.with(id, |e| e.rollout.updaters_held.clone())?;
        while let Some(done) = tasks.join_next().await {
            let Ok((host, r)) = done else { continue };
            match r {
                Ok(r) if r.outcome == Outcome::Ok => released.push((host, r.detail)),
                Ok(r) => left.push((host, r.detail)),
                Err(e) => left.push((host, e.to_string())),
            }
        }
        released.sort();
        left.sort();
        self.mutate(id, |e| {
            let doing: Vec<&(String, String)> = released.iter().filter(|(_, w)| w != "nothing to do").collect();
            event(
                e.rollout,
                format!(
                    "updaters outside the rollout released on {} host(s){}{}",
                    released.len(),
                    listed(": ", doing.iter().copied()),
                    listed("; still held, tried again later: ", left.iter())
                ),
            );
            // Whatever was not answered as released stays listed (a task
            // that did not finish too), and is asked again.
            e.rollout.updaters_held = asked
                .iter()
                .filter(|h| !released.iter().any(|(r, _)| r == *h))
                .cloned()
                .collect();
            Ok(())
        })
        .await
    }
}
