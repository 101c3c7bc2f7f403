//! Where umlctl keeps things on the host: a per-user cache (shim, init
//! roots, kernels) and a per-user runtime directory (one subdirectory per
//! running guest).

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The per-user cache directory, created if needed:
/// `$UMLCTL_CACHE_DIR`, else `$XDG_CACHE_HOME/umlctl`, else `~/.cache/umlctl`,
/// else (no usable home, e.g. `nobody`) `/tmp/umlctl-<uid>/cache`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = env_dir("UMLCTL_CACHE_DIR") {
        return ensure_dir(&d).map(|_| d);
    }
    let candidates = [
        env_dir("XDG_CACHE_HOME").map(|d| d.join("umlctl")),
        env_dir("HOME").map(|d| d.join(".cache").join("umlctl")),
    ];
    for d in candidates.into_iter().flatten() {
        if ensure_dir(&d).is_ok() {
            return Ok(d);
        }
    }
    let d = private_tmp_dir()?.join("cache");
    ensure_dir(&d)?;
    Ok(d)
}

/// The per-user runtime directory for run directories:
/// `$UMLCTL_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/umlctl`, else `/tmp/umlctl-<uid>`.
pub fn runtime_dir() -> Result<PathBuf> {
    if let Some(d) = env_dir("UMLCTL_RUNTIME_DIR") {
        ensure_private_dir(&d)?;
        return Ok(d);
    }
    if let Some(x) = env_dir("XDG_RUNTIME_DIR") {
        let d = x.join("umlctl");
        if x.is_dir() && ensure_private_dir(&d).is_ok() {
            return Ok(d);
        }
    }
    private_tmp_dir()
}

/// `/tmp/umlctl-<uid>`, created 0700 and checked to be ours (not a symlink
/// or a directory someone else planted).
fn private_tmp_dir() -> Result<PathBuf> {
    let d = PathBuf::from(format!("/tmp/umlctl-{}", uid()));
    ensure_private_dir(&d)?;
    Ok(d)
}

/// Create `dir` (and parents) if missing.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| Error::io("create directory", dir, e))
}

/// Create `dir` with mode 0700 if missing; refuse it if it is a symlink, is
/// owned by another user or is accessible to others.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                ensure_dir(parent)?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| Error::io("create directory", dir, e))?;
        }
        Err(e) => return Err(Error::io("create directory", dir, e)),
    }
    let md = fs::symlink_metadata(dir).map_err(|e| Error::io("stat", dir, e))?;
    if !md.is_dir() {
        return Err(Error::Host {
            check: "runtime directory",
            detail: format!("{} exists and is not a directory", dir.display()),
            fix: format!("remove {} or set UMLCTL_RUNTIME_DIR", dir.display()),
        });
    }
    if md.uid() != uid() {
        return Err(Error::Host {
            check: "runtime directory",
            detail: format!(
                "{} is owned by uid {}, not by you (uid {})",
                dir.display(),
                md.uid(),
                uid()
            ),
            fix: format!(
                "remove {} or set UMLCTL_RUNTIME_DIR to a directory of yours",
                dir.display()
            ),
        });
    }
    if md.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod 0700", dir, e))?;
    }
    Ok(())
}

/// Write `bytes` to `path` atomically: a temporary file in the same
/// directory, fsync'd, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("write", path, e));
    }
    Ok(())
}

/// A short hex digest of a file's identity as it is now (path, device,
/// inode, size, modification and change times, plus `salt`): it changes
/// whenever the file is replaced or rewritten, and costs one stat.
pub fn identity_hex(path: &Path, md: &fs::Metadata, salt: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(path.as_os_str().as_encoded_bytes());
    for v in [
        md.dev(),
        md.ino(),
        md.size(),
        u64::from_ne_bytes(md.mtime().to_ne_bytes()),
        u64::from_ne_bytes(md.mtime_nsec().to_ne_bytes()),
        u64::from_ne_bytes(md.ctime().to_ne_bytes()),
        u64::from_ne_bytes(md.ctime_nsec().to_ne_bytes()),
    ] {
        h.update(v.to_le_bytes());
    }
    h.update(salt);
    h.finalize()
        .iter()
        .take(10)
        .map(|b| format!("{b:02x}"))
        .collect()
}
