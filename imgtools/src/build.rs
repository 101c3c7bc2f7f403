//! `image build`: sources in, an ext4 image out, atomically.
//!
//! The image is written to an unnamed file in OUT's directory and linked
//! into place only when complete, so a failure or a kill never leaves a
//! partial image at OUT. The UUID and htree hash seed derive from the
//! manifest digest and the options, so equal inputs give equal bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ext4::{self, Ids, Options, Report, WriteError};
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::source::{Builder, SourceError, Spool, Stats};
use crate::tree::{Inode, Kind, Meta, Time};

/// Everything `image build` takes besides the sources and OUT.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub ext4: Options,
    /// Fixed UUID instead of the derived one.
    pub uuid: Option<[u8; 16]>,
    /// Clamp every timestamp to this and use it for the superblock times.
    pub epoch: Option<i64>,
    /// Owner (uid, gid) of every entry read from a directory source.
    pub dir_owner: Option<(u32, u32)>,
}

/// The result of a build.
#[derive(Debug)]
pub struct Built {
    pub report: Report,
    pub uuid: [u8; 16],
    pub manifest: Manifest,
    pub sources: Vec<Stats>,
}

/// Why a build failed (nothing is left at OUT).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: is a directory; give the image file to create with -o")]
    OutIsDir { path: PathBuf },
    #[error("the sources make /lost+found a {kind}; ext4 keeps it as a directory for e2fsck (remove that entry)")]
    LostFound { kind: &'static str },
}

/// Format a UUID the usual way.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h = crate::manifest::hex(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parse `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

