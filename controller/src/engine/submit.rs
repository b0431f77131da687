//! Submit and approval: a plan checked exactly as `plan check` does, the
//! first wave dry-run, a rollout created (or stored refused), approvals
//! bound to the plan and the dry-run reports, and an operator's pause,
//! resume and abort.

use super::*;

impl Engine {
    /// What the targets' agents reported of their updaters outside the
    /// rollout, into the report, and the site's `updaters` rule applied
    /// (see [`wavegate_domain::updaters::gate`]).
    fn updater_gate(&self, report: &mut Report) -> Option<String> {
        wavegate_domain::updaters::gate(report, |h| self.hub.updaters(h), self.policies.updaters())
    }
}

pub(super) fn build(
    id: String,
    submitter: &str,
    hash: &str,
    plan: &Plan,
    waves: &[wavegate_domain::WaveReport],
    policies: &PolicySet,
) -> (Rollout, Vec<HostRecord>) {
    let mut untouchable: Vec<String> = plan
        .untouchable
        .iter()
        .map(|u| u.value.clone())
        .chain(policies.untouchable())
        .collect();
    untouchable.sort();
    untouchable.dedup();
    let steps = plan
        .steps
        .iter()
        .map(|s| StepSpec {
            name: s.name.clone(),
            run: s.run.clone(),
            writes: s.writes.clone(),
            timeout_ms: s.timeout.as_millis() as u64,
            max_deletions: s.max_deletions,
            allow_failure: s.allow_failure.clone(),
            fetch: s.fetch.clone(),
            fetch_writes: s.fetch_writes.clone(),
            packages: s.packages.clone(),
            reboot: s.reboot,
            reboot_timeout_ms: s.reboot_timeout.as_millis() as u64,
            only_roles: s.only_roles.iter().map(|r| r.as_str().to_owned()).collect(),
        })
        .collect();
    let checks = plan
        .health
        .checks
        .iter()
        .map(|c| CheckSpec {
            name: c.name.clone(),
            timeout_ms: c.timeout.as_millis() as u64,
            probe: match &c.kind {
                CheckKind::Tcp(a) => ProbeSpec::Tcp(a.clone()),
                CheckKind::Http { url, expect_status } => ProbeSpec::Http {
                    url: url.clone(),
                    expect_status: *expect_status,
                },
                CheckKind::Exec(e) => ProbeSpec::Exec(e.clone()),
            },
        })
        .collect();
    let mut hosts = Vec::new();
    let waves: Vec<Wave> = waves
        .iter()
        .enumerate()
        .map(|(i, w)| {
            hosts.extend(w.hosts.iter().map(|h| HostRecord::new(h.clone(), i)));
            Wave {
                index: i + 1,
                state: WaveState::Pending,
                hosts: w.hosts.clone(),
                bake_ends_ms: None,
                max_in_flight: w.max_in_flight,
                windows: w.windows.clone(),
                expected_ms: w.expected_ms,
                waits_until_ms: None,
            }
        })
        .collect();
    let mut rollout = Rollout {
        id,
        plan_name: plan.name.clone(),
        plan_hash: hash.to_owned(),
        inventory_hash: String::new(),
        submitter: submitter.to_owned(),
        approvals: Vec::new(),
        approvals_required: plan.approvals,
        state: RolloutState::AwaitingApproval,
        halt_reason: None,
        waves,
        steps,
        checks,
        bake_ms: plan.health.bake.as_millis() as u64,
        interval_ms: plan.health.interval.as_millis() as u64,
        budget_canary: plan.failure_budget.canary,
        budget_wave: plan.failure_budget.wave,
        attempt: 0,
        on_failure: plan.on_failure,
        retain_ms: plan.snapshot_retain.as_millis() as u64,
        write_set: plan.write_set().into_iter().map(str::to_owned).collect(),
        dry_runs: Vec::new(),
        dry_run_digest: String::new(),
        rollback_pending: false,
        untouchable,
        snapshot_backend: policies.snapshot_backend().unwrap_or_default(),
        events: Vec::new(),
        rollback_requests: Vec::new(),
        submitter_person: String::new(),
        hold_updaters: None,
        updaters_held: Vec::new(),
        updaters_hold_taken: false,
        mirrors: Vec::new(),
        accepted_live_mirrors: Vec::new(),
    };
    event(
        &mut rollout,
        format!("submitted by {submitter}: plan `{}` ({hash})", plan.name),
    );
    (rollout, hosts)
}

