//! The host's mount table, as the agent sees it under a host root: which
//! filesystems a step could reach, how the dry-run sandbox treats each one,
//! and which paths are the same files seen twice (bind mounts).
//!
//! A hosting server keeps customer homes, mail and databases on their own
//! filesystems. A sandbox that overlays only the root shows a step an empty
//! `/home`, and its dry-run then reports "0 deletions" for a step that would
//! empty it. Everything here exists so that every mount under the host root
//! is seen, and so that a mount the sandbox cannot copy on write is named
//! instead of silently missed. Parsing is pure; only [`read`] does I/O.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// The directory of the filesystem this mount shows (`/` unless it is a
    /// bind mount of a subdirectory, or a btrfs subvolume).
    pub root: String,
    /// Where it is mounted, as this process sees it.
    pub point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub options: Vec<String>,
    /// Filesystem type (`ext4`, `fuse.sshfs`, `nfs4`, ...).
    pub fstype: String,
    /// What is mounted (a device, a server export, `none`).
    pub source: String,
}

impl Mount {
    /// Whether the mount itself is read-only.
    pub fn readonly(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undo the kernel's octal escapes (`\040` for a space, `\134` for `\`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\' && i + 4 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|oct| u8::from_str_radix(oct, 8).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse the text of a mountinfo file; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        // id parent dev root point options [optional...] - fstype source super
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.len() < sep + 3 {
            continue;
        }
        let (Ok(id), Ok(parent)) = (fields[0].parse(), fields[1].parse()) else {
            continue;
        };
        out.push(Mount {
            id,
            parent,
            dev: fields[2].to_owned(),
            root: unescape(fields[3]),
            point: PathBuf::from(unescape(fields[4])),
            options: fields[5].split(',').map(str::to_owned).collect(),
            fstype: fields[sep + 1].to_owned(),
            source: unescape(fields[sep + 2]),
        });
    }
    out
}

/// This process's mount table.
pub fn read() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse(&text))
}

/// Filesystems a copy-on-write overlay can take as its lower layer, and
/// whose files a step may change. Anything else (FUSE, network, unknown
/// types) is refused: the sandbox cannot promise what it would show there.
const OVERLAYABLE: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "vfat", "exfat", "jfs", "overlay",
];

/// Kernel pseudo-filesystems: the sandbox gives a step its own `/proc` and
/// `/dev` and leaves the rest out; none of them holds customer data.
const VIRTUAL: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "pstore",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
    "autofs",
    "rpc_pipefs",
    "nsfs",
    "selinuxfs",
    "ramfs",
];

const NETWORK: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "9p",
    "afs",
    "lustre",
    "gfs2",
    "ocfs2",
    "davfs",
];

/// How the sandbox and the confined run treat one mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Treatment {
    /// Overlaid with its own upper layer; its effects are collected.
    Overlay,
    /// Bound read-only: nothing can change it (mounted read-only, or listed
    /// as untouchable).
    ReadOnly(String),
    /// A kernel pseudo-filesystem: replaced or left out.
    Virtual,
    /// Cannot be overlaid: bound read-only in the sandbox, and every step
    /// whose write set reaches it is blocked (the dry-run cannot know).
    Refused(String),
}

/// A mount under a host root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostMount {
    /// Where the host sees it (`/` for the filesystem holding the host root).
    pub rel: String,
    /// The mount.
    pub mount: Mount,
    /// The directory of its filesystem shown at `rel` (for the host root's
    /// own filesystem: the host root's path on it).
    pub fs_dir: String,
    /// What the sandbox does with it.
    pub treatment: Treatment,
}

impl HostMount {
    /// A line for people: `/home (ext4 /dev/loop3)`.
    pub fn describe(&self) -> String {
        format!("{} ({} {})", self.rel, self.mount.fstype, self.mount.source)
    }
}

pub use wavegate_domain::paths::within;

fn join_rel(base: &str, rest: &str) -> String {
    let rest = rest.trim_start_matches('/');
    match (base.trim_end_matches('/'), rest) {
        ("", "") => "/".into(),
        (b, "") => b.to_owned(),
        (b, r) => format!("{b}/{r}"),
    }
}

fn treat(m: &Mount, rel: &str, untouchable: &[String]) -> Treatment {
    let fstype = m.fstype.as_str();
    if VIRTUAL.contains(&fstype) {
        return Treatment::Virtual;
    }
    if untouchable.iter().any(|u| within(rel, u)) {
        return Treatment::ReadOnly("listed as untouchable".into());
    }
    if m.readonly() {
        return Treatment::ReadOnly("mounted read-only".into());
    }
    if OVERLAYABLE.contains(&fstype) {
        return Treatment::Overlay;
    }
    let what = if fstype == "fuse" || fstype == "fuseblk" || fstype.starts_with("fuse.") {
        "a FUSE filesystem"
    } else if NETWORK.contains(&fstype) || fstype.starts_with("nfs") {
        "a network filesystem"
    } else {
        "a filesystem type the sandbox does not know"
    };
    Treatment::Refused(format!("{what} ({fstype}); the dry-run cannot copy it on write"))
}

