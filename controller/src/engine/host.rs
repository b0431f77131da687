//! The host driver: for each host of a wave, its steps in order, each
//! dry-run on the host's current state, snapshotted before the first,
//! persisted before it is sent, then its health checks.

use super::*;

/// What a host task does next.
pub(super) enum Next {
    Stop,
    Step {
        index: usize,
        resend: Option<String>,
    },
    Checks {
        cmd: Box<Command>,
        timeout: Duration,
    },
    /// The host is rebooting after a step: wait for its new boot.
    Reboot(RebootWait),
}

/// The last fetch digest of each step on a host: from its own dry-runs,
/// else from the submit-time dry-run (the first wave's hosts).
/// The last successful fetch of each step on `host` (at submit, staged;
/// later, on the host itself).
fn digests(e: &Entry, host: &str) -> BTreeMap<String, FetchRecord> {
    let mut out = BTreeMap::new();
    let from_submit = e.rollout.dry_runs.iter().filter(|d| d.host == host);
    let own = e.hosts().get(host).into_iter().flat_map(|h| h.dry_runs.iter());
    for d in from_submit.chain(own) {
        if let Some(f) = d.fetch.as_ref().filter(|f| f.ok() && !f.digest.is_empty()) {
            out.insert(d.step.clone(), f.clone());
        }
    }
    out
}

/// A package step's write set on a host, from its latest dry-run there.
fn implied(h: &HostRecord, step: &StepSpec) -> Option<Vec<String>> {
    step.packages.as_ref()?;
    h.dry_runs
        .iter()
        .find(|d| d.step == step.name)
        .and_then(|d| d.report.as_ref())
        .map(|r| r.implied_writes.clone())
}

impl Engine {
    /// What `host` does next: the domain decides (and moves the record);
    /// this turns a decision to run checks into the checks command.
    pub(super) fn next_for(&self, e: &mut Change<'_>, host: &str) -> Result<Next, EngineError> {
        let (r, h) = e.rollout_and_host(host)?;
        let (rid, attempt) = (r.id.clone(), r.attempt);
        let next = h.next(r, || format!("{rid}:{attempt}:{host}:checks:{}:{}", self.boot, nonce()))?;
        Ok(match next {
            HostNext::Stop => Next::Stop,
            HostNext::Step { index, resend } => Next::Step { index, resend },
            HostNext::Reboot(wait) => Next::Reboot(wait),
            HostNext::Checks { command_id } => Next::Checks {
                cmd: Box::new(checks_command(command_id, &r.checks)),
                timeout: checks_timeout(&r.checks),
            },
        })
    }
}

/// What a host is doing before its record says so, shown while it lasts.
struct Activity<'a> {
    engine: &'a Engine,
    id: &'a str,
    host: &'a str,
}

impl Activity<'_> {
    fn set(&self, what: Option<&'static str>) {
        self.engine.set_activity(self.id, self.host, what);
    }
}

impl Drop for Activity<'_> {
    fn drop(&mut self) {
        self.set(None);
    }
}

impl Engine {
    pub(super) async fn record_host(
        &self,
        id: &str,
        host: &str,
        f: impl FnOnce(&mut HostRecord),
    ) -> Result<(), EngineError> {
        self.mutate(id, |e| {
            let h = e.host_mut(host)?;
            f(h);
            Ok(())
        })
        .await
    }