impl Engine {
    /// Validate a plan exactly as `plan check` does, dry-run every step on
    /// the first wave's hosts, and create a rollout. A blocked dry-run (or a
    /// host that cannot dry-run) stores the rollout as refused: it can never
    /// be approved, and its reports say what would have happened.
    pub async fn submit(
        self: &Arc<Self>,
        submitter: &str,
        person: &str,
        plan_file: &str,
        plan_yaml: &str,
        bypass: &[String],
    ) -> Result<(Entry, Report), EngineError> {
        self.leading()?;
        if person.is_empty() {
            // Who may approve it is decided by person: without one, no
            // approver could be told apart from the submitter.
            self.refuse(&format!(
                "{submitter} submitted with a certificate that names no person"
            ))
            .await;
            return Err(EngineError::Denied(format!(
                "the certificate of {submitter} names no person, so no approver could be told apart from you; \
                 have it issued again with `wavegate certs issue operator {submitter} --role ROLE --person ID`"
            )));
        }
        if !bypass.is_empty() {
            self.refuse(&format!("{submitter} asked to bypass: {}", bypass.join(", ")))
                .await;
            return Err(EngineError::Denied(format!(
                "refused: nothing skips the canary, the approval or the backup rule (asked to bypass: {})",
                bypass.join(", ")
            )));
        }
        let (mut report, plan) = check_plan(
            &self.fleet,
            Source {
                name: plan_file,
                text: plan_yaml,
            },
            &self.policies,
        );
        let hold = if report.ok {
            self.updater_gate(&mut report)
        } else {
            None
        };
        let plan = match plan {
            Some(p) if report.ok => p,
            _ if report.exit_status() == 2 => return Err(EngineError::BadPlan(Box::new(report))),
            _ => return Err(EngineError::Refused(Box::new(report))),
        };
        let hash = hex::encode(Sha256::digest(plan_yaml.as_bytes()));
        let waves: Vec<Vec<String>> = report.waves.iter().map(|w| w.hosts.clone()).collect();
        let (mut template, template_hosts) =
            build(String::new(), submitter, &hash, &plan, &report.waves, &self.policies);
        template.submitter_person = person.to_owned();
        template.hold_updaters = hold;
        template.accepted_live_mirrors = plan.accept_live_mirrors.iter().map(|a| a.value.clone()).collect();
        let first = waves.first().cloned().unwrap_or_default();
        let tag = format!("submit:{}:{}:{}", &hash[..12], self.boot, nonce());
        let mut probes = Vec::new();
        for host in first {
            let engine = Arc::clone(self);
            let steps = template.steps.clone();
            let untouchable = template.untouchable.clone();
            let tag = tag.clone();
            probes.push(tokio::spawn(async move {
                engine
                    .dry_run(&tag, &host, &steps, &untouchable, &BTreeMap::new(), true)
                    .await
            }));
        }
        let mut records = Vec::new();
        for p in probes {
            match p.await {
                Ok(r) => records.extend(r),
                Err(e) => return Err(EngineError::Store(anyhow::anyhow!("dry-run task failed: {e}"))),
            }
        }
        let blocked: Vec<String> = records
            .iter()
            .filter(|r| r.blocked)
            .map(DryRunRecord::summary)
            .collect();
        crate::failpoint::hit("submit-dry-run-done");
        let report_json = serde_json::json!({
            "targets": report.targets,
            "waves": report.waves,
            "notes": report.notes,
            "policies": report.policies,
            "violations": report.violations,
        });
        let (submitter_s, hash_s, plan_file_s, plan_yaml_s) = (
            submitter.to_owned(),
            hash.clone(),
            plan_file.to_owned(),
            plan_yaml.to_owned(),
        );
        let inventory_hash = self.inventory_hash.clone();
        let notify = self.settings.notify;
        let blocked_any = !blocked.is_empty();
        let make: crate::store::Build = Box::new(move |id| {
            let (mut r, h) = (template, template_hosts);
            r.id = id;
            r.inventory_hash = inventory_hash;
            r.dry_runs = records.clone();
            r.dry_run_digest = hex::encode(Sha256::digest(serde_json::to_vec(&records).unwrap_or_default()));
            for rec in &records {
                event(&mut r, format!("dry-run at submit: {}", rec.summary()));
            }
            if !blocked.is_empty() {
                r.state = RolloutState::Refused;
                r.halt_reason = Some(format!(
                    "refused at submit: the first wave's dry-run was blocked: {}",
                    blocked.join(" | ")
                ));
                event(&mut r, "refused: a blocked dry-run; this rollout can never be approved");
            }
            let mut data = report_json;
            data["plan_hash"] = hash_s.clone().into();
            data["plan_file"] = plan_file_s.into();
            data["plan_yaml"] = plan_yaml_s.into();
            data["inventory_hash"] = r.inventory_hash.clone().into();
            data["dry_runs"] = serde_json::to_value(&r.dry_runs).unwrap_or_default();
            let mut bodies = vec![AuditBody {
                kind: "submit".into(),
                rollout: Some(r.id.clone()),
                host: None,
                actor: Some(submitter_s.clone()),
                text: format!("{submitter_s} submitted plan `{}` ({hash_s})", r.plan_name),
                data,
            }];
            bodies.extend(r.events.iter().map(|text| AuditBody {
                kind: "event".into(),
                rollout: Some(r.id.clone()),
                host: None,
                actor: None,
                text: text.clone(),
                data: serde_json::Value::Null,
            }));
            let outbox = match crate::notify::event_of(r.state) {
                Some(ev) if notify => vec![crate::notify::body(&r, &h, ev, &utc(now_ms()))],
                _ => Vec::new(),
            };
            (r, h, bodies, outbox)
        });
        self.leading()?;
        let (rollout, hosts) = self
            .store
            .create_rollout(hash.clone(), plan_yaml.to_owned(), make)
            .await?;
        if self.settings.notify {
            self.notified.notify_one();
        }
        crate::failpoint::hit("submit-committed");
        let entry = Entry {
            hosts: hosts.into_iter().map(|h| (h.host.clone(), h)).collect(),
            rollout,
            activity: BTreeMap::new(),
        };
        self.lock().rollouts.insert(entry.rollout.id.clone(), entry.clone());
        self.changes.send_modify(|n| *n += 1);
        if blocked_any {
            self.refuse(&format!(
                "submission {} by {submitter}: dry-run blocked",
                entry.rollout.id
            ))
            .await;
            return Err(EngineError::DryRunBlocked(Box::new(entry)));
        }
        Ok((entry, report))
    }

