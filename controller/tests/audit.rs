//! The live audit log in the controller's store: editing one byte of one
//! stored record, deleting one and swapping two are each detected, naming
//! the first bad record.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable};
use wavegate::store::{AUDIT, Store};
use wavegate_domain::audit::AuditBody;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wavegate-audit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A store with six audit records.
fn fill(d: &Path) {
    let store = Store::open(d).expect("store");
    for i in 0..6 {
        store
            .audit_only(vec![AuditBody {
                kind: "event".into(),
                rollout: Some("r0001".into()),
                host: None,
                actor: Some("ann".into()),
                text: format!("event number {i}"),
                data: serde_json::json!({"i": i}),
            }])
            .expect("append");
    }
    assert_eq!(store.verify_audit().expect("read"), Ok(6), "an untouched log verifies");
}

/// Change the stored records directly in the database file, as someone
/// with access to the disk could.
fn tamper(d: &Path, f: impl FnOnce(&mut redb::Table<u64, &[u8]>)) {
    let db = Database::open(d.join("wavegate.redb")).expect("open");
    let txn = db.begin_write().expect("txn");
    {
        let mut t = txn.open_table(AUDIT).expect("table");
        f(&mut t);
    }
    txn.commit().expect("commit");
}

fn get(t: &redb::Table<u64, &[u8]>, k: u64) -> Vec<u8> {
    t.get(k).expect("get").expect("record").value().to_vec()
}

fn first_bad(d: &Path) -> u64 {
    let store = Store::open(d).expect("store");
    store
        .verify_audit()
        .expect("read")
        .expect_err("tampering must be detected")
        .seq
}

#[test]
fn an_edited_byte_is_detected() {
    let d = dir("edit");
    fill(&d);
    tamper(&d, |t| {
        let mut v = get(t, 3);
        let i = v.windows(6).position(|w| w == b"number").expect("text");
        v[i] = b'N';
        t.insert(3, v.as_slice()).expect("insert");
    });
    assert_eq!(first_bad(&d), 3);
}

#[test]
fn a_deleted_record_is_detected() {
    let d = dir("delete");
    fill(&d);
    tamper(&d, |t| {
        t.remove(4).expect("remove");
    });
    assert_eq!(first_bad(&d), 4);
    let d = dir("delete-last");
    fill(&d);
    tamper(&d, |t| {
        t.remove(6).expect("remove");
    });
    assert_eq!(first_bad(&d), 6, "the signed checkpoint covers the last record");
}

#[test]
fn swapped_records_are_detected() {
    let d = dir("swap");
    fill(&d);
    tamper(&d, |t| {
        let (a, b) = (get(t, 2), get(t, 3));
        t.insert(2, b.as_slice()).expect("insert");
        t.insert(3, a.as_slice()).expect("insert");
    });
    assert_eq!(first_bad(&d), 2);
}
