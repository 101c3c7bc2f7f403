//! Sources of an image: tar archives (plain, gzip or zstd compressed) and
//! host directories, read into a [`Tree`]. Stream content is spooled once
//! (only its non-zero blocks) and hashed on the way; directory content
//! stays where it is and is read again when the image is written.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use crate::ext4::BLOCK;
use crate::num::us;
use crate::progress::Progress;
use crate::tree::{self, FileData, Inode, Kind, Meta, Run, Time, Tree, TreeError};

/// Why a source could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Tree { path: PathBuf, source: TreeError },
    #[error("{path}: entry {entry:?}: {why}")]
    Entry {
        path: PathBuf,
        entry: String,
        why: String,
    },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
    /// Writing the image (or its spool) failed: the sources are not at
    /// fault.
    #[error("{}: cannot write the image: {source}{}", path.display(), output_hint(source))]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn output_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            " (the filesystem holding it is full: free space there, or give -o a path elsewhere)"
        }
        Some(libc::EFBIG) => " (the filesystem holding it cannot hold a file this large)",
        _ => "",
    }
}

/// Why reading one file's content failed.
#[derive(Debug)]
enum IngestError {
    /// Reading the source.
    Read(std::io::Error),
    /// Writing the content into the spool (the image being built).
    Write(std::io::Error),
}

/// Counts of what a source added.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
}

/// Where file content goes while the sources are read. Normally that is
/// the image file itself, from block `base` on, skipping the places where
/// backup superblocks may go: the data is then already where the image
/// needs it and is never copied again. Images over 256 GiB use an unnamed
/// file next to the output instead and copy from it.
pub struct Spool {
    file: File,
    buf: Vec<u8>,
    buf_at: u64,
    /// Next write position (bytes).
    pos: u64,
    /// Blocks kept free after each potential backup group start
    /// (superblock + descriptor blocks), when writing into the image.
    reserve: Option<u64>,
    /// The image being built, named when a write fails.
    target: PathBuf,
}

/// Where a build's file content lives, for the ext4 writer.
pub enum SpoolKind {
    /// In the image file, between block `base` and block `end`, with
    /// `reserve` blocks skipped at every potential backup group start.
    InImage { base: u64, end: u64, reserve: u64 },
    /// In a separate file: runs' `src` are offsets into it.
    File(File),
}

/// Blocks of descriptor table reserved by an in-image spool (enough for
/// 2048 groups, a 256 GiB image).
pub const GDT_RESERVE: u64 = 16;

impl Spool {
    /// A spool in an unnamed file in `dir`, for the image `target`.
    pub fn new(dir: &Path, target: &Path) -> std::io::Result<Spool> {
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(f) => f,
            Err(_) => {
                // Filesystems without O_TMPFILE: a named file, unlinked at once.
                let p = dir.join(format!(".umlctl-spool.{}", std::process::id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)?;
                std::fs::remove_file(&p)?;
                f
            }
        };
        Ok(Spool {
            file: f,
            buf: Vec::with_capacity(1 << 20),
            buf_at: 0,
            pos: 0,
            reserve: None,
            target: target.into(),
        })
    }

    /// A spool writing into the image file `file` (which will be `target`)
    /// from block 1 + GDT_RESERVE.
    pub fn in_image(file: File, target: &Path) -> Spool {
        let base = (1 + GDT_RESERVE) * BLOCK as u64;
        Spool {
            file,
            buf: Vec::with_capacity(1 << 20),
            buf_at: base,
            pos: base,
            reserve: Some(1 + GDT_RESERVE),
            target: target.into(),
        }
    }

    /// The image this spool is for.
    pub fn target(&self) -> &Path {
        &self.target
    }

    fn flush(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.buf_at)?;
            self.buf.clear();
        }
        self.buf_at = self.pos;
        Ok(())
    }

    /// Append whole blocks; returns where they went as (offset, bytes)
    /// pieces (more than one when a reserved area is stepped over).
    fn append(&mut self, mut data: &[u8]) -> std::io::Result<Vec<(u64, u64)>> {
        let mut pieces = Vec::new();
        let bpg = crate::ext4::BLOCKS_PER_GROUP;
        while !data.is_empty() {
            let mut room = data.len() as u64;
            if let Some(reserve) = self.reserve {
                let blk = self.pos / BLOCK as u64;
                let (g, off) = (blk / bpg, blk % bpg);
                if crate::ext4::is_backup_group(g) && off < reserve {
                    self.flush()?;
                    self.pos = (g * bpg + reserve) * BLOCK as u64;
                    self.buf_at = self.pos;
                    continue;
                }
                let next = if crate::ext4::is_backup_group(g + 1) {
                    (g + 1) * bpg
                } else {
                    u64::MAX / BLOCK as u64
                };
                room = room.min((next - blk) * BLOCK as u64);
            }
            let n = us(room);
            if self.buf.len() + n > (1 << 20) && !self.buf.is_empty() {
                self.flush()?;
            }
            if self.buf.is_empty() {
                self.buf_at = self.pos;
            }
            if n >= (1 << 20) {
                use std::os::unix::fs::FileExt;
                self.file.write_all_at(&data[..n], self.pos)?;
            } else {
                self.buf.extend_from_slice(&data[..n]);
            }
            pieces.push((self.pos, n as u64));
            self.pos += n as u64;
            if n >= (1 << 20) {
                self.buf_at = self.pos;
            }
            data = &data[n..];
        }
        Ok(pieces)
    }

    /// Finish writing; what the ext4 writer needs to find the content.
    pub fn finish(mut self) -> std::io::Result<SpoolKind> {
        self.flush()?;
        Ok(match self.reserve {
            Some(reserve) => SpoolKind::InImage {
                base: reserve,
                end: self.pos.div_ceil(BLOCK as u64),
                reserve,
            },
            None => SpoolKind::File(self.file),
        })
    }
}

