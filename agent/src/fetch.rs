//! Fetches staged before approval and adopted after it.
//!
//! A step's `fetch` runs at submit, before anyone has approved the plan, so
//! it must change nothing real. It runs in the jail over the dry-run's
//! copy-on-write view of the host (with the network, Landlock allowing
//! writes only beneath its `fetch_writes`); afterwards only what it wrote
//! beneath those paths is kept, in a staging cache in the agent's state
//! directory (`fetch/<key>/root`, a tree shaped like the host's, whiteouts
//! and opaque directories included). The dry-run lays that cache over the
//! host, so the step is dry-run against what it will find. After approval
//! the real run adopts the cache: its digest is checked against the one
//! reported at submit, then its files are put in place (each written beside
//! its name and renamed over it) and its deletions made.
//!
//! The key is the SHA-256 of the fetch's command and write set, so the same
//! fetch stages to the same place.

use std::os::fd::AsFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::snapshot::fsx::{self, RawPath};
use crate::snapshot::{Entry, Kind};

/// The staging cache's key for a fetch.
pub fn key(run: &str, writes: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(run.as_bytes());
    for w in writes {
        h.update([0]);
        h.update(w.as_bytes());
    }
    hex::encode(h.finalize())[..32].to_owned()
}

/// Where a staging cache lives.
pub fn dir(state_dir: &Path, key: &str) -> PathBuf {
    state_dir.join("fetch").join(key)
}

/// The tree of a staging cache (shaped like the host root).
pub fn tree(state_dir: &Path, key: &str) -> PathBuf {
    dir(state_dir, key).join("root")
}

/// Whether an entry is an overlay whiteout (a deletion).
fn whiteout(e: &Entry) -> bool {
    e.kind == Kind::Char && e.rdev == 0
}

const OPAQUE: &str = "trusted.overlay.opaque";

/// Every entry of a staged tree beneath `writes`, in pre-order, with the
/// content digest of each file.
fn entries(tree: &Path, writes: &[String]) -> Result<Vec<Entry>> {
    let fd = fsx::open_dir(tree)?;
    let mut out = Vec::new();
    crate::snapshot::walk_part(fd.as_fd(), "/", writes, &[], &mut |mut e, f| {
        if e.kind == Kind::File {
            let f = f.context("a file without a handle")?;
            e.sha256 = fsx::digest(f, e.size, |_, _| Ok(()))?;
        }
        out.push(e);
        Ok(())
    })?;
    Ok(out)
}

/// The digest of a staged tree: every entry beneath `writes` (path, type,
/// mode, owner, content, link, whiteouts and opaque markers).
pub fn digest(tree: &Path, writes: &[String]) -> Result<String> {
    let mut h = Sha256::new();
    for mut e in entries(tree, writes)? {
        // An overlay redirect or metacopy would make the dry-run show what
        // adoption does not put in place.
        if let Some(k) = e
            .xattrs
            .keys()
            .find(|k| matches!(k.as_str(), "trusted.overlay.redirect" | "trusted.overlay.metacopy"))
        {
            bail!(
                "the staged fetch holds {} with the overlay attribute {k}; refusing it",
                e.path
            );
        }
        // Times move when a tree is copied; what is in it does not.
        e.mtime = 0;
        e.mtime_nsec = 0;
        h.update(serde_json::to_vec(&e)?);
        h.update([b'\n']);
    }
    Ok(hex::encode(h.finalize()))
}