    /// Run a step's fetch on `host` (with the network, confined to its
    /// `fetch_writes`). At submit, before approval, it is staged: it runs
    /// over a copy-on-write view and only a staging cache on the agent
    /// keeps what it wrote. After approval, a staged fetch is adopted (put
    /// in place, its digest checked first); otherwise it runs for real,
    /// unless the cache still matches the digest of its last fetch there.
    pub(super) async fn fetch(&self, tag: &str, host: &str, s: &StepSpec, mode: FetchMode) -> FetchRecord {
        let id = format!("{tag}:{host}:{}:fetch", s.name);
        let (stage, adopt_digest, skip) = match mode {
            FetchMode::Stage => (true, String::new(), String::new()),
            FetchMode::Adopt(d) => (false, d, String::new()),
            FetchMode::Real(skip) => (false, String::new(), skip.unwrap_or_default()),
        };
        let cmd = Command::new(
            id.clone(),
            CommandKind::Fetch(Fetch {
                rollout_id: String::new(),
                step_name: s.name.clone(),
                run: s.fetch.clone().unwrap_or_default(),
                writes: s.fetch_writes.clone(),
                timeout_ms: s.timeout_ms,
                skip_if_digest: skip,
                stage,
                adopt_digest,
                only_roles: s.only_roles.clone(),
            }),
        );
        let deadline = Instant::now() + Duration::from_millis(s.timeout_ms) + self.settings.agent_grace;
        match self.hub.execute(host, cmd, deadline).await {
            Ok(r) => {
                let info = match &r.report {
                    Some(AgentReport::Fetch(f)) => f.clone(),
                    _ => FetchReport::default(),
                };
                let tail = String::from_utf8_lossy(&r.output_tail);
                let last: Vec<&str> = tail.trim_end().lines().rev().take(3).collect();
                let last: Vec<&str> = last.into_iter().rev().collect();
                FetchRecord {
                    command_id: id,
                    outcome: r.outcome.as_str().into(),
                    ran: info.ran,
                    digest: info.digest,
                    stage: info.stage,
                    exit_code: r.exit_code,
                    output_sha256: r.output_sha256.clone(),
                    detail: if r.ok() {
                        r.detail
                    } else {
                        format!("{} (exit {}); last output: {}", r.detail, r.exit_code, last.join(" | "))
                    },
                }
            }
            Err(e) => FetchRecord {
                command_id: id,
                outcome: "unreachable".into(),
                exit_code: -1,
                detail: e.to_string(),
                ..FetchRecord::default()
            },
        }
    }