fn is_zero(block: &[u8]) -> bool {
    block
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// Reads content: hashes it, finds the non-zero blocks, spools them.
struct Ingest {
    buf: Vec<u8>,
}

/// One file's content as it is being read: its digest so far, its
/// non-zero runs, and where it has got to.
struct Progressing {
    hasher: Sha256,
    runs: Vec<Run>,
    total: u64,
    lblk: u64,
}

impl Ingest {
    /// Read `size` bytes (or to the end when `exact` is false) from `r`.
    fn read(
        &mut self,
        r: &mut dyn Read,
        size: u64,
        exact: bool,
        spool: Option<&mut Spool>,
    ) -> Result<(FileData, u64), IngestError> {
        let mut p = Progressing {
            hasher: Sha256::new(),
            runs: Vec::new(),
            total: 0,
            lblk: 0,
        };
        self.feed(&mut p, r, size, exact, spool)?;
        let n = p.total;
        Ok((p.finish(), n))
    }

    /// Read a host file of `size` bytes, skipping its holes
    /// (SEEK_DATA/SEEK_HOLE): a 20 GiB sparse file costs only its data and
    /// the hashing of its zeros. The result is the same as [`Ingest::read`]
    /// gives (all-zero blocks are holes either way). Where the filesystem
    /// cannot say, the file is read whole.
    fn read_sparse(
        &mut self,
        f: &mut File,
        size: u64,
        mut spool: Option<&mut Spool>,
    ) -> Result<(FileData, u64), IngestError> {
        use crate::seek::{next_data, next_hole, Next};
        let blk = BLOCK as u64;
        let mut p = Progressing {
            hasher: Sha256::new(),
            runs: Vec::new(),
            total: 0,
            lblk: 0,
        };
        loop {
            if p.total >= size {
                break;
            }
            // The next data, rounded down to a block (data of a partial
            // block is read with its zeros); none: the rest is a hole.
            let data = match next_data(f, p.total) {
                Ok(Next::Data(d)) => (d / blk * blk).max(p.total).min(size),
                Ok(Next::NoMoreData) => size,
                Err(e) => {
                    if p.total == 0 {
                        // No SEEK_DATA here: read it whole.
                        f.seek(std::io::SeekFrom::Start(0))
                            .map_err(IngestError::Read)?;
                        return self.read(f, size, false, spool);
                    } else {
                        return Err(IngestError::Read(e));
                    }
                }
            };
            p.zeros(data - p.total);
            if data >= size {
                break;
            }
            let hole = next_hole(f, data)
                .map(|h| h.div_ceil(blk) * blk)
                .unwrap_or(size)
                .min(size);
            f.seek(std::io::SeekFrom::Start(data))
                .map_err(IngestError::Read)?;
            let want = hole - data;
            let before = p.total;
            self.feed(&mut p, &mut *f, want, false, spool.as_deref_mut())?;
            if p.total - before < want {
                // The file shrank while it was read: the caller sees the
                // short count.
                break;
            }
        }
        let n = p.total;
        Ok((p.finish(), n))
    }

    /// Read `size` bytes (or to the end when `exact` is false) from `r` into
    /// `p`; `p.total` must be a multiple of the block size unless this is
    /// the file's last piece.
    fn feed(
        &mut self,
        p: &mut Progressing,
        r: &mut dyn Read,
        size: u64,
        exact: bool,
        mut spool: Option<&mut Spool>,
    ) -> Result<(), IngestError> {
        if self.buf.is_empty() {
            self.buf = vec![0; 1 << 20];
        }
        let mut done = 0u64;
        loop {
            let want = us((size - done).min(self.buf.len() as u64));
            if want == 0 {
                break;
            }
            let mut got = 0;
            while got < want {
                let n = match r.read(&mut self.buf[got..want]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(IngestError::Read(e)),
                };
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got == 0 {
                if exact {
                    return Err(IngestError::Read(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the data ends early (truncated archive?)",
                    )));
                }
                break;
            }
            p.hasher.update(&self.buf[..got]);
            let padded = got.div_ceil(BLOCK) * BLOCK;
            self.buf[got..padded].fill(0);
            let mut i = 0;
            while i < padded {
                // A stretch of non-zero blocks.
                if is_zero(&self.buf[i..i + BLOCK]) {
                    i += BLOCK;
                    continue;
                }
                let start = i;
                while i < padded && !is_zero(&self.buf[i..i + BLOCK]) {
                    i += BLOCK;
                }
                let mut l = p.lblk + (start / BLOCK) as u64;
                let n = ((i - start) / BLOCK) as u64;
                let pieces = match spool.as_deref_mut() {
                    Some(s) => s.append(&self.buf[start..i]).map_err(IngestError::Write)?,
                    None => vec![(l * BLOCK as u64, n * BLOCK as u64)],
                };
                for (src, bytes) in pieces {
                    let n = bytes / BLOCK as u64;
                    match p.runs.last_mut() {
                        Some(r) if r.lblk + r.len == l && r.src + r.len * BLOCK as u64 == src => {
                            r.len += n
                        }
                        _ => p.runs.push(Run {
                            lblk: l,
                            len: n,
                            src,
                        }),
                    }
                    l += n;
                }
            }
            p.total += got as u64;
            done += got as u64;
            p.lblk += (padded / BLOCK) as u64;
            if got < want && !exact {
                break;
            }
        }
        Ok(())
    }
}

impl Progressing {
    /// `n` zero bytes (a hole of the source; `n` a multiple of the block
    /// size unless it ends the file).
    fn zeros(&mut self, mut n: u64) {
        static Z: [u8; 64 * 1024] = [0; 64 * 1024];
        let blocks = n.div_ceil(BLOCK as u64);
        self.total += n;
        while n > 0 {
            let k = us(n.min(Z.len() as u64));
            self.hasher.update(&Z[..k]);
            n -= k as u64;
        }
        self.lblk += blocks;
    }

    fn finish(self) -> FileData {
        FileData {
            size: self.total,
            sha256: self.hasher.finalize().into(),
            runs: self.runs,
        }
    }
}

/// Reads a decompressor on another thread so that inflating overlaps
/// with parsing, hashing and spooling.
struct Pipelined {
    rx: mpsc::Receiver<std::io::Result<(Vec<u8>, u64)>>,
    back: mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    consumed: u64,
}

impl Pipelined {
    fn new<R: Read + Send + 'static>(
        mut r: R,
        counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Pipelined {
        let (tx, rx) = mpsc::sync_channel(32);
        let (back, spare) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || loop {
            let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0; 1 << 20]);
            buf.resize(1 << 20, 0);
            let mut got = 0;
            let res = loop {
                // Small reads: a decoder that fails mid-read (ruzstd on a
                // cut block) loses what that one read had inflated.
                let upto = (got + (64 << 10)).min(buf.len());
                match r.read(&mut buf[got..upto]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        got += n;
                        if got == buf.len() {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(got);
            let pos = counter.load(std::sync::atomic::Ordering::Relaxed);
            let end = got == 0;
            // What was inflated before an error is delivered first, so that
            // the error surfaces where the stream really broke (naming the
            // entry it broke in).
            let msgs = match res {
                Ok(()) => vec![Ok((buf, pos))],
                Err(e) if got > 0 => vec![Ok((buf, pos)), Err(e)],
                Err(e) => vec![Err(e)],
            };
            let failed = msgs.iter().any(Result::is_err);
            for msg in msgs {
                if tx.send(msg).is_err() {
                    return;
                }
            }
            if end || failed {
                return;
            }
        });
        Pipelined {
            rx,
            back,
            cur: Vec::new(),
            pos: 0,
            consumed: 0,
        }
    }
}

impl Read for Pipelined {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok((buf, consumed))) => {
                    let old = std::mem::replace(&mut self.cur, buf);
                    let _ = self.back.send(old);
                    self.pos = 0;
                    self.consumed = consumed;
                    if self.cur.is_empty() {
                        return Ok(0);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counts bytes read from the raw source file (for progress).
struct Counting<R> {
    inner: R,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// Builds a tree from sources, layer after layer.
pub struct Builder<'p> {
    pub tree: Tree,
    spool: Spool,
    ingest: Ingest,
    layer: u32,
    progress: &'p dyn Progress,
    dir_owner: Option<(u32, u32)>,
}

fn meta_time(sec: i64, nsec: i64) -> Time {
    Time {
        sec,
        nsec: u32::try_from(nsec.clamp(0, 999_999_999)).unwrap_or(0),
    }
}

/// A uid or gid from a tar header (base-256 fields can hold 64 bits; ext4
/// and Linux take 32).
fn header_id(what: &str, v: u64) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("header {what} {v} is not a number from 0 to 4294967295"))
}

/// Parse a PAX time ("1700000000.5", "-12.25").
fn pax_time(v: &str) -> Option<Time> {
    let (neg, v) = match v.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, v),
    };
    let (s, frac) = v.split_once('.').unwrap_or((v, ""));
    let sec: i64 = s.parse().ok()?;
    if !frac.chars().all(|c| c.is_ascii_digit()) || !s.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    Some(if neg {
        if nsec == 0 {
            Time { sec: -sec, nsec: 0 }
        } else {
            Time {
                sec: -sec - 1,
                nsec: 1_000_000_000 - nsec,
            }
        }
    } else {
        Time { sec, nsec }
    })
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Parse PAX records (`LEN key=value\n`, LEN counting the whole record),
/// binary-safe. `None` when malformed.
fn parse_pax(data: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < data.len() {
        if data[p..].iter().all(|&b| b == 0) {
            break;
        }
        let sp = p + data[p..].iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&data[p..sp]).ok()?.parse().ok()?;
        let end = p.checked_add(len)?;
        if end > data.len() || end <= sp + 1 || data[end - 1] != b'\n' {
            return None;
        }
        let rec = &data[sp + 1..end - 1];
        let eq = rec.iter().position(|&b| b == b'=')?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        p = end;
    }
    Some(out)
}

