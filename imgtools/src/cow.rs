//! UML's copy-on-write (COW) disk format.
//!
//! A COW file is a header, a bitmap with one bit per 512-byte sector of the
//! backing file (LSB first; set = the sector lives in the COW file), and a
//! data area holding those sectors at `data_offset + sector * 512`. The
//! kernel reads versions 1, 2, 3 and a "broken" 64-bit variant of 3, and
//! writes only version 3; so do we (byte-compatible with `uml_mkcow`).
//! See `reference/uml-spec.md` §1 for the layouts, checked against the
//! kernel sources and uml-utilities.
//!
//! Fields of versions 2 and 3 are big-endian; version 1 is host-native
//! (little-endian on x86). The backing file is validated as the kernel does
//! it: its size must equal the header's, and its `st_mtime` the header's
//! 32-bit mtime, or UML refuses to open the disk.

use crate::num::{fit32, time32, us};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::progress::Progress;

/// The magic number, `OOOM` in big-endian byte order.
pub const COW_MAGIC: u32 = 0x4F4F_4F4D;
/// The kernel's bitmap unit, whatever the header says.
pub const SECTOR: u64 = 512;
/// Size of a version 3 header.
pub const V3_HEADER_LEN: usize = 4128;
/// The most bytes any header variant occupies (the broken V3).
pub const MAX_HEADER_LEN: usize = 4136;
/// Longest backing path a V2/V3 header holds (plus the NUL).
pub const MAX_BACKING_PATH: usize = 4095;
/// The kernel keeps offsets in a C `int`; stay far below where they overflow.
pub const MAX_BACKING_SIZE: u64 = 4 << 40;

/// Errors from reading, creating, merging and rebasing COW files.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a UML COW file (no COW magic); it would be used as a raw disk image", path.display())]
    NotCow { path: PathBuf },
    #[error("{} has a damaged COW header: {reason}", path.display())]
    BadHeader { path: PathBuf, reason: String },
    #[error("{} already exists; remove it first (umlctl never overwrites a disk)", path.display())]
    Exists { path: PathBuf },
    #[error("{}", .0)]
    Backing(BackingProblem),
    #[error("{0}")]
    Invalid(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CowError + 'a {
    move |source| CowError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

pub type Result<T, E = CowError> = std::result::Result<T, E>;

/// Header versions the kernel reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Version {
    V1,
    V2,
    V3,
    /// Version 3 as written by 64-bit builds before December 2005.
    V3Broken,
}

impl Version {
    fn header_len(self) -> usize {
        match self {
            Version::V1 => 280,
            Version::V2 => 4120,
            Version::V3 => V3_HEADER_LEN,
            Version::V3Broken => MAX_HEADER_LEN,
        }
    }
}

/// A decoded COW header and the geometry that follows from it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Header {
    pub version: Version,
    /// The backing file as recorded (bytes; normally an absolute path).
    #[serde(serialize_with = "ser_path")]
    pub backing: PathBuf,
    /// Backing file mtime in seconds, truncated to 32 bits.
    pub mtime: u32,
    /// Backing file size in bytes.
    pub size: u64,
    pub sectorsize: u32,
    pub alignment: u32,
    pub cow_format: u32,
}

fn ser_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn bytes<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}
fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(bytes(b, off))
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes(b, off))
}
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(bytes(b, off))
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes(b, off))
}
fn cstr_path(b: &[u8]) -> PathBuf {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    PathBuf::from(std::ffi::OsStr::from_bytes(&b[..end]))
}

impl Header {
    /// Decode the start of a file. `Ok(None)` means "no COW magic": UML uses
    /// such a file as a raw image. A magic with anything wrong after it is
    /// an error, as it is for the kernel.
    pub fn parse(b: &[u8]) -> Result<Option<Header>, String> {
        if b.len() < 8 {
            return Ok(None);
        }
        let magic_le = le32(b, 0);
        let magic_be = be32(b, 0);
        let version = if magic_le == COW_MAGIC {
            le32(b, 4)
        } else if magic_be == COW_MAGIC {
            be32(b, 4)
        } else {
            return Ok(None);
        };
        let need = |v: Version| {
            if b.len() < v.header_len() {
                Err(format!(
                    "the file is {} bytes, shorter than a version {} header ({} bytes)",
                    b.len(),
                    match v {
                        Version::V1 => "1",
                        Version::V2 => "2",
                        _ => "3",
                    },
                    v.header_len()
                ))
            } else {
                Ok(())
            }
        };
        let h = match version {
            1 => {
                need(Version::V1)?;
                let sectorsize = le32(b, 276);
                Header {
                    version: Version::V1,
                    backing: cstr_path(&b[8..264]),
                    mtime: le32(b, 264),
                    size: le64(b, 268),
                    sectorsize,
                    alignment: sectorsize,
                    cow_format: 0,
                }
            }
            2 => {
                need(Version::V2)?;
                let sectorsize = be32(b, 4116);
                Header {
                    version: Version::V2,
                    backing: cstr_path(&b[8..4104]),
                    mtime: be32(b, 4104),
                    size: be64(b, 4108),
                    sectorsize,
                    alignment: sectorsize,
                    cow_format: 0,
                }
            }
            3 if b.len() >= 36 && b[32..36] != [0, 0, 0, 0] => {
                need(Version::V3)?;
                Header {
                    version: Version::V3,
                    backing: cstr_path(&b[32..32 + 4096]),
                    mtime: be32(b, 8),
                    size: be64(b, 12),
                    sectorsize: be32(b, 20),
                    alignment: be32(b, 24),
                    cow_format: be32(b, 28),
                }
            }
            3 => {
                need(Version::V3Broken)?;
                Header {
                    version: Version::V3Broken,
                    backing: cstr_path(&b[36..36 + 4096]),
                    mtime: be32(b, 8),
                    size: be64(b, 16),
                    sectorsize: be32(b, 24),
                    alignment: be32(b, 28),
                    cow_format: be32(b, 32),
                }
            }
            v => {
                return Err(format!(
                    "unknown COW version {v} (the kernel reads 1, 2 and 3)"
                ))
            }
        };
        h.validate()?;
        Ok(Some(h))
    }

    fn validate(&self) -> Result<(), String> {
        if self.sectorsize == 0 {
            return Err("sector size is 0".into());
        }
        if self.alignment == 0 {
            return Err("alignment is 0 (the kernel would divide by it)".into());
        }
        if self.cow_format != 0 {
            return Err(format!(
                "cow_format {} (only 0, bitmap, is defined)",
                self.cow_format
            ));
        }
        if self.backing.as_os_str().is_empty() {
            return Err("the backing file path is empty".into());
        }
        if self.size > MAX_BACKING_SIZE {
            return Err(format!(
                "backing size {} is beyond what UML can address",
                self.size
            ));
        }
        Ok(())
    }

