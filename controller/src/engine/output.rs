//! Live output: chunks from the agents, stored per rollout, host and step.
//!
//! Sessions hand chunks to a bounded queue and wait for room in it: a
//! flood of output slows the sending agent's session down (gRPC flow
//! control), and the agent then skips ahead and says how much; memory stays
//! bounded on both sides. One writer stores the chunks in batches. A chunk sent twice (after a reconnect the agent sends a step's
//! output again from the start) is stored once, by its offset. Each host
//! keeps at most a cap of output per rollout, and a rollout at most a cap
//! for all its hosts; past them, output is counted, not stored. When a step's result comes,
//! its stored output is checked against the agent's SHA-256 of the whole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::*;
use crate::store::OutputPiece;
use wavegate_domain::command::{OutputChunk, OutputSummary};

/// How many chunks (of at most 32 KiB) may wait for the writer.
const QUEUE: usize = 256;

/// The sessions' side of the output pipeline.
pub struct OutputSink {
    tx: mpsc::Sender<(String, OutputChunk)>,
    /// Chunks handed to the writer (or dropped) so far.
    queued: AtomicU64,
    /// Chunks the writer has dealt with (stored, or found nothing new in).
    done: watch::Sender<u64>,
}

impl OutputSink {
    /// A sink and the receiving end for [`writer`].
    pub(super) fn new() -> (OutputSink, mpsc::Receiver<(String, OutputChunk)>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (done, _) = watch::channel(0);
        (
            OutputSink {
                tx,
                queued: AtomicU64::new(0),
                done,
            },
            rx,
        )
    }
}

/// What the writer knows of one host's output in one rollout.
#[derive(Default)]
struct HostOutput {
    /// Where each step's stored output ends.
    ends: HashMap<String, u64>,
    /// Bytes stored.
    total: u64,
}

impl Engine {
    /// Take a chunk of output from `host`'s session, waiting for room.
    pub async fn accept_output(&self, host: &str, chunk: OutputChunk) {
        if chunk.rollout_id.is_empty() || chunk.step.is_empty() {
            return;
        }
        if chunk.dropped > 0 {
            // The agent could not send this much (its session was full).
            self.metrics.output_dropped.inc_by(chunk.dropped);
        }
        let sink = &self.output;
        sink.queued.fetch_add(1, Ordering::SeqCst);
        if sink.tx.send((host.to_owned(), chunk)).await.is_err() {
            sink.done.send_modify(|n| *n += 1);
        }
    }

    /// Wait (up to `limit`) until every chunk taken so far is stored.
    pub(super) async fn output_flushed(&self, limit: Duration) {
        let want = self.output.queued.load(Ordering::SeqCst);
        let mut rx = self.output.done.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n >= want)).await;
    }

    /// Something new was stored (for followers).
    pub fn output_changes(&self) -> watch::Receiver<u64> {
        self.output.done.subscribe()
    }

    /// Whether the output a reader follows is over: the rollout stopped, or
    /// every host it follows is done (with `step`: has a result for it).
    /// Once it has ended, every output chunk that arrived before is stored
    /// first: a failed step is judged (and may halt the rollout) before its
    /// output is checked, so the end can be seen before the output of the
    /// step that ended it is in the store.
    pub async fn output_ended(&self, id: &str, host: Option<&str>, step: Option<&str>) -> bool {
        let Ok(e) = self.get(id).await else { return true };
        // A rollout awaiting approval has not started: a follow waits for it.
        let ended = !matches!(
            e.rollout.state,
            RolloutState::Running | RolloutState::Paused | RolloutState::AwaitingApproval
        ) || e
            .hosts
            .values()
            .filter(|h| host.is_none_or(|x| h.host == x))
            .all(|h| match step {
                Some(s) => h.results.iter().any(|r| r.step == s),
                None => matches!(h.state, HostState::Healthy | HostState::Failed) && h.reboot.is_none(),
            });
        if ended {
            self.output_flushed(Duration::from_secs(10)).await;
        }
        ended
    }

    /// One summary per host and step: what is stored, and whether it is the
    /// whole output.
    pub async fn output_summary(&self, id: &str, host: Option<&str>, step: Option<&str>) -> Vec<OutputSummary> {
        let Ok(e) = self.get(id).await else { return Vec::new() };
        let mut out = Vec::new();
        for h in e.hosts.values().filter(|h| host.is_none_or(|x| h.host == x)) {
            let ends = self
                .store
                .output_ends(id.to_owned(), h.host.clone())
                .await
                .unwrap_or_default();
            let mut seen = std::collections::BTreeSet::new();
            for r in h.results.iter().rev().filter(|r| step.is_none_or(|s| r.step == s)) {
                if seen.insert(r.step.clone()) {
                    out.push(OutputSummary {
                        host: h.host.clone(),
                        step: r.step.clone(),
                        stored: r.output_stored,
                        verified: r.output_verified.clone(),
                    });
                }
            }
            for (s, end) in ends {
                if step.is_none_or(|x| x == s) && seen.insert(s.clone()) {
                    out.push(OutputSummary {
                        host: h.host.clone(),
                        step: s,
                        stored: end,
                        verified: String::new(),
                    });
                }
            }
        }
        out
    }

    /// Check a step's stored output against the agent's SHA-256 of the whole:
    /// (bytes stored, "ok" or why not).
    pub(super) async fn verify_output(&self, id: &str, host: &str, step: &str, sha256: &str) -> (u64, String) {
        self.output_flushed(Duration::from_secs(10)).await;
        let digest = self
            .store
            .output_digest(id.to_owned(), host.to_owned(), step.to_owned())
            .await;
        match digest {
            Ok((bytes, sha, gap)) => {
                let verdict = if sha == sha256 {
                    "ok".to_owned()
                } else if gap {
                    "incomplete: part of it was dropped on the way; the agent's journal has all of it".to_owned()
                } else {
                    "incomplete: only the start is stored (dropped on the way or over the cap); the agent's journal has all of it"
                        .to_owned()
                };
                (bytes, verdict)
            }
            Err(e) => (0, format!("not checked: {e:#}")),
        }
    }
}