/// Keep what a staged fetch wrote: for every layer of its sandbox (`rel`:
/// the mount's host path, `upper`: what was written on it), the part of the
/// upper layer beneath each of `writes`, copied into `out` (made new).
pub fn keep(layers: &[crate::sandbox::Layer], writes: &[String], out: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    for w in writes {
        // The deepest layer holding `w` is the one it was written on.
        let Some(layer) = layers
            .iter()
            .filter(|l| crate::mountinfo::within(w, &l.rel))
            .max_by_key(|l| l.rel.len())
        else {
            continue;
        };
        let rest = if layer.rel == "/" {
            w.as_str()
        } else {
            w.strip_prefix(layer.rel.as_str()).unwrap_or(w)
        };
        let src = layer.upper.join(rest.trim_start_matches('/'));
        if src.symlink_metadata().is_err() {
            continue;
        }
        let dst = out.join(w.trim_start_matches('/'));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // cp -a keeps types, owners, modes, times and the overlay's own
        // attributes (whiteouts are device nodes, opaque directories an
        // xattr); the upper layer is the agent's own tmpfs.
        let st = std::process::Command::new("/bin/cp")
            .arg("-a")
            .arg("--no-target-directory")
            .arg(&src)
            .arg(&dst)
            .status()
            .context("running cp")?;
        if !st.success() {
            bail!("keeping what the fetch wrote to {w} failed (cp -a exited {st})");
        }
    }
    Ok(())
}

/// Put a staged tree in place on the host under `root`: only beneath
/// `writes`, after checking its digest. Every operation goes through
/// handles opened without following links.
pub fn adopt(tree: &Path, root: &Path, writes: &[String], want_digest: &str) -> Result<usize> {
    let got = digest(tree, writes)?;
    if got != want_digest {
        bail!(
            "the staged fetch changed since it was checked at submit (digest {got}, expected {want_digest}); refusing to put it in place"
        );
    }
    let root_fd = fsx::open_dir(root)?;
    let tree_fd = fsx::open_dir(tree)?;
    let mut done = 0;
    let mut dirs: Vec<Entry> = Vec::new();
    for e in entries(tree, writes)? {
        if !writes.iter().any(|w| fsx::within(e.path.as_bytes(), w.as_bytes())) {
            continue;
        }
        let parent = e.path.parent();
        let name = e.path.name().to_vec();
        let pfd = match fsx::open_beneath(root_fd.as_fd(), parent.as_bytes(), true)? {
            Some(fd) => fd,
            None => mkdirs(root_fd.as_fd(), &parent)?,
        };
        let live = fsx::open_child(pfd.as_fd(), &name)?;
        let dev = rustix::fs::fstat(&pfd)?.st_dev;
        let no_subvolumes = |_: std::os::fd::BorrowedFd<'_>, n: &[u8]| -> Result<()> {
            bail!(
                "{} is a btrfs subvolume; a fetch does not remove one",
                RawPath(n.to_vec())
            )
        };
        if whiteout(&e) {
            if live.is_some() {
                fsx::remove_all(pfd.as_fd(), &name, dev, &no_subvolumes)?;
            }
            done += 1;
            continue;
        }
        // What a fetch leaves is a cache, never a way to root: no set-id
        // bits, no file capabilities or security labels, no link that
        // leaves where the fetch may write.
        let mut meta = e.clone();
        meta.mode &= !0o6000;
        meta.xattrs
            .retain(|k, _| !k.starts_with("trusted.overlay.") && !k.starts_with("security."));
        if e.kind == Kind::Symlink {
            let t = e.link.as_bytes();
            if t.first() == Some(&b'/') || t.split(|&c| c == b'/').any(|c| c == b"..") {
                bail!(
                    "the fetch left a link {} -> {}, which leaves where it may write; refusing to put it in place",
                    e.path,
                    e.link
                );
            }
        }
        match e.kind {
            Kind::Dir => {
                match &live {
                    Some(n) if n.kind() == Kind::Dir => {
                        if e.xattrs.contains_key(OPAQUE) {
                            let d = n.reopen()?;
                            for c in fsx::names(d.as_fd())? {
                                fsx::remove_all(d.as_fd(), &c, dev, &no_subvolumes)?;
                            }
                        }
                    }
                    Some(_) => {
                        fsx::remove_all(pfd.as_fd(), &name, dev, &no_subvolumes)?;
                        fsx::make(pfd.as_fd(), &name, &meta)?;
                    }
                    None => {
                        fsx::make(pfd.as_fd(), &name, &meta)?;
                    }
                }
                let d = fsx::open_child(pfd.as_fd(), &name)?
                    .context("a directory vanished")?
                    .reopen()?;
                fsx::set_meta(d.as_fd(), &meta)?;
                dirs.push(meta);
            }
            Kind::File | Kind::Symlink => {
                // Written beside its name, then renamed over it: a reader
                // sees the old file or the new one, never half of one.
                let tmp = {
                    let mut t = b".wavegate-adopt-".to_vec();
                    t.extend_from_slice(&name);
                    t
                };
                fsx::remove_all(pfd.as_fd(), &tmp, dev, &no_subvolumes)?;
                if let Some(f) = fsx::make(pfd.as_fd(), &tmp, &meta)? {
                    let rel = e.path.as_bytes().strip_prefix(b"/").unwrap_or(e.path.as_bytes());
                    let src = fsx::node_at(tree_fd.as_fd(), rel)?
                        .context("a staged file vanished")?
                        .reopen()?;
                    fsx::copy_sparse(&src, e.size, &f)?;
                    fsx::set_meta(f.as_fd(), &meta)?;
                    fsx::set_times(f.as_fd(), &meta)?;
                    f.sync_all()?;
                } else {
                    fsx::set_meta_at(pfd.as_fd(), &tmp, &meta)?;
                }
                if let Some(n) = &live
                    && n.kind() == Kind::Dir
                {
                    fsx::remove_all(pfd.as_fd(), &name, dev, &no_subvolumes)?;
                }
                rustix::fs::renameat(
                    &pfd,
                    std::ffi::OsStr::from_bytes(&tmp),
                    &pfd,
                    std::ffi::OsStr::from_bytes(&name),
                )
                .with_context(|| format!("putting {} in place", e.path))?;
            }
            _ => {
                // A FIFO, socket or device in a package cache is not
                // something a fetch should leave; it is not put in place.
                tracing::warn!("the fetch left {} ({}); not put in place", e.path, e.kind.as_str());
                continue;
            }
        }
        done += 1;
    }
    // Directory times last: what was put in them moved them.
    for d in dirs.iter().rev() {
        if let Some(fd) = fsx::open_beneath(root_fd.as_fd(), d.path.as_bytes(), true)? {
            fsx::set_times(fd.as_fd(), d)?;
        }
    }
    rustix::fs::syncfs(&root_fd)?;
    Ok(done)
}

