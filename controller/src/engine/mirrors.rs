//! Live mirrors that feed the targets' backups (rsync every few minutes,
//! DRBD, database replication): before a wave that holds a primary, its
//! backups' mirrors are paused (the inventory's `pause`, run on the backup)
//! or the backup's copy is snapshotted; once the wave is confirmed after
//! its bake they are resumed (and the snapshot released). When the wave
//! halts they stay paused; when its primaries are rolled back, a backup
//! whose copy was snapshotted is put back as it was before the wave if it
//! changed. A mirror that cannot be guarded halts the rollout before the
//! wave: the gate fails closed.

use std::collections::BTreeMap;

use wavegate_domain::rollout::{MirrorHold, MirrorState};

use super::*;

/// How long a mirror's pause or resume may take.
const MIRROR_WITHIN: Duration = Duration::from_secs(300);

/// What the driver must do about mirrors before it goes on.
pub(super) enum MirrorWork {
    /// Guard the mirrors of wave `w`'s primaries.
    Guard(usize),
    /// Resume mirrors whose wave is confirmed (or, after an abort, whose
    /// primaries are sound).
    Resume,
    /// Put back the copies of backups whose primaries were rolled back.
    Restore,
}

/// Backups fed by a live mirror from the hosts of wave `w`, with those
/// hosts: what guarding the wave means.
fn fed_by(fleet: &Fleet, hosts: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in hosts {
        let Some(idx) = fleet.lookup(h) else { continue };
        for b in fleet.direct_backups(idx) {
            if fleet.host(b).mirror.is_some() {
                out.entry(fleet.id(b).to_owned()).or_default().push(h.clone());
            }
        }
    }
    out
}

/// Whether the primaries of `m` are sound, so that its mirror may copy
/// them again: their wave was confirmed, or each was restored from its
/// snapshot or never had a step. A primary mid-step, mid-bake or failed is
/// not: after an abort its mirror stays paused and keeps its snapshot.
fn primaries_sound(e: &Entry, m: &MirrorHold) -> bool {
    if e.rollout
        .waves
        .get(m.wave)
        .is_some_and(|w| w.state == WaveState::Confirmed)
    {
        return true;
    }
    m.primaries.iter().all(|p| {
        e.hosts
            .get(p)
            .is_none_or(|h| h.rolled_back || (h.state == HostState::Untouched && h.results.is_empty()))
    })
}

/// Record where mirror `m` (found by its wave and backup) now is.
fn set_state(r: &mut Rollout, m: &MirrorHold, state: MirrorState, detail: &str) {
    if let Some(h) = r.mirrors.iter_mut().find(|x| x.wave == m.wave && x.backup == m.backup) {
        h.state = state;
        detail.clone_into(&mut h.detail);
    }
}

impl Engine {
    /// The next piece of mirror work for a rollout, if any.
    pub(super) fn mirror_work(&self, e: &Entry) -> Option<MirrorWork> {
        let r = &e.rollout;
        let wave_state = |w: usize| r.waves.get(w).map(|w| w.state);
        match r.state {
            RolloutState::Running => {
                if r.mirrors
                    .iter()
                    .any(|m| m.owes_resume() && wave_state(m.wave) == Some(WaveState::Confirmed))
                {
                    return Some(MirrorWork::Resume);
                }
                if let Some(w) = r.current_wave() {
                    let wanted = fed_by(&self.fleet, &r.waves[w].hosts);
                    let unguarded = wanted
                        .keys()
                        .any(|b| !r.mirrors.iter().any(|m| m.wave == w && &m.backup == b && m.guarding()));
                    // Before the wave's first host, and again on a resume
                    // after a guard that failed: never a wave with a mirror
                    // left unguarded.
                    if unguarded {
                        return Some(MirrorWork::Guard(w));
                    }
                }
                None
            }
            RolloutState::Completed => r
                .mirrors
                .iter()
                .any(MirrorHold::owes_resume)
                .then_some(MirrorWork::Resume),
            RolloutState::Halted if !r.rollback_pending => r
                .mirrors
                .iter()
                .any(|m| {
                    m.snapshotted
                        && matches!(m.state, MirrorState::Paused | MirrorState::Snapshotted)
                        && m.primaries
                            .iter()
                            .any(|p| e.hosts.get(p).is_some_and(|h| h.rolled_back))
                })
                .then_some(MirrorWork::Restore),
            RolloutState::Aborted => r
                .mirrors
                .iter()
                .any(MirrorHold::owes_resume)
                .then_some(MirrorWork::Resume),
            _ => None,
        }
    }

