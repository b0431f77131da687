//! File operations that no tenant can redirect.
//!
//! A snapshot reads, and a restore writes, directories that customers own,
//! as root. A tenant can rename, replace or link anything in their own tree
//! at any moment, so nothing here resolves a path twice or follows a link:
//!
//! - a write-set root is opened from the host root's handle with `openat2`
//!   (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`);
//! - below it every name is opened relative to its directory's handle with
//!   `O_PATH | O_NOFOLLOW`, and what that handle's `fstat` says is the
//!   truth: a name swapped for a link between two calls is read as the link
//!   it now is, never followed;
//! - a regular file is re-opened for reading through its own handle
//!   (`/proc/self/fd/N`), so FIFOs, sockets and device nodes are recorded
//!   from their metadata and never opened;
//! - owner, mode, times and extended attributes are set through handles
//!   (`fchown`, `fchmod`, `futimens`, `fsetxattr`), or relative to a
//!   directory only the agent can reach, never through a path.
//!
//! `rustix` gives these calls safe wrappers (the workspace forbids
//! `unsafe`); `openat2` needs Linux 5.6.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Entry, Kind};

/// A path as raw bytes: Unix names need not be UTF-8, and two names that
/// differ only in invalid UTF-8 are two files. Written in manifests as a
/// string where `\` is `\\` and a byte that is not part of valid UTF-8 is
/// `\xHH`; a path without either reads the same as before.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawPath(pub Vec<u8>);

impl RawPath {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The escaped form (what manifests and messages show).
    pub fn escaped(&self) -> String {
        let mut out = String::new();
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    out.push_str("\\\\");
                } else {
                    out.push(c);
                }
            }
            for b in chunk.invalid() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out
    }

    /// Read the escaped form back.
    pub fn unescape(s: &str) -> Result<RawPath> {
        let mut out = Vec::with_capacity(s.len());
        let b = s.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'\\' {
                out.push(b[i]);
                i += 1;
                continue;
            }
            match b.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                }
                Some(b'x') => {
                    let hex = s.get(i + 2..i + 4).context("a cut-off \\x escape in a path")?;
                    out.push(u8::from_str_radix(hex, 16).context("a bad \\x escape in a path")?);
                    i += 4;
                }
                _ => bail!("a bad escape in the path {s:?}"),
            }
        }
        Ok(RawPath(out))
    }

    /// `self/name`.
    pub fn child(&self, name: &[u8]) -> RawPath {
        let mut v = self.0.clone();
        if v.last() != Some(&b'/') {
            v.push(b'/');
        }
        v.extend_from_slice(name);
        RawPath(v)
    }

    /// The last component.
    pub fn name(&self) -> &[u8] {
        match self.0.iter().rposition(|&c| c == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// The parent (`/` for a top-level path).
    pub fn parent(&self) -> RawPath {
        match self.0.iter().rposition(|&c| c == b'/') {
            Some(0) | None => RawPath(b"/".to_vec()),
            Some(i) => RawPath(self.0[..i].to_vec()),
        }
    }
}

impl From<&str> for RawPath {
    fn from(s: &str) -> RawPath {
        RawPath(s.as_bytes().to_vec())
    }
}

impl std::fmt::Display for RawPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.escaped())
    }
}

impl Serialize for RawPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.escaped())
    }
}

impl<'de> Deserialize<'de> for RawPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<RawPath, D::Error> {
        let s = String::deserialize(d)?;
        RawPath::unescape(&s).map_err(serde::de::Error::custom)
    }
}

pub use wavegate_domain::paths::within_bytes as within;

/// A host path as a path relative to the host root's handle.
fn relative(p: &[u8]) -> &[u8] {
    let r = trim_slashes(p);
    if r.is_empty() { b"." } else { r }
}

fn trim_slashes(p: &[u8]) -> &[u8] {
    let start = p.iter().position(|&c| c != b'/').unwrap_or(p.len());
    &p[start..]
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}

/// Open a directory the agent itself names (a host root, its state
/// directory): trusted, no tenant can reach it.
pub fn open_dir(p: &Path) -> Result<OwnedFd> {
    rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("opening {}", p.display()))
}