/// A POSIX ACL in `getfacl` text form (as GNU tar's SCHILY.acl.* records
/// hold it) to the VFS binary form. Names are resolved on this host.
fn acl_from_text(text: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8".to_string())?;
    let mut out = 2u32.to_le_bytes().to_vec();
    for entry in text
        .split(['\n', ','])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let parts: Vec<&str> = entry.split(':').collect();
        if parts.len() < 3 {
            return Err(format!("bad ACL entry {entry:?}"));
        }
        let (kind, qual, perms) = (parts[0], parts[1], parts[2]);
        let mut perm = 0u16;
        for (c, bit) in perms.chars().zip([4u16, 2, 1]) {
            if c != '-' {
                perm |= bit;
            }
        }
        let lookup = |is_user: bool| -> Result<u32, String> {
            if let Ok(n) = qual.parse() {
                return Ok(n);
            }
            let c = CString::new(qual).map_err(|_| format!("bad name in {entry:?}"))?;
            // SAFETY: c is NUL-terminated; the returned pointers are only read at once.
            let id = unsafe {
                if is_user {
                    let pw = libc::getpwnam(c.as_ptr());
                    (!pw.is_null()).then(|| (*pw).pw_uid)
                } else {
                    let gr = libc::getgrnam(c.as_ptr());
                    (!gr.is_null()).then(|| (*gr).gr_gid)
                }
            };
            id.ok_or_else(|| {
                format!(
                    "{} {qual:?} of ACL entry {entry:?} is unknown on this host",
                    if is_user { "user" } else { "group" }
                )
            })
        };
        let (tag, id) = match (kind, qual.is_empty()) {
            ("user" | "u", true) => (0x01u16, u32::MAX),
            ("user" | "u", false) => (0x02, lookup(true)?),
            ("group" | "g", true) => (0x04, u32::MAX),
            ("group" | "g", false) => (0x08, lookup(false)?),
            ("mask" | "m", _) => (0x10, u32::MAX),
            ("other" | "o", _) => (0x20, u32::MAX),
            _ => return Err(format!("bad ACL entry {entry:?}")),
        };
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

fn llistxattr(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: c is NUL-terminated; buf is valid for buf.len() bytes.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if let Ok(n) = usize::try_from(n) {
            buf.truncate(n);
            return Ok(buf
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| s.to_vec())
                .collect());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    }
}

