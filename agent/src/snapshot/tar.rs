//! The tar + zstd backend: an archive of the part's paths (the record
//! stream of [`super::archive`], zstd on every core) with a manifest of
//! every path, its type and its content digest, taken in one pass over the
//! data, read back and checked before it counts. It works on every
//! filesystem; it is what a part gets when its filesystem has nothing
//! better, or when a site policy forces it.
//!
//! Nothing here resolves a path twice: the walk holds a handle per
//! directory and reads each file through the handle it was found by
//! ([`super::fsx`]). A restore rebuilds the part beside the live files,
//! checking every record against the manifest and every file's digest as
//! it goes ([`super::stage`]).

use std::io::{Read, Write};
use std::os::fd::AsFd as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::archive::{self, Item};
use super::fsx::{self, BlockDigest};
use super::stage::Builder;
use super::{Backend, Entry, Kept, Kind, Part, TarInfo, walk_part};

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

/// The tar + zstd backend.
pub struct TarZstd;

/// The part's archive record, when it has one.
fn record(part: &Part) -> Option<&TarInfo> {
    match &part.kept {
        Some(Kept::Tar(t)) => Some(t),
        _ => None,
    }
}

fn info(part: &Part) -> Result<&TarInfo> {
    let t = record(part).context("a tar+zstd part without its archive record")?;
    if t.format != 1 {
        bail!(
            "this snapshot was taken by an older agent as a tar archive, which cannot be restored without following the paths in it; take a new snapshot"
        );
    }
    Ok(t)
}

/// Read an archive, decompressing (and hashing what is read) on one core
/// and handling its records on another. Returns the archive's SHA-256.
fn read_archive(file: &Path, on: &mut dyn FnMut(Item<'_>) -> Result<()>) -> Result<String> {
    let raw = Tee::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?);
    let (pipe_in, mut pipe_out) = std::io::pipe()?;
    let decompress = std::thread::spawn(move || -> std::io::Result<String> {
        let mut dec = zstd::Decoder::new(raw)?;
        std::io::copy(&mut dec, &mut pipe_out)?;
        // Whatever follows the frame counts too: the hash covers every byte.
        let mut raw = dec.finish().into_inner();
        std::io::copy(&mut raw, &mut std::io::sink())?;
        Ok(raw.finish().1)
    });
    let mut input = std::io::BufReader::with_capacity(256 * 1024, pipe_in);
    let read = archive::read(&mut input, on);
    // Drain, so the decompressor always ends, then judge both.
    let _ = std::io::copy(&mut input, &mut std::io::sink());
    drop(input);
    let sha256 = decompress
        .join()
        .map_err(|_| anyhow::anyhow!("the decompressor panicked"))?
        .context("reading the snapshot archive")?;
    read?;
    Ok(sha256)
}

impl Backend for TarZstd {
    fn prepare(&self, part: &mut Part, index: usize, _rollout: &str) {
        part.kept = Some(Kept::Tar(TarInfo {
            file: format!("part-{index}.zst"),
            bytes: 0,
            sha256: String::new(),
            format: 1,
            data: 0,
        }));
    }

    fn kept_bytes(&self, part: &Part) -> u64 {
        record(part).map_or(part.alloc, |t| t.bytes)
    }