/// Open host path `p` below `root` without following any symlink on the
/// way or at the end: `O_PATH` when `dir` is false, a readable directory
/// otherwise. `Ok(None)` when nothing is there.
pub fn open_beneath(root: BorrowedFd<'_>, p: &[u8], dir: bool) -> Result<Option<OwnedFd>> {
    let flags = if dir {
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
    } else {
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC
    };
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match rustix::fs::openat2(root, os(relative(p)), flags, Mode::empty(), how) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::XDEV) => bail!(
            "{} is reached through a symbolic link; refusing to follow it",
            RawPath(p.to_vec())
        ),
        Err(e) => Err(e).with_context(|| format!("opening {}", RawPath(p.to_vec()))),
    }
}

/// One name in a directory, opened without following it.
pub struct Node {
    /// An `O_PATH` handle.
    pub fd: OwnedFd,
    /// What the handle says it is.
    pub stat: Stat,
}

impl Node {
    /// Its type.
    pub fn kind(&self) -> Kind {
        kind_of(&self.stat)
    }

    /// A readable handle on the same inode (directories and regular files
    /// only: nothing else is ever opened for reading).
    pub fn reopen(&self) -> Result<File> {
        match self.kind() {
            Kind::Dir => Ok(File::from(rustix::fs::openat(
                &self.fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?)),
            Kind::File => {
                let fd = reopen_file(&self.fd)?;
                let now = rustix::fs::fstat(&fd)?;
                if (now.st_dev, now.st_ino) != (self.stat.st_dev, self.stat.st_ino) {
                    bail!("a file was replaced while it was opened");
                }
                Ok(File::from(fd))
            }
            k => bail!("a {} is never opened", k.as_str()),
        }
    }
}

fn reopen_file(fd: &OwnedFd) -> Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    let magic = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::open(
        magic.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .context("re-opening a file through its handle (is /proc mounted?)")
}

/// Open `name` in directory `dir` without following it. `Ok(None)` when
/// it is gone.
pub fn open_child(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<Node>> {
    match rustix::fs::openat(
        dir,
        os(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => {
            let stat = rustix::fs::fstat(&fd)?;
            Ok(Some(Node { fd, stat }))
        }
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The node at host path `p` below `root` (never followed).
pub fn node_at(root: BorrowedFd<'_>, p: &[u8]) -> Result<Option<Node>> {
    let Some(fd) = open_beneath(root, p, false)? else {
        return Ok(None);
    };
    let stat = rustix::fs::fstat(&fd)?;
    Ok(Some(Node { fd, stat }))
}

/// The names in a directory, sorted bytewise (without `.` and `..`).
pub fn names(dir: BorrowedFd<'_>) -> Result<Vec<Vec<u8>>> {
    let mut d = rustix::fs::Dir::read_from(dir)?;
    let mut out = Vec::new();
    while let Some(e) = d.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    out.sort();
    Ok(out)
}

/// The type of an inode.
pub fn kind_of(st: &Stat) -> Kind {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => Kind::Socket,
        FileType::CharacterDevice => Kind::Char,
        FileType::BlockDevice => Kind::Block,
        _ => Kind::File,
    }
}

/// The entry of a node at host path `path`: metadata, link target,
/// extended attributes (of files and directories, read through `readable`),
/// without the content digest.
pub fn entry_of(path: RawPath, node: &Node, readable: Option<&File>) -> Result<Entry> {
    let st = &node.stat;
    let kind = kind_of(st);
    let link = if kind == Kind::Symlink {
        RawPath(rustix::fs::readlinkat(&node.fd, "", Vec::new())?.into_bytes())
    } else {
        RawPath::default()
    };
    let xattrs = match readable {
        Some(f) => read_xattrs(f.as_fd())?,
        None => BTreeMap::new(),
    };
    Ok(Entry {
        path,
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        mtime_nsec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
        size: if kind == Kind::File { st.st_size as u64 } else { 0 },
        sha256: String::new(),
        link,
        rdev: if matches!(kind, Kind::Char | Kind::Block) {
            st.st_rdev
        } else {
            0
        },
        xattrs,
    })
}

/// Every extended attribute of an open file or directory: name to hex value.
pub fn read_xattrs(fd: BorrowedFd<'_>) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    // Most files have none: one call says so.
    let len = match rustix::fs::flistxattr_query(fd) {
        Ok(0) | Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Ok(n) => n,
        Err(e) => return Err(e).context("listing extended attributes"),
    };
    let mut list = vec![0u8; len + 256];
    let n = rustix::fs::flistxattr(fd, &mut list[..]).context("listing extended attributes")?;
    list.truncate(n);
    let mut buf = vec![0u8; 64 * 1024];
    for name in list.split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let value = match rustix::fs::fgetxattr(fd, os(name), &mut buf[..]) {
            Ok(v) => buf[..v].to_vec(),
            Err(rustix::io::Errno::NODATA) => continue,
            Err(e) => return Err(e).context("reading an extended attribute"),
        };
        out.insert(RawPath(name.to_vec()).escaped(), hex::encode(value));
    }
    Ok(out)
}

/// Set extended attributes on an open file or directory.
pub fn write_xattrs(fd: BorrowedFd<'_>, xattrs: &BTreeMap<String, String>) -> Result<()> {
    for (name, value) in xattrs {
        let name = RawPath::unescape(name)?;
        let value = hex::decode(value).context("an extended attribute's value is not hex")?;
        rustix::fs::fsetxattr(fd, os(name.as_bytes()), &value, rustix::fs::XattrFlags::empty())
            .with_context(|| format!("setting the extended attribute {name}"))?;
    }
    Ok(())
}

/// Content is read, archived and hashed in blocks of this size, aligned to
/// the start of the file; a block of zeros is a hole.
pub const BLOCK: u64 = 64 * 1024;

/// A file's content digest, the same however the file keeps its zeros:
/// SHA-256 over its size, then the offset and bytes of every block that is
/// not all zeros. Holes are skipped with `SEEK_DATA`/`SEEK_HOLE`, so an
/// 8 GB sparse file costs what its data costs. `each` sees every block
/// that is hashed.
pub fn digest(f: &File, size: u64, mut each: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; BLOCK as usize];
    let mut next = 0u64;
    while next < size {
        let data = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(next)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            // No SEEK_DATA on this filesystem: all of it is data.
            Err(rustix::io::Errno::INVAL) => next,
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(_) => size,
        };
        let mut off = (data / BLOCK * BLOCK).max(next);
        while off < hole {
            let len = BLOCK.min(size - off) as usize;
            let got = read_full(f, &mut buf[..len], off)?;
            // A file that shrank while it was read reads as zeros past its
            // end: what is hashed is what is archived.
            buf[got..len].fill(0);
            let block = &buf[..len];
            if !is_zero(block) {
                h.update(off.to_le_bytes());
                h.update(block);
                each(off, block)?;
            }
            off += len as u64;
        }
        next = off;
    }
    Ok(hex::encode(h.finalize()))
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read_at(&mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Whether a block is all zeros.
pub fn is_zero(b: &[u8]) -> bool {
    let (chunks, rest) = b.as_chunks::<16>();
    chunks.iter().all(|c| u128::from_ne_bytes(*c) == 0) && rest.iter().all(|&x| x == 0)
}

/// The digest of content given as blocks (offset, bytes), in order: the
/// same as [`digest`] of a file holding them.
pub struct BlockDigest(Sha256);

impl BlockDigest {
    /// Start, for content of `size` bytes.
    pub fn new(size: u64) -> BlockDigest {
        let mut h = Sha256::new();
        h.update(size.to_le_bytes());
        BlockDigest(h)
    }

    /// Add a block (already known not to be all zeros).
    pub fn block(&mut self, off: u64, bytes: &[u8]) {
        self.0.update(off.to_le_bytes());
        self.0.update(bytes);
    }

    /// The digest.
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// What a walk found: the entries (pre-order: a directory before what is
/// in it) and the directories below its roots that are on another
/// filesystem.
pub struct Walked {
    /// Host path of each entry's directory on another filesystem.
    pub boundaries: Vec<String>,
    /// Bytes the files' data takes on disk (allocated blocks: a sparse
    /// file counts what it holds, not its size).
    pub alloc: u64,
}

/// A path stored as text in a manifest (a root, a path left out): its
/// escaped form read back to bytes (a plain path reads as itself).
pub fn raw(s: &str) -> Vec<u8> {
    RawPath::unescape(s).map_or_else(|_| s.as_bytes().to_vec(), |r| r.0)
}

/// Whether host path `p` is one of `skip` (escaped paths) or below one.
pub fn skipped(p: &[u8], skip: &[String]) -> bool {
    skip.iter().any(|s| within(p, &raw(s)))
}

/// A name waiting to be walked: opened only when its turn comes, so a walk
/// holds a handle per directory level, not one per name (a maildir of
/// 100,000 messages must not exhaust the agent's file handles).
enum Pending {
    Top(Node, RawPath),
    Child(std::rc::Rc<File>, Vec<u8>, RawPath),
}

/// Queue the names in directory `d` (host path `p`) but `skip`, in sorted
/// order, to be opened when their turn comes.
fn push_children(stack: &mut Vec<Pending>, d: File, p: &RawPath, skip: &[String]) -> Result<()> {
    let d = std::rc::Rc::new(d);
    let mut children = Vec::new();
    for n in names(d.as_fd())? {
        let cp = p.child(&n);
        if !skipped(cp.as_bytes(), skip) {
            children.push(Pending::Child(d.clone(), n, cp));
        }
    }
    children.reverse();
    stack.extend(children);
    Ok(())
}

/// Walk `top` (a directory or any other node, shown as host path `path`)
/// in pre-order, without following anything, leaving out `skip` and what
/// is below it, and stopping at other filesystems than `dev` (those are
/// returned as boundaries). `visit` gets each entry and, for files and
/// directories, a readable handle.
pub fn walk(
    top: Node,
    path: RawPath,
    dev: u64,
    skip: &[String],
    visit: &mut dyn FnMut(Entry, Option<&File>) -> Result<()>,
) -> Result<Walked> {
    let mut walked = Walked {
        boundaries: Vec::new(),
        alloc: 0,
    };
    let mut stack = vec![Pending::Top(top, path)];
    while let Some(item) = stack.pop() {
        let (node, p) = match item {
            Pending::Top(n, p) => (n, p),
            Pending::Child(dir, name, p) => {
                let Some(c) = open_child(dir.as_fd(), &name)? else {
                    continue;
                };
                // Another filesystem, or the empty placeholder a btrfs
                // snapshot has where a nested subvolume was (inode 2).
                let placeholder = c.stat.st_ino == 2 && c.kind() == Kind::Dir && is_btrfs(c.fd.as_fd());
                if c.stat.st_dev != dev || placeholder {
                    walked.boundaries.push(p.escaped());
                    continue;
                }
                (c, p)
            }
        };
        let kind = node.kind();
        if kind == Kind::File {
            walked.alloc += u64::try_from(node.stat.st_blocks).unwrap_or(0).saturating_mul(512);
        }
        let readable = match kind {
            Kind::Dir | Kind::File => Some(node.reopen().with_context(|| format!("reading {p}"))?),
            _ => None,
        };
        let entry = entry_of(p.clone(), &node, readable.as_ref())?;
        drop(node);
        visit(entry, readable.as_ref())?;
        if kind == Kind::Dir
            && let Some(d) = readable
        {
            push_children(&mut stack, d, &p, skip)?;
        }
    }
    Ok(walked)
}

/// Every inode under `top` (shown as host path `path`), in a fixed order:
/// path, type and mode, inode number, change time, size, owner. Two trees
/// with the same list hold the same inodes, unchanged (a btrfs snapshot
/// keeps its source's inode numbers and change times, and any change to
/// an inode moves its change time). Files are never opened.
pub fn inodes(top: Node, path: RawPath, skip: &[String]) -> Result<Vec<(RawPath, [i64; 7])>> {
    let mut out = Vec::new();
    let mut stack = vec![Pending::Top(top, path)];
    while let Some(item) = stack.pop() {
        let (node, p) = match item {
            Pending::Top(n, p) => (n, p),
            Pending::Child(dir, name, p) => {
                let Some(c) = open_child(dir.as_fd(), &name)? else {
                    continue;
                };
                (c, p)
            }
        };
        let st = &node.stat;
        out.push((
            p.clone(),
            [
                i64::from(st.st_mode),
                st.st_ino as i64,
                st.st_ctime,
                st.st_ctime_nsec as i64,
                st.st_size,
                i64::from(st.st_uid),
                i64::from(st.st_gid),
            ],
        ));
        if node.kind() == Kind::Dir {
            push_children(&mut stack, node.reopen()?, &p, skip)?;
        }
    }
    Ok(out)
}

/// Remove `name` in `dir` and everything below it, never following a link
/// (names are removed relative to their directory's handle) and never
/// leaving filesystem `dev`: a mount found inside is left alone, and so is
/// what holds it. Subvolumes found on the way are handed to `subvolume`
/// (they cannot be unlinked).
pub fn remove_all(
    dir: BorrowedFd<'_>,
    name: &[u8],
    dev: u64,
    subvolume: &dyn Fn(BorrowedFd<'_>, &[u8]) -> Result<()>,
) -> Result<()> {
    let Some(node) = open_child(dir, name)? else {
        return Ok(());
    };
    if node.kind() != Kind::Dir {
        return match rustix::fs::unlinkat(dir, os(name), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", RawPath(name.to_vec()))),
        };
    }
    if node.stat.st_ino == 256 && is_btrfs(node.fd.as_fd()) {
        return subvolume(dir, name);
    }
    if node.stat.st_dev != dev {
        bail!(
            "{} is another filesystem (a mount); it is left where it is",
            RawPath(name.to_vec())
        );
    }
    let d = node.reopen()?;
    drop(node);
    // A tenant still inside the old tree can keep adding names; a few
    // rounds and then it is left for the next clean-up.
    for _ in 0..4 {
        for n in names(d.as_fd())? {
            remove_all(d.as_fd(), &n, dev, subvolume)?;
        }
        match rustix::fs::unlinkat(dir, os(name), AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(rustix::io::Errno::NOTEMPTY) => continue,
            Err(e) => return Err(e).with_context(|| format!("removing {}", RawPath(name.to_vec()))),
        }
    }
    bail!("{} kept being refilled while it was removed", RawPath(name.to_vec()))
}

/// Whether an open inode is on btrfs.
pub fn is_btrfs(fd: BorrowedFd<'_>) -> bool {
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    rustix::fs::fstatfs(fd).is_ok_and(|s| s.f_type == BTRFS_SUPER_MAGIC)
}

/// Bytes a root process may still write on the filesystem holding `fd`.
pub fn room(fd: BorrowedFd<'_>) -> Result<u64> {
    let s = rustix::fs::fstatvfs(fd)?;
    Ok(s.f_bfree.saturating_mul(s.f_frsize))
}

/// A path through an open handle that another process (btrfs-progs) can
/// use: it names the inode the handle holds, whatever happens to its name.
pub fn proc_path(fd: BorrowedFd<'_>) -> std::path::PathBuf {
    use std::os::fd::AsRawFd as _;
    std::path::PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd()))
}

/// Make `name` in `dir` as the entry says (its content is written by the
/// caller for files): a directory, a link, a FIFO, a socket or a device
/// node is made here and never opened; a file is created and returned.
/// `dir` is a directory only the agent can reach, so the name-relative
/// calls below cannot be redirected.
pub fn make(dir: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<Option<File>> {
    let n = os(name);
    let mode = Mode::from_raw_mode(e.mode);
    match e.kind {
        Kind::File => {
            let fd = rustix::fs::openat(
                dir,
                n,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .with_context(|| format!("creating {}", e.path))?;
            rustix::fs::ftruncate(&fd, e.size)?;
            return Ok(Some(File::from(fd)));
        }
        Kind::Dir => rustix::fs::mkdirat(dir, n, Mode::from_raw_mode(0o700))?,
        Kind::Symlink => rustix::fs::symlinkat(os(e.link.as_bytes()), dir, n)?,
        Kind::Fifo => rustix::fs::mknodat(dir, n, FileType::Fifo, mode, 0)?,
        Kind::Socket => rustix::fs::mknodat(dir, n, FileType::Socket, mode, 0)?,
        Kind::Char => rustix::fs::mknodat(dir, n, FileType::CharacterDevice, mode, e.rdev)?,
        Kind::Block => rustix::fs::mknodat(dir, n, FileType::BlockDevice, mode, e.rdev)?,
    }
    Ok(None)
}

/// Give a made file or directory (open as `fd`) the entry's owner, mode
/// and extended attributes; times are set last, by [`set_times`].
pub fn set_meta(fd: BorrowedFd<'_>, e: &Entry) -> Result<()> {
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
    )?;
    // After the owner: a chown clears set-id bits.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode))?;
    // Only the recorded attributes: a default ACL of the directory it was
    // made in must not add one of its own.
    for name in read_xattrs(fd)?.keys() {
        if !e.xattrs.contains_key(name) {
            let n = RawPath::unescape(name)?;
            rustix::fs::fremovexattr(fd, os(n.as_bytes()))
                .with_context(|| format!("removing the extended attribute {name}"))?;
        }
    }
    write_xattrs(fd, &e.xattrs)?;
    // Setting an ACL moves the mode's group bits: the recorded mode last.
    rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode))?;
    Ok(())
}

/// Copy a file's content to a made file, holes kept (where a reflink is
/// refused, as between a no-copy-on-write file and a new one).
pub fn copy_sparse(src: &File, size: u64, dst: &File) -> Result<()> {
    digest(src, size, |off, block| write_block(dst, off, block))?;
    Ok(())
}

/// Give a made link, FIFO, socket or device node `name` in `dir` (only the
/// agent reaches `dir`) the entry's owner and mode (and times).
pub fn set_meta_at(dir: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<()> {
    let n = os(name);
    rustix::fs::chownat(
        dir,
        n,
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if e.kind != Kind::Symlink {
        rustix::fs::chmodat(dir, n, Mode::from_raw_mode(e.mode), AtFlags::empty())?;
    }
    rustix::fs::utimensat(dir, n, &times(e), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn times(e: &Entry) -> rustix::fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: e.mtime,
        tv_nsec: i64::from(e.mtime_nsec),
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Set an open file's or directory's times to the entry's.
pub fn set_times(fd: BorrowedFd<'_>, e: &Entry) -> Result<()> {
    rustix::fs::futimens(fd, &times(e))?;
    Ok(())
}

/// Write `bytes` at `off` of a made file.
pub fn write_block(f: &File, off: u64, bytes: &[u8]) -> Result<()> {
    f.write_all_at(bytes, off)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_paths_round_trip_every_byte() {
        for p in [
            &b"/home/t1/caf\xe9"[..],
            b"/home/dup\xff",
            "/home/dup\u{FFFD}".as_bytes(),
            b"/a\\b",
            b"/x\\xff",
            b"/plain",
        ] {
            let r = RawPath(p.to_vec());
            let s = r.escaped();
            assert_eq!(RawPath::unescape(&s).expect("parses"), r, "{s}");
        }
        assert_ne!(
            RawPath(b"/dup\xff".to_vec()).escaped(),
            RawPath("/dup\u{FFFD}".as_bytes().to_vec()).escaped()
        );
        assert_eq!(RawPath::from("/etc/app").escaped(), "/etc/app");
        assert!(RawPath::unescape("/bad\\q").is_err());
    }

    #[test]
    fn parents_children_and_containment() {
        let p = RawPath::from("/home/t1");
        assert_eq!(p.child(b"x").as_bytes(), b"/home/t1/x");
        assert_eq!(p.parent().as_bytes(), b"/home");
        assert_eq!(RawPath::from("/home").parent().as_bytes(), b"/");
        assert_eq!(p.name(), b"t1");
        assert!(within(b"/home/t1/x", b"/home/t1"));
        assert!(!within(b"/home/t10", b"/home/t1"));
        assert!(within(b"/anything", b"/"));
    }

    #[test]
    fn zero_blocks_are_seen() {
        assert!(is_zero(&[0u8; 100]));
        let mut b = [0u8; 100];
        b[99] = 1;
        assert!(!is_zero(&b));
    }
}