    /// Pause (and snapshot) the mirrors feeding the backups of wave `w`'s
    /// hosts. One that cannot be guarded halts the rollout before the wave.
    pub(super) async fn guard_mirrors(self: &Arc<Self>, id: &str, w: usize) -> Result<(), EngineError> {
        let (hosts, attempt) = self.with(id, |e| (e.rollout.waves[w].hosts.clone(), e.rollout.attempt))?;
        for (backup, primaries) in fed_by(&self.fleet, &hosts) {
            let done = self.with(id, |e| {
                e.rollout
                    .mirrors
                    .iter()
                    .any(|m| m.wave == w && m.backup == backup && m.guarding())
            })?;
            if done {
                continue;
            }
            let Some(mirror) = self
                .fleet
                .lookup(&backup)
                .and_then(|b| self.fleet.host(b).mirror.clone())
            else {
                continue;
            };
            // Checked at submit against the inventory then; this one may be
            // another: a mirror that cannot be guarded now, and that the plan
            // did not accept by name, stops the wave.
            let accepted = self.with(id, |e| e.rollout.accepted_live_mirrors.contains(&backup))?;
            if !mirror.guarded() && !accepted {
                self.mutate(id, |e| {
                    if e.rollout.state == RolloutState::Running {
                        e.rollout.halt(
                            w,
                            format!(
                                "halted before wave {}: {backup} is fed from {} by a live mirror that can be neither paused nor snapshotted, and the plan does not accept that by name (the inventory changed since the plan was checked)",
                                w + 1,
                                primaries.join(", ")
                            ),
                        )?;
                    }
                    Ok(())
                })
                .await?;
                return Ok(());
            }
            // Recorded before the backup is asked: whatever happens next,
            // a resume reaches it.
            self.mutate(id, |e| {
                e.rollout.mirrors.retain(|m| !(m.wave == w && m.backup == backup));
                e.rollout.mirrors.push(MirrorHold {
                    backup: backup.clone(),
                    primaries: primaries.clone(),
                    wave: w,
                    state: MirrorState::Guarding,
                    snapshotted: false,
                    detail: String::new(),
                });
                Ok(())
            })
            .await?;
            let mut failed = None;
            let mut done = Vec::new();
            if let Some(pause) = &mirror.pause {
                let cmd = Command::new(
                    format!("{id}:{attempt}:{backup}:mirror-pause-w{}:{}", w + 1, nonce()),
                    CommandKind::Mirror {
                        rollout_id: id.to_owned(),
                        purpose: "pause".into(),
                        run: pause.clone(),
                        timeout_ms: MIRROR_WITHIN.as_millis() as u64,
                    },
                );
                match self
                    .hub
                    .execute(&backup, cmd, Instant::now() + MIRROR_WITHIN + self.settings.agent_grace)
                    .await
                {
                    Ok(r) if r.outcome == Outcome::Ok => done.push(format!("paused (`{pause}`)")),
                    Ok(r) => failed = Some(r.detail),
                    Err(e) => failed = Some(e.to_string()),
                }
            }
            let mut snapshotted = false;
            let snapshot_paths = mirror.snapshot_paths(&self.with(id, |e| e.rollout.write_set.clone())?);
            if failed.is_none() && !snapshot_paths.is_empty() {
                let cmd = Command::new(
                    format!("{id}:{attempt}:{backup}:mirror-snapshot-w{}:{}", w + 1, nonce()),
                    CommandKind::TakeSnapshot {
                        rollout_id: MirrorHold::snapshot_key(id, w),
                        paths: snapshot_paths.clone(),
                        untouchable: Vec::new(),
                        backend: None,
                    },
                );
                match self
                    .hub
                    .execute(
                        &backup,
                        cmd,
                        Instant::now() + Duration::from_secs(600) + self.settings.agent_grace,
                    )
                    .await
                {
                    Ok(r) if r.outcome == Outcome::Ok => {
                        snapshotted = true;
                        done.push(format!("{} snapshotted", snapshot_paths.join(", ")));
                    }
                    Ok(r) => failed = Some(format!("snapshot: {}", r.detail)),
                    Err(e) => failed = Some(format!("snapshot: {e}")),
                }
            }
            let state = match (&failed, mirror.pause.is_some(), snapshotted) {
                (Some(_), _, _) => MirrorState::Guarding,
                (None, true, _) => MirrorState::Paused,
                (None, false, true) => MirrorState::Snapshotted,
                (None, false, false) => MirrorState::Live,
            };
            self.mutate(id, |e| {
                let Some(m) = e
                    .rollout
                    .mirrors
                    .iter_mut()
                    .find(|m| m.wave == w && m.backup == backup)
                else {
                    return Ok(());
                };
                m.state = state;
                m.snapshotted = snapshotted;
                let from = primaries.join(", ");
                let text = match (&failed, state) {
                    (Some(why), _) => {
                        m.detail = format!("could not be guarded: {why}");
                        format!("the live mirror feeding {backup} from {from} could not be guarded before wave {}: {why}", w + 1)
                    }
                    (None, MirrorState::Live) => {
                        m.detail = "left running: it cannot be paused, and the plan accepts the risk".into();
                        format!(
                            "the live mirror feeding {backup} from {from} is left running in wave {}: the plan accepts the risk by name",
                            w + 1
                        )
                    }
                    (None, _) => {
                        m.detail = done.join("; ");
                        format!(
                            "the live mirror feeding {backup} from {from} guarded before wave {}: {}",
                            w + 1,
                            done.join("; ")
                        )
                    }
                };
                event(e.rollout, text);
                if let Some(why) = &failed
                    && e.rollout.state == RolloutState::Running
                {
                    e.rollout.halt(
                        w,
                        format!(
                            "halted before wave {}: the live mirror feeding {backup} from {from} could not be paused or snapshotted ({why}); a primary's damage would reach its backup",
                            w + 1
                        ),
                    )?;
                }
                Ok(())
            })
            .await?;
            if failed.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Resume the mirrors whose wave is confirmed (after an abort: whose
    /// primaries are sound; the others are left paused, and say why), and
    /// release their snapshots.
    pub(super) async fn resume_mirrors(self: &Arc<Self>, id: &str) -> Result<(), EngineError> {
        let due: Vec<(MirrorHold, bool)> = self.with(id, |e| {
            let r = &e.rollout;
            r.mirrors
                .iter()
                .filter(|m| match r.state {
                    RolloutState::Aborted | RolloutState::Completed => m.owes_resume(),
                    _ => m.owes_resume() && r.waves.get(m.wave).is_some_and(|w| w.state == WaveState::Confirmed),
                })
                .map(|m| (m.clone(), primaries_sound(e, m)))
                .collect()
        })?;
        for (m, sound) in due {
            let mirror = self
                .fleet
                .lookup(&m.backup)
                .and_then(|b| self.fleet.host(b).mirror.clone());
            let (state, detail) = if mirror.is_none() && m.state != MirrorState::Live {
                (
                    MirrorState::LeftPaused,
                    "left paused: its mirror is no longer in the inventory, so wavegate has no resume to run; resume it by hand".to_owned(),
                )
            } else if !sound {
                (
                    MirrorState::LeftPaused,
                    format!(
                        "left paused: {} failed and was not restored from its snapshot; resume it by hand once it is sound",
                        m.primaries.join(", ")
                    ),
                )
            } else {
                let mut notes = Vec::new();
                let mut failed = None;
                if let Some(resume) = mirror.as_ref().and_then(|x| x.resume.clone())
                    && m.state != MirrorState::Live
                {
                    let cmd = Command::new(
                        format!("{id}:{}:mirror-resume-w{}:{}", m.backup, m.wave + 1, nonce()),
                        CommandKind::Mirror {
                            rollout_id: id.to_owned(),
                            purpose: "resume".into(),
                            run: resume.clone(),
                            timeout_ms: MIRROR_WITHIN.as_millis() as u64,
                        },
                    );
                    match self
                        .hub
                        .execute(
                            &m.backup,
                            cmd,
                            Instant::now() + MIRROR_WITHIN + self.settings.agent_grace,
                        )
                        .await
                    {
                        Ok(r) if r.outcome == Outcome::Ok => notes.push(format!("resumed (`{resume}`)")),
                        Ok(r) => failed = Some(r.detail),
                        Err(e) => failed = Some(e.to_string()),
                    }
                }
                if m.snapshotted && failed.is_none() {
                    let cmd = Command::new(
                        format!("{id}:{}:mirror-release-w{}:{}", m.backup, m.wave + 1, nonce()),
                        CommandKind::ReleaseSnapshot {
                            rollout_id: MirrorHold::snapshot_key(id, m.wave),
                        },
                    );
                    if let Ok(r) = self
                        .hub
                        .execute(&m.backup, cmd, Instant::now() + Duration::from_secs(120))
                        .await
                        && r.outcome == Outcome::Ok
                    {
                        notes.push("its snapshot released".into());
                    }
                }
                match failed {
                    Some(why) => (
                        MirrorState::LeftPaused,
                        format!("left paused: its resume failed ({why}); resume it by hand"),
                    ),
                    None => (MirrorState::Resumed, notes.join("; ")),
                }
            };
            self.mutate(id, |e| {
                set_state(e.rollout, &m, state, &detail);
                event(
                    e.rollout,
                    format!(
                        "the live mirror feeding {} from {} after wave {}: {}",
                        m.backup,
                        m.primaries.join(", "),
                        m.wave + 1,
                        if state == MirrorState::Resumed && detail.is_empty() {
                            "guard ended".to_owned()
                        } else {
                            detail.clone()
                        }
                    ),
                );
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    /// Put back, as they were before the wave, the copies of backups whose
    /// primaries were rolled back (only where the copy changed).
    pub(super) async fn restore_mirrors(self: &Arc<Self>, id: &str) -> Result<(), EngineError> {
        let due: Vec<MirrorHold> = self.with(id, |e| {
            e.rollout
                .mirrors
                .iter()
                .filter(|m| {
                    m.snapshotted
                        && matches!(m.state, MirrorState::Paused | MirrorState::Snapshotted)
                        && m.primaries
                            .iter()
                            .any(|p| e.hosts.get(p).is_some_and(|h| h.rolled_back))
                })
                .cloned()
                .collect()
        })?;
        for m in due {
            let key = MirrorHold::snapshot_key(id, m.wave);
            let ask = |preview: bool| {
                Command::new(
                    format!("{id}:{}:mirror-restore-w{}:{}", m.backup, m.wave + 1, nonce()),
                    CommandKind::RestoreSnapshot {
                        rollout_id: key.clone(),
                        preview,
                    },
                )
            };
            let deadline = || Instant::now() + Duration::from_secs(600) + self.settings.agent_grace;
            // Restored, or left paused (with its snapshot) when that could
            // not be done: never resumed over a copy that may be damaged.
            let kept = "; left paused with its snapshot";
            let (state, detail) = match self.hub.execute(&m.backup, ask(true), deadline()).await {
                Ok(r) if r.ok() && r.changes.is_empty() => (
                    MirrorState::Restored,
                    "its copy is as it was before the wave: nothing to restore".to_owned(),
                ),
                Ok(r) if r.ok() => {
                    let n = r.changes.len();
                    match self.hub.execute(&m.backup, ask(false), deadline()).await {
                        Ok(r) if r.ok() => (
                            MirrorState::Restored,
                            format!("its copy changed ({n} paths) and was restored as it was before the wave"),
                        ),
                        Ok(r) => (
                            MirrorState::LeftPaused,
                            format!(
                                "its copy changed ({n} paths) and could NOT be restored: {}{kept}",
                                r.detail
                            ),
                        ),
                        Err(e) => (
                            MirrorState::LeftPaused,
                            format!("its copy changed ({n} paths) and could NOT be restored: {e}{kept}"),
                        ),
                    }
                }
                Ok(r) => (
                    MirrorState::LeftPaused,
                    format!("its copy could not be compared with the snapshot: {}{kept}", r.detail),
                ),
                Err(e) => (
                    MirrorState::LeftPaused,
                    format!("its copy could not be compared with the snapshot: {e}{kept}"),
                ),
            };
            self.mutate(id, |e| {
                set_state(e.rollout, &m, state, &detail);
                event(
                    e.rollout,
                    format!(
                        "{} was rolled back; the backup {} fed from it by a live mirror: {detail}",
                        m.primaries.join(", "),
                        m.backup
                    ),
                );
                Ok(())
            })
            .await?;
        }
        Ok(())
    }
}