fn derive_ids(manifest: &Manifest, opts: &BuildOptions) -> ([u8; 16], [u8; 16]) {
    let mut h = Sha256::new();
    h.update(b"umlctl ext4 image v1\0");
    h.update(manifest.digest.as_bytes());
    h.update(format!(
        "\0size={:?} headroom={:?} inodes={:?} journal={} epoch={:?}\0",
        opts.ext4.size, opts.ext4.headroom, opts.ext4.inodes, opts.ext4.journal, opts.epoch
    ));
    h.update(&opts.ext4.label);
    let d = h.finalize();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&d[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4 layout (random-looking)
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    let uuid = opts.uuid.unwrap_or(uuid);
    let mut seed = [0u8; 16];
    seed.copy_from_slice(&Sha256::digest([&d[..], &uuid[..]].concat())[..16]);
    (uuid, seed)
}

/// A file that becomes visible at its final path only when committed.
///
/// A target that exists and is not a regular file or a directory (`/dev/null`,
/// a FIFO, a terminal, a block device) is never replaced: the file is made in
/// the temporary directory and written into the target in place, start to
/// end, at commit. The target `-` means standard output, the same way.
pub struct AtomicFile {
    file: File,
    dir: PathBuf,
    target: PathBuf,
    named: Option<PathBuf>,
    /// Written into in place (or stdout) at commit, not renamed over.
    in_place: Option<InPlace>,
}

enum InPlace {
    Path(PathBuf),
    Stdout,
}

impl AtomicFile {
    /// Prepare to create `target` (replaced if it is a regular file; written
    /// in place if it is another kind of file; `-` is standard output).
    pub fn new(target: &Path) -> std::io::Result<AtomicFile> {
        let in_place = if target == Path::new("-") {
            Some(InPlace::Stdout)
        } else {
            match std::fs::metadata(target) {
                Ok(m) if !m.is_file() && !m.is_dir() => Some(InPlace::Path(target.into())),
                _ => None,
            }
        };
        let dir = match (&in_place, target.parent()) {
            (Some(_), _) => std::env::temp_dir(),
            (None, Some(p)) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let anon = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_TMPFILE)
            .open(&dir);
        match anon {
            Ok(file) => Ok(AtomicFile {
                file,
                dir,
                target: target.to_path_buf(),
                named: None,
                in_place,
            }),
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || e.raw_os_error() == Some(libc::EISDIR) =>
            {
                let name = match in_place {
                    Some(_) => dir.join(format!(".umlctl-tmp.{}", std::process::id())),
                    None => Self::temp_name(target),
                };
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&name)?;
                Ok(AtomicFile {
                    file,
                    dir,
                    target: target.to_path_buf(),
                    named: Some(name),
                    in_place,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn temp_name(target: &Path) -> PathBuf {
        let mut n = std::ffi::OsString::from(".");
        n.push(target.file_name().unwrap_or_default());
        n.push(format!(".umlctl-tmp.{}", std::process::id()));
        target.with_file_name(n)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the target is written in place (or is stdout) rather than
    /// replaced.
    pub fn in_place(&self) -> bool {
        self.in_place.is_some()
    }

    /// Put the file at its final path (atomically replacing what was
    /// there), or write it into an in-place target from its start.
    pub fn commit(mut self) -> std::io::Result<()> {
        if let Some(dest) = self.in_place.take() {
            use std::io::{Seek, Write};
            let mut from = &self.file;
            from.seek(std::io::SeekFrom::Start(0))?;
            match dest {
                InPlace::Stdout => {
                    let mut out = std::io::stdout().lock();
                    std::io::copy(&mut from, &mut out)?;
                    out.flush()?;
                }
                InPlace::Path(p) => {
                    let mut out = std::fs::OpenOptions::new().write(true).open(p)?;
                    std::io::copy(&mut from, &mut out)?;
                    out.flush()?;
                }
            }
            return Ok(());
        }
        let tmp = match self.named.take() {
            Some(n) => n,
            None => {
                let tmp = Self::temp_name(&self.target);
                let fd_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                let c_from = std::ffi::CString::new(fd_path).map_err(std::io::Error::other)?;
                let c_to = std::ffi::CString::new(tmp.as_os_str().as_bytes())
                    .map_err(std::io::Error::other)?;
                // SAFETY: both paths are NUL-terminated C strings.
                let r = unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        c_from.as_ptr(),
                        libc::AT_FDCWD,
                        c_to.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                };
                if r != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                tmp
            }
        };
        std::fs::rename(&tmp, &self.target).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// Directory the file is made in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(n) = &self.named {
            let _ = std::fs::remove_file(n);
        }
    }
}

/// Build an image at `out` from `sources` layered in order.
pub fn build(
    sources: &[PathBuf],
    out: &Path,
    opts: &BuildOptions,
    read_progress: &dyn Progress,
    write_progress: &dyn Progress,
) -> Result<Built, BuildError> {
    if out.is_dir() {
        return Err(BuildError::OutIsDir { path: out.into() });
    }
    let atomic = AtomicFile::new(out).map_err(|source| BuildError::Io {
        path: out.into(),
        op: "create",
        source,
    })?;
    // Content goes straight into the image file unless the image may need
    // more descriptor blocks than the in-image spool keeps free.
    let big = opts
        .ext4
        .size
        .is_some_and(|s| s > (crate::source::GDT_RESERVE * 128) << 27);
    let spool = if big {
        Spool::new(atomic.dir(), out).map_err(|source| BuildError::Io {
            path: atomic.dir().into(),
            op: "create a spool file in",
            source,
        })?
    } else {
        let f = atomic.file().try_clone().map_err(|source| BuildError::Io {
            path: out.into(),
            op: "reopen",
            source,
        })?;
        Spool::in_image(f, out)
    };
    let mut b = Builder::new(spool, opts.epoch, read_progress);
    b.set_dir_owner(opts.dir_owner);
    let mut stats = Vec::new();
    for s in sources {
        stats.push(b.add(s)?);
    }
    let (mut tree, spool) = b.finish()?;
    // Times the sources do not give: the epoch, else the newest mtime.
    let default_time = match opts.epoch {
        Some(e) => Time {
            sec: e.clamp(0, crate::tree::TIME_MAX),
            nsec: 0,
        },
        None => Time {
            sec: tree.max_mtime().sec,
            nsec: 0,
        },
    };
    match tree.get(b"lost+found").map(|i| &i.kind) {
        None | Some(Kind::Dir) => {}
        Some(k) => {
            return Err(BuildError::LostFound {
                kind: match k {
                    Kind::File(_) => "regular file",
                    Kind::Symlink(_) => "symlink",
                    _ => "special file",
                },
            })
        }
    }
    if tree.get(b"lost+found").is_none() {
        let lpf = Inode {
            kind: Kind::Dir,
            meta: Meta {
                mode: 0o700,
                uid: 0,
                gid: 0,
                mtime: default_time,
            },
            xattrs: BTreeMap::new(),
            implicit: true,
        };
        // Cannot fail: the root is a directory and the name is valid.
        let _ = tree.insert(b"lost+found", lpf, u32::MAX);
    }
    tree.set_implicit_times(default_time);
    let manifest = Manifest::from_tree(&tree);
    let (uuid, hash_seed) = derive_ids(&manifest, opts);
    let ids = Ids {
        uuid,
        hash_seed,
        time: default_time.sec,
    };
    let report = ext4::write_image(
        &tree,
        &spool,
        &opts.ext4,
        &ids,
        atomic.file(),
        out,
        write_progress,
    )?;
    drop(spool);
    atomic.commit().map_err(|source| BuildError::Io {
        path: out.into(),
        op: "move the finished image into place at",
        source,
    })?;
    Ok(Built {
        report,
        uuid,
        manifest,
        sources: stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text() {
        let u = parse_uuid("0123abcd-0000-4000-8000-00000000ffff").unwrap();
        assert_eq!(uuid_string(&u), "0123abcd-0000-4000-8000-00000000ffff");
        assert!(parse_uuid("nope").is_none());
    }

    /// A deterministic short version of fuzz/fuzz_targets/tar_to_image.rs:
    /// a small tar (file, directory, symlink, hard link, PAX header),
    /// mutated hundreds of times: building never panics, and an image that
    /// is written checks clean.
    #[test]
    fn mutated_archives_never_panic_and_what_builds_is_sound() {
        use crate::progress::NoProgress;
        let mut ar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        ar.append_data(&mut h, "d/", std::io::empty()).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(5000);
        ar.append_data(&mut h, "d/f", &vec![3u8; 5000][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        ar.append_link(&mut h, "s", "d/f").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        ar.append_link(&mut h, "hard", "d/f").unwrap();
        ar.append_pax_extensions([("mtime", &b"12.5"[..])]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o600);
        h.set_size(3);
        ar.append_data(&mut h, "last", &b"end"[..]).unwrap();
        let good = ar.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("in.tar"), dir.path().join("out.img"));
        let mut x = 0x9E3779B97F4A7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut built = 0;
        for _ in 0..400 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let r = next();
                let at = (r >> 16) as usize % b.len();
                b[at] = (r >> 40) as u8;
            }
            std::fs::write(&src, &b).unwrap();
            let opts = BuildOptions {
                epoch: Some(0),
                ..BuildOptions::default()
            };
            if build(
                std::slice::from_ref(&src),
                &out,
                &opts,
                &NoProgress,
                &NoProgress,
            )
            .is_ok()
            {
                built += 1;
                let disk = crate::disk::Disk::open(&out).unwrap();
                let img = crate::ext4::read::Image::open(disk).unwrap();
                let w = crate::verify::walk(&img).unwrap();
                let problems = crate::verify::check(&img, &w).unwrap();
                assert!(problems.is_empty(), "{problems:?}");
            }
        }
        assert!(built > 0, "no mutation built at all: the seed is broken");
    }
}
