//! The fleet inventory and its backup graph.
//!
//! [`Fleet`] wraps a petgraph graph whose edges run from a primary to each host
//! that holds copies of it. Construction refuses every inventory that would
//! make "a host and its backup" ambiguous: cycles, self-backups, dangling
//! `backup_of`, duplicate ids, a backup that backs nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use petgraph::Direction;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::violation::{Code, Loc, Violation};
use crate::yaml::{self, Source, loc_of};

/// The inventory as written (FORMATS.md "Fleet inventory").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryDoc {
    hosts: Option<Spanned<Vec<Spanned<HostDoc>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostDoc {
    id: Spanned<String>,
    address: Option<String>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    failure_domain: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    backup_of: Option<Spanned<Vec<Spanned<String>>>>,
    mirror: Option<Spanned<MirrorDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorDoc {
    feed: Option<String>,
    pause: Option<Spanned<String>>,
    resume: Option<Spanned<String>>,
    #[serde(alias = "snapshot-before")]
    snapshot_before: Option<SnapshotBeforeDoc>,
}

/// `snapshot_before: true` (the plan's write set, on the backup) or the
/// backup's own paths.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SnapshotBeforeDoc {
    WriteSet(bool),
    Paths(Vec<String>),
}

/// How a backup is fed from its primaries by a live mirror (rsync every
/// few minutes, DRBD, database replication), and how wavegate keeps a
/// primary's damage from reaching it during the primary's wave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mirror {
    /// What feeds it, for people (`rsync every minute from p09`).
    pub feed: Option<String>,
    /// Run on the backup before a primary's wave; returns once the mirror
    /// is paused.
    pub pause: Option<String>,
    /// Run on the backup once the primary's wave is confirmed.
    pub resume: Option<String>,
    /// The backup's copy of its primaries' data: snapshotted before a
    /// primary's wave and restored if the primary is rolled back.
    pub snapshot_before: Vec<String>,
    /// `snapshot_before: true`: the plan's write set, as the backup holds
    /// it, is that copy.
    pub snapshot_write_set: bool,
}

impl Mirror {
    /// Whether wavegate can keep a primary's damage from it: by pausing
    /// it, or by a snapshot of the backup's copy to restore.
    pub fn guarded(&self) -> bool {
        self.pause.is_some() || !self.snapshot_before.is_empty() || self.snapshot_write_set
    }

    /// The backup's paths to snapshot before a wave, given the plan's
    /// write set; empty: none.
    pub fn snapshot_paths(&self, write_set: &[String]) -> Vec<String> {
        if self.snapshot_write_set {
            write_set.to_vec()
        } else {
            self.snapshot_before.clone()
        }
    }
}

/// What a host is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Serves customers and has backups.
    Primary,
    /// Holds copies of one or more other hosts.
    Backup,
    /// Neither.
    Standalone,
}

impl Role {
    /// Every role, in the order an operator reads them.
    pub const ALL: [Role; 3] = [Role::Primary, Role::Backup, Role::Standalone];

    /// The role a word names (`primary`, `backup`, `standalone`).
    pub fn parse(word: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == word)
    }

    /// Its name in an inventory and a plan.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Standalone => "standalone",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Index of a host in its [`Fleet`]: a newtype over the graph's node index so
/// that it cannot be mixed up with other indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostIdx(NodeIndex<u32>);

impl HostIdx {
    /// Position of the host in inventory order.
    pub fn index(self) -> usize {
        self.0.index()
    }
}

/// One host of the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Unique id, `[a-z0-9][a-z0-9._-]*`.
    pub id: String,
    /// Address for SSH bootstrap and probes.
    pub address: Option<String>,
    /// Groups, sorted.
    pub groups: BTreeSet<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Hosts that fail together share a failure domain.
    pub failure_domain: Option<String>,
    /// What the host is for.
    pub role: Role,
    /// Hosts this one holds copies of.
    pub backup_of: Vec<String>,
    /// How it is fed by a live mirror, if it is.
    pub mirror: Option<Mirror>,
    /// Where the host is defined.
    pub loc: Loc,
}

/// A validated inventory with its backup graph.
#[derive(Debug)]
pub struct Fleet {
    file: String,
    graph: DiGraph<Host, ()>,
    by_id: HashMap<String, HostIdx>,
    groups: BTreeMap<String, Vec<HostIdx>>,
}