    fn take(&self, root: &Path, dir: &Path, part: &mut Part) -> Result<Vec<String>> {
        let roots: Vec<String> = part.roots.keys().cloned().collect();
        let file = record(part)
            .context("a tar+zstd part without its archive record")?
            .file
            .clone();
        let root_fd = fsx::open_dir(root)?;
        let mut entries = Vec::new();
        let mut data = 0u64;
        // One pass over the write set: each file is hashed as it is archived,
        // and the archive is hashed as it is written; zstd compresses on
        // every core.
        let (found, sha256, bytes) = {
            let out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_private()
                .open(dir.join(&file))?;
            let mut enc = zstd::Encoder::new(Tee::new(out), 3)?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            enc.multithread(u32::try_from(cores).unwrap_or(1))?;
            let mut w = archive::Writer::new(std::io::BufWriter::with_capacity(256 * 1024, enc))?;
            let found = walk_part(root_fd.as_fd(), "/", &roots, &part.skip, &mut |mut e, f| {
                w.entry(&e).with_context(|| format!("archiving {}", e.path))?;
                if e.kind == Kind::File {
                    let f = f.context("a file without a handle")?;
                    e.sha256 = fsx::digest(f, e.size, |off, block| {
                        data += block.len() as u64;
                        w.block(off, block)
                    })
                    .with_context(|| format!("archiving {}", e.path))?;
                    w.end_file()?;
                }
                entries.push(e);
                Ok(())
            })?;
            let enc = w.finish()?.into_inner().map_err(|e| e.into_error())?;
            let (out, sha, bytes) = enc.finish()?.finish();
            out.sync_all()?;
            (found, sha, bytes)
        };
        part.alloc = found.alloc;
        let found = found.boundaries;
        part.skip.extend(found.iter().cloned());
        part.skip.sort();
        part.skip.dedup();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        part.entries = entries;
        part.kept = Some(Kept::Tar(TarInfo {
            file,
            bytes,
            sha256,
            format: 1,
            data,
        }));
        self.verify(root, dir, part).context("reading the new snapshot back")?;
        Ok(found)
    }

    /// Read the archive back and check it against the manifest, in one
    /// pass: the archive's hash, every entry, every file's content digest.
    fn verify(&self, _root: &Path, dir: &Path, part: &Part) -> Result<()> {
        let t = info(part)?;
        let want: std::collections::HashMap<&super::RawPath, &Entry> =
            part.entries.iter().map(|e| (&e.path, e)).collect();
        let mut seen = 0usize;
        let mut current: Option<(&Entry, BlockDigest)> = None;
        let sha256 = read_archive(&dir.join(&t.file), &mut |item| {
            match item {
                Item::Entry(e) => {
                    let Some(w) = want.get(&e.path) else {
                        bail!("the snapshot holds {}, which its manifest does not list", e.path);
                    };
                    let mut a = e.clone();
                    a.sha256 = w.sha256.clone();
                    if a != **w {
                        bail!("{} in the snapshot does not match its manifest", e.path);
                    }
                    seen += 1;
                    if e.kind == Kind::File {
                        current = Some((w, BlockDigest::new(e.size)));
                    }
                }
                Item::Block(off, bytes) => {
                    if let Some((_, d)) = current.as_mut() {
                        d.block(off, bytes);
                    }
                }
                Item::EndFile => {
                    if let Some((w, d)) = current.take()
                        && d.finish() != w.sha256
                    {
                        bail!("{} in the snapshot does not match its manifest hash", w.path);
                    }
                }
            }
            Ok(())
        })?;
        if seen != part.entries.len() {
            bail!(
                "the snapshot holds {seen} entries; its manifest lists {}",
                part.entries.len()
            );
        }
        if sha256 != t.sha256 {
            bail!("the snapshot archive does not match its manifest hash");
        }
        Ok(())
    }

    fn check_before_restore(&self, _root: &Path, dir: &Path, part: &Part) -> Result<()> {
        // Every record and digest is checked as the restored tree is built,
        // and the archive's hash before it is swapped in.
        let t = info(part)?;
        if !dir.join(&t.file).is_file() {
            bail!("the snapshot archive {} is gone", t.file);
        }
        Ok(())
    }

    fn restore_bytes(&self, part: &Part) -> u64 {
        record(part).map_or(0, |t| t.data)
    }

    fn build(&self, _root: &Path, dir: &Path, part: &Part, b: &mut Builder<'_>) -> Result<()> {
        let t = info(part)?;
        let sha256 = read_archive(&dir.join(&t.file), &mut |item| match item {
            Item::Entry(e) => b.entry(e),
            Item::Block(off, bytes) => b.block(off, bytes),
            Item::EndFile => b.end_file(true),
        })?;
        if sha256 != t.sha256 {
            bail!("the snapshot archive does not match its manifest hash");
        }
        Ok(())
    }

    fn release(&self, _root: &Path, dir: &Path, part: &Part) -> Result<()> {
        let Some(t) = record(part) else { return Ok(()) };
        let f = dir.join(&t.file);
        if f.exists() {
            std::fs::remove_file(&f)?;
        }
        Ok(())
    }
}

/// Files the agent writes are its own: 0600 whatever the umask.
trait PrivateOpen {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateOpen for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}