fn lgetxattr(path: &Path, name: &[u8]) -> std::io::Result<Vec<u8>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let n =
        CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: both strings are NUL-terminated; buf is valid for its length.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if let Ok(r) = usize::try_from(r) {
            buf.truncate(r);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return Err(e);
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

impl<'p> Builder<'p> {
    /// A builder spooling content into `spool`; timestamps are clamped to
    /// `epoch` when given.
    pub fn new(spool: Spool, epoch: Option<i64>, progress: &'p dyn Progress) -> Builder<'p> {
        Builder {
            tree: Tree::new(epoch),
            spool,
            ingest: Ingest { buf: Vec::new() },
            layer: 0,
            progress,
            dir_owner: None,
        }
    }

    /// Give every entry read from a directory source this owner (uid, gid)
    /// instead of the host's; tar entries keep the owners they carry.
    /// Building a root filesystem as an ordinary user (or in a Nix build,
    /// whose build user means nothing in the guest) needs this.
    pub fn set_dir_owner(&mut self, owner: Option<(u32, u32)>) {
        self.dir_owner = owner;
    }

    /// Finish: the tree and where its content is.
    pub fn finish(self) -> Result<(Tree, SpoolKind), SourceError> {
        let path = self.spool.target().to_path_buf();
        let k = self
            .spool
            .finish()
            .map_err(|source| SourceError::Output { path, source })?;
        Ok((self.tree, k))
    }

    /// Insert an entry of source `src` into the tree.
    fn put(
        &mut self,
        src: &Path,
        rel: &[u8],
        kind: Kind,
        meta: Meta,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<(), SourceError> {
        let inode = Inode {
            kind,
            meta,
            xattrs,
            implicit: false,
        };
        self.tree
            .insert(rel, inode, self.layer)
            .map_err(|source| SourceError::Tree {
                path: src.into(),
                source,
            })
    }

    /// Apply `rel` as an OCI whiteout if it is one (`.wh.NAME` removes NAME,
    /// `.wh..wh..opq` empties its directory of lower layers).
    fn whiteout(&mut self, rel: &[u8]) -> bool {
        let (dir, name) = split_last(rel);
        if name == b".wh..wh..opq" {
            self.tree.remove_children(dir, self.layer);
            true
        } else if let Some(victim) = name.strip_prefix(b".wh.") {
            self.tree.remove(&join(dir, victim));
            true
        } else {
            false
        }
    }

    /// Add one source (a directory, or a tar archive, plain or gzip/zstd
    /// compressed), layered over what was added before.
    pub fn add(&mut self, path: &Path) -> Result<Stats, SourceError> {
        if path == Path::new("-") {
            let stats = self.add_stdin(path)?;
            self.layer += 1;
            return Ok(stats);
        }
        let meta = std::fs::metadata(path).map_err(|source| SourceError::Io {
            path: path.into(),
            op: "open source",
            source,
        })?;
        let stats = if meta.is_dir() {
            self.add_dir(path)?
        } else {
            self.add_archive(path, meta.len())?
        };
        self.layer += 1;
        Ok(stats)
    }

    fn add_archive(&mut self, path: &Path, size: u64) -> Result<Stats, SourceError> {
        let io_err = |op, source| SourceError::Io {
            path: path.into(),
            op,
            source,
        };
        let mut f = File::open(path).map_err(|e| io_err("open source", e))?;
        let mut magic = [0u8; 6];
        let n = f.read(&mut magic).map_err(|e| io_err("read", e))?;
        drop(f);
        let f = File::open(path).map_err(|e| io_err("open source", e))?;
        self.add_stream(path, f, size, &magic[..n])
    }

    /// A tar (plain, gzip or zstd) on standard input, the source `-`:
    /// `mmdebstrap --mode=unshare bookworm - | umlctl image build -o IMG -`.
    fn add_stdin(&mut self, path: &Path) -> Result<Stats, SourceError> {
        let mut stdin = std::io::stdin();
        let mut magic = Vec::with_capacity(6);
        (&mut stdin)
            .take(6)
            .read_to_end(&mut magic)
            .map_err(|source| SourceError::Io {
                path: path.into(),
                op: "read",
                source,
            })?;
        let again = std::io::Cursor::new(magic.clone()).chain(stdin);
        self.add_stream(path, again, 0, &magic)
    }

    /// An archive from `raw`, whose first bytes are `magic` (still to be
    /// read from `raw`); `size` for progress (0: unknown).
    fn add_stream<R: Read + Send + 'static>(
        &mut self,
        path: &Path,
        raw: R,
        size: u64,
        magic: &[u8],
    ) -> Result<Stats, SourceError> {
        let n = magic.len();
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let raw = Counting {
            inner: raw,
            count: counter.clone(),
        };
        let reader: Box<dyn Read> = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
            Box::new(Pipelined::new(
                flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, raw)),
                counter.clone(),
            ))
        } else if n >= 4 && magic[..4] == [0x28, 0xb5, 0x2f, 0xfd] {
            let dec = ruzstd::decoding::StreamingDecoder::new(std::io::BufReader::with_capacity(
                1 << 20,
                raw,
            ))
            .map_err(|e| SourceError::Format {
                path: path.into(),
                why: format!("not a valid zstd stream: {e}"),
            })?;
            Box::new(Pipelined::new(dec, counter.clone()))
        } else if n >= 6 && magic == [0xfd, b'7', b'z', b'X', b'Z', 0] {
            return Err(SourceError::Format { path: path.into(), why: "xz-compressed sources are not supported; decompress first (`xz -d`) or use gzip or zstd".into() });
        } else if n >= 3 && magic[..3] == [b'B', b'Z', b'h'] {
            return Err(SourceError::Format { path: path.into(), why: "bzip2-compressed sources are not supported; decompress first (`bunzip2`) or use gzip or zstd".into() });
        } else {
            Box::new(std::io::BufReader::with_capacity(1 << 20, raw))
        };
        self.progress.start(size);
        let mut last = 0u64;
        let mut stats = Stats::default();
        let mut ar = tar::Archive::new(reader);
        // Raw mode: the tar crate's own PAX parser splits records at newlines
        // and so loses values that contain one (text ACLs, binary xattrs);
        // PAX records and GNU long names are handled here instead.
        let entries = ar
            .entries()
            .map_err(|e| self.stream_error(path, e, None))?
            .raw(true);
        let mut pax: Option<Vec<(Vec<u8>, Vec<u8>)>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        // The last entry read whole, named when the stream breaks between
        // entries.
        let mut last_entry: Option<String> = None;
        for entry in entries {
            let mut e = entry.map_err(|e| self.stream_error(path, e, last_entry.as_deref()))?;
            let now = counter.load(std::sync::atomic::Ordering::Relaxed);
            self.progress.advance(now.saturating_sub(last));
            last = now;
            let header = e.header().clone();
            let etype = header.entry_type();
            if etype.is_pax_local_extensions()
                || etype.is_pax_global_extensions()
                || etype.is_gnu_longname()
                || etype.is_gnu_longlink()
            {
                let mut data = Vec::new();
                e.read_to_end(&mut data)
                    .map_err(|err| self.stream_error(path, err, last_entry.as_deref()))?;
                if etype.is_pax_local_extensions() {
                    pax = Some(parse_pax(&data).ok_or_else(|| SourceError::Format {
                        path: path.into(),
                        why: "malformed PAX extended header".into(),
                    })?);
                } else if etype.is_gnu_longname() {
                    long_name = Some(trim_nul(data));
                } else if etype.is_gnu_longlink() {
                    long_link = Some(trim_nul(data));
                }
                continue;
            }
            let records = pax.take().unwrap_or_default();
            let rec = |k: &[u8]| {
                records
                    .iter()
                    .rev()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
            };
            let raw_path = rec(b"path")
                .or(long_name.take())
                .unwrap_or_else(|| header.path_bytes().into_owned());
            let link_name = rec(b"linkpath")
                .or(long_link.take())
                .or_else(|| header.link_name_bytes().map(|c| c.into_owned()));
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            let bad = |why: String| SourceError::Entry {
                path: path.into(),
                entry: shown.clone(),
                why,
            };
            // GNU tar's sparse files (old GNU 'S' entries, PAX 0.0, 0.1
            // and 1.0) are not read yet: refused by name rather than built
            // as a wrong file (the data alone, or a directory
            // GNUSparseFile.N/).
            let sparse_pax = records.iter().any(|(k, _)| k.starts_with(b"GNU.sparse."));
            if sparse_pax || etype == tar::EntryType::GNUSparse {
                let name = rec(b"GNU.sparse.name")
                    .map(|n| String::from_utf8_lossy(&n).into_owned())
                    .unwrap_or_else(|| shown.clone());
                return Err(SourceError::Entry {
                    path: path.into(),
                    entry: name,
                    why: format!(
                        "a sparse file in GNU tar's sparse format ({}), which umlctl does not read yet; make the archive without --sparse (-S), or give the directory itself as a source (its holes are kept)",
                        if etype == tar::EntryType::GNUSparse {
                            "old GNU".to_string()
                        } else {
                            match (rec(b"GNU.sparse.major"), rec(b"GNU.sparse.map")) {
                                (Some(_), _) => "PAX 1.0".to_string(),
                                (None, Some(_)) => "PAX 0.1".to_string(),
                                _ => "PAX 0.0".to_string(),
                            }
                        }
                    ),
                });
            }
            let rel = tree::normalize(&raw_path).map_err(|source| SourceError::Tree {
                path: path.into(),
                source,
            })?;
            if let Some(sz) = rec(b"size") {
                let header_size = header.entry_size().unwrap_or(0);
                if std::str::from_utf8(&sz)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    != Some(header_size)
                {
                    return Err(bad("its size is given only in a PAX record (a file over 8 GiB in a POSIX-format tar), which is not supported; make the archive with `tar --format=gnu`".into()));
                }
            }
            // A PAX record that is present must be valid (as GNU tar
            // insists): falling back to the header would build a file
            // with metadata the archive did not say.
            let num = |k: &[u8]| -> Result<Option<u32>, SourceError> {
                match rec(k) {
                    None => Ok(None),
                    Some(v) => std::str::from_utf8(&v)
                        .ok()
                        .and_then(|v| v.parse::<u32>().ok())
                        .map(Some)
                        .ok_or_else(|| {
                            bad(format!(
                                "PAX {} record {:?} is not a number from 0 to 4294967295",
                                String::from_utf8_lossy(k),
                                String::from_utf8_lossy(&v)
                            ))
                        }),
                }
            };
            let mtime = match rec(b"mtime") {
                None => {
                    let m = header.mtime().unwrap_or(0);
                    let m = i64::try_from(m).map_err(|_| {
                        bad(format!("header mtime {m} is beyond what a time can hold"))
                    })?;
                    meta_time(m, 0)
                }
                Some(v) => std::str::from_utf8(&v)
                    .ok()
                    .and_then(pax_time)
                    .ok_or_else(|| {
                        bad(format!(
                            "PAX mtime record {:?} is not a valid time (seconds since 1970 that fit in 64 bits, with an optional fraction)",
                            String::from_utf8_lossy(&v)
                        ))
                    })?,
            };
            let uid = match num(b"uid")? {
                Some(u) => u,
                None => header_id("uid", header.uid().unwrap_or(0)).map_err(&bad)?,
            };
            let gid = match num(b"gid")? {
                Some(g) => g,
                None => header_id("gid", header.gid().unwrap_or(0)).map_err(&bad)?,
            };
            let mut xattrs = BTreeMap::new();
            for (k, v) in &records {
                if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.insert(name.to_vec(), v.clone());
                }
            }
            // GNU tar --acls without --xattrs carries ACLs only as text.
            for (key, name) in [
                (&b"SCHILY.acl.access"[..], &b"system.posix_acl_access"[..]),
                (b"SCHILY.acl.default", b"system.posix_acl_default"),
            ] {
                if let (Some(text), false) = (rec(key), xattrs.contains_key(name)) {
                    let acl = acl_from_text(&text)
                        .map_err(|w| bad(format!("{}: {w}", String::from_utf8_lossy(key))))?;
                    // A minimal ACL (owner, group, other) is just the mode
                    // bits; the kernel stores no attribute for it.
                    if acl.len() > 4 + 3 * 8 {
                        xattrs.insert(name.to_vec(), acl);
                    }
                }
            }
            let mode = (header.mode().unwrap_or(0o644) & 0o7777) as u16;
            let meta = Meta {
                mode,
                uid,
                gid,
                mtime,
            };
            if self.whiteout(&rel) {
                continue;
            }
            let kind = match etype {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = e.size();
                    let (data, n) = self
                        .ingest
                        .read(&mut e, size, true, Some(&mut self.spool))
                        .map_err(|err| match err {
                            IngestError::Read(err)
                                if err.kind() == std::io::ErrorKind::UnexpectedEof =>
                            {
                                bad(
                                    "the archive ends inside this file's data (truncated archive?)"
                                        .into(),
                                )
                            }
                            IngestError::Read(err) => bad(format!(
                                "cannot read this file's data: {err} (corrupt archive?)"
                            )),
                            IngestError::Write(source) => SourceError::Output {
                                path: self.spool.target().into(),
                                source,
                            },
                        })?;
                    stats.bytes += n;
                    Kind::File(data)
                }
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => {
                    let t = link_name.clone().unwrap_or_default();
                    if t.is_empty() || t.len() > 4095 {
                        return Err(bad(format!(
                            "symlink target is {} bytes; it must be 1 to 4095",
                            t.len()
                        )));
                    }
                    Kind::Symlink(t)
                }
                tar::EntryType::Link => {
                    let t = link_name.clone().unwrap_or_default();
                    let target = tree::normalize(&t).map_err(|source| SourceError::Tree {
                        path: path.into(),
                        source,
                    })?;
                    self.tree
                        .link(&rel, &target, self.layer)
                        .map_err(|source| SourceError::Tree {
                            path: path.into(),
                            source,
                        })?;
                    stats.entries += 1;
                    last_entry = Some(shown);
                    continue;
                }
                tar::EntryType::Char | tar::EntryType::Block => {
                    let major = header.device_major().ok().flatten().unwrap_or(0);
                    let minor = header.device_minor().ok().flatten().unwrap_or(0);
                    if etype == tar::EntryType::Char {
                        Kind::CharDev { major, minor }
                    } else {
                        Kind::BlockDev { major, minor }
                    }
                }
                tar::EntryType::Fifo => Kind::Fifo,
                other => return Err(bad(format!("unsupported tar entry type {:?}", other))),
            };
            self.put(path, &rel, kind, meta, xattrs)?;
            stats.entries += 1;
            last_entry = Some(shown);
        }
        // Read what follows the end-of-archive blocks, so that a compressed
        // stream's trailer (gzip's CRC and length, zstd's checksum) is
        // checked: a stream cut inside it is refused, not taken as whole.
        std::io::copy(&mut ar.into_inner(), &mut std::io::sink())
            .map_err(|e| self.stream_error(path, e, last_entry.as_deref()))?;
        let now = counter.load(std::sync::atomic::Ordering::Relaxed);
        self.progress.advance(now.saturating_sub(last));
        self.progress.finish();
        Ok(stats)
    }

    fn stream_error(&self, path: &Path, e: std::io::Error, after: Option<&str>) -> SourceError {
        let at = match after {
            Some(name) => format!(" after entry {name:?}"),
            None => String::new(),
        };
        let why = match e.kind() {
            std::io::ErrorKind::UnexpectedEof => format!("the archive ends early{at} (truncated?)"),
            _ => format!(
                "cannot read the archive{at}: {e} (corrupt or not a tar, tar.gz or tar.zst?)"
            ),
        };
        SourceError::Format {
            path: path.into(),
            why,
        }
    }

    fn add_dir(&mut self, root: &Path) -> Result<Stats, SourceError> {
        let mut stats = Stats::default();
        let mut seen: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
        let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
        self.progress.start(0);
        while let Some((host, rel)) = stack.pop() {
            let io_err = |op, source| SourceError::Io {
                path: host.clone(),
                op,
                source,
            };
            let md = std::fs::symlink_metadata(&host).map_err(|e| io_err("stat", e))?;
            let ft = md.file_type();
            let (uid, gid) = self.dir_owner.unwrap_or((md.uid(), md.gid()));
            let meta = Meta {
                mode: (md.mode() & 0o7777) as u16,
                uid,
                gid,
                mtime: meta_time(md.mtime(), md.mtime_nsec()),
            };
            let mut xattrs = BTreeMap::new();
            for name in llistxattr(&host).map_err(|e| io_err("list extended attributes of", e))? {
                let v = lgetxattr(&host, &name)
                    .map_err(|e| io_err("read extended attributes of", e))?;
                xattrs.insert(name, v);
            }
            if !rel.is_empty() && self.whiteout(&rel) {
                continue;
            }
            if !ft.is_dir() && md.nlink() > 1 {
                if let Some(first) = seen.get(&(md.dev(), md.ino())) {
                    self.tree.link(&rel, first, self.layer).map_err(|source| {
                        SourceError::Tree {
                            path: root.into(),
                            source,
                        }
                    })?;
                    stats.entries += 1;
                    continue;
                }
                seen.insert((md.dev(), md.ino()), rel.clone());
            }
            let kind = if ft.is_dir() {
                let mut names: Vec<Vec<u8>> = std::fs::read_dir(&host)
                    .map_err(|e| io_err("read directory", e))?
                    .map(|d| d.map(|d| d.file_name().as_bytes().to_vec()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| io_err("read directory", e))?;
                names.sort();
                // Depth first, names in byte order (the stack pops the last).
                for n in names.into_iter().rev() {
                    if n.len() > tree::NAME_MAX {
                        return Err(SourceError::Tree {
                            path: root.into(),
                            source: TreeError::BadPath {
                                path: tree::show(&join(&rel, &n)),
                                why: "a name is longer than 255 bytes, the ext4 limit",
                            },
                        });
                    }
                    stack.push((host.join(std::ffi::OsStr::from_bytes(&n)), join(&rel, &n)));
                }
                Kind::Dir
            } else if ft.is_file() {
                let mut f = File::open(&host).map_err(|e| io_err("open", e))?;
                let (data, n) = self
                    .ingest
                    .read_sparse(&mut f, md.len(), Some(&mut self.spool))
                    .map_err(|e| match e {
                        IngestError::Read(e) => io_err("read", e),
                        IngestError::Write(source) => SourceError::Output {
                            path: self.spool.target().into(),
                            source,
                        },
                    })?;
                if n != md.len() {
                    return Err(io_err(
                        "read",
                        std::io::Error::other("the file changed size while it was read"),
                    ));
                }
                stats.bytes += n;
                self.progress.advance(n);
                Kind::File(data)
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&host).map_err(|e| io_err("read symlink", e))?;
                Kind::Symlink(t.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = md.rdev();
                let (major, minor) = (libc::major(rdev), libc::minor(rdev));
                if ft.is_char_device() {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                Kind::Socket
            };
            self.put(root, &rel, kind, meta, xattrs)?;
            stats.entries += 1;
        }
        self.progress.finish();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_are_binary_safe() {
        let v = b"30 mtime=1795560091.268859557\n29 SCHILY.acl.access=u::rw-\n\n";
        let r = parse_pax(v).unwrap();
        assert_eq!(r[1], (b"SCHILY.acl.access".to_vec(), b"u::rw-\n".to_vec()));
        assert!(parse_pax(b"99 x=y\n").is_none());
        let acl = acl_from_text(b"user::rw-\nuser:1000:r--\ngroup::r--\nmask::r--\nother::---\n")
            .unwrap();
        assert_eq!(acl.len(), 4 + 5 * 8);
        assert!(crate::ext4::xattr::canonical_acl(&acl).is_ok());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            pax_time("1700000000.5"),
            Some(Time {
                sec: 1700000000,
                nsec: 500_000_000
            })
        );
        assert_eq!(pax_time("12"), Some(Time { sec: 12, nsec: 0 }));
        assert_eq!(
            pax_time("-1.25"),
            Some(Time {
                sec: -2,
                nsec: 750_000_000
            })
        );
        assert_eq!(pax_time("x"), None);
        assert_eq!(pax_time("-99999999999999999999.5"), None);
        assert_eq!(pax_time("1.5x"), None);
        assert_eq!(pax_time("+1"), None);
        assert_eq!(pax_time(""), None);
    }

    #[test]
    fn zero_blocks_become_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(dir.path(), Path::new("test.img")).unwrap();
        let mut data = vec![0u8; 3 * BLOCK + 100];
        data[BLOCK + 5] = 1;
        data[3 * BLOCK + 99] = 2;
        let mut ing = Ingest { buf: Vec::new() };
        let (fd, n) = ing
            .read(&mut &data[..], data.len() as u64, true, Some(&mut spool))
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(
            fd.runs,
            vec![
                Run {
                    lblk: 1,
                    len: 1,
                    src: 0
                },
                Run {
                    lblk: 3,
                    len: 1,
                    src: BLOCK as u64
                }
            ]
        );
        assert_eq!(fd.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
    }
}