    /// Byte offset of the bitmap.
    pub fn bitmap_offset(&self) -> u64 {
        match self.version {
            Version::V1 | Version::V2 => self.version.header_len() as u64,
            Version::V3 | Version::V3Broken => {
                round_up(self.version.header_len() as u64, u64::from(self.alignment))
            }
        }
    }

    /// Length of the bitmap in bytes (V1/V2 reproduce the kernel's historic
    /// rounding).
    pub fn bitmap_len(&self) -> u64 {
        let ss = u64::from(self.sectorsize);
        match self.version {
            Version::V1 | Version::V2 => (self.size + ss - 1) / (8 * ss),
            Version::V3 | Version::V3Broken => self.size.div_ceil(ss).div_ceil(8),
        }
    }

    /// Byte offset of sector 0 in the data area.
    pub fn data_offset(&self) -> u64 {
        let a = match self.version {
            Version::V1 | Version::V2 => u64::from(self.sectorsize),
            Version::V3 | Version::V3Broken => u64::from(self.alignment),
        };
        round_up(self.bitmap_offset() + self.bitmap_len(), a)
    }

    /// 512-byte sectors covered by the bitmap.
    pub fn sectors(&self) -> u64 {
        (self.bitmap_len() * 8).min(self.size.div_ceil(SECTOR))
    }

    /// A version 3 header for `backing` (absolute path), as the kernel and
    /// `uml_mkcow` write it: sector size 512, alignment 4096.
    pub fn new_v3(backing: &Path, mtime: u32, size: u64) -> Header {
        Header {
            version: Version::V3,
            backing: backing.to_path_buf(),
            mtime,
            size,
            sectorsize: fit32(SECTOR),
            alignment: 4096,
            cow_format: 0,
        }
    }

    /// Encode in this header's own layout (so a rewrite never moves the
    /// bitmap). The broken V3 layout is written back as it was read.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let path = self.backing.as_os_str().as_bytes();
        let field = match self.version {
            Version::V1 => 256,
            _ => 4096,
        };
        if path.len() >= field {
            return Err(format!(
                "backing path is {} bytes; this header holds at most {}",
                path.len(),
                field - 1
            ));
        }
        if path.contains(&0) {
            return Err("backing path contains a NUL byte".into());
        }
        let mut b = vec![0u8; self.version.header_len()];
        match self.version {
            Version::V1 => {
                b[0..4].copy_from_slice(&COW_MAGIC.to_le_bytes());
                b[4..8].copy_from_slice(&1u32.to_le_bytes());
                b[8..8 + path.len()].copy_from_slice(path);
                b[264..268].copy_from_slice(&self.mtime.to_le_bytes());
                b[268..276].copy_from_slice(&self.size.to_le_bytes());
                b[276..280].copy_from_slice(&self.sectorsize.to_le_bytes());
            }
            Version::V2 => {
                b[0..4].copy_from_slice(&COW_MAGIC.to_be_bytes());
                b[4..8].copy_from_slice(&2u32.to_be_bytes());
                b[8..8 + path.len()].copy_from_slice(path);
                b[4104..4108].copy_from_slice(&self.mtime.to_be_bytes());
                b[4108..4116].copy_from_slice(&self.size.to_be_bytes());
                b[4116..4120].copy_from_slice(&self.sectorsize.to_be_bytes());
            }
            Version::V3 => {
                b[0..4].copy_from_slice(&COW_MAGIC.to_be_bytes());
                b[4..8].copy_from_slice(&3u32.to_be_bytes());
                b[8..12].copy_from_slice(&self.mtime.to_be_bytes());
                b[12..20].copy_from_slice(&self.size.to_be_bytes());
                b[20..24].copy_from_slice(&self.sectorsize.to_be_bytes());
                b[24..28].copy_from_slice(&self.alignment.to_be_bytes());
                b[28..32].copy_from_slice(&self.cow_format.to_be_bytes());
                b[32..32 + path.len()].copy_from_slice(path);
            }
            Version::V3Broken => {
                b[0..4].copy_from_slice(&COW_MAGIC.to_be_bytes());
                b[4..8].copy_from_slice(&3u32.to_be_bytes());
                b[8..12].copy_from_slice(&self.mtime.to_be_bytes());
                b[16..24].copy_from_slice(&self.size.to_be_bytes());
                b[24..28].copy_from_slice(&self.sectorsize.to_be_bytes());
                b[28..32].copy_from_slice(&self.alignment.to_be_bytes());
                b[32..36].copy_from_slice(&self.cow_format.to_be_bytes());
                b[36..36 + path.len()].copy_from_slice(path);
            }
        }
        Ok(b)
    }
}

/// Why a backing file does not match its COW header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum BackingProblem {
    Missing {
        cow: PathBuf,
        backing: PathBuf,
        error: String,
    },
    SizeMismatch {
        cow: PathBuf,
        backing: PathBuf,
        header: u64,
        actual: u64,
    },
    MtimeMismatch {
        cow: PathBuf,
        backing: PathBuf,
        header: u32,
        actual: i64,
    },
    /// Not a regular file or block device (a directory, FIFO, device…).
    NotAFile { cow: PathBuf, backing: PathBuf },
    /// The overlay names itself, or an overlay that names it back.
    Loop { cow: PathBuf, backing: PathBuf },
    /// Not the backing file the caller pinned (`--backing`).
    NotPinned {
        cow: PathBuf,
        backing: PathBuf,
        pinned: PathBuf,
    },
}

impl std::fmt::Display for BackingProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackingProblem::Missing { cow, backing, error } => write!(
                f,
                "the backing file {} of overlay {} cannot be opened ({error})\nfix: if it was moved or copied, run `umlctl cow rebase {} --backing NEW_PATH`",
                backing.display(),
                cow.display(),
                cow.display()
            ),
            BackingProblem::NotAFile { cow, backing } => write!(
                f,
                "overlay {} names {} as its backing file, which is not a regular file or block device\nfix: an overlay needs a disk image as its base",
                cow.display(),
                backing.display()
            ),
            BackingProblem::Loop { cow, backing } => write!(
                f,
                "overlay {} names {} as its backing file, which is the overlay itself or an overlay over it; a merge would write into the overlay\nfix: the header is damaged or hostile; rebase the overlay onto its real base (`umlctl cow rebase {} --backing IMAGE`)",
                cow.display(),
                backing.display(),
                cow.display()
            ),
            BackingProblem::NotPinned { cow, backing, pinned } => write!(
                f,
                "overlay {} names {} as its backing file, not {} (--backing); nothing was written",
                cow.display(),
                backing.display(),
                pinned.display()
            ),
            BackingProblem::SizeMismatch { cow, backing, header, actual } => write!(
                f,
                "the backing file {} of overlay {} is {actual} bytes, but the overlay was made for {header} bytes; UML refuses it (\"Size mismatch\"), and the overlay's sectors would land on different data\nfix: use the backing file the overlay was made for; a resized image cannot take this overlay",
                backing.display(),
                cow.display()
            ),
            BackingProblem::MtimeMismatch { cow, backing, header, actual } => write!(
                f,
                "the backing file {} of overlay {} was modified or touched after the overlay was made (mtime {actual}, overlay records {header}); UML refuses such an overlay (\"mtime mismatch\")\nfix: if its content is unchanged (copied without -p, touched), run `umlctl cow rebase {} --backing {}` (add --force when the original is gone and nothing can be compared); if it really changed, the overlay's data no longer fit it",
                backing.display(),
                cow.display(),
                cow.display(),
                backing.display()
            ),
        }
    }
}

