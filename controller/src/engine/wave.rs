//! The wave driver: each wave's hosts in parallel, then the bake with its
//! repeated health checks, the wave confirmed healthy or the rollout halted
//! when a wave fails beyond its budget.

use super::*;

/// How soon a release of updaters that missed a host is asked again.
const RELEASE_AGAIN: Duration = Duration::from_secs(30);

impl Engine {
    pub(super) async fn wait_change(&self, rx: &mut watch::Receiver<u64>) {
        let _ = rx.changed().await;
    }

    pub(super) async fn drive(self: Arc<Self>, id: &str) -> Result<(), EngineError> {
        let mut rx = self.subscribe();
        loop {
            let (state, rollback_pending, current, hold, release, mirrors, window) = self.with(id, |e| {
                let r = &e.rollout;
                // A wave about to start, or one taken up again (after a
                // pause, a halt or a restart) with hosts it has not started:
                // those start only inside a window too.
                let window = r
                    .current_wave()
                    .map(|w| &r.waves[w])
                    .filter(|w| {
                        !w.windows.is_empty()
                            && (w.state == WaveState::Pending
                                || (w.state == WaveState::Running
                                    && w.hosts.iter().any(|h| {
                                        e.hosts
                                            .get(h)
                                            .is_some_and(|h| h.state == HostState::Untouched && h.in_flight.is_none())
                                    })))
                    })
                    .map(|w| (w.index - 1, w.windows.clone(), w.expected_ms, w.waits_until_ms));
                (
                    r.state,
                    r.rollback_pending,
                    r.current_wave(),
                    r.hold_updaters.is_some() && !r.updaters_hold_taken,
                    !r.updaters_held.is_empty(),
                    self.mirror_work(e),
                    window,
                )
            })?;
            // Mirrors whose wave is done are resumed (or their copies
            // restored) first: never left paused while the next wave waits.
            match mirrors {
                Some(super::mirrors::MirrorWork::Resume) => {
                    self.resume_mirrors(id).await?;
                    continue;
                }
                Some(super::mirrors::MirrorWork::Restore) => {
                    self.restore_mirrors(id).await?;
                    continue;
                }
                _ => {}
            }
            // A wave starts only inside its maintenance windows, and only
            // when its expected time fits: otherwise it waits, and says
            // until when. Its backups' mirrors are paused only once it may.
            if state == RolloutState::Running
                && !hold
                && let Some((w, sets, expected, waits)) = window
                && !self.window_open(id, w, &sets, expected, waits, &mut rx).await?
            {
                continue;
            }
            if let Some(super::mirrors::MirrorWork::Guard(w)) = mirrors
                && !hold
            {
                self.guard_mirrors(id, w).await?;
                continue;
            }
            match state {
                RolloutState::Running if hold => {
                    self.hold_updaters(id).await?;
                    continue;
                }
                RolloutState::Running => {}
                RolloutState::Completed | RolloutState::Aborted | RolloutState::Refused if release => {
                    self.release_updaters(id).await?;
                    if self.with(id, |e| !e.rollout.updaters_held.is_empty())? {
                        // Some host is away: asked again, every half minute,
                        // until it is back and lets go (and at the next
                        // start of a controller).
                        tokio::time::sleep(RELEASE_AGAIN).await;
                    }
                    continue;
                }
                RolloutState::Completed | RolloutState::Aborted | RolloutState::Refused => {
                    // Its steps are all answered or never will be.
                    let prefix = format!("{id}:");
                    self.lock().sent.retain(|c| !c.starts_with(&prefix));
                    return Ok(());
                }
                RolloutState::Halted if rollback_pending => {
                    self.auto_rollback(id).await?;
                    continue;
                }
                _ => {
                    self.wait_change(&mut rx).await;
                    continue;
                }
            }
            match current {
                None => {
                    self.mutate(id, |e| {
                        let failed = wavegate_domain::rollout::failed_hosts(e.hosts().values());
                        e.rollout.complete()?;
                        let text = if failed.is_empty() {
                            "every wave confirmed healthy; rollout completed".to_owned()
                        } else {
                            format!(
                                "every wave confirmed within its failure budget; rollout {}",
                                wavegate_domain::rollout::state_line("completed", &failed)
                            )
                        };
                        event(e.rollout, text);
                        Ok(())
                    })
                    .await?;
                    continue;
                }
                Some(w) => self.run_wave(id, w).await?,
            }
        }
    }

