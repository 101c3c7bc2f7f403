//! Extracting a file or tree from an ext4 image onto the host, safely for
//! an image made by anyone.
//!
//! Everything is created below `dest` and nothing outside it is touched:
//! each entry is created exclusively (`mkdir`, `O_CREAT|O_EXCL`, `symlink`,
//! `mknod`, `link` all fail on an existing name and never follow a symlink
//! there), so an image that holds a symlink and then a file of the same
//! name cannot make a write land where the symlink points; each directory
//! walked into is one this extraction just created. Names were checked by
//! the reader (no `/`, no NUL, not empty); `.` and `..` are skipped.
//! Metadata is set with calls that do not follow symlinks.
//!
//! A crafted image cannot make it run away either: a directory linked twice
//! or into its own subtree (a loop) is an error, as is a tree deeper than
//! [`MAX_DEPTH`]; a file's holes stay holes, so a size of a terabyte costs
//! nothing. Files with several links in the image are extracted once and
//! hard-linked. On error, what this extraction created is removed.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::ext4::read::{Image, Piece, RawInode, ReadAt, ReadError};
use crate::num::us;
use crate::tree::Time;

/// Directories nested deeper than this are refused.
pub const MAX_DEPTH: usize = 1024;

/// What to restore besides content and modes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExtractOptions {
    /// Owners, device nodes and attributes outside `user.` (needs root).
    pub privileged: bool,
}

/// What an extraction did not do (each is also a reason to exit non-zero).
#[derive(Debug, Default)]
pub struct Extracted {
    /// Entries created on the host.
    pub entries: u64,
    /// Things skipped or not restored, each naming the path.
    pub warnings: Vec<String>,
}

/// Why an extraction stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("reading the image for {}: {source}", path.display())]
    Read { path: PathBuf, source: ReadError },
    #[error("{}: the image links directory inode {ino} a second time (a loop or a directory hard link; the image is corrupt)", path.display())]
    DirectoryLinkedTwice { path: PathBuf, ino: u32 },
    #[error("{}: directories nested deeper than {MAX_DEPTH} levels", path.display())]
    TooDeep { path: PathBuf },
    #[error("{}: cannot extract an inode of type {kind}", path.display())]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{}: a path with a NUL byte", path.display())]
    Nul { path: PathBuf },
}

/// Extract `node` (a directory, file, symlink or special file of `img`) to
/// `dest`, which must not exist yet. On error nothing of it stays.
pub fn extract<R: ReadAt>(
    img: &Image<R>,
    node: &RawInode,
    dest: &Path,
    opts: ExtractOptions,
) -> Result<Extracted, ExtractError> {
    let mut x = Extractor {
        img,
        opts,
        out: Extracted::default(),
        dirs: Vec::new(),
        open_dirs: HashSet::new(),
        seen_dirs: HashSet::new(),
        files: HashMap::new(),
    };
    match x.entry(node, dest, 0) {
        Ok(()) => {
            // Directory times last, after their contents were written.
            for (p, t) in std::mem::take(&mut x.dirs).into_iter().rev() {
                set_times(&p, t);
            }
            Ok(x.out)
        }
        Err(e) => {
            // `dest` did not exist (it was created exclusively), so all of
            // it is ours.
            let _ = match std::fs::symlink_metadata(dest) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(dest),
                Ok(_) => std::fs::remove_file(dest),
                Err(_) => Ok(()),
            };
            Err(e)
        }
    }
}

struct Extractor<'a, R: ReadAt> {
    img: &'a Image<R>,
    opts: ExtractOptions,
    out: Extracted,
    dirs: Vec<(PathBuf, Time)>,
    /// Directory inodes on the path being extracted.
    open_dirs: HashSet<u32>,
    /// Every directory inode extracted so far.
    seen_dirs: HashSet<u32>,
    /// Files with several links: inode → where it was extracted first.
    files: HashMap<u32, PathBuf>,
}

fn cstr(p: &Path) -> Result<CString, ExtractError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ExtractError::Nul { path: p.into() })
}

fn set_times(p: &Path, t: Time) {
    let ts = libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: libc::c_long::from(t.nsec),
    };
    let times = [ts, ts];
    if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
        // SAFETY: c is NUL-terminated and times points at two timespecs.
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
    }
}

