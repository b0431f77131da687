//! The record stream inside a tar+zstd part's archive (zstd-compressed).
//!
//! It is wavegate's own, not tar: tar has no type for a socket, and a name
//! in a tar header goes through tools that would unpack it by path. Every
//! record carries what a restore needs and nothing it would have to look
//! up on the live tree:
//!
//! ```text
//! "WGAR\x01\n"
//! per entry:  0x01 u32-le len, the entry as JSON (path as escaped bytes,
//!             type, mode, owner, times, size, link, device, xattrs)
//!   per data block of a file (a block of zeros is a hole, never stored):
//!             0x02 u64-le offset, u32-le len, bytes
//!   end of a file:
//!             0x03
//! end:        0xff u64-le number of entries
//! ```
//!
//! Entries come in pre-order (a directory before what it holds).

use std::io::{Read, Write};

use anyhow::{Context, Result, bail};

use super::Entry;

const MAGIC: &[u8] = b"WGAR\x01\n";
const ENTRY: u8 = 0x01;
const BLOCK: u8 = 0x02;
const END_FILE: u8 = 0x03;
const END: u8 = 0xff;
/// No header or block is larger (a block is 64 KiB; a header with every
/// xattr of a file fits easily).
const MAX_RECORD: u32 = 16 << 20;

/// Writes the record stream.
pub struct Writer<W: Write> {
    out: W,
    count: u64,
}

impl<W: Write> Writer<W> {
    /// Start a stream.
    pub fn new(mut out: W) -> Result<Writer<W>> {
        out.write_all(MAGIC)?;
        Ok(Writer { out, count: 0 })
    }

    /// An entry's header (its digest is not part of it).
    pub fn entry(&mut self, e: &Entry) -> Result<()> {
        let mut e = e.clone();
        e.sha256.clear();
        let json = serde_json::to_vec(&e)?;
        self.out.write_all(&[ENTRY])?;
        self.out.write_all(&u32::try_from(json.len())?.to_le_bytes())?;
        self.out.write_all(&json)?;
        self.count += 1;
        Ok(())
    }

    /// A data block of the file whose header came last.
    pub fn block(&mut self, off: u64, bytes: &[u8]) -> Result<()> {
        self.out.write_all(&[BLOCK])?;
        self.out.write_all(&off.to_le_bytes())?;
        self.out.write_all(&u32::try_from(bytes.len())?.to_le_bytes())?;
        self.out.write_all(bytes)?;
        Ok(())
    }

    /// The end of a file's blocks.
    pub fn end_file(&mut self) -> Result<()> {
        self.out.write_all(&[END_FILE])?;
        Ok(())
    }

    /// The end of the stream.
    pub fn finish(mut self) -> Result<W> {
        self.out.write_all(&[END])?;
        self.out.write_all(&self.count.to_le_bytes())?;
        Ok(self.out)
    }
}

/// One thing read from the stream.
pub enum Item<'a> {
    /// An entry's header.
    Entry(Entry),
    /// A data block of the last file.
    Block(u64, &'a [u8]),
    /// The end of the last file's blocks.
    EndFile,
}

fn byte(r: &mut impl Read) -> Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b).context("the archive ends early")?;
    Ok(b[0])
}

fn u32_le(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).context("the archive ends early")?;
    Ok(u32::from_le_bytes(b))
}

fn u64_le(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).context("the archive ends early")?;
    Ok(u64::from_le_bytes(b))
}

/// Read a stream to its end, handing every item to `on`. Fails on anything
/// that is not a well-formed stream.
pub fn read(mut r: impl Read, on: &mut dyn FnMut(Item<'_>) -> Result<()>) -> Result<u64> {
    let mut magic = [0u8; 6];
    r.read_exact(&mut magic).context("the archive ends early")?;
    if magic != MAGIC {
        bail!("not a wavegate snapshot archive (an older agent's tar archive cannot be restored safely)");
    }
    let mut buf = Vec::new();
    let mut count = 0u64;
    let mut in_file = false;
    loop {
        match byte(&mut r)? {
            ENTRY => {
                if in_file {
                    bail!("an entry starts inside a file's data");
                }
                let n = u32_le(&mut r)?;
                if n > MAX_RECORD {
                    bail!("an entry header of {n} bytes");
                }
                buf.resize(n as usize, 0);
                r.read_exact(&mut buf).context("the archive ends early")?;
                let e: Entry = serde_json::from_slice(&buf).context("a damaged entry header")?;
                in_file = e.kind == super::Kind::File;
                count += 1;
                on(Item::Entry(e))?;
            }
            BLOCK => {
                if !in_file {
                    bail!("data outside a file");
                }
                let off = u64_le(&mut r)?;
                let n = u32_le(&mut r)?;
                if n > MAX_RECORD {
                    bail!("a data block of {n} bytes");
                }
                buf.resize(n as usize, 0);
                r.read_exact(&mut buf).context("the archive ends early")?;
                on(Item::Block(off, &buf))?;
            }
            END_FILE => {
                if !in_file {
                    bail!("the end of a file that did not start");
                }
                in_file = false;
                on(Item::EndFile)?;
            }
            END => {
                if in_file {
                    bail!("the archive ends inside a file");
                }
                let n = u64_le(&mut r)?;
                if n != count {
                    bail!("the archive says it holds {n} entries; it holds {count}");
                }
                return Ok(count);
            }
            t => bail!("a damaged archive (record type {t:#x})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Kind, RawPath};
    use super::*;

    fn entry(path: &[u8], kind: Kind, size: u64) -> Entry {
        Entry {
            path: RawPath(path.to_vec()),
            kind,
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime: 3,
            mtime_nsec: 4,
            size,
            sha256: String::new(),
            link: RawPath::default(),
            rdev: 0,
            xattrs: Default::default(),
        }
    }

    #[test]
    fn a_stream_reads_back_item_for_item() {
        let mut w = Writer::new(Vec::new()).expect("new");
        w.entry(&entry(b"/d", Kind::Dir, 0)).expect("dir");
        w.entry(&entry(b"/d/caf\xe9", Kind::File, 10)).expect("file");
        w.block(0, b"hello").expect("block");
        w.end_file().expect("end");
        w.entry(&entry(b"/d/p", Kind::Fifo, 0)).expect("fifo");
        let bytes = w.finish().expect("finish");
        let mut seen = Vec::new();
        let n = read(&bytes[..], &mut |i| {
            seen.push(match i {
                Item::Entry(e) => format!("{} {}", e.path, e.kind.as_str()),
                Item::Block(o, b) => format!("{o}:{}", String::from_utf8_lossy(b)),
                Item::EndFile => "eof".into(),
            });
            Ok(())
        })
        .expect("reads");
        assert_eq!(n, 3);
        assert_eq!(seen, ["/d dir", "/d/caf\\xe9 file", "0:hello", "eof", "/d/p fifo"]);
    }

    #[test]
    fn a_cut_or_damaged_stream_is_refused() {
        let mut w = Writer::new(Vec::new()).expect("new");
        w.entry(&entry(b"/f", Kind::File, 5)).expect("file");
        w.block(0, b"hello").expect("block");
        w.end_file().expect("end");
        let bytes = w.finish().expect("finish");
        for cut in [3, 10, bytes.len() - 1] {
            assert!(read(&bytes[..cut], &mut |_| Ok(())).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        let last = bad.len() - 8;
        bad[last] = 9;
        assert!(read(&bad[..], &mut |_| Ok(())).is_err(), "a wrong count");
        assert!(read(&b"ustar\0\0\0"[..], &mut |_| Ok(())).is_err(), "a tar archive");
    }
}