/// Size and mtime of a backing file as the kernel sees them (block devices
/// by their device size).
fn backing_stat(path: &Path) -> io::Result<(u64, i64)> {
    let md = fs::metadata(path)?;
    let size = if md.file_type().is_block_device() {
        let f = File::open(path)?;
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes a u64 into `bytes`.
        let r =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x8008_1272, &mut bytes) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        bytes
    } else {
        md.len()
    };
    Ok((size, md.mtime()))
}

/// An open COW file with its bitmap in memory.
#[derive(Debug)]
pub struct Cow {
    pub path: PathBuf,
    pub header: Header,
    file: File,
    bitmap: Vec<u8>,
}

impl Cow {
    /// Open `path` read-only.
    pub fn open(path: &Path) -> Result<Cow> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, write: bool) -> Result<Cow> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(io_err("open COW file", path))?;
        let mut buf = vec![0u8; MAX_HEADER_LEN];
        let n = read_full_at(&file, &mut buf, 0).map_err(io_err("read COW header", path))?;
        buf.truncate(n);
        let header = match Header::parse(&buf) {
            Ok(Some(h)) => h,
            Ok(None) => {
                return Err(CowError::NotCow {
                    path: path.to_path_buf(),
                })
            }
            Err(reason) => {
                return Err(CowError::BadHeader {
                    path: path.to_path_buf(),
                    reason,
                })
            }
        };
        let flen = file.metadata().map_err(io_err("stat", path))?.len();
        if flen < header.data_offset() {
            return Err(CowError::BadHeader {
                path: path.to_path_buf(),
                reason: format!(
                    "the file is {flen} bytes, but its bitmap ends at {}: it was truncated",
                    header.bitmap_offset() + header.bitmap_len()
                ),
            });
        }
        let mut bitmap = vec![0u8; us(header.bitmap_len())];
        let n = read_full_at(&file, &mut bitmap, header.bitmap_offset())
            .map_err(io_err("read COW bitmap", path))?;
        if n < bitmap.len() {
            return Err(CowError::BadHeader {
                path: path.to_path_buf(),
                reason: "the bitmap is cut short: the file was truncated".into(),
            });
        }
        Ok(Cow {
            path: path.to_path_buf(),
            header,
            file,
            bitmap,
        })
    }

    /// The backing path resolved like UML does: relative to the COW file's
    /// directory when UML runs there; umlctl uses absolute paths.
    pub fn backing_path(&self) -> PathBuf {
        if self.header.backing.is_absolute() {
            self.header.backing.clone()
        } else {
            self.path
                .parent()
                .unwrap_or(Path::new("."))
                .join(&self.header.backing)
        }
    }

    /// Check the backing file as the kernel will when a guest opens the disk,
    /// and more: it must be a regular file or block device, and neither
    /// the overlay itself nor an overlay whose backing file is this one.
    pub fn check_backing(&self) -> Result<(), BackingProblem> {
        let backing = self.backing_path();
        let (size, mtime) = backing_stat(&backing).map_err(|e| BackingProblem::Missing {
            cow: self.path.clone(),
            backing: backing.clone(),
            error: e.to_string(),
        })?;
        let bmd = fs::metadata(&backing).map_err(|e| BackingProblem::Missing {
            cow: self.path.clone(),
            backing: backing.clone(),
            error: e.to_string(),
        })?;
        if !(bmd.is_file() || bmd.file_type().is_block_device()) {
            return Err(BackingProblem::NotAFile {
                cow: self.path.clone(),
                backing,
            });
        }
        let id = |m: &fs::Metadata| (m.dev(), m.ino());
        let me = self.file.metadata().map(|m| id(&m)).ok();
        // The backing file names this overlay back (only its header is read).
        let names_me = || {
            let f = File::open(&backing).ok()?;
            let mut buf = vec![0u8; MAX_HEADER_LEN];
            let n = read_full_at(&f, &mut buf, 0).ok()?;
            let h = Header::parse(&buf[..n]).ok()??;
            let theirs = if h.backing.is_absolute() {
                h.backing
            } else {
                backing.parent().unwrap_or(Path::new(".")).join(h.backing)
            };
            Some(fs::metadata(theirs).ok().map(|m| id(&m)) == me)
        };
        let looped = me == Some(id(&bmd)) || names_me() == Some(true);
        if looped {
            return Err(BackingProblem::Loop {
                cow: self.path.clone(),
                backing,
            });
        }
        if size != self.header.size {
            return Err(BackingProblem::SizeMismatch {
                cow: self.path.clone(),
                backing,
                header: self.header.size,
                actual: size,
            });
        }
        if mtime != i64::from(self.header.mtime) {
            return Err(BackingProblem::MtimeMismatch {
                cow: self.path.clone(),
                backing,
                header: self.header.mtime,
                actual: mtime,
            });
        }
        Ok(())
    }

    /// Whether sector `s` lives in the COW file.
    pub fn is_set(&self, s: u64) -> bool {
        let byte = (s / 8) as usize;
        byte < self.bitmap.len() && self.bitmap[byte] & (1 << (s % 8)) != 0
    }

    /// Sectors held by the COW file.
    pub fn allocated_sectors(&self) -> u64 {
        let n = self.header.sectors();
        let full = (n / 8) as usize;
        let mut count: u64 = self.bitmap[..full]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum();
        for s in (full as u64 * 8)..n {
            count += u64::from(self.is_set(s));
        }
        count
    }

    /// Call `f(offset, data)` for the overlay's data, in order, in chunks of
    /// at most CHUNK bytes, one run of written sectors at a time (sectors
    /// the overlay does not hold are neither read nor passed).
    fn for_each_overlay_chunk(
        &self,
        cow: &Path,
        mut f: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let size = self.header.size;
        let mut buf = Vec::new();
        for (s, n, set) in self.runs(0, self.header.sectors()) {
            if !set {
                continue;
            }
            let mut a = s * SECTOR;
            let end = ((s + n) * SECTOR).min(size);
            while a < end {
                let len = us(CHUNK.min(end - a));
                buf.resize(len, 0);
                buf.fill(0);
                read_full_at(&self.file, &mut buf, self.header.data_offset() + a)
                    .map_err(io_err("read COW data", cow))?;
                f(a, &buf)?;
                a += len as u64;
            }
        }
        Ok(())
    }

    /// Maximal runs of sectors with the same bit, `(start, len, set)`, in
    /// `[from, to)`.
    fn runs(&self, from: u64, to: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut s = from;
        while s < to {
            let set = self.is_set(s);
            let mut e = s + 1;
            // Skip whole bitmap bytes quickly.
            while e < to {
                if e % 8 == 0 && e + 8 <= to {
                    let b = self.bitmap.get((e / 8) as usize).copied().unwrap_or(0);
                    if (set && b == 0xff) || (!set && b == 0) {
                        e += 8;
                        continue;
                    }
                }
                if self.is_set(e) != set {
                    break;
                }
                e += 1;
            }
            out.push((s, e - s, set));
            s = e;
        }
        out
    }

    /// Read `buf.len()` bytes of the disk as the guest sees it (overlay over
    /// backing) at `offset`. Bytes past the end read as zeros.
    pub fn read_merged(&self, backing: &File, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let end = (offset + buf.len() as u64).min(self.header.size);
        if offset >= end {
            return Ok(());
        }
        let first = offset / SECTOR;
        let last = end.div_ceil(SECTOR);
        for (s, n, set) in self.runs(first, last) {
            let a = (s * SECTOR).max(offset);
            let b = ((s + n) * SECTOR).min(end);
            let dst = &mut buf[us(a - offset)..us(b - offset)];
            if set {
                read_full_at(&self.file, dst, self.header.data_offset() + a)
                    .map_err(io_err("read COW data", &self.path))?;
            } else {
                read_full_at(backing, dst, a)
                    .map_err(io_err("read backing file", &self.backing_path()))?;
            }
        }
        Ok(())
    }

    /// Whether any sector in `[from, to)` lives in the COW file.
    pub fn any_set(&self, from: u64, to: u64) -> bool {
        let a = (from / 8) as usize;
        let b = us(to.div_ceil(8)).min(self.bitmap.len());
        a < b && self.bitmap[a..b].iter().any(|&x| x != 0) && (from..to).any(|s| self.is_set(s))
    }

    /// Read the overlay's sectors in `[off, off + len)` over `chunk` (which
    /// holds the backing data for that range), one read per run of set
    /// sectors (the COW data area is mostly holes; reading it whole would
    /// cost more than the data); `on_run(a, b)` is called for each byte
    /// range read.
    fn overlay_chunk(
        &self,
        off: u64,
        len: u64,
        chunk: &mut [u8],
        mut on_run: impl FnMut(u64, u64),
    ) -> Result<()> {
        let end = off + len;
        for (s, n, set) in self.runs(off / SECTOR, end.div_ceil(SECTOR)) {
            if !set {
                continue;
            }
            let (a, b) = ((s * SECTOR).max(off), ((s + n) * SECTOR).min(end));
            let dst = &mut chunk[us(a - off)..us(b - off)];
            read_full_at(&self.file, dst, self.header.data_offset() + a)
                .map_err(io_err("read COW data", &self.path))?;
            on_run(a, b);
        }
        Ok(())
    }

    /// Open the backing file after checking it still matches.
    /// Refuse unless the backing file is `pinned` (the same file, by
    /// device and inode).
    pub fn check_pinned(&self, pinned: &Path) -> Result<(), BackingProblem> {
        let backing = self.backing_path();
        let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        if id(&backing).is_none() || id(&backing) != id(pinned) {
            return Err(BackingProblem::NotPinned {
                cow: self.path.clone(),
                backing,
                pinned: pinned.to_path_buf(),
            });
        }
        Ok(())
    }

    pub fn open_backing(&self) -> Result<File> {
        self.check_backing().map_err(CowError::Backing)?;
        File::open(self.backing_path()).map_err(io_err("open backing file", &self.backing_path()))
    }
}

