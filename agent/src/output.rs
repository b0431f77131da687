//! Live output: a command's output file, sent to the controller as it grows.
//!
//! A step writes its output to a file in its journal directory, never to a
//! pipe the agent must drain, so a slow controller or a flood of output can
//! never block it. The tailer reads that file in chunks and hands them to
//! the session's bounded queue. When the queue stays full, it skips to the
//! end of the file and says how much it skipped: memory stays bounded by
//! one chunk and the queue, whatever the step prints. The whole output stays
//! in the journal, and its SHA-256 goes with the result.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio::sync::{mpsc, watch};
use wavegate_proto::v1::{self as pb, agent_message};

/// Bytes per chunk.
pub const CHUNK: usize = 32 * 1024;

/// How long a chunk may wait for room in the session before the tailer
/// skips ahead.
pub const PATIENCE: Duration = Duration::from_secs(1);

/// Which command an output file belongs to.
#[derive(Clone, Debug)]
pub struct Stream {
    /// The command's id.
    pub command_id: String,
    /// Its rollout.
    pub rollout_id: String,
    /// Its step, fetch or check.
    pub step: String,
    /// The site's redact patterns (on top of the built-in ones): only whole
    /// lines are sent, each masked first.
    pub redact: Vec<String>,
}

/// Send `path` to the controller as it grows, from its start, until `done`
/// says the command ended (then what is left is sent too).
pub async fn tail(path: PathBuf, s: Stream, tx: mpsc::Sender<pb::AgentMessage>, mut done: watch::Receiver<bool>) {
    // Masking keeps every byte's place, so offsets in the file are offsets
    // in what is sent; `offset` is where the next masked bytes start, and
    // what was read after it waits in the masker for its newline.
    let Ok(r) = wavegate_domain::redact::Redactor::new(&s.redact) else {
        return;
    };
    let mut masker = wavegate_domain::redact::Stream::new(r.clone());
    let mut read = 0u64;
    let mut offset = 0u64;
    let mut dropped = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let chunk = |data: Vec<u8>, offset: u64, dropped: u64| pb::AgentMessage {
        body: Some(agent_message::Body::Output(pb::OutputChunk {
            command_id: s.command_id.clone(),
            data,
            offset,
            dropped,
            rollout_id: s.rollout_id.clone(),
            step: s.step.clone(),
        })),
    };
    loop {
        let finished = *done.borrow_and_update();
        if let Ok(mut f) = tokio::fs::File::open(&path).await {
            loop {
                let len = f.metadata().await.map_or(0, |m| m.len());
                if read >= len {
                    break;
                }
                if f.seek(SeekFrom::Start(read)).await.is_err() {
                    break;
                }
                let want = usize::try_from(len - read).unwrap_or(CHUNK).min(CHUNK);
                let Ok(n) = f.read(&mut buf[..want]).await else { break };
                if n == 0 {
                    break;
                }
                read += n as u64;
                let data = masker.push(&buf[..n]);
                if data.is_empty() {
                    continue;
                }
                let sent = data.len() as u64;
                match tokio::time::timeout(PATIENCE, tx.send(chunk(data, offset, dropped))).await {
                    Ok(Ok(())) => {
                        offset += sent;
                        dropped = 0;
                    }
                    // The session is gone: the output stays in the journal.
                    Ok(Err(_)) => return,
                    // The session is full: skip what is there now. What
                    // was skipped may have opened a key block: the masker
                    // starts again suspicious of key-looking lines.
                    Err(_) => {
                        let now = f.metadata().await.map_or(len, |m| m.len());
                        dropped += now - offset;
                        offset = now;
                        read = now;
                        masker = wavegate_domain::redact::Stream::new(r.clone().after_gap());
                    }
                }
            }
        }
        if finished {
            break;
        }
        tokio::select! {
            _ = done.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let rest = masker.finish();
    if !rest.is_empty() || dropped > 0 {
        let _ = tokio::time::timeout(PATIENCE, tx.send(chunk(rest, offset, dropped))).await;
    }
}

/// Tail `path` while `work` runs; the tail is complete when this returns.
pub async fn while_running<T>(
    path: PathBuf,
    s: Stream,
    tx: &mpsc::Sender<pb::AgentMessage>,
    work: impl std::future::Future<Output = T>,
) -> T {
    let (done_tx, done_rx) = watch::channel(false);
    let tailer = tokio::spawn(tail(path, s, tx.clone(), done_rx));
    let out = work.await;
    let _ = done_tx.send(true);
    let _ = tailer.await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Stream {
        Stream {
            command_id: "c1".into(),
            rollout_id: "r1".into(),
            step: "s".into(),
            redact: Vec::new(),
        }
    }

    fn chunks(rx: &mut mpsc::Receiver<pb::AgentMessage>) -> Vec<pb::OutputChunk> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Some(agent_message::Body::Output(c)) = m.body {
                out.push(c);
            }
        }
        out
    }

    #[tokio::test]
    async fn output_arrives_in_order_and_whole_when_there_is_room() {
        let dir = std::env::temp_dir().join(format!("wavegate-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("output.log");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let (tx, mut rx) = mpsc::channel(64);
        while_running(path, stream(), &tx, async {}).await;
        let got = chunks(&mut rx);
        let mut all = Vec::new();
        for c in &got {
            assert_eq!(c.offset as usize, all.len(), "in order, no gap");
            assert_eq!(c.dropped, 0);
            all.extend_from_slice(&c.data);
        }
        assert_eq!(all, data);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_session_makes_it_skip_ahead_and_say_so_not_wait_or_grow() {
        let dir = std::env::temp_dir().join(format!("wavegate-tail-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("output.log");
        std::fs::write(&path, vec![b'x'; 10 * CHUNK]).expect("write");
        // Room for one message, and nobody reads until the tail is done.
        let (tx, mut rx) = mpsc::channel(1);
        while_running(path, stream(), &tx, async {}).await;
        let got = chunks(&mut rx);
        assert_eq!(got.len(), 1, "only what fits: {got:?}");
        assert_eq!(got[0].offset, 0);
        // The rest was dropped and would be said by the next chunk sent.
        let _ = std::fs::remove_dir_all(&dir);
    }
}