    /// Whether wave `w` may start now in its windows. If not, the wave is
    /// recorded as waiting (once per new start time) and this waits until
    /// that time or the next change of anything.
    async fn window_open(
        self: &Arc<Self>,
        id: &str,
        w: usize,
        sets: &[wavegate_domain::windows::WindowSet],
        expected_ms: u64,
        waits: Option<u64>,
        rx: &mut watch::Receiver<u64>,
    ) -> Result<bool, EngineError> {
        let now = now_ms();
        let next = wavegate_domain::windows::next_start(
            sets,
            i64::try_from(now).unwrap_or(i64::MAX),
            Duration::from_millis(expected_ms),
        );
        match next {
            None => {
                self.mutate(id, |e| {
                    if e.rollout.state == RolloutState::Running {
                        let text = format!(
                            "halted before wave {}: it is expected to take up to {} and no maintenance window in the coming week fits it ({})",
                            w + 1,
                            wavegate_domain::units::format_duration(Duration::from_millis(expected_ms)),
                            e.rollout.waves[w].window_lines().join("; ")
                        );
                        e.rollout.halt(w, text)?;
                    }
                    Ok(())
                })
                .await?;
                Ok(false)
            }
            Some((start, _)) if start > i64::try_from(now).unwrap_or(i64::MAX) => {
                let start = u64::try_from(start).unwrap_or(u64::MAX);
                if waits != Some(start) {
                    self.mutate(id, |e| {
                        if e.rollout.state != RolloutState::Running {
                            return Ok(());
                        }
                        e.rollout.waves[w].waits_until_ms = Some(start);
                        let text = format!("wave {} {}", w + 1, e.rollout.waves[w].waiting().unwrap_or_default());
                        event(e.rollout, text);
                        Ok(())
                    })
                    .await?;
                }
                let left = Duration::from_millis(start.saturating_sub(now_ms()));
                tokio::select! {
                    () = tokio::time::sleep(left) => {}
                    _ = rx.changed() => {}
                }
                Ok(false)
            }
            Some(_) => {
                if waits.is_some() {
                    self.mutate(id, |e| {
                        e.rollout.waves[w].waits_until_ms = None;
                        let text = format!("wave {}: its maintenance window is open, and it fits", w + 1);
                        event(e.rollout, text);
                        Ok(())
                    })
                    .await?;
                }
                Ok(true)
            }
        }
    }

    /// Whether another host of wave `w` may start now: the rollout runs, in
    /// the same attempt. This is the budget check before each start: a
    /// failure is judged in the same change that records it, and one over
    /// the budget halts the rollout there, in memory, before anything else
    /// can start (the commit follows).
    fn may_start(&self, id: &str, w: usize, attempt: u32) -> Result<(), String> {
        let st = self.lock();
        let r = &st.rollouts.get(id).ok_or_else(|| format!("no rollout {id}"))?.rollout;
        if r.state != RolloutState::Running {
            return Err(format!("the rollout is {}", r.state));
        }
        if r.attempt != attempt || r.waves.get(w).is_none_or(|x| x.state != WaveState::Running) {
            return Err(format!("wave {} is no longer running in this attempt", w + 1));
        }
        Ok(())
    }

    /// Whether wave `w` is still in one of `states`, in attempt `attempt`
    /// of a running rollout.
    fn wave_is(&self, id: &str, w: usize, attempt: u32, states: &[WaveState]) -> bool {
        self.lock().rollouts.get(id).is_some_and(|e| {
            e.rollout.state == RolloutState::Running
                && e.rollout.attempt == attempt
                && e.rollout.waves.get(w).is_some_and(|x| states.contains(&x.state))
        })
    }