/// pread until `buf` is full or EOF; returns the bytes read (the rest of
/// `buf` is left as it was).
fn read_full_at(f: &File, buf: &mut [u8], mut off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Make `p` absolute the way UML does (symlinks in the directory part
/// resolved, the final component kept).
pub fn absolutize(p: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(p).map_err(io_err("resolve", p))?;
    let name = abs
        .file_name()
        .ok_or_else(|| CowError::Invalid(format!("{} does not name a file", p.display())))?;
    let dir = abs.parent().unwrap_or(Path::new("/"));
    let dir = fs::canonicalize(dir).map_err(io_err("resolve directory", dir))?;
    Ok(dir.join(name))
}

/// A temporary file next to `dest`, removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn new(dest: &Path) -> Result<TempFile> {
        let dir = dest
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for i in 0..100u32 {
            let path = dir.join(format!(".{name}.umlctl-{}-{i}", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file: Some(file),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create", &path)(e)),
            }
        }
        Err(CowError::Invalid(format!(
            "cannot create a temporary file next to {}",
            dest.display()
        )))
    }

    // `file` is Some from creation until `persist` consumes self.
    #[allow(clippy::expect_used)]
    fn file(&self) -> &File {
        self.file.as_ref().expect("open until persisted")
    }

    /// fsync, then rename onto `dest`; with `replace == false` fail if
    /// `dest` exists.
    // `file` is Some from creation until here, which consumes self.
    #[allow(clippy::expect_used)]
    fn persist(mut self, dest: &Path, replace: bool) -> Result<()> {
        let f = self.file.take().expect("open until persisted");
        f.sync_all().map_err(io_err("fsync", &self.path))?;
        drop(f);
        if replace {
            fs::rename(&self.path, dest).map_err(io_err("rename into place", dest))?;
        } else {
            // link() fails if dest exists: atomic "create unless present".
            match fs::hard_link(&self.path, dest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(CowError::Exists {
                        path: dest.to_path_buf(),
                    })
                }
                Err(e) => return Err(io_err("link into place", dest)(e)),
            }
            let _ = fs::remove_file(&self.path);
        }
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Create a COW file at `cow` over `backing`, like `uml_mkcow`: sparse and
/// instant at any size. Refuses to overwrite `cow`; nothing is left at
/// `cow` if anything fails.
pub fn create(cow: &Path, backing: &Path) -> Result<Header> {
    if fs::symlink_metadata(cow).is_ok() {
        return Err(CowError::Exists {
            path: cow.to_path_buf(),
        });
    }
    let backing_abs = absolutize(backing)?;
    let (size, mtime) =
        backing_stat(&backing_abs).map_err(io_err("open backing file", &backing_abs))?;
    let bmd = fs::metadata(&backing_abs).map_err(io_err("stat backing file", &backing_abs))?;
    if !(bmd.is_file() || bmd.file_type().is_block_device()) {
        return Err(CowError::Invalid(format!(
            "backing file {} is not a regular file or block device; an overlay needs a disk image as its base",
            backing_abs.display()
        )));
    }
    if size == 0 {
        return Err(CowError::Invalid(format!(
            "backing file {} is empty",
            backing_abs.display()
        )));
    }
    if size > MAX_BACKING_SIZE {
        return Err(CowError::Invalid(format!(
            "backing file {} is {size} bytes; UML's COW offsets overflow near 8 TiB, umlctl stops at 4 TiB",
            backing_abs.display()
        )));
    }
    if backing_abs.as_os_str().len() > MAX_BACKING_PATH {
        return Err(CowError::Invalid(format!(
            "backing path {} is longer than the {MAX_BACKING_PATH} bytes a COW header holds",
            backing_abs.display()
        )));
    }
    // The kernel stores the mtime truncated to 32 bits, then compares the
    // full value: a backing mtime beyond 2106 can never match.
    let header = Header::new_v3(&backing_abs, time32(mtime), size);
    let bytes = header.encode().map_err(CowError::Invalid)?;
    let tmp = TempFile::new(cow)?;
    tmp.file()
        .write_all_at(&bytes, 0)
        .map_err(io_err("write COW header", &tmp.path))?;
    tmp.file()
        .write_all_at(&[0], header.data_offset() + size - 1)
        .map_err(io_err("extend COW file", &tmp.path))?;
    tmp.persist(cow, false)?;
    Ok(header)
}

/// Is every byte zero? (64-byte folds vectorize well.)
fn all_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Chunk size for merges: large enough for sequential I/O, small enough to
/// keep memory flat.
const CHUNK: u64 = 4 << 20;
/// Granularity of holes in merged output.
const BLOCK: usize = 4096;

/// Data regions of `f` (SEEK_DATA/SEEK_HOLE) overlapping `[from, to)`, so
/// holes in a sparse backing file are neither read nor written.
fn data_regions(f: &File, from: u64, to: u64) -> Vec<(u64, u64)> {
    use crate::seek::{next_data, next_hole, Next};
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let data = match next_data(f, pos) {
            Ok(Next::Data(d)) => d,
            Ok(Next::NoMoreData) => break,
            // SEEK_DATA unsupported: treat everything as data.
            Err(_) => return vec![(from, to)],
        };
        if data >= to {
            break;
        }
        let hole = next_hole(f, data).map_or(to, |h| h.min(to));
        out.push((data, hole));
        pos = hole;
    }
    out
}

/// Write `buf` at `off`, skipping whole zero blocks so the file stays sparse.
fn write_sparse(f: &File, path: &Path, buf: &[u8], off: u64) -> Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let j = (i + BLOCK).min(buf.len());
        if !all_zero(&buf[i..j]) {
            // Coalesce consecutive non-zero blocks into one write.
            let mut k = j;
            while k < buf.len() {
                let l = (k + BLOCK).min(buf.len());
                if all_zero(&buf[k..l]) {
                    break;
                }
                k = l;
            }
            f.write_all_at(&buf[i..k], off + i as u64)
                .map_err(io_err("write", path))?;
            i = k;
        } else {
            i = j;
        }
    }
    Ok(())
}

