//! Snapshots of a host's write set, taken before its first real step, read
//! back and verified; restored exactly (content, modes, owners, timestamps,
//! symlinks; files the step created are removed). tar + zstd, with a JSON
//! manifest of every path and its content hash.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One path of the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the host root, starting with `/`.
    pub path: String,
    /// file | dir | symlink
    pub kind: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Size (files).
    pub size: u64,
    /// SHA-256 (files).
    pub sha256: String,
    /// Target (symlinks).
    pub link: String,
}

/// What a snapshot holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The host it was taken on; a restore elsewhere is refused.
    pub host: String,
    /// The rollout it belongs to.
    pub rollout: String,
    /// The write set, and whether each path existed.
    pub roots: BTreeMap<String, bool>,
    /// Every path under the write set.
    pub entries: Vec<Entry>,
    /// Bytes of the archive.
    pub archive_bytes: u64,
    /// SHA-256 of the archive.
    pub archive_sha256: String,
}

fn rel(p: &str) -> &str {
    p.trim_start_matches('/')
}

fn hash_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn entry(root: &Path, path: &str) -> Result<Entry> {
    let full = root.join(rel(path));
    let m = full.symlink_metadata()?;
    let kind = if m.file_type().is_symlink() {
        "symlink"
    } else if m.is_dir() {
        "dir"
    } else {
        "file"
    };
    Ok(Entry {
        path: path.to_owned(),
        kind: kind.into(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        size: if kind == "file" { m.len() } else { 0 },
        sha256: if kind == "file" {
            hash_file(&full)?
        } else {
            String::new()
        },
        link: if kind == "symlink" {
            std::fs::read_link(&full)?.display().to_string()
        } else {
            String::new()
        },
    })
}

/// Every path under the write set, sorted (parents before children).
fn walk(root: &Path, writes: &[String]) -> Result<(BTreeMap<String, bool>, Vec<Entry>)> {
    let mut roots = BTreeMap::new();
    let mut entries = Vec::new();
    for w in writes {
        let full = root.join(rel(w));
        let exists = full.symlink_metadata().is_ok();
        roots.insert(w.clone(), exists);
        if !exists {
            continue;
        }
        let mut stack = vec![w.clone()];
        while let Some(p) = stack.pop() {
            let e = entry(root, &p)?;
            if e.kind == "dir" {
                let mut children: Vec<String> = std::fs::read_dir(root.join(rel(&p)))?
                    .flatten()
                    .map(|c| format!("{}/{}", p.trim_end_matches('/'), c.file_name().to_string_lossy()))
                    .collect();
                children.sort();
                children.reverse();
                stack.extend(children);
            }
            entries.push(e);
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((roots, entries))
}

/// Where a rollout's snapshot lives.
pub fn dir(state_dir: &Path, rollout: &str) -> PathBuf {
    let safe: String = rollout
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    state_dir.join("snapshots").join(safe)
}

/// Take (once) and verify the snapshot of `writes` for `rollout`. A verified
/// snapshot that already exists is returned as it is, never retaken: it holds
/// the state before the first step.
pub fn take(state_dir: &Path, host: &str, root: &Path, rollout: &str, writes: &[String]) -> Result<Manifest> {
    let d = dir(state_dir, rollout);
    if let Ok(bytes) = std::fs::read(d.join("manifest.json")) {
        let m: Manifest = serde_json::from_slice(&bytes)?;
        verify(&d, &m)?;
        return Ok(m);
    }
    let tmp = d.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let (roots, entries) = walk(root, writes)?;
    {
        let file = std::fs::File::create(tmp.join("data.tar.zst"))?;
        let enc = zstd::Encoder::new(file, 3)?.auto_finish();
        let mut tar = tar::Builder::new(enc);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        for e in &entries {
            tar.append_path_with_name(root.join(rel(&e.path)), rel(&e.path))
                .with_context(|| format!("archiving {}", e.path))?;
        }
        tar.into_inner()?;
    }
    let archive = tmp.join("data.tar.zst");
    let m = Manifest {
        host: host.to_owned(),
        rollout: rollout.to_owned(),
        roots,
        entries,
        archive_bytes: std::fs::metadata(&archive)?.len(),
        archive_sha256: hash_file(&archive)?,
    };
    crate::journal::write_durably(&tmp.join("manifest.json"), &serde_json::to_vec_pretty(&m)?)?;
    std::fs::File::open(&archive)?.sync_all()?;
    verify(&tmp, &m).context("reading the new snapshot back")?;
    std::fs::create_dir_all(d.parent().unwrap_or(state_dir))?;
    std::fs::rename(&tmp, &d)?;
    Ok(m)
}

/// Read the archive back and check it against the manifest.
pub fn verify(d: &Path, m: &Manifest) -> Result<()> {
    let archive = d.join("data.tar.zst");
    if hash_file(&archive)? != m.archive_sha256 {
        bail!("the snapshot archive does not match its manifest hash");
    }
    let want: BTreeMap<&str, &Entry> = m.entries.iter().map(|e| (rel(&e.path), e)).collect();
    let mut seen = 0usize;
    let mut tar = tar::Archive::new(zstd::Decoder::new(std::fs::File::open(&archive)?)?);
    for item in tar.entries()? {
        let mut item = item?;
        let path = item.path()?.display().to_string();
        let path = path.trim_end_matches('/').to_owned();
        let Some(e) = want.get(path.as_str()) else {
            bail!("the snapshot holds {path}, which its manifest does not list")
        };
        if e.kind == "file" {
            let mut h = Sha256::new();
            let mut buf = [0u8; 64 * 1024];
            loop {
                let n = item.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            if hex::encode(h.finalize()) != e.sha256 {
                bail!("{} in the snapshot does not match its manifest hash", e.path);
            }
        }
        seen += 1;
    }
    if seen != m.entries.len() {
        bail!(
            "the snapshot holds {seen} entries; its manifest lists {}",
            m.entries.len()
        );
    }
    Ok(())
}

/// Restore the write set from the snapshot: remove what is there now, put
/// back what was there, and check the result against the manifest.
pub fn restore(state_dir: &Path, host: &str, root: &Path, rollout: &str) -> Result<Manifest> {
    let d = dir(state_dir, rollout);
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(d.join("manifest.json"))
            .with_context(|| format!("no snapshot for rollout {rollout} on this host"))?,
    )?;
    if m.host != host {
        bail!(
            "this snapshot was taken on host {}, not {host}; refusing to restore it here",
            m.host
        );
    }
    verify(&d, &m)?;
    for w in m.roots.keys() {
        let full = root.join(rel(w));
        match full.symlink_metadata() {
            Ok(md) if md.is_dir() => std::fs::remove_dir_all(&full)?,
            Ok(_) => std::fs::remove_file(&full)?,
            Err(_) => {}
        }
    }
    let mut tar = tar::Archive::new(zstd::Decoder::new(std::fs::File::open(d.join("data.tar.zst"))?)?);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    tar.unpack(root).context("unpacking the snapshot")?;
    // Directory mtimes change as their children are written; set them last.
    for e in m.entries.iter().rev().filter(|e| e.kind == "dir") {
        let full = root.join(rel(&e.path));
        let t = nix::sys::time::TimeSpec::new(e.mtime, 0);
        let _ = nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &full,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }
    let (_, now) = walk(root, &m.roots.keys().cloned().collect::<Vec<_>>())?;
    if now != m.entries {
        let diff: Vec<&str> = now
            .iter()
            .filter(|e| !m.entries.contains(e))
            .map(|e| e.path.as_str())
            .take(5)
            .collect();
        bail!(
            "after the restore the write set still differs from the snapshot: {}",
            diff.join(", ")
        );
    }
    Ok(m)
}

/// Release (delete) a snapshot.
pub fn release(state_dir: &Path, rollout: &str) -> Result<()> {
    let d = dir(state_dir, rollout);
    if d.exists() {
        std::fs::remove_dir_all(&d)?;
    }
    Ok(())
}