/// A backup's `mirror:`, checked: only on a backup; `pause` and `resume`
/// together; `snapshot_before` paths absolute and not `/`.
fn mirror(file: &str, id: &str, role: Role, i: usize, m: Spanned<MirrorDoc>, problems: &mut Vec<Violation>) -> Mirror {
    let loc = loc_of(file, &m);
    let field = format!("hosts[{i}].mirror");
    let bad = |at: &Loc, f: String, msg: String, fix: &str| {
        Violation::new(Code::InventoryInvalid, msg)
            .at(at)
            .field(f)
            .hosts([id.to_owned()])
            .fix(fix)
    };
    let m = m.value;
    if role != Role::Backup {
        problems.push(bad(
            &loc,
            field.clone(),
            format!("host `{id}` has a `mirror` but its role is {role}"),
            "a mirror feeds a backup: set `role: backup` and `backup_of`, or remove `mirror`",
        ));
    }
    if m.pause.is_some() != m.resume.is_some() {
        problems.push(bad(
            &loc,
            field.clone(),
            format!(
                "the mirror of `{id}` has {} without {}",
                if m.pause.is_some() { "`pause`" } else { "`resume`" },
                if m.pause.is_some() { "`resume`" } else { "`pause`" }
            ),
            "give both: `pause` runs before a primary's wave, `resume` once it is confirmed",
        ));
    }
    let mut paths = Vec::new();
    let snapshot_write_set = matches!(m.snapshot_before, Some(SnapshotBeforeDoc::WriteSet(true)));
    if let Some(SnapshotBeforeDoc::Paths(list)) = &m.snapshot_before {
        for (j, p) in list.iter().enumerate() {
            match crate::plan::normalise_write_path(p) {
                Ok(n) => paths.push(n),
                Err(why) => problems.push(bad(
                    &loc,
                    format!("{field}.snapshot_before[{j}]"),
                    format!("the mirror path `{p}` of `{id}` {why}"),
                    "write the absolute path of the backup's copy, like /srv/mirror/p09, or `snapshot_before: true` for the plan's write set",
                )),
            }
        }
    }
    Mirror {
        feed: m.feed,
        pause: m.pause.map(|p| p.value),
        resume: m.resume.map(|r| r.value),
        snapshot_before: paths,
        snapshot_write_set,
    }
}

/// Whether `id` is a valid host id (it names the agent's certificate too).
pub fn is_valid_host_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
        && id.len() <= 253
}

impl Fleet {
    /// Parse and validate an inventory, reporting every problem at once.
    pub fn parse(source: Source<'_>) -> Result<Fleet, Vec<Violation>> {
        let doc: InventoryDoc = yaml::parse(source, "fleet inventory").map_err(|v| vec![*v])?;
        Fleet::from_doc(source.name, doc)
    }