/// Make `dst` share all of `src`'s extents (FICLONE); false where the
/// filesystem cannot (ext4, tmpfs, across filesystems).
fn clone_file(dst: &File, src: &File) -> bool {
    use std::os::fd::AsRawFd;
    // _IOW(0x94, 9, int), from linux/fs.h.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both descriptors are open for the duration of the call and
    // FICLONE takes the source descriptor as its integer argument.
    unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) == 0 }
}

/// Merge `cow` with its backing file into a new sparse image at `out`
/// (like `uml_moo COW OUT`, but keeping a size that is not a multiple of
/// 512). `out` appears only when complete.
pub fn merge_to(cow: &Path, out: &Path, replace: bool, progress: &dyn Progress) -> Result<u64> {
    let c = Cow::open(cow)?;
    if u64::from(c.header.sectorsize) != SECTOR {
        return Err(CowError::Invalid(format!(
            "{} has sector size {}; only 512 is consistent with how UML uses the bitmap",
            cow.display(),
            c.header.sectorsize
        )));
    }
    let backing = c.open_backing()?;
    if !replace && fs::symlink_metadata(out).is_ok() {
        return Err(CowError::Exists {
            path: out.to_path_buf(),
        });
    }
    let size = c.header.size;
    let tmp = TempFile::new(out)?;
    // Where the filesystem shares extents (btrfs, XFS with reflink), the
    // new image starts as a clone of the backing file and only the
    // overlay's sectors are written: the output's unchanged data costs
    // neither reads, writes nor space.
    if clone_file(tmp.file(), &backing) {
        tmp.file()
            .set_len(size)
            .map_err(io_err("size", &tmp.path))?;
        progress.start(c.allocated_sectors() * SECTOR);
        c.for_each_overlay_chunk(cow, |a, data| {
            tmp.file()
                .write_all_at(data, a)
                .map_err(io_err("write", &tmp.path))?;
            progress.advance(data.len() as u64);
            Ok(())
        })?;
        tmp.persist(out, replace)?;
        progress.finish();
        return Ok(size);
    }
    tmp.file()
        .set_len(size)
        .map_err(io_err("size", &tmp.path))?;
    progress.start(size);
    // Holes of a sparse backing file are neither read nor written.
    let regions = data_regions(&backing, 0, size);
    let mut buf = vec![0u8; us(CHUNK)];
    let mut off = 0;
    while off < size {
        let len = CHUNK.min(size - off);
        let chunk = &mut buf[..us(len)];
        chunk.fill(0);
        for &(da, db) in regions.iter().filter(|&&(a, b)| a < off + len && b > off) {
            let (a, b) = (da.max(off), db.min(off + len));
            read_full_at(&backing, &mut chunk[us(a - off)..us(b - off)], a)
                .map_err(io_err("read backing file", &c.backing_path()))?;
        }
        c.overlay_chunk(off, len, chunk, |_, _| {})?;
        write_sparse(tmp.file(), &tmp.path, chunk, off)?;
        off += len;
        progress.advance(len);
    }
    tmp.persist(out, replace)?;
    progress.finish();
    Ok(size)
}

/// Name of the marker that records an in-place merge in progress.
pub fn merge_marker(cow: &Path) -> PathBuf {
    let mut s = cow.as_os_str().to_os_string();
    s.push(".merging");
    PathBuf::from(s)
}