    /// Dry-run step `index` on the host's current state, snapshot the write
    /// set before the first real step, then persist the command id and send
    /// the confined real step. Returns the step's result, or why it did not
    /// run (the host has then failed).
    pub(super) async fn real_step(
        self: &Arc<Self>,
        id: &str,
        w: usize,
        host: &str,
        index: usize,
        resend: Option<String>,
    ) -> Result<Option<(String, CommandResult, Instant)>, EngineError> {
        let (step, steps, attempt, write_set, untouchable, backend, digests, has_snapshot) = self.with(id, |e| {
            let r = &e.rollout;
            (
                r.steps[index].clone(),
                r.steps.clone(),
                r.attempt,
                r.write_set.clone(),
                r.untouchable.clone(),
                r.snapshot_backend.clone(),
                digests(e, host),
                e.hosts().get(host).is_some_and(|h| h.snapshot.is_some()),
            )
        })?;
        // Cleared when this returns, whichever way.
        let activity = Activity { engine: self, id, host };
        let cmd_id = match resend {
            Some(cmd_id) => cmd_id,
            None => {
                activity.set(Some("dry-run"));
                // 1. Its own dry-run (after its fetch, when it has one),
                // right before the real run. Before the first real step,
                // when a later step is a package step, every step from here
                // is dry-run: their write sets on this host are what the
                // snapshot must hold.
                let tag = format!("{id}:{attempt}:{}:{}", self.boot, nonce());
                let later_packages = steps[index + 1..].iter().any(|s| s.packages.is_some());
                let to_dry = if !has_snapshot && later_packages {
                    &steps[index..]
                } else {
                    std::slice::from_ref(&step)
                };
                let records = self
                    .dry_run(
                        &format!("{tag}:step{index}"),
                        host,
                        to_dry,
                        &untouchable,
                        &digests,
                        false,
                    )
                    .await;
                if !records.is_empty() {
                    let recs = records.clone();
                    self.record_host(id, host, |h| {
                        for rec in recs {
                            h.dry_runs.retain(|d| d.step != rec.step);
                            h.dry_runs.push(rec);
                        }
                    })
                    .await?;
                }
                let record = records.into_iter().find(|r| r.step == step.name);
                match &record {
                    Some(rec) if !rec.blocked => {}
                    Some(rec) => {
                        self.host_failed(
                            id,
                            w,
                            host,
                            format!("step `{}` not run: dry-run blocked: {}", step.name, rec.summary()),
                        )
                        .await?;
                        return Ok(None);
                    }
                    None => {
                        self.host_failed(id, w, host, format!("step `{}` not run: no dry-run report", step.name))
                            .await?;
                        return Ok(None);
                    }
                }
                // 2. A verified snapshot before the host's first real step:
                // of the plan's write set and every package step's on this
                // host.
                if !has_snapshot {
                    activity.set(Some("snapshot"));
                    let mut paths: BTreeSet<String> = write_set.iter().cloned().collect();
                    self.with(id, |e| {
                        if let Some(h) = e.hosts().get(host) {
                            for s in &steps {
                                paths.extend(implied(h, s).unwrap_or_default());
                            }
                        }
                    })?;
                    // A backend the site policy forces; one this controller
                    // does not know takes no snapshot, so runs no step.
                    let backend = match backend.as_str() {
                        "" => None,
                        name => match SnapshotBackend::parse(name) {
                            Some(b) => Some(b),
                            None => {
                                self.host_failed(
                                    id,
                                    w,
                                    host,
                                    format!("no snapshot, so no real step: unknown snapshot backend `{name}`"),
                                )
                                .await?;
                                return Ok(None);
                            }
                        },
                    };
                    let cmd = Command::new(
                        format!("{id}:{host}:snapshot:{}", nonce()),
                        CommandKind::TakeSnapshot {
                            rollout_id: id.to_owned(),
                            paths: paths.into_iter().collect(),
                            untouchable: untouchable.clone(),
                            backend,
                        },
                    );
                    let deadline = Instant::now() + Duration::from_secs(600) + self.settings.agent_grace;
                    match self
                        .hub
                        .execute_gated(host, cmd, deadline, self.gate(id))
                        .await
                        .map(|(r, _)| r)
                    {
                        Err(ExecError::NotSent(why)) => {
                            info!(rollout = %id, host, "Snapshot not sent: {why}.");
                            return Ok(None);
                        }
                        Ok(CommandResult {
                            outcome: Outcome::Ok,
                            report: Some(AgentReport::Snapshot(summary)),
                            ..
                        }) => {
                            let mut snap = SnapshotRecord::pinned(summary.bytes, summary.files, now_ms());
                            snap.parts = summary.parts;
                            // The host record (and its audit record) says so, with
                            // the backend of every part; no rollout event per host,
                            // which would grow without bound.
                            self.record_host(id, host, |h| {
                                h.detail =
                                    format!("snapshot of its write set taken and verified ({})", snap.backends());
                                h.snapshot = Some(snap);
                            })
                            .await?;
                        }
                        Ok(res) => {
                            self.host_failed(
                                id,
                                w,
                                host,
                                format!("no verified snapshot, so no real step: {}", res.detail),
                            )
                            .await?;
                            return Ok(None);
                        }
                        Err(e) => {
                            self.host_failed(id, w, host, format!("no verified snapshot, so no real step: {e}"))
                                .await?;
                            return Ok(None);
                        }
                    }
                }
                // A package step's write set on this host must be inside
                // what the snapshot holds, or a rollback could not undo it.
                let uncovered: Vec<String> = self.with(id, |e| {
                    let Some(h) = e.hosts().get(host) else {
                        return Vec::new();
                    };
                    let held: Vec<String> = h
                        .snapshot
                        .iter()
                        .flat_map(|s| s.parts.iter().flat_map(|p| p.roots.clone()))
                        .chain(write_set.iter().cloned())
                        .collect();
                    implied(h, &step)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|w| !held.iter().any(|r| wavegate_domain::plan::within(w, r)))
                        .collect()
                })?;
                if !uncovered.is_empty() {
                    self.host_failed(
                        id,
                        w,
                        host,
                        format!(
                            "step `{}` not run: its write set on this host is not in its snapshot: {}",
                            step.name,
                            uncovered.join(", ")
                        ),
                    )
                    .await?;
                    return Ok(None);
                }
                // 3. Persist the command id, unless a halt came in meanwhile.
                let cmd_id = format!("{id}:{attempt}:{host}:step{index}:{}", nonce());
                let sent = self
                    .mutate(id, |e| {
                        if e.rollout.state != RolloutState::Running {
                            return Ok(false);
                        }
                        let h = e.host_mut(host)?;
                        h.in_flight = Some(cmd_id.clone());
                        h.set_state(HostState::Running)?;
                        h.detail = format!("running step `{}`", step.name);
                        Ok(true)
                    })
                    .await?;
                activity.set(None);
                if !sent {
                    return Ok(None);
                }
                crate::failpoint::hit("step-persisted");
                cmd_id
            }
        };
        let (hints, writes) = self.with(id, |e| {
            let h = e.hosts().get(host);
            let hints = h
                .and_then(|h| {
                    h.dry_runs
                        .iter()
                        .find(|d| d.step == step.name)
                        .and_then(|d| d.report.clone())
                })
                .unwrap_or_default();
            let writes = h.and_then(|h| implied(h, &step)).unwrap_or_else(|| step.writes.clone());
            (hints, writes)
        })?;
        let cmd = Command::new(
            cmd_id.clone(),
            CommandKind::RunStep(RunStep {
                rollout_id: id.to_owned(),
                step: wavegate_domain::command::Step { writes, ..step.step() },
                create_dirs: hints.created_dirs,
                create_files: hints.created_files,
                untouchable,
            }),
        );
        let deadline = Instant::now() + Duration::from_millis(step.timeout_ms) + self.settings.agent_grace;
        match self
            .hub
            .execute_gated(host, cmd, deadline, self.step_gate(id, &cmd_id))
            .await
        {
            Ok((res, received)) => Ok(Some((step.name, res, received))),
            // Halted, paused or aborted since the command id was stored: the
            // id stays in flight, and a resume sends that same id again.
            Err(ExecError::NotSent(why)) => {
                info!(rollout = %id, host, "Step not sent: {why}.");
                Ok(None)
            }
            Err(e) => {
                self.host_failed(id, w, host, format!("step `{}`: {e}", step.name))
                    .await?;
                Ok(None)
            }
        }
    }

    pub(super) async fn run_host(self: Arc<Self>, id: &str, w: usize, host: &str) -> Result<(), EngineError> {
        loop {
            let next = self.mutate(id, |e| self.next_for(e, host)).await?;
            match next {
                Next::Stop => return Ok(()),
                Next::Step { index, resend } => {
                    let Some((step_name, r, received)) = self.real_step(id, w, host, index, resend).await? else {
                        return Ok(());
                    };
                    let ok = r.ok();
                    self.metrics.steps.with_label_values(&[r.outcome.as_str()]).inc();
                    self.metrics.step_duration.observe(r.duration_ms as f64 / 1000.0);
                    let mut result = StepResult {
                        step: step_name.clone(),
                        command_id: r.command_id.clone(),
                        outcome: r.outcome.as_str().into(),
                        exit_code: r.exit_code,
                        duration_ms: r.duration_ms,
                        output_sha256: r.output_sha256.clone(),
                        replayed: r.replayed,
                        output_tail: String::from_utf8_lossy(&r.output_tail).into_owned(),
                        output_stored: 0,
                        output_verified: String::new(),
                    };
                    if !ok {
                        // A failure is judged first, ahead of the output's
                        // check: the halt it may bring is in memory at once,
                        // so no other host starts meanwhile.
                        let tail = String::from_utf8_lossy(&r.output_tail);
                        let last = tail.lines().last().unwrap_or_default().to_owned();
                        let detail = format!(
                            "step `{step_name}` {} (exit {}){}{}",
                            r.outcome,
                            r.exit_code,
                            if r.detail.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", r.detail)
                            },
                            if last.is_empty() {
                                String::new()
                            } else {
                                format!("; last output: {last}")
                            }
                        );
                        result.output_verified = "not checked yet".into();
                        self.step_failed(id, w, host, result, detail, received).await?;
                        let (stored, verified) = self.verify_output(id, host, &step_name, &r.output_sha256).await;
                        let command_id = r.command_id.clone();
                        return self
                            .record_host(id, host, |h| {
                                if let Some(res) = h.results.iter_mut().rfind(|x| x.command_id == command_id) {
                                    res.output_stored = stored;
                                    res.output_verified = verified;
                                }
                            })
                            .await;
                    }
                    (result.output_stored, result.output_verified) =
                        self.verify_output(id, host, &step_name, &r.output_sha256).await;
                    let timeout_ms = self.with(id, |e| {
                        e.rollout
                            .steps
                            .iter()
                            .find(|s| s.name == step_name)
                            .map_or(0, |s| s.reboot_timeout_ms)
                    })?;
                    let rebooting = r.reboot_pending;
                    // The step's result and the reboot to wait for are one
                    // change: after a controller restart the host is waited
                    // for, never sent its step again.
                    self.mutate(id, |e| {
                        let h = e.host_mut(host)?;
                        h.results.push(result);
                        h.next_step += 1;
                        h.in_flight = None;
                        h.detail = format!("step `{step_name}` done");
                        if rebooting {
                            h.reboot = Some(RebootWait {
                                step: step_name.clone(),
                                from_boot: r.boot_id.clone(),
                                deadline_ms: now_ms() + timeout_ms,
                            });
                            h.detail = format!("rebooting after step `{step_name}`");
                            event(
                                e.rollout,
                                format!("host {host} rebooting after step `{step_name}` (boot {})", r.boot_id),
                            );
                        }
                        Ok(())
                    })
                    .await?;
                }
                Next::Reboot(wait) => {
                    crate::failpoint::hit("reboot-pending");
                    let left = Duration::from_millis(wait.deadline_ms.saturating_sub(now_ms()));
                    match self
                        .hub
                        .wait_new_boot(host, &wait.from_boot, Instant::now() + left)
                        .await
                    {
                        Some(boot) => {
                            self.mutate(id, |e| {
                                if let Ok(h) = e.host_mut(host) {
                                    h.reboot = None;
                                    h.boot_id.clone_from(&boot);
                                    h.detail = format!("back after its reboot (boot {boot})");
                                }
                                event(e.rollout, format!("host {host} back after its reboot (boot {boot})"));
                                Ok(())
                            })
                            .await?;
                        }
                        None => {
                            let timeout_ms = self
                                .mutate(id, |e| {
                                    if let Ok(h) = e.host_mut(host) {
                                        h.reboot = None;
                                    }
                                    let t = e
                                        .rollout
                                        .steps
                                        .iter()
                                        .find(|s| s.name == wait.step)
                                        .map_or(0, |s| s.reboot_timeout_ms);
                                    Ok(t)
                                })
                                .await?;
                            return self
                                .host_failed(
                                    id,
                                    w,
                                    host,
                                    format!(
                                        "did not come back after reboot within its reboot_timeout of {} s (after step `{}`; its boot was {})",
                                        timeout_ms / 1000,
                                        wait.step,
                                        wait.from_boot
                                    ),
                                )
                                .await;
                        }
                    }
                }
                Next::Checks { cmd, timeout } => {
                    let deadline = Instant::now() + timeout + self.settings.agent_grace;
                    match self
                        .hub
                        .execute_gated(host, *cmd, deadline, || Ok::<(), String>(()))
                        .await
                    {
                        Ok((r, _)) if r.ok() => {
                            // Passing checks make a host healthy only from where
                            // it was when they were sent: one that failed
                            // meanwhile stays failed.
                            self.record_host(id, host, |h| {
                                if h.set_state(HostState::Healthy).is_ok() {
                                    h.in_flight = None;
                                    h.detail = "healthy".into();
                                }
                            })
                            .await?;
                            return Ok(());
                        }
                        Ok((r, received)) => {
                            return self
                                .host_failed_at(id, w, host, checks_detail(&r), Some(received))
                                .await;
                        }
                        Err(e) => return self.host_failed(id, w, host, format!("health checks: {e}")).await,
                    }
                }
            }
        }
    }
}
