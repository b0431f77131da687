//! The audit log's tamper evidence: a hash chain over records whose bodies
//! can be left out of an export without breaking the chain, and checkpoints
//! signed with the controller's Ed25519 key.
//!
//! `hash(n) = SHA-256("wavegate-audit" | n | hash(n-1) | SHA-256(body(n)))`.
//! Editing a body, removing, inserting or reordering records, or cutting the
//! log short (the signed checkpoint covers the head) is detected, and the
//! first bad record is named.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditBody {
    /// submit, event, host, refusal, ...
    pub kind: String,
    /// The rollout it concerns, if any.
    pub rollout: Option<String>,
    /// The host it concerns, if any.
    pub host: Option<String>,
    /// Who did it (certificate name), if a person.
    pub actor: Option<String>,
    /// One line for people.
    pub text: String,
    /// Structured detail (plan hash, targets, step result with output...).
    pub data: serde_json::Value,
}

/// One record of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// 1, 2, 3, ...
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    /// Hash of the previous record ([`GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 of the body's JSON (with `at_ms`).
    pub body_sha256: String,
    /// This record's chain hash.
    pub hash: String,
    /// The body; absent in an export filtered to other rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<AuditBody>,
}

/// A signed statement of the head of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Last record covered.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// Ed25519 signature over [`Checkpoint::message`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// What is signed.
    pub fn message(seq: u64, hash: &str) -> Vec<u8> {
        format!("wavegate-audit-checkpoint:{seq}:{hash}").into_bytes()
    }

    /// Sign the head.
    pub fn sign(key: &SigningKey, seq: u64, hash: &str) -> Checkpoint {
        let sig = key.sign(&Checkpoint::message(seq, hash));
        Checkpoint {
            seq,
            hash: hash.to_owned(),
            signature: hex::encode(sig.to_bytes()),
        }
    }

    /// Check the signature.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let Ok(bytes) = hex::decode(&self.signature) else {
            return false;
        };
        let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        key.verify_strict(&Checkpoint::message(self.seq, &self.hash), &Signature::from_bytes(&arr))
            .is_ok()
    }
}

/// SHA-256 of a body as stored.
pub fn body_digest(at_ms: u64, body: &AuditBody) -> String {
    let mut h = Sha256::new();
    h.update(at_ms.to_be_bytes());
    h.update(serde_json::to_vec(body).unwrap_or_default());
    hex::encode(h.finalize())
}

/// The chain hash of a record.
pub fn chain_hash(seq: u64, prev: &str, body_sha256: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"wavegate-audit");
    h.update(seq.to_be_bytes());
    h.update(prev.as_bytes());
    h.update(body_sha256.as_bytes());
    hex::encode(h.finalize())
}

/// The record after `prev` (None for the first).
pub fn next(prev: Option<&AuditRecord>, at_ms: u64, body: AuditBody) -> AuditRecord {
    let (seq, prev_hash) = match prev {
        Some(p) => (p.seq + 1, p.hash.clone()),
        None => (1, GENESIS.to_owned()),
    };
    let body_sha256 = body_digest(at_ms, &body);
    let hash = chain_hash(seq, &prev_hash, &body_sha256);
    AuditRecord {
        seq,
        at_ms,
        prev: prev_hash,
        body_sha256,
        hash,
        body: Some(body),
    }
}

/// Why a log does not verify: the first bad record, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("record {seq}: {why}")]
pub struct Tamper {
    /// The first record that does not verify.
    pub seq: u64,
    /// What is wrong with it.
    pub why: String,
}