/// Merge `cow` into its backing file in place, then empty the overlay and
/// re-stamp it for the backing file's new mtime, so it stays usable. With
/// `reclaim`, the overlay's old data blocks are freed as well (otherwise
/// they stay allocated, unused, until the overlay is removed).
///
/// Only sectors the overlay holds are written; every other sector of the
/// backing file is never touched, so a kill at any point leaves them intact.
/// Before the first write a marker `<cow>.merging` records the backing
/// file's original mtime; a kill leaves the backing file with some of the
/// overlay's sectors applied, the overlay unchanged, and the marker. Run the
/// merge again to finish it (it rewrites every overlay sector, which is
/// idempotent). Other overlays on the same backing file are invalid after a
/// merge (their base changed).
///
/// The backing file is the one the overlay's header names: an untrusted
/// overlay chooses where the merge writes. `pinned` makes the merge refuse
/// unless that is this file.
pub fn merge_in_place(
    cow: &Path,
    reclaim: bool,
    pinned: Option<&Path>,
    progress: &dyn Progress,
) -> Result<u64> {
    let c = Cow::open_with(cow, true)?;
    if let Some(p) = pinned {
        c.check_pinned(p).map_err(CowError::Backing)?;
    }
    if u64::from(c.header.sectorsize) != SECTOR {
        return Err(CowError::Invalid(format!(
            "{} has sector size {}; only 512 is consistent with how UML uses the bitmap",
            cow.display(),
            c.header.sectorsize
        )));
    }
    let marker = merge_marker(cow);
    let resuming = match fs::read_to_string(&marker) {
        Ok(m) => m.trim() == c.header.mtime.to_string(),
        Err(_) => false,
    };
    match c.check_backing() {
        Ok(()) => {}
        Err(BackingProblem::MtimeMismatch { .. }) if resuming => {}
        Err(p) => return Err(CowError::Backing(p)),
    }
    let bpath = c.backing_path();
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bpath)
        .map_err(io_err("open backing file for writing", &bpath))?;
    {
        let tmp = TempFile::new(&marker)?;
        tmp.file()
            .write_all_at(format!("{}\n", c.header.mtime).as_bytes(), 0)
            .map_err(io_err("write", &marker))?;
        tmp.persist(&marker, true)?;
    }
    let size = c.header.size;
    let total = c.allocated_sectors() * SECTOR;
    progress.start(total);
    // Per run of overlay sectors: read it from the overlay and write it into
    // the backing file. Nothing else of the backing file is read or written.
    // When resuming a killed merge, a run is compared first and written only
    // where it differs (what is already done is skipped).
    let mut old = Vec::new();
    // Writeback is started every WRITEBACK bytes, so that the final fsync
    // finds most of the data already on its way to the disk.
    const WRITEBACK: u64 = 32 << 20;
    let mut unsynced = 0u64;
    c.for_each_overlay_chunk(cow, |a, new| {
        let len = new.len();
        {
            let write = if resuming {
                old.resize(len, 0);
                old.fill(0);
                read_full_at(&backing, &mut old, a).map_err(io_err("read backing file", &bpath))?;
                new != old
            } else {
                true
            };
            if write {
                backing
                    .write_all_at(new, a)
                    .map_err(io_err("write backing file", &bpath))?;
                unsynced += len as u64;
                if unsynced >= WRITEBACK {
                    // Only a hint: the fsync below is what makes it durable.
                    // SAFETY: sync_file_range takes a valid open fd (ours,
                    // alive for the call) and integers; nix has no wrapper.
                    let _ = unsafe {
                        libc::sync_file_range(
                            std::os::fd::AsRawFd::as_raw_fd(&backing),
                            0,
                            0,
                            libc::SYNC_FILE_RANGE_WRITE,
                        )
                    };
                    unsynced = 0;
                }
            }
        }
        progress.advance(len as u64);
        Ok(())
    })?;
    backing.sync_all().map_err(io_err("fsync", &bpath))?;
    drop(backing);
    // Empty and re-stamp the overlay.
    let (_, mtime) = backing_stat(&bpath).map_err(io_err("stat", &bpath))?;
    let mut h = c.header.clone();
    h.mtime = time32(mtime);
    let zeros = vec![0u8; c.bitmap.len()];
    c.file
        .write_all_at(&zeros, h.bitmap_offset())
        .map_err(io_err("clear COW bitmap", cow))?;
    c.file
        .write_all_at(&h.encode().map_err(CowError::Invalid)?, 0)
        .map_err(io_err("write COW header", cow))?;
    c.file.sync_all().map_err(io_err("fsync", cow))?;
    if reclaim {
        // Free the data area: cutting the file back to its bitmap and
        // extending it again (sparse). With the bitmap already clear, a kill
        // in between leaves a valid, short overlay. Freeing many extents
        // can take longer than the merge itself, hence optional.
        c.file
            .set_len(h.data_offset())
            .map_err(io_err("truncate", cow))?;
        c.file
            .set_len(h.data_offset() + size)
            .map_err(io_err("extend", cow))?;
    }
    fs::remove_file(&marker).map_err(io_err("remove", &marker))?;
    progress.finish();
    Ok(total)
}

/// How `rebase` established that the new backing file has the same content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Identity {
    /// Same size and mtime: the same file, moved, or copied with its mtime.
    SameStamp,
    /// Compared byte for byte with the original backing file.
    Compared,
    /// Not verified (`--force`).
    Forced,
}

