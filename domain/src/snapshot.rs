//! The life of a host's pre-change snapshot: pinned until its wave is
//! confirmed healthy, then retained for `snapshot.retain`, then released.
//!
//! Nothing releases the snapshot of an unconfirmed wave: not retention, not
//! disk pressure, not a halt or a resume; only an operator's explicit force,
//! which names who forced it (and is recorded by the caller).

use serde::{Deserialize, Serialize};

/// Where a snapshot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SnapshotState {
    /// Its wave is not confirmed: it must be kept.
    Pinned,
    /// Its wave is confirmed; it may be released after this time.
    Retained {
        /// Unix milliseconds.
        release_after_ms: u64,
    },
    /// Deleted from the host.
    Released,
}

impl SnapshotState {
    /// The status string.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Pinned => "pinned",
            SnapshotState::Retained { .. } => "retained",
            SnapshotState::Released => "released",
        }
    }
}

/// Something that happens to a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotEvent {
    /// Its wave was confirmed healthy.
    WaveConfirmed {
        /// Now, Unix milliseconds.
        now_ms: u64,
        /// How long to keep it after confirmation.
        retain_ms: u64,
    },
    /// Time passes (the retention sweep).
    Tick {
        /// Now, Unix milliseconds.
        now_ms: u64,
    },
    /// The host's disk is filling up.
    DiskPressure,
    /// The rollout halted.
    Halted,
    /// The rollout resumed.
    Resumed,
    /// The host was restored from it.
    Restored,
    /// An operator asked to release it without forcing.
    OperatorRelease {
        /// Who asked.
        by: String,
    },
    /// An operator forced its release (explicit and recorded).
    ForceRelease {
        /// Who forced it.
        by: String,
    },
}

/// A snapshot as the controller tracks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Where it is.
    pub state: SnapshotState,
    /// Archive size.
    pub bytes: u64,
    /// Paths in it.
    pub files: u64,
    /// When it was taken and verified.
    pub taken_ms: u64,
    /// Whether its wave was confirmed.
    pub wave_confirmed: bool,
    /// Who forced its release, if someone did.
    pub forced_by: Option<String>,
    /// One per filesystem the write set lives on, with the backend that
    /// keeps it.
    #[serde(default)]
    pub parts: Vec<SnapshotPart>,
}

/// One filesystem's share of a host's snapshot, as the agent reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPart {
    /// The backend that keeps it.
    pub backend: crate::command::SnapshotBackend,
    /// Host path of the mount holding it.
    pub mount: String,
    /// Its filesystem type.
    #[serde(default)]
    pub fstype: String,
    /// The write-set paths it holds.
    #[serde(default)]
    pub roots: Vec<String>,
    /// Paths in it.
    #[serde(default)]
    pub files: u64,
    /// Bytes it keeps (the archive; for a btrfs snapshot, the data it
    /// references).
    #[serde(default)]
    pub bytes: u64,
    /// Why this backend, when it is not the filesystem's best.
    #[serde(default)]
    pub note: String,
}

impl SnapshotRecord {
    /// The backends of its parts, like `btrfs:/home, tar+zstd:/`.
    pub fn backends(&self) -> String {
        if self.parts.is_empty() {
            return "tar+zstd".into();
        }
        self.parts
            .iter()
            .map(|p| format!("{}:{}", p.backend, p.mount))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl SnapshotRecord {
    /// A verified snapshot, pinned.
    pub fn pinned(bytes: u64, files: u64, taken_ms: u64) -> SnapshotRecord {
        SnapshotRecord {
            state: SnapshotState::Pinned,
            bytes,
            files,
            taken_ms,
            wave_confirmed: false,
            forced_by: None,
            parts: Vec::new(),
        }
    }

    /// Apply an event. Returns true when the snapshot must now be deleted
    /// from the host.
    pub fn apply(&mut self, event: &SnapshotEvent) -> bool {
        if self.state == SnapshotState::Released {
            return false;
        }
        match (self.state, event) {
            (SnapshotState::Pinned, SnapshotEvent::WaveConfirmed { now_ms, retain_ms }) => {
                self.wave_confirmed = true;
                self.state = SnapshotState::Retained {
                    release_after_ms: now_ms.saturating_add(*retain_ms),
                };
                false
            }
            (SnapshotState::Retained { release_after_ms }, SnapshotEvent::Tick { now_ms })
                if *now_ms >= release_after_ms =>
            {
                self.state = SnapshotState::Released;
                true
            }
            (_, SnapshotEvent::ForceRelease { by }) => {
                self.forced_by = Some(by.clone());
                self.state = SnapshotState::Released;
                true
            }
            // Retention may be cut short by a person only once the wave is
            // confirmed; a pinned snapshot needs a force.
            (SnapshotState::Retained { .. }, SnapshotEvent::OperatorRelease { .. }) => {
                self.state = SnapshotState::Released;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        let mut s = SnapshotRecord::pinned(10, 2, 0);
        assert!(
            !s.apply(&SnapshotEvent::Tick { now_ms: u64::MAX }),
            "retention never releases a pinned snapshot"
        );
        assert!(!s.apply(&SnapshotEvent::DiskPressure));
        assert!(
            !s.apply(&SnapshotEvent::OperatorRelease { by: "ann".into() }),
            "a pinned snapshot needs a force"
        );
        assert!(!s.apply(&SnapshotEvent::WaveConfirmed {
            now_ms: 100,
            retain_ms: 50
        }));
        assert!(!s.apply(&SnapshotEvent::Tick { now_ms: 149 }));
        assert!(s.apply(&SnapshotEvent::Tick { now_ms: 150 }));
        assert_eq!(s.state, SnapshotState::Released);
        assert!(!s.apply(&SnapshotEvent::Tick { now_ms: 999 }), "released once");
    }
}
