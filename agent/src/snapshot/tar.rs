//! The tar + zstd backend: an archive of the part's files with a manifest
//! of every path and its content hash, taken in one pass over the data
//! (each file hashed as it is archived, zstd on every core), read back and
//! checked before it counts, and restored exactly. It works on every
//! filesystem; it is what a part gets when its filesystem has nothing
//! better, or when a site policy forces it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::{Backend, Entry, Part, TarInfo, hash_file, host_path, is_boundary, remove_except, walk};

fn rel(p: &str) -> &str {
    p.trim_start_matches('/')
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
pub(crate) fn hash_entries(root: &Path, entries: &mut [Entry]) -> Result<()> {
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

/// The tar + zstd backend.
pub struct TarZstd;

fn info(part: &Part) -> Result<&TarInfo> {
    part.tar.as_ref().context("a tar+zstd part without its archive record")
}

impl Backend for TarZstd {
    fn take(&self, root: &Path, dir: &Path, part: &mut Part) -> Result<Vec<String>> {
        let roots: Vec<String> = part.roots.keys().cloned().collect();
        let (mut entries, found) = walk(root, "/", root, &roots, &part.skip)?;
        part.skip.extend(found.iter().cloned());
        part.skip.sort();
        part.skip.dedup();
        let file = info(part)?.file.clone();
        // One pass over the write set: each file is hashed as it is archived,
        // and the archive is hashed as it is written; zstd compresses on
        // every core.
        let (sha256, bytes) = {
            let out = std::fs::File::create(dir.join(&file))?;
            let mut enc = zstd::Encoder::new(Tee::new(out), 3)?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            enc.multithread(u32::try_from(cores).unwrap_or(1))?;
            let mut tar = tar::Builder::new(enc);
            tar.follow_symlinks(false);
            tar.mode(tar::HeaderMode::Complete);
            for e in &mut entries {
                let full = host_path(root, &e.path);
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
            let (out, sha, bytes) = tar.into_inner()?.finish()?.finish();
            out.sync_all()?;
            (sha, bytes)
        };
        part.entries = entries;
        part.tar = Some(TarInfo { file, bytes, sha256 });
        self.verify(root, dir, part).context("reading the new snapshot back")?;
        Ok(found)
    }

    /// Read the archive back and check it against the manifest, in one
    /// pass: the archive's hash, every entry, every file's content hash.
    fn verify(&self, _root: &Path, dir: &Path, part: &Part) -> Result<()> {
        let t = info(part)?;
        let raw = Tee::new(std::fs::File::open(dir.join(&t.file))?);
        // Decompress (and hash the archive) on one core, read the entries
        // and hash their content on another.
        let (pipe_in, mut pipe_out) = std::io::pipe()?;
        let decompress = std::thread::spawn(move || -> std::io::Result<String> {
            let mut dec = zstd::Decoder::new(raw)?;
            std::io::copy(&mut dec, &mut pipe_out)?;
            // Whatever follows the frame counts too: the hash covers every byte.
            let mut raw = dec.finish().into_inner();
            std::io::copy(&mut raw, &mut std::io::sink())?;
            Ok(raw.finish().1)
        });
        let checked = check_entries(pipe_in, &part.entries);
        let sha256 = decompress
            .join()
            .map_err(|_| anyhow::anyhow!("the decompressor panicked"))?
            .context("reading the snapshot archive")?;
        checked?;
        if sha256 != t.sha256 {
            bail!("the snapshot archive does not match its manifest hash");
        }
        Ok(())
    }

    /// Remove what is there now (never a mount point or another part), put
    /// back what was there, and check the result against the manifest.
    fn restore(&self, root: &Path, dir: &Path, part: &Part) -> Result<()> {
        let t = info(part)?;
        for r in part.roots.keys() {
            remove_except(root, r, &part.skip, is_boundary(root, r))?;
        }
        // Decompress on one core and unpack on another, as `zstd -d | tar -x`.
        let (pipe_in, mut pipe_out) = std::io::pipe()?;
        let archive = std::fs::File::open(dir.join(&t.file))?;
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
        for e in part.entries.iter().rev().filter(|e| e.kind == "dir") {
            set_mtime(&host_path(root, &e.path), e.mtime);
        }
        let roots: Vec<String> = part.roots.keys().cloned().collect();
        let (mut now, _) = walk(root, "/", root, &roots, &part.skip)?;
        hash_entries(root, &mut now)?;
        if now != part.entries {
            let diff: Vec<&str> = now
                .iter()
                .filter(|e| !part.entries.contains(e))
                .map(|e| e.path.as_str())
                .chain(
                    part.entries
                        .iter()
                        .filter(|e| !now.contains(e))
                        .map(|e| e.path.as_str()),
                )
                .take(5)
                .collect();
            bail!(
                "after the restore the write set still differs from the snapshot: {}",
                diff.join(", ")
            );
        }
        Ok(())
    }

    fn release(&self, _root: &Path, dir: &Path, part: &Part) -> Result<()> {
        let f = dir.join(&info(part)?.file);
        if f.exists() {
            std::fs::remove_file(&f)?;
        }
        Ok(())
    }
}

/// Set a path's modification (and access) time, seconds.
pub(crate) fn set_mtime(full: &Path, secs: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, 0);
    let _ = nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        full,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

/// Check a tar stream against the manifest, then read it to its end.
fn check_entries(stream: impl Read, entries: &[Entry]) -> Result<()> {
    let want: BTreeMap<&str, &Entry> = entries.iter().map(|e| (rel(&e.path), e)).collect();
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
        if seen != entries.len() {
            bail!(
                "the snapshot holds {seen} entries; its manifest lists {}",
                entries.len()
            );
        }
        Ok(())
    })();
    // Drain, so the writer on the other end always finishes.
    let _ = std::io::copy(&mut tar.into_inner(), &mut std::io::sink());
    result
}
