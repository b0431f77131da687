//! A rollout being changed: the only way the engine's mutations reach a
//! host record, so that every host a change touches is stored and audited
//! with it. (A module of its own: its fields are private even to the rest
//! of the engine.)

use std::collections::{BTreeMap, BTreeSet, HashSet};

use wavegate_domain::rollout::{HostRecord, Rollout};

use super::{EngineError, Entry};

/// A rollout being changed in one commit: the rollout itself, and its host
/// records through [`Change::host_mut`], which notes every host it hands
/// out. The hosts a change touched are the ones stored and audited with it;
/// there is no other way to change one, so none is changed unrecorded.
pub struct Change<'a> {
    /// The rollout.
    pub rollout: &'a mut Rollout,
    hosts: &'a mut BTreeMap<String, HostRecord>,
    touched: BTreeSet<String>,
    sent: &'a HashSet<String>,
}

impl<'a> Change<'a> {
    pub(super) fn new(entry: &'a mut Entry, sent: &'a HashSet<String>) -> Change<'a> {
        Change {
            rollout: &mut entry.rollout,
            hosts: &mut entry.hosts,
            touched: BTreeSet::new(),
            sent,
        }
    }

    /// Whether the real step `command_id` was handed to a session (or may
    /// have been, before a restart).
    pub fn was_sent(&self, command_id: &str) -> bool {
        self.sent.contains(command_id)
    }

    /// The host records, to read.
    pub fn hosts(&self) -> &BTreeMap<String, HostRecord> {
        self.hosts
    }

    /// One host's record, to change.
    pub fn host_mut(&mut self, host: &str) -> Result<&mut HostRecord, EngineError> {
        let h = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
        self.touched.insert(host.to_owned());
        Ok(h)
    }

    /// The rollout, to read, and one host's record, to change.
    pub fn rollout_and_host(&mut self, host: &str) -> Result<(&Rollout, &mut HostRecord), EngineError> {
        let h = self
            .hosts
            .get_mut(host)
            .ok_or_else(|| EngineError::NotFound(host.to_owned()))?;
        self.touched.insert(host.to_owned());
        Ok((self.rollout, h))
    }

    /// The records of the hosts `keep` picks, to change.
    pub fn hosts_mut_where(&mut self, keep: impl Fn(&HostRecord) -> bool) -> Vec<&mut HostRecord> {
        let picked: Vec<&mut HostRecord> = self.hosts.values_mut().filter(|h| keep(h)).collect();
        self.touched.extend(picked.iter().map(|h| h.host.clone()));
        picked
    }

    /// A transition of the rollout's own (`domain::rollout`) that moves
    /// hosts too: it says which hosts it changed.
    pub fn rollout_and_hosts<R, E>(
        &mut self,
        f: impl FnOnce(&mut Rollout, &mut BTreeMap<String, HostRecord>) -> Result<(R, Vec<String>), E>,
    ) -> Result<R, E> {
        let (out, changed) = f(self.rollout, self.hosts)?;
        self.touched.extend(changed);
        Ok(out)
    }
}

impl Change<'_> {
    /// The hosts this change touched.
    pub(super) fn touched(self) -> BTreeSet<String> {
        self.touched
    }
}
