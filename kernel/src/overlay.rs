//! The root disk of an `--image` guest: a UML COW overlay over the image,
//! throwaway (in the run directory) or persistent (`--overlay FILE`,
//! created if missing, reused so changes accumulate). The image itself is
//! only ever opened read-only by UML.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use umlctl_imgtools::cow::{self, Cow};

use crate::error::{Error, Result};

/// Whether the path can go onto UML's command line as is.
fn plain(p: &Path) -> bool {
    p.to_str().is_some_and(|s| {
        !s.contains([',', ':', '"']) && !s.chars().any(|c| c.is_whitespace() || c.is_control())
    })
}

/// The pid holding a conflicting POSIX lock on `path` (UML write-locks the
/// disks it opens), if any.
// libc declares the lock constants as int; struct flock keeps them in shorts.
#[allow(clippy::cast_possible_truncation)]
pub fn locked_by(path: &Path) -> Option<i32> {
    let f = File::open(path).ok()?;
    // SAFETY: flock is plain data; zeroed is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // F_OFD_GETLK reports POSIX locks held by other processes as conflicts.
    // SAFETY: F_OFD_GETLK reads and writes `fl`, valid for the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    (r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid)
}

/// Prepare the overlay for `image` and return the path to give UML as
/// `ubd0` (its backing file comes from the COW header).
pub fn prepare(image: &Path, persistent: Option<&Path>, rundir: &Path) -> Result<PathBuf> {
    // UML runs in another directory: a relative path must not reach it.
    let persistent = persistent
        .map(|p| std::path::absolute(p).map_err(|e| Error::io("resolve", p, e)))
        .transpose()?;
    let persistent = persistent.as_deref();
    let path = match persistent {
        None => {
            let p = rundir.join("overlay.cow");
            cow::create(&p, image)?;
            p
        }
        Some(p) if p.exists() => {
            let c = Cow::open(p)?;
            let want = std::fs::canonicalize(image).map_err(|e| Error::io("resolve", image, e))?;
            let have = std::fs::canonicalize(c.backing_path()).unwrap_or_else(|_| c.backing_path());
            if have != want {
                return Err(Error::Usage(format!(
                    "overlay {} belongs to {}, not to {}\nfix: pass --image {} or use another --overlay",
                    p.display(),
                    c.header.backing.display(),
                    image.display(),
                    c.header.backing.display()
                )));
            }
            if cow::merge_marker(p).exists() {
                return Err(Error::Usage(format!(
                    "an in-place merge of {} was interrupted\nfix: finish it with `umlctl cow merge {} --in-place`",
                    p.display(),
                    p.display()
                )));
            }
            c.check_backing().map_err(|e| Error::Usage(e.to_string()))?;
            if let Some(pid) = locked_by(p) {
                return Err(Error::Usage(format!(
                    "overlay {} is in use by another guest (UML pid {pid}); a disk can only be used by one guest at a time",
                    p.display()
                )));
            }
            p.to_path_buf()
        }
        Some(p) => {
            cow::create(p, image)?;
            p.to_path_buf()
        }
    };
    if plain(&path) {
        return Ok(path);
    }
    // UML's command line cannot carry ',' ':' or spaces; a symlink can.
    let link = rundir.join("overlay");
    let target = std::path::absolute(&path).map_err(|e| Error::io("resolve", &path, e))?;
    std::os::unix::fs::symlink(&target, &link).map_err(|e| Error::io("symlink", &link, e))?;
    Ok(link)
}
