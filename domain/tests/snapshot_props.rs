//! Every order of events: a snapshot of an unconfirmed wave is never released
//! unless a named operator forced it.

use proptest::prelude::*;
use wavegate_domain::snapshot::{SnapshotEvent, SnapshotRecord, SnapshotState};

fn event() -> impl Strategy<Value = SnapshotEvent> {
    prop_oneof![
        (0u64..1_000, 0u64..500).prop_map(|(now_ms, retain_ms)| SnapshotEvent::WaveConfirmed { now_ms, retain_ms }),
        (0u64..2_000).prop_map(|now_ms| SnapshotEvent::Tick { now_ms }),
        Just(SnapshotEvent::DiskPressure),
        Just(SnapshotEvent::Halted),
        Just(SnapshotEvent::Resumed),
        Just(SnapshotEvent::Restored),
        Just(SnapshotEvent::OperatorRelease { by: "ann".into() }),
        Just(SnapshotEvent::ForceRelease { by: "bob".into() }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, .. ProptestConfig::default() })]

    #[test]
    fn no_unconfirmed_snapshot_is_ever_released_without_a_recorded_force(events in proptest::collection::vec(event(), 0..30)) {
        let mut s = SnapshotRecord::pinned(1, 1, 0);
        let mut confirmed_at: Option<(u64, u64)> = None;
        let mut released_by_signal = 0;
        for e in &events {
            if let (SnapshotState::Pinned, SnapshotEvent::WaveConfirmed { now_ms, retain_ms }) = (s.state, e) {
                confirmed_at = Some((*now_ms, *retain_ms));
            }
            let was = s.state;
            if s.apply(e) {
                released_by_signal += 1;
                prop_assert_eq!(s.state, SnapshotState::Released);
                match e {
                    SnapshotEvent::ForceRelease { .. } => prop_assert!(s.forced_by.is_some()),
                    SnapshotEvent::Tick { now_ms } => {
                        let (at, retain) = confirmed_at.expect("released by time only after confirmation");
                        prop_assert!(*now_ms >= at + retain, "released before its retention ended");
                    }
                    SnapshotEvent::OperatorRelease { .. } => {
                        let retained = matches!(was, SnapshotState::Retained { .. });
                        prop_assert!(retained, "an operator released a pinned snapshot without forcing");
                    }
                    other => prop_assert!(false, "released by {:?}", other),
                }
            }
            if s.state == SnapshotState::Released {
                prop_assert!(s.wave_confirmed || s.forced_by.is_some(), "an unconfirmed wave's snapshot was released unforced");
            }
        }
        prop_assert!(released_by_signal <= 1, "a snapshot is deleted at most once");
    }
}