/// Make `path` (and its missing parents) below the host root, as root's
/// 0755 directories, without following links; its handle.
fn mkdirs(root: std::os::fd::BorrowedFd<'_>, path: &RawPath) -> Result<std::os::fd::OwnedFd> {
    let mut at = fsx::open_beneath(root, b"/", true)?.context("the host root")?;
    let mut so_far = RawPath(b"/".to_vec());
    for part in path.as_bytes().split(|&c| c == b'/').filter(|p| !p.is_empty()) {
        so_far = so_far.child(part);
        let name = std::ffi::OsStr::from_bytes(part);
        let made = match rustix::fs::mkdirat(&at, name, rustix::fs::Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(e).with_context(|| format!("making {so_far}")),
        };
        at = fsx::open_beneath(root, so_far.as_bytes(), true)?
            .with_context(|| format!("{so_far} vanished as it was made"))?;
        if made {
            // The agent's own umask (077) is not what a cache directory
            // should have.
            rustix::fs::fchmod(&at, rustix::fs::Mode::from_raw_mode(0o755))?;
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_stages_to_the_same_place_every_time() {
        let a = key("apt-get update", &["/var/cache/apt".into()]);
        assert_eq!(a, key("apt-get update", &["/var/cache/apt".into()]));
        assert_ne!(a, key("apt-get update", &["/var/cache/apt2".into()]));
        assert_ne!(a, key("apt-get  update", &["/var/cache/apt".into()]));
    }
}
