//! Snapshots of a host's write set, taken before its first real step, read
//! back and verified; restored exactly (content, modes, owners, timestamps,
//! symlinks; files the step created are removed). tar + zstd, with a JSON
//! manifest of every path and its content hash.

use std::collections::BTreeMap;
use std::io::{Read, Write};
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

/// A hashing tee: what passes through is also hashed.
struct Tee<T> {
    inner: T,
    hash: Sha256,
    bytes: u64,
}

impl<T> Tee<T> {
    fn new(inner: T) -> Tee<T> {
        Tee {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    fn finish(self) -> (T, String, u64) {
        (self.inner, hex::encode(self.hash.finalize()), self.bytes)
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Fill in the content hash of every file entry, on every core.
fn hash_entries(root: &Path, entries: &mut [Entry]) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = entries.len().div_ceil(cores).max(1);
    std::thread::scope(|s| {
        let jobs: Vec<_> = entries
            .chunks_mut(chunk)
            .map(|part| {
                s.spawn(move || {
                    for e in part.iter_mut().filter(|e| e.kind == "file") {
                        e.sha256 = hash_file(&root.join(rel(&e.path)))?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().map_err(|_| anyhow::anyhow!("a hashing thread panicked"))?)
    })
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
        // Filled in by whoever reads the content anyway.
        sha256: String::new(),
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
    let (roots, mut entries) = walk(root, writes)?;
    // One pass over the write set: each file is hashed as it is archived,
    // and the archive is hashed as it is written; zstd compresses on every
    // core.
    let (archive_sha256, archive_bytes) = {
        let file = std::fs::File::create(tmp.join("data.tar.zst"))?;
        let mut enc = zstd::Encoder::new(Tee::new(file), 3)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        enc.multithread(u32::try_from(cores).unwrap_or(1))?;
        let mut tar = tar::Builder::new(enc);
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        for e in &mut entries {
            let full = root.join(rel(&e.path));
            if e.kind == "file" {
                let f = std::fs::File::open(&full).with_context(|| format!("archiving {}", e.path))?;
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&f.metadata()?, tar::HeaderMode::Complete);
                let mut tee = Tee::new(f.take(e.size));
                tar.append_data(&mut header, rel(&e.path), &mut tee)
                    .with_context(|| format!("archiving {}", e.path))?;
                let (_, sha, n) = tee.finish();
                if n != e.size {
                    bail!("{} changed size while it was archived", e.path);
                }
                e.sha256 = sha;
            } else {
                tar.append_path_with_name(&full, rel(&e.path))
                    .with_context(|| format!("archiving {}", e.path))?;
            }
        }
        let (file, sha, bytes) = tar.into_inner()?.finish()?.finish();
        file.sync_all()?;
        (sha, bytes)
    };
    let m = Manifest {
        host: host.to_owned(),
        rollout: rollout.to_owned(),
        roots,
        entries,
        archive_bytes,
        archive_sha256,
    };
    crate::journal::write_durably(&tmp.join("manifest.json"), &serde_json::to_vec_pretty(&m)?)?;
    verify(&tmp, &m).context("reading the new snapshot back")?;
    std::fs::create_dir_all(d.parent().unwrap_or(state_dir))?;
    std::fs::rename(&tmp, &d)?;
    Ok(m)
}

/// Read the archive back and check it against the manifest, in one pass:
/// the archive's hash, every entry, every file's content hash.
pub fn verify(d: &Path, m: &Manifest) -> Result<()> {
    let archive = d.join("data.tar.zst");
    let raw = Tee::new(std::fs::File::open(&archive)?);
    // Decompress (and hash the archive) on one core, read the entries and
    // hash their content on another.
    let (pipe_in, mut pipe_out) = std::io::pipe()?;
    let decompress = std::thread::spawn(move || -> std::io::Result<String> {
        let mut dec = zstd::Decoder::new(raw)?;
        std::io::copy(&mut dec, &mut pipe_out)?;
        // Whatever follows the frame counts too: the hash covers every byte.
        let mut raw = dec.finish().into_inner();
        std::io::copy(&mut raw, &mut std::io::sink())?;
        Ok(raw.finish().1)
    });
    let checked = check_entries(pipe_in, m);
    let archive_sha256 = decompress
        .join()
        .map_err(|_| anyhow::anyhow!("the decompressor panicked"))?
        .context("reading the snapshot archive")?;
    checked?;
    if archive_sha256 != m.archive_sha256 {
        bail!("the snapshot archive does not match its manifest hash");
    }
    Ok(())
}

/// Check a tar stream against the manifest, then read it to its end.
fn check_entries(stream: impl Read, m: &Manifest) -> Result<()> {
    let want: BTreeMap<&str, &Entry> = m.entries.iter().map(|e| (rel(&e.path), e)).collect();
    let mut seen = 0usize;
    let mut tar = tar::Archive::new(stream);
    let result = (|| {
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
    })();
    // Drain, so the writer on the other end always finishes.
    let _ = std::io::copy(&mut tar.into_inner(), &mut std::io::sink());
    result
}

/// Check the archive's bytes against the manifest (its content was checked
/// against the manifest when the snapshot was taken).
fn check_archive(d: &Path, m: &Manifest) -> Result<()> {
    if hash_file(&d.join("data.tar.zst"))? != m.archive_sha256 {
        bail!("the snapshot archive does not match its manifest hash");
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
    check_archive(&d, &m)?;
    for w in m.roots.keys() {
        let full = root.join(rel(w));
        match full.symlink_metadata() {
            Ok(md) if md.is_dir() => std::fs::remove_dir_all(&full)?,
            Ok(_) => std::fs::remove_file(&full)?,
            Err(_) => {}
        }
    }
    // Decompress on one core and unpack on another, as `zstd -d | tar -x`.
    let (pipe_in, mut pipe_out) = std::io::pipe()?;
    let archive = std::fs::File::open(d.join("data.tar.zst"))?;
    let decompress = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut dec = zstd::Decoder::new(archive)?;
        std::io::copy(&mut dec, &mut pipe_out)
    });
    let mut tar = tar::Archive::new(pipe_in);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(true);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    let unpacked = tar.unpack(root).context("unpacking the snapshot");
    // Drain the pipe so the decompressor always ends, then judge both.
    let mut rest = tar.into_inner();
    let _ = std::io::copy(&mut rest, &mut std::io::sink());
    drop(rest);
    let decompressed = decompress
        .join()
        .map_err(|_| anyhow::anyhow!("the decompressor panicked"))?;
    unpacked?;
    decompressed.context("decompressing the snapshot")?;
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
    // A rollback that a power cut could undo is no rollback.
    nix::unistd::syncfs(std::fs::File::open(root)?).context("syncing the restored files")?;
    let (_, mut now) = walk(root, &m.roots.keys().cloned().collect::<Vec<_>>())?;
    hash_entries(root, &mut now)?;
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