    /// Fetch what `steps` need, then dry-run them in one sandbox on `host`;
    /// one record per step, each with its fetch. A host that cannot answer,
    /// whose sandbox fails, or whose fetch failed, is blocked. `fetched`
    /// are the last fetches on this host, by step name: a staged one is
    /// adopted after approval. `at_submit`: nobody has approved yet, so
    /// every fetch is staged and nothing on the host changes.
    pub(super) async fn dry_run(
        &self,
        tag: &str,
        host: &str,
        steps: &[StepSpec],
        untouchable: &[String],
        fetched: &BTreeMap<String, FetchRecord>,
        at_submit: bool,
    ) -> Vec<DryRunRecord> {
        let mut fetches: BTreeMap<String, FetchRecord> = BTreeMap::new();
        for s in steps.iter().filter(|s| s.fetch.is_some()) {
            let mode = match fetched.get(&s.name) {
                _ if at_submit => FetchMode::Stage,
                Some(f) if !f.stage.is_empty() => FetchMode::Adopt(f.digest.clone()),
                Some(f) => FetchMode::Real(Some(f.digest.clone())),
                None => FetchMode::Real(None),
            };
            let rec = self.fetch(tag, host, s, mode).await;
            fetches.insert(s.name.clone(), rec);
        }
        let fetch_stages: Vec<String> = fetches
            .values()
            .filter(|f| f.ok() && !f.stage.is_empty())
            .map(|f| f.stage.clone())
            .collect();
        let cmd = Command::new(
            format!("{tag}:{host}:dry-run"),
            CommandKind::DryRun(DryRun {
                rollout_id: String::new(),
                untouchable: untouchable.to_vec(),
                fetch_stages,
                steps: steps.iter().map(StepSpec::step).collect(),
            }),
        );
        let timeout = Duration::from_millis(steps.iter().map(|s| s.timeout_ms).sum::<u64>());
        let deadline = Instant::now() + timeout + self.settings.agent_grace;
        let blocked_all = |why: String| {
            steps
                .iter()
                .map(|s| DryRunRecord {
                    host: host.to_owned(),
                    step: s.name.clone(),
                    blocked: true,
                    reasons: vec![why.clone()],
                    report: None,
                    fetch: None,
                })
                .collect()
        };
        let records: Vec<DryRunRecord> = match self.hub.execute(host, cmd, deadline).await {
            Ok(r) => match r.report {
                Some(AgentReport::DryRun(reports)) if reports.len() == steps.len() => reports
                    .into_iter()
                    .map(|rep| DryRunRecord {
                        host: host.to_owned(),
                        step: rep.step.clone(),
                        blocked: rep.blocked,
                        reasons: rep.reasons.clone(),
                        report: Some(rep),
                        fetch: None,
                    })
                    .collect(),
                _ => blocked_all(format!("no dry-run report: {}", r.detail)),
            },
            Err(e) => blocked_all(format!("no dry-run: {e}")),
        };
        let mut records = records;
        for rec in &mut records {
            if let Some(f) = fetches.remove(&rec.step) {
                if !f.ok() {
                    rec.blocked = true;
                    rec.reasons.insert(0, format!("its fetch {}: {}", f.outcome, f.detail));
                }
                rec.fetch = Some(f);
            }
        }
        let blocked = records.iter().filter(|r| r.blocked).count();
        self.metrics.dry_runs_blocked.inc_by(blocked as u64);
        records
    }