/// Point `cow` at `new_backing` (a moved or copied backing file). The new
/// file must have the recorded size, and either the recorded mtime or the
/// same bytes as the original backing file (compared when that still
/// exists); `force` skips the content check. The header is rewritten in its
/// own version's layout with the new absolute path and mtime.
pub fn rebase(
    cow: &Path,
    new_backing: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<Identity> {
    let c = Cow::open_with(cow, true)?;
    let new_abs = absolutize(new_backing)?;
    let (size, mtime) =
        backing_stat(&new_abs).map_err(io_err("open new backing file", &new_abs))?;
    if size != c.header.size {
        return Err(CowError::Invalid(format!(
            "{} is {size} bytes, but overlay {} was made for a {}-byte backing file: it is not the same image",
            new_abs.display(),
            cow.display(),
            c.header.size
        )));
    }
    let old = c.backing_path();
    let identity = if mtime == i64::from(c.header.mtime) {
        Identity::SameStamp
    } else if fs::metadata(&old).is_ok()
        && fs::canonicalize(&old).ok() != fs::canonicalize(&new_abs).ok()
    {
        if !same_content(&old, &new_abs, size, progress)? {
            return Err(CowError::Invalid(format!(
                "{} differs from the overlay's original backing file {}: the overlay's sectors would land on different data",
                new_abs.display(),
                old.display()
            )));
        }
        Identity::Compared
    } else if force {
        Identity::Forced
    } else {
        return Err(CowError::Invalid(format!(
            "cannot verify that {} has the content overlay {} was made for: its mtime changed and there is no original to compare with\nfix: if you are sure it is the same image, add --force",
            new_abs.display(),
            cow.display()
        )));
    };
    let mut h = c.header.clone();
    h.backing = new_abs;
    h.mtime = time32(mtime);
    let bytes = h.encode().map_err(CowError::Invalid)?;
    c.file
        .write_all_at(&bytes, 0)
        .map_err(io_err("write COW header", cow))?;
    c.file.sync_all().map_err(io_err("fsync", cow))?;
    Ok(identity)
}

fn same_content(a: &Path, b: &Path, size: u64, progress: &dyn Progress) -> Result<bool> {
    let fa = File::open(a).map_err(io_err("open", a))?;
    let fb = File::open(b).map_err(io_err("open", b))?;
    let mut ba = vec![0u8; us(CHUNK)];
    let mut bb = vec![0u8; us(CHUNK)];
    progress.start(size);
    let mut off = 0;
    while off < size {
        let len = us(CHUNK.min(size - off));
        let na = read_full_at(&fa, &mut ba[..len], off).map_err(io_err("read", a))?;
        let nb = read_full_at(&fb, &mut bb[..len], off).map_err(io_err("read", b))?;
        if na != nb || ba[..na] != bb[..nb] {
            progress.finish();
            return Ok(false);
        }
        off += len as u64;
        progress.advance(len as u64);
    }
    progress.finish();
    Ok(true)
}

/// Write `data` into the disk at byte `offset` through the overlay (as the
/// guest would): sectors only partly covered are first filled from the
/// backing file. Used to prepare overlays without booting a guest.
pub fn write_through(cow: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let mut c = Cow::open_with(cow, true)?;
    let backing = c.open_backing()?;
    let end = offset + data.len() as u64;
    if end > c.header.size {
        return Err(CowError::Invalid(format!(
            "write past the end of the {}-byte disk",
            c.header.size
        )));
    }
    let first = offset / SECTOR;
    let last = end.div_ceil(SECTOR);
    let mut sectors = vec![0u8; us((last - first) * SECTOR)];
    c.read_merged(&backing, first * SECTOR, &mut sectors)?;
    let at = us(offset - first * SECTOR);
    sectors[at..at + data.len()].copy_from_slice(data);
    let data_off = c.header.data_offset();
    c.file
        .write_all_at(&sectors, data_off + first * SECTOR)
        .map_err(io_err("write COW data", cow))?;
    for s in first..last {
        c.bitmap[(s / 8) as usize] |= 1 << (s % 8);
    }
    let b0 = (first / 8) as usize;
    let b1 = ((last - 1) / 8) as usize;
    c.file
        .write_all_at(&c.bitmap[b0..=b1], c.header.bitmap_offset() + b0 as u64)
        .map_err(io_err("write COW bitmap", cow))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    fn hexdump_header(p: &Path) -> Vec<u8> {
        fs::read(p).unwrap()[..V3_HEADER_LEN].to_vec()
    }

    #[test]
    fn geometry_matches_the_worked_examples() {
        // reference/uml-spec.md §1.4: 10 MiB backing.
        let h = Header::new_v3(Path::new("/b"), 0, 10 << 20);
        assert_eq!(h.bitmap_offset(), 8192);
        assert_eq!(h.bitmap_len(), 2560);
        assert_eq!(h.data_offset(), 12288);
        assert_eq!(h.data_offset() + h.size, 10_498_048);
        // 1000-byte backing.
        let h = Header::new_v3(Path::new("/b"), 0, 1000);
        assert_eq!(h.bitmap_len(), 1);
        assert_eq!(h.data_offset(), 12288);
        assert_eq!(h.sectors(), 2);
    }

    #[test]
    fn v3_header_matches_the_spec_hexdump() {
        // §1.8: mtime 0x65937D25, size 10 MiB.
        let h = Header::new_v3(Path::new("/x/backing.img"), 0x6593_7D25, 10 << 20);
        let b = h.encode().unwrap();
        assert_eq!(b.len(), V3_HEADER_LEN);
        assert_eq!(
            &b[..32],
            &[
                0x4f, 0x4f, 0x4f, 0x4d, 0, 0, 0, 3, 0x65, 0x93, 0x7d, 0x25, 0, 0, 0, 0, 0, 0xa0, 0,
                0, 0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(&b[32..46], b"/x/backing.img");
        assert_eq!(Header::parse(&b).unwrap().unwrap(), h);
    }

    #[test]
    fn all_versions_roundtrip() {
        for v in [Version::V1, Version::V2, Version::V3, Version::V3Broken] {
            let mut h = Header::new_v3(
                Path::new("/some/where/base.img"),
                1_700_000_000,
                123_456_789,
            );
            h.version = v;
            if matches!(v, Version::V1 | Version::V2) {
                h.alignment = h.sectorsize;
            }
            let b = h.encode().unwrap();
            let back = Header::parse(&b).unwrap().unwrap();
            assert_eq!(back, h, "{v:?}");
        }
    }

    #[test]
    fn v1_and_v2_geometry_reproduce_the_kernel() {
        let mut h = Header::new_v3(Path::new("/b"), 0, 10 << 20);
        h.version = Version::V2;
        h.alignment = 512;
        assert_eq!(h.bitmap_offset(), 4120);
        assert_eq!(h.bitmap_len(), 2560);
        assert_eq!(h.data_offset(), round_up(4120 + 2560, 512));
        // The historic rounding: 1000 bytes -> (1000+511)/4096 = 0 bytes.
        h.size = 1000;
        assert_eq!(h.bitmap_len(), 0);
        h.version = Version::V1;
        assert_eq!(h.bitmap_offset(), 280);
    }

    #[test]
    fn bad_headers_are_errors_and_non_cow_is_none() {
        assert_eq!(Header::parse(b"").unwrap(), None);
        assert_eq!(Header::parse(&[0u8; 8192]).unwrap(), None);
        let good = Header::new_v3(Path::new("/b"), 1, 4096).encode().unwrap();
        // Truncated.
        assert!(Header::parse(&good[..100]).unwrap_err().contains("shorter"));
        // Unknown version.
        let mut b = good.clone();
        b[7] = 9;
        assert!(Header::parse(&b).unwrap_err().contains("version 9"));
        // Zero alignment.
        let mut b = good.clone();
        b[24..28].copy_from_slice(&[0; 4]);
        assert!(Header::parse(&b).unwrap_err().contains("alignment"));
        // Unknown format.
        let mut b = good.clone();
        b[31] = 1;
        assert!(Header::parse(&b).unwrap_err().contains("cow_format"));
        // Empty path in the broken layout too.
        let mut b = good;
        b[32..].fill(0);
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn parser_survives_random_and_mutated_input() {
        // A cheap stand-in for the fuzz target in fuzz/: no input may panic.
        let good = Header::new_v3(Path::new("/base.img"), 7, 1 << 30)
            .encode()
            .unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..(next() % 8) {
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            b.truncate((next() as usize) % (MAX_HEADER_LEN + 16));
            if let Ok(Some(h)) = Header::parse(&b) {
                let _ = (h.bitmap_len(), h.data_offset(), h.sectors(), h.encode());
            }
        }
    }

    #[test]
    fn create_merge_and_write_through() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let mut content: Vec<u8> = (0..(1u32 << 20) + 1000).map(|i| (i % 251) as u8).collect();
        fs::write(&base, &content).unwrap();
        let cow = dir.path().join("c.cow");
        let h = create(&cow, &base).unwrap();
        assert_eq!(h.size, content.len() as u64);
        assert!(matches!(create(&cow, &base), Err(CowError::Exists { .. })));
        let c = Cow::open(&cow).unwrap();
        assert_eq!(c.allocated_sectors(), 0);
        c.check_backing().unwrap();
        // Sparse: only the header page and the last block are allocated.
        assert!(fs::metadata(&cow).unwrap().blocks() * 512 < 64 * 1024);

        write_through(&cow, 700, b"hello overlay").unwrap();
        write_through(&cow, content.len() as u64 - 5, b"tail!").unwrap();
        content[700..713].copy_from_slice(b"hello overlay");
        let n = content.len();
        content[n - 5..].copy_from_slice(b"tail!");
        let c = Cow::open(&cow).unwrap();
        assert!(c.is_set(1) && !c.is_set(0) && !c.is_set(2));
        assert!(c.is_set((content.len() as u64 - 1) / SECTOR));
        assert_eq!(c.allocated_sectors(), 2);
        let out = dir.path().join("merged.img");
        merge_to(&cow, &out, false, &NoProgress).unwrap();
        assert_eq!(fs::read(&out).unwrap(), content);
        assert_eq!(
            fs::read(&base).unwrap()[700..713],
            (700..713).map(|i| (i % 251) as u8).collect::<Vec<_>>()[..]
        );
        // The merged reader agrees.
        let b = File::open(&base).unwrap();
        let mut buf = vec![0u8; 2000];
        c.read_merged(&b, 0, &mut buf).unwrap();
        assert_eq!(buf, content[..2000]);
        // In place: the backing file becomes the merged image and the
        // overlay is empty and valid again.
        merge_in_place(&cow, true, None, &NoProgress).unwrap();
        assert_eq!(fs::read(&base).unwrap(), content);
        let c = Cow::open(&cow).unwrap();
        assert_eq!(c.allocated_sectors(), 0);
        c.check_backing().unwrap();
        assert!(!merge_marker(&cow).exists());
    }

    #[test]
    fn backing_problems_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        fs::write(&base, vec![1u8; 8192]).unwrap();
        let cow = dir.path().join("c.cow");
        create(&cow, &base).unwrap();
        // Touched.
        let f = File::options().write(true).open(&base).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(100))
            .unwrap();
        let e = Cow::open(&cow).unwrap().check_backing().unwrap_err();
        assert!(matches!(e, BackingProblem::MtimeMismatch { .. }));
        assert!(e.to_string().contains("umlctl cow rebase"));
        // Resized.
        f.set_len(4096).unwrap();
        let e = Cow::open(&cow).unwrap().check_backing().unwrap_err();
        assert!(
            matches!(
                e,
                BackingProblem::SizeMismatch {
                    header: 8192,
                    actual: 4096,
                    ..
                }
            ),
            "{e:?}"
        );
        // Missing.
        fs::remove_file(&base).unwrap();
        let e = Cow::open(&cow).unwrap().check_backing().unwrap_err();
        assert!(matches!(e, BackingProblem::Missing { .. }));
        assert!(merge_to(&cow, &dir.path().join("o"), false, &NoProgress).is_err());
        assert!(!dir.path().join("o").exists());
    }

    #[test]
    fn backings_that_are_not_images_or_loop_back_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A directory is not a base.
        let e = create(&dir.path().join("d.cow"), dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(!dir.path().join("d.cow").exists());
        // An overlay whose header names itself, with size and mtime that
        // match: an in-place merge would write into the overlay.
        let cow = dir.path().join("self.cow");
        let size = 1u64 << 20;
        let mut bytes = Header::new_v3(&cow, 1_000_000, size).encode().unwrap();
        bytes.resize(size as usize, 0);
        fs::write(&cow, &bytes).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(&cow)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let e = Cow::open(&cow).unwrap().check_backing().unwrap_err();
        assert!(matches!(e, BackingProblem::Loop { .. }), "{e:?}");
        let before = fs::read(&cow).unwrap();
        assert!(merge_in_place(&cow, false, None, &NoProgress).is_err());
        assert_eq!(fs::read(&cow).unwrap(), before, "the overlay was written");
        // Two overlays naming each other.
        let a = dir.path().join("a.cow");
        let b = dir.path().join("b.cow");
        for (me, other) in [(&a, &b), (&b, &a)] {
            let mut bytes = Header::new_v3(other, 1_000_000, size).encode().unwrap();
            bytes.resize(size as usize, 0);
            fs::write(me, &bytes).unwrap();
        }
        for p in [&a, &b] {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let e = Cow::open(&a).unwrap().check_backing().unwrap_err();
        assert!(matches!(e, BackingProblem::Loop { .. }), "{e:?}");
    }

    #[test]
    fn an_in_place_merge_can_be_pinned_to_its_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let other = dir.path().join("other.img");
        fs::write(&base, vec![1u8; 8192]).unwrap();
        fs::write(&other, vec![1u8; 8192]).unwrap();
        let cow = dir.path().join("c.cow");
        create(&cow, &base).unwrap();
        let e = merge_in_place(&cow, false, Some(&other), &NoProgress).unwrap_err();
        assert!(e.to_string().contains("not"), "{e}");
        assert!(!merge_marker(&cow).exists());
        merge_in_place(&cow, false, Some(&base), &NoProgress).unwrap();
    }

    #[test]
    fn rebase_checks_size_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        fs::write(&base, vec![7u8; 16384]).unwrap();
        let cow = dir.path().join("c.cow");
        create(&cow, &base).unwrap();
        let before = hexdump_header(&cow);
        // A copy with a new mtime and the same bytes: compared, accepted.
        let copy = dir.path().join("copy.img");
        fs::write(&copy, vec![7u8; 16384]).unwrap();
        let f = File::options().write(true).open(&copy).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(500))
            .unwrap();
        assert_eq!(
            rebase(&cow, &copy, false, &NoProgress).unwrap(),
            Identity::Compared
        );
        let c = Cow::open(&cow).unwrap();
        assert_eq!(c.header.backing, copy.canonicalize().unwrap());
        c.check_backing().unwrap();
        assert_ne!(hexdump_header(&cow), before);
        // A different image of the same size is refused.
        let other = dir.path().join("other.img");
        fs::write(&other, vec![8u8; 16384]).unwrap();
        let f = File::options().write(true).open(&other).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(900))
            .unwrap();
        let e = rebase(&cow, &other, false, &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs"), "{e}");
        // A different size is refused, even with --force.
        fs::write(&other, vec![7u8; 100]).unwrap();
        assert!(rebase(&cow, &other, true, &NoProgress).is_err());
    }
}