/// The mounts a host sees under `host_root`, parents before children:
/// first the filesystem holding the host root itself (at `/`), then every
/// mount at any depth below it. A mount hidden under another at the same
/// point is left out (only the top one is visible). Mounts under `skip`
/// (the agent's own scratch space) are left out.
pub fn host_mounts(table: &[Mount], host_root: &Path, untouchable: &[String], skip: &[&Path]) -> Vec<HostMount> {
    let root = host_root.display().to_string();
    let root = if root.len() > 1 {
        root.trim_end_matches('/').to_owned()
    } else {
        root
    };
    // The last mount at a point is the visible one.
    let mut by_point: BTreeMap<String, &Mount> = BTreeMap::new();
    for m in table {
        let p = m.point.display().to_string();
        if skip.iter().any(|s| within(&p, &s.display().to_string())) {
            continue;
        }
        by_point.insert(p, m);
    }
    let mut out = Vec::new();
    // The filesystem holding the host root: the deepest mount at or above it.
    if let Some((point, m)) = by_point
        .iter()
        .filter(|(p, _)| within(&root, p))
        .max_by_key(|(p, _)| p.len())
    {
        let below = root.strip_prefix(point.trim_end_matches('/')).unwrap_or("");
        out.push(HostMount {
            rel: "/".into(),
            fs_dir: join_rel(&m.root, below),
            treatment: treat(m, "/", untouchable),
            mount: (*m).clone(),
        });
    }
    let mut subs: Vec<HostMount> = by_point
        .iter()
        .filter(|(p, _)| **p != root && within(p, &root))
        .filter_map(|(p, m)| {
            let rel = if root == "/" {
                p.clone()
            } else {
                p.strip_prefix(&root)?.to_owned()
            };
            if rel.is_empty() || rel == "/" {
                return None;
            }
            Some(HostMount {
                treatment: treat(m, &rel, untouchable),
                fs_dir: m.root.clone(),
                rel,
                mount: (*m).clone(),
            })
        })
        .collect();
    subs.sort_by(|a, b| {
        let depth = |s: &str| s.matches('/').count();
        depth(&a.rel).cmp(&depth(&b.rel)).then(a.rel.cmp(&b.rel))
    });
    out.extend(subs);
    out
}

/// The mount a host path lives on: the deepest one whose `rel` holds it.
pub fn mount_of<'a>(mounts: &'a [HostMount], path: &str) -> Option<&'a HostMount> {
    mounts
        .iter()
        .filter(|m| within(path, &m.rel))
        .max_by_key(|m| if m.rel == "/" { 0 } else { m.rel.len() })
}

/// Mounts a write path could change: the one it lives on, and every mount
/// below it (a write set of `/var` reaches a database on `/var/lib/mysql`).
pub fn reached_by<'a>(mounts: &'a [HostMount], write: &str) -> Vec<&'a HostMount> {
    let mut out: Vec<&HostMount> = mount_of(mounts, write).into_iter().collect();
    out.extend(
        mounts
            .iter()
            .filter(|m| m.rel != "/" && m.rel != write && within(&m.rel, write)),
    );
    out
}