    /// Approve, bound to the plan hash the approver saw.
    pub async fn approve(
        self: &Arc<Self>,
        who: &str,
        person: &str,
        id: &str,
        plan_hash: &str,
    ) -> Result<Entry, EngineError> {
        let started = self
            .mutate(id, |e| {
                let r = &mut e.rollout;
                if r.submitter == who || (!person.is_empty() && person == r.submitter_person) {
                    return Err(EngineError::Denied(format!(
                        "{who} ({person}) submitted this rollout and cannot approve it; another person must"
                    )));
                }
                if let Some(a) = r.approvals.iter().find(|a| a.person == person && a.who != who) {
                    return Err(EngineError::Denied(format!(
                        "{who} is {person}, who approved already as {}; approvals count people, not certificates",
                        a.who
                    )));
                }
                if r.submitter_person.is_empty() {
                    // Submitted before certificates named people: nobody
                    // can tell its submitter apart from an approver.
                    return Err(EngineError::Denied(
                        "this rollout was submitted before certificates named people, so its submitter cannot be told apart from you; submit the plan again".into(),
                    ));
                }
                if person.is_empty() {
                    return Err(EngineError::Denied(format!(
                        "the certificate of {who} names no person, so its approval cannot be counted; \
                         have it issued again with `wavegate certs issue operator {who} --role ROLE --person ID`"
                    )));
                }
                if !plan_hash.is_empty() && plan_hash != r.plan_hash {
                    return Err(EngineError::Denied(format!(
                        "the plan changed: you approved {plan_hash}, this rollout runs {}; review the plan it runs",
                        r.plan_hash
                    )));
                }
                let hash = r.plan_hash.clone();
                let dry_run_digest = r.dry_run_digest.clone();
                let started = r.approve(Approval {
                    who: who.to_owned(),
                    person: person.to_owned(),
                    plan_hash: hash,
                    dry_run_digest,
                    at_ms: now_ms(),
                })?;
                event(
                    r,
                    format!(
                        "approved by {who} ({person}; {} of {}) for plan {} and dry-run reports {}",
                        r.approvals.len(),
                        r.approvals_required,
                        r.plan_hash,
                        r.dry_run_digest
                    ),
                );
                if started {
                    event(r, "all approvals in; rollout running");
                }
                Ok(started)
            })
            .await;
        if let Err(EngineError::Denied(msg)) = &started {
            self.refuse(&format!("approval of {id} by {who}: {msg}")).await;
            // Record it on the rollout too (the transaction above did not commit).
            let _ = self
                .mutate(id, |e| {
                    event(e.rollout, format!("refused approval by {who}: {msg}"));
                    Ok(())
                })
                .await;
        }
        if started? {
            crate::failpoint::hit("approval-committed");
            self.spawn_driver(id);
        }
        self.get(id).await
    }

    /// Pause, resume or abort, on an operator's word.
    pub async fn control(self: &Arc<Self>, who: &str, id: &str, action: Control) -> Result<Entry, EngineError> {
        self.mutate(id, |e| {
            let waiting: Vec<u32> = e
                .rollout
                .rollback_requests
                .iter()
                .filter(|q| q.state == RollbackState::AwaitingApproval)
                .map(|q| q.number)
                .collect();
            e.rollout_and_hosts(|r, hosts| r.control(action, hosts).map(|c| ((), c)))?;
            event(e.rollout, format!("{} by {who}", action.as_str()));
            for n in waiting {
                if e.rollout
                    .rollback_requests
                    .iter()
                    .any(|q| q.number == n && q.state == RollbackState::Done)
                {
                    event(
                        e.rollout,
                        format!("rollback request {n} withdrawn: the rollout resumed"),
                    );
                }
            }
            Ok(())
        })
        .await?;
        if action == Control::Resume {
            self.spawn_driver(id);
        }
        self.get(id).await
    }
}

/// How a fetch runs.
pub(super) enum FetchMode {
    /// Before approval: over a copy-on-write view, kept in a staging cache.
    Stage,
    /// After approval: the staging cache with this digest put in place.
    Adopt(String),
    /// After approval: for real, unless the cache still has this digest.
    Real(Option<String>),
}