/// Verify records in the order given (a whole log, from record 1), and the
/// checkpoint against `key`. Returns how many records verified.
pub fn verify(records: &[AuditRecord], checkpoint: &Checkpoint, key: &VerifyingKey) -> Result<usize, Tamper> {
    let mut prev_hash = GENESIS.to_owned();
    let mut expect = 1u64;
    for r in records {
        if r.seq != expect {
            let why = if r.seq > expect {
                format!("record {expect} is missing (found {} where {expect} should be)", r.seq)
            } else {
                format!("out of order: found {} after {}", r.seq, expect - 1)
            };
            return Err(Tamper {
                seq: expect.min(r.seq),
                why,
            });
        }
        if r.prev != prev_hash {
            return Err(Tamper {
                seq: r.seq,
                why: "does not follow the record before it (removed, inserted or reordered)".into(),
            });
        }
        if let Some(body) = &r.body
            && body_digest(r.at_ms, body) != r.body_sha256
        {
            return Err(Tamper {
                seq: r.seq,
                why: "its content was changed".into(),
            });
        }
        if chain_hash(r.seq, &r.prev, &r.body_sha256) != r.hash {
            return Err(Tamper {
                seq: r.seq,
                why: "its hash does not match its content".into(),
            });
        }
        prev_hash = r.hash.clone();
        expect += 1;
    }
    let last = expect - 1;
    if !checkpoint.verify(key) {
        return Err(Tamper {
            seq: checkpoint.seq,
            why: "the checkpoint's signature is not the controller's".into(),
        });
    }
    if checkpoint.seq != last || checkpoint.hash != prev_hash {
        let why = if checkpoint.seq > last {
            format!(
                "the signed checkpoint covers {} records but the log ends at {last}",
                checkpoint.seq
            )
        } else {
            format!("the log goes past the signed checkpoint at {}", checkpoint.seq)
        };
        return Err(Tamper {
            seq: (last + 1).min(checkpoint.seq.max(1)),
            why,
        });
    }
    Ok(records.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn log(n: u64) -> (Vec<AuditRecord>, Checkpoint) {
        let mut out: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let body = AuditBody {
                kind: "event".into(),
                rollout: Some(format!("r{}", i % 2)),
                host: None,
                actor: None,
                text: format!("event {i}"),
                data: serde_json::json!({"i": i}),
            };
            let r = next(out.last(), 1000 + i, body);
            out.push(r);
        }
        let last = out.last().expect("records");
        let cp = Checkpoint::sign(&key(), last.seq, &last.hash);
        (out, cp)
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (log, cp) = log(6);
        assert_eq!(verify(&log, &cp, &key().verifying_key()), Ok(6));
    }

    #[test]
    fn an_edit_a_removal_a_swap_and_a_cut_are_named() {
        let (good, cp) = log(6);
        let k = key().verifying_key();
        let mut edited = good.clone();
        if let Some(b) = edited[2].body.as_mut() {
            b.text = "event X".into();
        }
        assert_eq!(verify(&edited, &cp, &k).map_err(|t| t.seq), Err(3));
        let mut removed = good.clone();
        removed.remove(3);
        assert_eq!(verify(&removed, &cp, &k).map_err(|t| t.seq), Err(4));
        let mut swapped = good.clone();
        swapped.swap(1, 2);
        assert_eq!(verify(&swapped, &cp, &k).map_err(|t| t.seq), Err(2));
        let cut = good[..5].to_vec();
        assert_eq!(verify(&cut, &cp, &k).map_err(|t| t.seq), Err(6));
        let forged = Checkpoint::sign(&SigningKey::from_bytes(&[9u8; 32]), cp.seq, &cp.hash);
        assert!(verify(&good, &forged, &k).is_err(), "another key's checkpoint");
    }

    #[test]
    fn a_filtered_export_still_verifies_and_still_detects() {
        let (mut log, cp) = log(6);
        for r in &mut log {
            if r.body.as_ref().and_then(|b| b.rollout.as_deref()) != Some("r1") {
                r.body = None;
            }
        }
        assert_eq!(verify(&log, &cp, &key().verifying_key()), Ok(6));
        if let Some(b) = log[1].body.as_mut() {
            b.data = serde_json::json!({"i": 99});
        }
        assert_eq!(verify(&log, &cp, &key().verifying_key()).map_err(|t| t.seq), Err(2));
    }
}