    fn from_doc(file: &str, doc: InventoryDoc) -> Result<Fleet, Vec<Violation>> {
        let mut problems = Vec::new();
        let Some(hosts) = doc.hosts else {
            return Err(vec![
                Violation::new(Code::InventoryInvalid, "the inventory has no `hosts:` list")
                    .at(&Loc::file(file))
                    .field("hosts")
                    .fix("list every host the controller may touch under `hosts:`"),
            ]);
        };
        let mut graph: DiGraph<Host, ()> = DiGraph::with_capacity(hosts.value.len(), 0);
        let mut by_id: HashMap<String, HostIdx> = HashMap::with_capacity(hosts.value.len());
        let mut pending_edges = Vec::new();

        for (i, host) in hosts.value.into_iter().enumerate() {
            let h = host.value;
            let field = format!("hosts[{i}]");
            let id_loc = loc_of(file, &h.id);
            let id = h.id.value.clone();
            if !is_valid_host_id(&id) {
                problems.push(
                    Violation::new(Code::InventoryInvalid, format!("host id `{id}` is not a valid id"))
                        .at(&id_loc)
                        .field(format!("{field}.id"))
                        .hosts([id.clone()])
                        .fix("use lower-case letters, digits, `.`, `_` and `-`, starting with a letter or digit"),
                );
            }
            let role = match h.role.as_ref() {
                None => Role::Standalone,
                Some(r) => Role::parse(&r.value).unwrap_or_else(|| {
                    problems.push(
                        Violation::new(
                            Code::ParseError,
                            format!("host `{id}` has role `{}`, which is not a role", r.value),
                        )
                        .at(&loc_of(file, r))
                        .field(format!("{field}.role"))
                        .hosts([id.clone()])
                        .fix("write `role: primary`, `role: backup` or `role: standalone`"),
                    );
                    Role::Standalone
                }),
            };
            let backup_of: Vec<Spanned<String>> = h.backup_of.map(|b| b.value).unwrap_or_default();
            match (role, backup_of.is_empty()) {
                (Role::Backup, true) => problems.push(
                    Violation::new(
                        Code::InventoryInvalid,
                        format!("backup host `{id}` does not say what it backs up"),
                    )
                    .at(&id_loc)
                    .field(format!("{field}.backup_of"))
                    .hosts([id.clone()])
                    .fix("add `backup_of: [<primary ids>]`, or change its role"),
                ),
                (Role::Primary | Role::Standalone, false) => problems.push(
                    Violation::new(
                        Code::InventoryInvalid,
                        format!("host `{id}` has `backup_of` but its role is {role}"),
                    )
                    .at(&loc_of(file, &backup_of[0]))
                    .field(format!("{field}.backup_of"))
                    .hosts([id.clone()])
                    .fix("set `role: backup`, or remove `backup_of`"),
                ),
                _ => {}
            }
            if let Some(prev) = by_id.get(&id) {
                let first = &graph[prev.0].loc;
                problems.push(
                    Violation::new(
                        Code::InventoryInvalid,
                        format!("host id `{id}` is defined twice (first at {first})"),
                    )
                    .at(&id_loc)
                    .field(format!("{field}.id"))
                    .hosts([id.clone()])
                    .fix("give every host a unique id"),
                );
                continue;
            }
            for target in &backup_of {
                pending_edges.push((id.clone(), target.value.clone(), loc_of(file, target), i));
            }
            let mirror = h.mirror.map(|m| mirror(file, &id, role, i, m, &mut problems));
            let node = graph.add_node(Host {
                id: id.clone(),
                address: h.address,
                groups: h.groups.into_iter().map(|g| g.value).collect(),
                labels: h.labels.into_iter().map(|(k, v)| (k, v.value)).collect(),
                failure_domain: h.failure_domain.map(|f| f.value),
                role,
                backup_of: backup_of.iter().map(|b| b.value.clone()).collect(),
                mirror,
                loc: id_loc,
            });
            by_id.insert(id, HostIdx(node));
        }

        for (backup, primary, loc, i) in pending_edges {
            let field = format!("hosts[{i}].backup_of");
            if backup == primary {
                problems.push(
                    Violation::new(
                        Code::InventoryInvalid,
                        format!("host `{backup}` is listed as its own backup"),
                    )
                    .at(&loc)
                    .field(field)
                    .hosts([backup])
                    .fix("a backup must be another host, in another failure domain"),
                );
                continue;
            }
            let (Some(&b), Some(&p)) = (by_id.get(&backup), by_id.get(&primary)) else {
                problems.push(
                    Violation::new(
                        Code::InventoryInvalid,
                        format!("host `{backup}` backs up `{primary}`, which is not in the inventory"),
                    )
                    .at(&loc)
                    .field(field)
                    .hosts([backup, primary])
                    .fix("add the primary to the inventory, or correct the id"),
                );
                continue;
            };
            if graph.find_edge(p.0, b.0).is_none() {
                graph.add_edge(p.0, b.0, ());
            }
        }

        for scc in tarjan_scc(&graph) {
            if scc.len() > 1 {
                let mut ids: Vec<String> = scc.iter().map(|n| graph[*n].id.clone()).collect();
                ids.sort();
                let loc = scc
                    .iter()
                    .map(|n| graph[*n].loc.clone())
                    .min_by_key(|l| l.line)
                    .unwrap_or_default();
                problems.push(
                    Violation::new(
                        Code::InventoryInvalid,
                        format!("backup relations form a cycle: {}", ids.join(" -> ")),
                    )
                    .at(&loc)
                    .field("hosts[].backup_of")
                    .hosts(ids)
                    .fix("a host cannot (through any chain) back up one of its own backups; break the cycle"),
                );
            }
        }

        if !problems.is_empty() {
            problems.sort_by_key(|v| (v.line, v.column));
            return Err(problems);
        }
        let mut groups: BTreeMap<String, Vec<HostIdx>> = BTreeMap::new();
        for idx in graph.node_indices() {
            for g in &graph[idx].groups {
                groups.entry(g.clone()).or_default().push(HostIdx(idx));
            }
        }
        Ok(Fleet {
            file: file.to_owned(),
            graph,
            by_id,
            groups,
        })
    }