    pub(super) async fn run_wave(self: &Arc<Self>, id: &str, w: usize) -> Result<(), EngineError> {
        let started = Instant::now();
        let mut changes = self.subscribe();
        let (hosts, attempt, limit) = self
            .mutate(id, |e| {
                let wave = &mut e.rollout.waves[w];
                let limit = wave.max_in_flight();
                if wave.state == WaveState::Pending {
                    wave.set_state(WaveState::Running)?;
                    let text = format!(
                        "wave {} started ({limit} at a time): {}",
                        wave.index,
                        wave.hosts.join(", ")
                    );
                    event(e.rollout, text);
                }
                // Hosts a previous pass left mid-step go first: they hold
                // their place, and their results are owed.
                let mut hosts = e.rollout.waves[w].hosts.clone();
                let hosts_of = e.hosts();
                hosts.sort_by_key(|h| hosts_of.get(h).is_none_or(|r| r.in_flight.is_none()));
                Ok((hosts, e.rollout.attempt, limit))
            })
            .await?;
        crate::failpoint::hit("wave-start-committed");
        // At most `limit` hosts of the wave at once: each host task holds a
        // permit from its dry-run to its result and checks, and the next
        // host starts only once one is done and the wave may still go on.
        // After a failure at most `limit - 1` other hosts can be mid-step.
        let permits = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
        let mut tasks = Vec::new();
        for host in hosts {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            if let Err(why) = self.may_start(id, w, attempt) {
                info!(rollout = %id, wave = w + 1, host, "Not started: {why}.");
                break;
            }
            let engine = Arc::clone(self);
            let id = id.to_owned();
            tasks.push(tokio::spawn(async move {
                let r = engine.run_host(&id, w, &host).await;
                drop(permit);
                r
            }));
        }
        for t in tasks {
            match t.await {
                Ok(r) => r?,
                Err(e) => return Err(EngineError::Store(anyhow::anyhow!("host task failed: {e}"))),
            }
        }
        // What has changed so far is seen: the wait below is for the next
        // change, not one before the checks.
        changes.borrow_and_update();
        // A halt and a resume may have come while the hosts ran: the wave
        // was re-entered, and its retried hosts belong to the next pass of
        // the driver, not to this one's bake.
        // (A wave found baking, after a restart, bakes again from the start.)
        if !self.wave_is(id, w, attempt, &[WaveState::Running, WaveState::Baking]) {
            return Ok(());
        }
        if !self.with(id, |e| wave_done(e.hosts(), w))? {
            // A host of the wave is neither healthy nor failed, and nothing
            // here can move it: the driver tries again after the next
            // change, rather than at once.
            self.wait_change(&mut changes).await;
            return Ok(());
        }
        self.bake(id, w, attempt).await?;
        if self.with(id, |e| e.rollout.waves[w].state)? == WaveState::Confirmed {
            self.metrics.waves_confirmed.inc();
            self.metrics.wave_duration.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    pub(super) async fn bake(self: &Arc<Self>, id: &str, w: usize, attempt: u32) -> Result<(), EngineError> {
        let baking = self
            .mutate(id, |e| {
                let r = &mut e.rollout;
                if !(r.state == RolloutState::Running
                    && r.attempt == attempt
                    && matches!(r.waves[w].state, WaveState::Running | WaveState::Baking)
                    && wave_done(e.hosts(), w))
                {
                    return Ok(None);
                }
                let r = &mut e.rollout;
                r.waves[w].set_state(WaveState::Baking)?;
                r.waves[w].bake_ends_ms = Some(now_ms() + r.bake_ms);
                let text = format!("wave {} baking for {} ms", w + 1, r.bake_ms);
                event(r, text);
                Ok(Some((r.bake_ms, r.interval_ms.max(1), r.checks.clone(), r.attempt)))
            })
            .await?;
        let Some((bake, interval, checks, attempt)) = baking else {
            return Ok(());
        };
        crate::failpoint::hit("bake-committed");
        let end = Instant::now() + Duration::from_millis(bake);
        let mut round = 0u64;
        while Instant::now() < end {
            let pause = Duration::from_millis(interval).min(end - Instant::now());
            tokio::time::sleep(pause).await;
            if !self.wave_is(id, w, attempt, &[WaveState::Baking]) {
                return Ok(());
            }
            round += 1;
            if checks.is_empty() {
                continue;
            }
            let healthy: Vec<String> = {
                let state = self.lock();
                let Some(e) = state.rollouts.get(id) else { return Ok(()) };
                e.hosts
                    .values()
                    .filter(|h| h.wave == w && h.state == HostState::Healthy)
                    .map(|h| h.host.clone())
                    .collect()
            };
            let mut probes = Vec::new();
            for host in healthy {
                let cmd = checks_command(
                    format!("{id}:{attempt}:{host}:bake:{}:{round}:{}", self.boot, nonce()),
                    &checks,
                );
                let deadline = Instant::now() + checks_timeout(&checks) + self.settings.agent_grace;
                let engine = Arc::clone(self);
                probes.push(tokio::spawn(async move {
                    (host.clone(), engine.hub.execute(&host, cmd, deadline).await)
                }));
            }
            for p in probes {
                let Ok((host, res)) = p.await else { continue };
                let failed = match res {
                    Ok(r) if r.ok() => None,
                    Ok(r) => Some(format!("during bake: {}", checks_detail(&r))),
                    Err(e) => Some(format!("during bake: {e}")),
                };
                if let Some(detail) = failed {
                    self.host_failed(id, w, &host, detail).await?;
                }
            }
            if !self.wave_is(id, w, attempt, &[WaveState::Baking]) {
                return Ok(());
            }
        }
        self.mutate(id, |e| {
            // Confirmed only as this bake found it: still running, in the
            // same attempt, baking, and every host of the wave done.
            if !(e.rollout.state == RolloutState::Running
                && e.rollout.attempt == attempt
                && e.rollout.waves[w].state == WaveState::Baking
                && wave_done(e.hosts(), w))
            {
                return Ok(());
            }
            let r = &mut e.rollout;
            r.waves[w].set_state(WaveState::Confirmed)?;
            event(r, format!("wave {} confirmed healthy", w + 1));
            let retain_ms = r.retain_ms;
            for h in e.hosts_mut_where(|h| h.wave == w && h.snapshot.is_some()) {
                if let Some(snap) = h.snapshot.as_mut() {
                    snap.apply(&SnapshotEvent::WaveConfirmed {
                        now_ms: now_ms(),
                        retain_ms,
                    });
                }
            }
            Ok(())
        })
        .await?;
        if self.with(id, |e| e.rollout.waves[w].state)? == WaveState::Confirmed {
            crate::failpoint::hit("wave-confirmed");
        }
        Ok(())
    }

    /// Mark a host failed; halt when the wave is over its budget.
    pub(super) async fn host_failed(&self, id: &str, w: usize, host: &str, detail: String) -> Result<(), EngineError> {
        self.host_failed_at(id, w, host, detail, None).await
    }

    /// [`Engine::host_failed`] for a failure an agent reported at `received`:
    /// when it halts the rollout, the time from then to the halt's commit is
    /// measured.
    pub(super) async fn host_failed_at(
        &self,
        id: &str,
        w: usize,
        host: &str,
        detail: String,
        received: Option<Instant>,
    ) -> Result<(), EngineError> {
        let halted = self
            .mutate(id, |e| {
                let h = e.host_mut(host)?;
                h.set_state(HostState::Failed)?;
                h.in_flight = None;
                h.detail = detail.clone();
                event(e.rollout, format!("host {host} failed: {detail}"));
                self.halt_if_over_budget(e, w, host, &detail)
            })
            .await?;
        self.halted(halted, received);
        Ok(())
    }
}

impl Engine {
    /// A host's failed step: its result, its failure and the halt it may
    /// bring, in one change, so a halt never waits behind the result's own
    /// commit. The time from `received` to the halt's commit is measured.
    pub(super) async fn step_failed(
        &self,
        id: &str,
        w: usize,
        host: &str,
        result: StepResult,
        detail: String,
        received: Instant,
    ) -> Result<(), EngineError> {
        let halted = self
            .mutate(id, |e| {
                let h = e.host_mut(host)?;
                h.set_state(HostState::Failed)?;
                h.results.push(result);
                h.in_flight = None;
                h.detail = detail.clone();
                event(e.rollout, format!("host {host} failed: {detail}"));
                self.halt_if_over_budget(e, w, host, &detail)
            })
            .await?;
        self.halted(halted, Some(received));
        Ok(())
    }

    fn halted(&self, halted: bool, received: Option<Instant>) {
        if halted {
            crate::failpoint::hit("halt-committed");
        }
        if halted && let Some(at) = received {
            let secs = at.elapsed().as_secs_f64();
            self.metrics.halt_commit.observe(secs);
            self.metrics.last_halt_commit.set(secs);
        }
    }

    /// Halt the rollout if wave `w` is over its failure budget and it still
    /// runs (or is paused); `host` failed last, for `detail`. Returns
    /// whether it halted.
    fn halt_if_over_budget(&self, e: &mut Change<'_>, w: usize, host: &str, detail: &str) -> Result<bool, EngineError> {
        let Some(mut d) = e.rollout.halt_decision(w, e.hosts()) else {
            return Ok(false);
        };
        // Who else ran it: the hosts whose step was sent, not those whose
        // command id was stored and will now never be sent.
        d.in_flight.retain(|h| {
            e.hosts()
                .get(h)
                .and_then(|r| r.in_flight.as_deref())
                .is_some_and(|c| e.was_sent(c))
        });
        let reason = d.reason(host, detail);
        // Only hosts whose records change are written again (the halt says
        // which): at 10,000 hosts, serialising every record here made the
        // halt several times slower to commit.
        e.rollout_and_hosts(|r, hosts| r.apply_halt(&d, reason.clone(), hosts).map(|c| ((), c)))?;
        event(e.rollout, format!("halted: {reason}"));
        self.metrics.waves_halted.inc();
        Ok(true)
    }

    /// On taking over: a commit too large for one etcd transaction is
    /// written in parts, rollout headers last, so a leader that died
    /// between two parts can leave a host's failure stored while its
    /// rollout still runs. Every such rollout halts now, before anything
    /// is driven, as it would have if the commit had been whole.
    pub(super) async fn halt_what_is_over_budget(&self) -> Result<(), EngineError> {
        let found: Vec<(String, usize, String, String)> = {
            let st = self.lock();
            st.rollouts
                .values()
                .filter(|e| matches!(e.rollout.state, RolloutState::Running | RolloutState::Paused))
                .filter_map(|e| {
                    (0..e.rollout.waves.len()).find_map(|w| {
                        e.rollout.halt_decision(w, &e.hosts)?;
                        let last = e
                            .hosts
                            .values()
                            .rfind(|h| h.wave == w && h.state == HostState::Failed)?;
                        Some((e.rollout.id.clone(), w, last.host.clone(), last.detail.clone()))
                    })
                })
                .collect()
        };
        for (id, w, host, detail) in found {
            warn!(rollout = %id, wave = w + 1, "Found over its failure budget on taking over; halting it.");
            self.mutate_leading(&id, |e| self.halt_if_over_budget(e, w, &host, &detail))
                .await?;
        }
        Ok(())
    }
}

/// Whether every host of wave `w` is done: healthy, or failed within the
/// budget (a failure over it has halted the rollout already). A host still
/// running or untouched keeps the wave from baking and from being
/// confirmed.
fn wave_done(hosts: &BTreeMap<String, HostRecord>, w: usize) -> bool {
    hosts
        .values()
        .filter(|h| h.wave == w)
        .all(|h| matches!(h.state, HostState::Healthy | HostState::Failed))
}