impl<R: ReadAt> Extractor<'_, R> {
    fn entry(&mut self, node: &RawInode, dest: &Path, depth: usize) -> Result<(), ExtractError> {
        let io = |op: &'static str| {
            let path = dest.to_path_buf();
            move |source| ExtractError::Io { path, op, source }
        };
        let read = |source| ExtractError::Read {
            path: dest.to_path_buf(),
            source,
        };
        let c = cstr(dest)?;
        match node.kind_name() {
            "dir" => {
                if depth > MAX_DEPTH {
                    return Err(ExtractError::TooDeep { path: dest.into() });
                }
                if self.open_dirs.contains(&node.ino) || !self.seen_dirs.insert(node.ino) {
                    return Err(ExtractError::DirectoryLinkedTwice {
                        path: dest.into(),
                        ino: node.ino,
                    });
                }
                std::fs::create_dir(dest).map_err(io("create directory"))?;
                self.out.entries += 1;
                self.open_dirs.insert(node.ino);
                let mut children = self.img.read_dir(node).map_err(read)?;
                children.sort();
                for (name, ino, _) in children {
                    if name == b"." || name == b".." {
                        continue;
                    }
                    let child = self.img.inode(ino).map_err(read)?;
                    self.entry(&child, &dest.join(OsStr::from_bytes(&name)), depth + 1)?;
                }
                self.open_dirs.remove(&node.ino);
                self.dirs.push((dest.to_path_buf(), node.mtime));
            }
            "file" => {
                if node.links > 1 {
                    if let Some(first) = self.files.get(&node.ino) {
                        std::fs::hard_link(first, dest).map_err(io("link"))?;
                        self.out.entries += 1;
                        return Ok(());
                    }
                    self.files.insert(node.ino, dest.to_path_buf());
                }
                // Holes stay holes: only what the image holds is written, so
                // a file that claims a huge size costs no space and no time.
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(dest)
                    .map_err(io("create"))?;
                self.out.entries += 1;
                let mut werr = None;
                let mut pos = 0u64;
                self.img
                    .read_pieces(node, &mut |piece| match piece {
                        Piece::Data(d) => {
                            if werr.is_none() {
                                if let Err(e) = f.write_all_at(d, pos) {
                                    werr = Some(e);
                                }
                            }
                            pos += d.len() as u64;
                        }
                        Piece::Hole(n) => pos += n,
                    })
                    .map_err(read)?;
                if let Some(e) = werr {
                    return Err(io("write")(e));
                }
                f.set_len(node.size).map_err(io("set the size of"))?;
            }
            "symlink" => {
                let t = self.img.symlink_target(node).map_err(read)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&t), dest)
                    .map_err(io("create symlink"))?;
                self.out.entries += 1;
            }
            kind @ ("char" | "block" | "fifo" | "socket") => {
                if kind != "fifo" && !self.opts.privileged {
                    self.out.warnings.push(format!(
                        "{}: skipped a {kind} (creating one needs root)",
                        dest.display()
                    ));
                    return Ok(());
                }
                let (maj, min) = node.rdev();
                use nix::sys::stat::{makedev, mknod, Mode, SFlag};
                let fmt = match kind {
                    "char" => SFlag::S_IFCHR,
                    "block" => SFlag::S_IFBLK,
                    "fifo" => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                // mknod does not follow a symlink at the last component
                // (it fails with EEXIST).
                mknod(
                    c.as_c_str(),
                    fmt,
                    Mode::from_bits_truncate(0o600),
                    makedev(maj.into(), min.into()),
                )
                .map_err(|e| io("create node")(e.into()))?;
                self.out.entries += 1;
            }
            kind => {
                return Err(ExtractError::Unsupported {
                    path: dest.into(),
                    kind,
                })
            }
        }
        if self.opts.privileged {
            if let Err(e) = std::os::unix::fs::lchown(dest, Some(node.uid), Some(node.gid)) {
                self.out
                    .warnings
                    .push(format!("{}: chown: {e}", dest.display()));
            }
        }
        // The mode after the owner (a chown clears set-id bits). By path:
        // these are entries this extraction just created exclusively, never
        // symlinks.
        if !node.is_symlink() {
            // SAFETY: c is NUL-terminated.
            let r = unsafe {
                libc::fchmodat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::mode_t::from(node.mode & 0o7777),
                    0,
                )
            };
            if r != 0 {
                return Err(io("chmod")(std::io::Error::last_os_error()));
            }
        }
        for (name, value) in self.img.xattrs(node).map_err(read)? {
            if !self.opts.privileged && !name.starts_with(b"user.") {
                continue;
            }
            let Ok(n) = CString::new(name.clone()) else {
                continue;
            };
            // SAFETY: both strings are NUL-terminated; value is a valid
            // buffer of its length; lsetxattr does not follow symlinks.
            let r = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if r != 0 {
                self.out.warnings.push(format!(
                    "{}: set attribute {}: {}",
                    dest.display(),
                    String::from_utf8_lossy(&name),
                    std::io::Error::last_os_error()
                ));
            }
        }
        if !node.is_dir() {
            set_times(dest, node.mtime);
        }
        Ok(())
    }
}

/// Write the content of the regular file `node` to `w` as a stream, holes
/// as zeros (for a pipe, a FIFO or a device; [`extract`] keeps holes).
pub fn write_content<R: ReadAt, W: std::io::Write>(
    img: &Image<R>,
    node: &RawInode,
    w: &mut W,
    name: &Path,
) -> Result<u64, ExtractError> {
    let mut werr = None;
    let mut pos = 0u64;
    let zeros = [0u8; 64 * 1024];
    img.read_pieces(node, &mut |piece| {
        if werr.is_some() {
            return;
        }
        let r = match piece {
            Piece::Data(d) => {
                pos += d.len() as u64;
                w.write_all(d)
            }
            Piece::Hole(mut n) => {
                pos += n;
                let mut r = Ok(());
                while n > 0 && r.is_ok() {
                    let k = us(n.min(zeros.len() as u64));
                    r = w.write_all(&zeros[..k]);
                    n -= k as u64;
                }
                r
            }
        };
        if let Err(e) = r {
            werr = Some(e);
        }
    })
    .map_err(|source| ExtractError::Read {
        path: name.into(),
        source,
    })?;
    if let Some(source) = werr {
        return Err(ExtractError::Io {
            path: name.into(),
            op: "write",
            source,
        });
    }
    // The image may hold less than the size says (a hole at the end).
    let mut left = node.size.saturating_sub(pos);
    while left > 0 {
        let k = us(left.min(zeros.len() as u64));
        w.write_all(&zeros[..k])
            .map_err(|source| ExtractError::Io {
                path: name.into(),
                op: "write",
                source,
            })?;
        left -= k as u64;
    }
    w.flush().map_err(|source| ExtractError::Io {
        path: name.into(),
        op: "write",
        source,
    })?;
    Ok(node.size)
}