/// If the files at write path `write` can also be reached at a host path
/// outside `writes` (the same filesystem mounted twice, or a bind mount),
/// that path: a change through the write set would change it too.
pub fn alias_outside(mounts: &[HostMount], write: &str, writes: &[String]) -> Option<String> {
    let inside = |p: &str| writes.iter().any(|w| within(p, w));
    let home = mount_of(mounts, write)?;
    let rest = if home.rel == "/" {
        write.to_owned()
    } else {
        write.strip_prefix(&home.rel).unwrap_or("").to_owned()
    };
    // The write path, and every mount below it, as (filesystem, directory).
    let mut shown: Vec<(&str, String, String)> =
        vec![(home.mount.dev.as_str(), join_rel(&home.fs_dir, &rest), write.to_owned())];
    for m in mounts
        .iter()
        .filter(|m| m.rel != write && m.rel != "/" && within(&m.rel, write))
    {
        shown.push((m.mount.dev.as_str(), m.fs_dir.clone(), m.rel.clone()));
    }
    for (dev, dir, at) in &shown {
        for other in mounts.iter().filter(|o| o.mount.dev == *dev) {
            // Where `dir` (or part of it) appears through `other`.
            let seen_at = if within(dir, &other.fs_dir) {
                let tail = dir.strip_prefix(other.fs_dir.trim_end_matches('/')).unwrap_or("");
                join_rel(&other.rel, tail)
            } else if within(&other.fs_dir, dir) {
                other.rel.clone()
            } else {
                continue;
            };
            if seen_at != *at && !inside(&seen_at) {
                return Some(seen_at);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:5 / /proc rw,nosuid shared:5 - proc proc rw
40 22 7:0 / /lab/h1/root/home rw,relatime shared:9 - ext4 /dev/loop0 rw
41 22 7:1 / /lab/h1/root/var/lib/mysql rw,relatime shared:10 - xfs /dev/loop1 rw
42 22 0:50 / /lab/h1/root/srv/sshfs rw,nosuid - fuse.sshfs me@host:/ rw
43 22 0:51 / /lab/h1/root/srv/nfs rw - nfs4 10.0.0.1:/export rw
44 22 7:2 / /lab/h1/root/opt/ro ro,relatime - ext4 /dev/loop2 ro
45 40 7:0 /alice /lab/h1/root/srv/www rw,relatime - ext4 /dev/loop0 rw
46 22 7:3 / /lab/h1/root/mnt/with\\040space rw - ext4 /dev/loop3 rw
";

    fn mounts(untouchable: &[&str]) -> Vec<HostMount> {
        let u: Vec<String> = untouchable.iter().map(|s| (*s).to_owned()).collect();
        host_mounts(&parse(TABLE), Path::new("/lab/h1/root"), &u, &[])
    }

    #[test]
    fn the_host_sees_its_root_filesystem_and_every_mount_below() {
        let m = mounts(&[]);
        let rels: Vec<&str> = m.iter().map(|m| m.rel.as_str()).collect();
        assert_eq!(
            rels,
            [
                "/",
                "/home",
                "/mnt/with space",
                "/opt/ro",
                "/srv/nfs",
                "/srv/sshfs",
                "/srv/www",
                "/var/lib/mysql"
            ]
        );
        assert_eq!(
            m[0].fs_dir, "/lab/h1/root",
            "the root is a directory of the machine's /"
        );
        assert_eq!(m[0].treatment, Treatment::Overlay);
        let t = |rel: &str| m.iter().find(|x| x.rel == rel).map(|x| x.treatment.clone());
        assert_eq!(t("/home"), Some(Treatment::Overlay));
        assert_eq!(t("/var/lib/mysql"), Some(Treatment::Overlay));
        assert!(matches!(t("/srv/sshfs"), Some(Treatment::Refused(w)) if w.contains("FUSE")));
        assert!(matches!(t("/srv/nfs"), Some(Treatment::Refused(w)) if w.contains("network")));
        assert!(matches!(t("/opt/ro"), Some(Treatment::ReadOnly(_))));
    }

    #[test]
    fn an_untouchable_mount_is_read_only_not_refused() {
        let m = mounts(&["/srv/nfs"]);
        let nfs = m.iter().find(|x| x.rel == "/srv/nfs").expect("nfs");
        assert_eq!(nfs.treatment, Treatment::ReadOnly("listed as untouchable".into()));
    }

    #[test]
    fn a_path_lives_on_the_deepest_mount_and_reaches_those_below() {
        let m = mounts(&[]);
        assert_eq!(
            mount_of(&m, "/home/alice/Maildir").map(|x| x.rel.as_str()),
            Some("/home")
        );
        assert_eq!(mount_of(&m, "/etc/postfix").map(|x| x.rel.as_str()), Some("/"));
        let reached: Vec<&str> = reached_by(&m, "/var").iter().map(|x| x.rel.as_str()).collect();
        assert_eq!(reached, ["/", "/var/lib/mysql"]);
        let reached: Vec<&str> = reached_by(&m, "/srv").iter().map(|x| x.rel.as_str()).collect();
        assert_eq!(reached, ["/", "/srv/nfs", "/srv/sshfs", "/srv/www"]);
    }

    #[test]
    fn a_bind_mount_is_an_alias_of_what_it_shows() {
        let m = mounts(&[]);
        // /srv/www shows /alice of the /home filesystem: writing it writes /home/alice.
        assert_eq!(
            alias_outside(&m, "/srv/www", &["/srv/www".into()]),
            Some("/home/alice".into())
        );
        assert_eq!(
            alias_outside(&m, "/srv/www", &["/srv/www".into(), "/home/alice".into()]),
            None
        );
        // And /home/alice/x is visible at /srv/www/x.
        assert_eq!(
            alias_outside(&m, "/home/alice/x", &["/home/alice/x".into()]),
            Some("/srv/www/x".into())
        );
        // A write set holding the bind mount reaches it too.
        assert_eq!(alias_outside(&m, "/srv", &["/srv".into()]), Some("/home/alice".into()));
        assert_eq!(alias_outside(&m, "/home/bob", &["/home/bob".into()]), None);
        assert_eq!(alias_outside(&m, "/var/lib/mysql", &["/var/lib/mysql".into()]), None);
    }

    #[test]
    fn a_host_root_at_slash_sees_the_machine() {
        let m = host_mounts(&parse(TABLE), Path::new("/"), &[], &[Path::new("/lab")]);
        let rels: Vec<&str> = m.iter().map(|m| m.rel.as_str()).collect();
        assert_eq!(rels, ["/", "/proc"]);
        assert_eq!(m[1].treatment, Treatment::Virtual);
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