/// The output writer: takes what the sessions queued, drops what is stored
/// already or over the cap, stores the rest in batches.
pub(super) async fn writer(
    engine: Weak<Engine>,
    mut rx: mpsc::Receiver<(String, OutputChunk)>,
    (cap, rollout_cap): (u64, u64),
) {
    let mut hosts: HashMap<(String, String), HostOutput> = HashMap::new();
    // Bytes stored per rollout, every host together.
    let mut rollouts: HashMap<String, u64> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let mut bytes = batch[0].1.data.len();
        while batch.len() < 512 && bytes < 4 << 20 {
            match rx.try_recv() {
                Ok(c) => {
                    bytes += c.1.data.len();
                    batch.push(c);
                }
                Err(_) => break,
            }
        }
        let Some(engine) = engine.upgrade() else { return };
        let n = batch.len() as u64;
        let mut pieces = Vec::new();
        for (host, c) in batch {
            let key = (c.rollout_id.clone(), host.clone());
            if !rollouts.contains_key(&c.rollout_id) {
                // What an earlier run stored for every host of the rollout.
                let mut total = 0;
                if let Ok(e) = engine.get(&c.rollout_id).await {
                    for h in e.hosts.keys() {
                        let known = engine
                            .store
                            .output_ends(c.rollout_id.clone(), h.clone())
                            .await
                            .unwrap_or_default();
                        total += known.iter().map(|(_, e)| e).sum::<u64>();
                    }
                }
                rollouts.insert(c.rollout_id.clone(), total);
            }
            if !hosts.contains_key(&key) {
                // What an earlier run of the controller stored already.
                let (r, h) = key.clone();
                let known = engine.store.output_ends(r, h).await.unwrap_or_default();
                let ho = HostOutput {
                    total: known.iter().map(|(_, e)| e).sum(),
                    ends: known.into_iter().collect(),
                };
                hosts.insert(key.clone(), ho);
            }
            let Some(ho) = hosts.get_mut(&key) else { continue };
            let end = ho.ends.get(&c.step).copied().unwrap_or(0);
            let len = c.data.len() as u64;
            if len == 0 || c.offset + len <= end {
                continue;
            }
            let (offset, data) = if c.offset < end {
                (end, c.data[usize::try_from(end - c.offset).unwrap_or(0)..].to_vec())
            } else {
                (c.offset, c.data)
            };
            let in_rollout = rollouts.get(&c.rollout_id).copied().unwrap_or(0);
            if ho.total + data.len() as u64 > cap || in_rollout + data.len() as u64 > rollout_cap {
                engine.metrics.output_capped.inc_by(data.len() as u64);
                continue;
            }
            ho.total += data.len() as u64;
            rollouts.insert(c.rollout_id.clone(), in_rollout + data.len() as u64);
            ho.ends.insert(c.step.clone(), offset + data.len() as u64);
            pieces.push(OutputPiece {
                rollout: c.rollout_id,
                host,
                step: c.step,
                offset,
                data,
            });
        }
        let stored: u64 = pieces.iter().map(|p| p.data.len() as u64).sum();
        match engine.store.append_output(pieces).await {
            Ok(()) => engine.metrics.output_bytes.inc_by(stored),
            Err(e) => warn!(error = %format!("{e:#}"), "Could not store output; it stays in the agents' journals."),
        }
        engine.output.done.send_modify(|d| *d += n);
    }
}