    /// The file the inventory came from.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    /// Whether the inventory has no hosts.
    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// A host by index.
    pub fn host(&self, idx: HostIdx) -> &Host {
        &self.graph[idx.0]
    }

    /// Look a host up by id.
    pub fn lookup(&self, id: &str) -> Option<HostIdx> {
        self.by_id.get(id).copied()
    }

    /// Every host, in inventory order.
    pub fn hosts(&self) -> impl Iterator<Item = HostIdx> + '_ {
        self.graph.node_indices().map(HostIdx)
    }

    /// Hosts of a group, in inventory order; `None` for a group nobody is in.
    pub fn group(&self, group: &str) -> Option<&[HostIdx]> {
        self.groups.get(group).map(Vec::as_slice)
    }

    /// Hosts that directly hold copies of `idx`.
    pub fn direct_backups(&self, idx: HostIdx) -> impl Iterator<Item = HostIdx> + '_ {
        self.graph
            .edges_directed(idx.0, Direction::Outgoing)
            .map(|e| HostIdx(e.target()))
    }

    /// Hosts that `idx` directly holds copies of.
    pub fn direct_primaries(&self, idx: HostIdx) -> impl Iterator<Item = HostIdx> + '_ {
        self.graph
            .edges_directed(idx.0, Direction::Incoming)
            .map(|e| HostIdx(e.source()))
    }

    /// Every host that backs `idx` up, directly or through a chain.
    pub fn backups_transitive(&self, idx: HostIdx) -> BTreeSet<HostIdx> {
        self.walk(idx, Direction::Outgoing)
    }

    /// Every host that `idx` backs up, directly or through a chain.
    pub fn primaries_transitive(&self, idx: HostIdx) -> BTreeSet<HostIdx> {
        self.walk(idx, Direction::Incoming)
    }

    fn walk(&self, start: HostIdx, dir: Direction) -> BTreeSet<HostIdx> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.0];
        while let Some(n) = stack.pop() {
            for next in self.graph.neighbors_directed(n, dir) {
                if seen.insert(HostIdx(next)) {
                    stack.push(next);
                }
            }
        }
        seen
    }

    /// The id of a host.
    pub fn id(&self, idx: HostIdx) -> &str {
        &self.graph[idx.0].id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Fleet, Vec<Violation>> {
        Fleet::parse(Source {
            name: "fleet.yaml",
            text,
        })
    }

    fn codes(text: &str) -> Vec<(Code, Vec<String>)> {
        parse(text)
            .expect_err("must be refused")
            .into_iter()
            .map(|v| (v.code, v.hosts))
            .collect()
    }

    #[test]
    fn parses_the_formats_example() {
        let fleet = parse(
            "hosts:
  - id: p09
    address: 10.0.9.1
    groups: [g-biz2]
    labels: {rack: A09, os: debian12, tenant-tier: gold}
    failure_domain: dc1-rackA09
    role: primary
  - id: b09
    groups: [g-biz2-backup]
    failure_domain: dc1-rackB09
    role: backup
    backup_of: [p09]
",
        )
        .expect("valid");
        let p = fleet.lookup("p09").expect("p09");
        let b = fleet.lookup("b09").expect("b09");
        assert_eq!(fleet.host(p).role, Role::Primary);
        assert_eq!(fleet.host(p).labels["os"], "debian12");
        assert_eq!(fleet.backups_transitive(p), BTreeSet::from([b]));
        assert_eq!(fleet.primaries_transitive(b), BTreeSet::from([p]));
        assert_eq!(fleet.group("g-biz2"), Some(&[p][..]));
    }

    #[test]
    fn chains_are_transitive() {
        let fleet = parse(
            "hosts:
  - {id: p1, role: primary}
  - {id: b1, role: backup, backup_of: [p1]}
  - {id: b2, role: backup, backup_of: [b1]}
",
        )
        .expect("valid");
        let p1 = fleet.lookup("p1").expect("p1");
        let ids: Vec<&str> = fleet.backups_transitive(p1).into_iter().map(|h| fleet.id(h)).collect();
        assert_eq!(ids, ["b1", "b2"]);
    }

    #[test]
    fn refuses_cycles_naming_the_hosts() {
        let got = codes(
            "hosts:
  - {id: a, role: backup, backup_of: [c]}
  - {id: b, role: backup, backup_of: [a]}
  - {id: c, role: backup, backup_of: [b]}
",
        );
        assert_eq!(
            got,
            vec![(Code::InventoryInvalid, vec!["a".into(), "b".into(), "c".into()])]
        );
    }

    #[test]
    fn refuses_self_backup_dangling_duplicate_and_missing_backup_of() {
        let errs = parse(
            "hosts:
  - {id: a, role: backup, backup_of: [a]}
  - {id: b, role: backup, backup_of: [nosuch]}
  - {id: c}
  - {id: c}
  - {id: d, role: backup}
  - {id: Bad!}
",
        )
        .expect_err("invalid");
        let msgs: Vec<String> = errs.iter().map(|v| v.message.clone()).collect();
        assert!(errs.iter().all(|v| v.code == Code::InventoryInvalid), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("own backup")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("`nosuch`")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("defined twice")), "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.contains("does not say what it backs up")),
            "{msgs:?}"
        );
        assert!(msgs.iter().any(|m| m.contains("`Bad!`")), "{msgs:?}");
        assert!(errs.iter().all(|v| v.line.is_some()), "every problem has a line");
    }

    #[test]
    fn a_mirror_feeds_a_backup_and_says_how_it_is_paused() {
        let f = Fleet::parse(Source {
            name: "f.yaml",
            text: "hosts:\n  - {id: p, role: primary}\n  - {id: b, role: backup, backup_of: [p], mirror: {pause: stop, resume: start, snapshot_before: [/srv/m/]}}\n  - {id: d, role: backup, backup_of: [p], mirror: {feed: drbd}}\n",
        })
        .expect("valid");
        let b = f.host(f.lookup("b").expect("b")).mirror.clone().expect("mirror");
        assert!(b.guarded());
        assert_eq!(b.snapshot_before, ["/srv/m"]);
        assert!(
            !f.host(f.lookup("d").expect("d"))
                .mirror
                .clone()
                .expect("mirror")
                .guarded()
        );
        // FORMATS.md's spelling, and the plan's write set as the copy.
        let f = Fleet::parse(Source {
            name: "f.yaml",
            text: "hosts:\n  - {id: p, role: primary}\n  - {id: b, role: backup, backup_of: [p], mirror: {snapshot-before: true}}\n",
        })
        .expect("valid");
        let m = f.host(f.lookup("b").expect("b")).mirror.clone().expect("mirror");
        assert!(m.guarded());
        assert_eq!(m.snapshot_paths(&["/srv/db".to_owned()]), ["/srv/db"]);
        let got = codes(
            "hosts:\n  - {id: p, role: primary, mirror: {pause: x, resume: y}}\n  - {id: b, role: backup, backup_of: [p], mirror: {pause: x, snapshot_before: [srv]}}\n",
        );
        assert_eq!(got.len(), 3, "{got:?}");
    }

    #[test]
    fn backup_of_needs_role_backup() {
        let got = codes("hosts:\n  - {id: a}\n  - {id: b, role: primary, backup_of: [a]}\n");
        assert_eq!(got, vec![(Code::InventoryInvalid, vec!["b".into()])]);
    }

    #[test]
    fn host_ids() {
        for ok in ["p09", "0a", "web-1.dc1_x"] {
            assert!(is_valid_host_id(ok), "{ok}");
        }
        for bad in ["", "-a", "A1", "a b", "a/b", ".a"] {
            assert!(!is_valid_host_id(bad), "{bad}");
        }
    }
}
