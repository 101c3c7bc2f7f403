//! The init disk for guests booted from an image.
//!
//! With `--image`, the guest must reach nothing of the host, so its init
//! (umlctl itself) does not come through hostfs: it comes from a small
//! read-only ext4 disk made by umlctl's own image writer, holding a copy of
//! the umlctl binary, the dynamic loader and libraries it needs, and the
//! mount points the init uses. The kernel boots from that disk, the init
//! mounts the image and switches to it. The disk (and the directory it is
//! built from) lives in the cache, keyed by the identity of the running
//! binary, and is built atomically; every guest shares it read-only.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::{Object, ObjectSection};

use crate::error::{Error, Result};
use crate::paths;

/// Name of the init binary inside the init root.
pub const INIT_NAME: &str = "umlctl";

/// Mount points the init needs in its root.
const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys", "newroot", "tmp"];

/// A prepared init disk.
#[derive(Debug, Clone)]
pub struct InitRoot {
    /// The read-only ext4 disk.
    pub disk: PathBuf,
    /// The init, as a path inside the disk.
    pub init: PathBuf,
}

/// The running umlctl binary, resolved.
pub fn current_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::sys("find the umlctl binary (/proc/self/exe)", e))?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        return Err(Error::Host {
            check: "umlctl binary",
            detail: format!(
                "the running umlctl binary {} was deleted or replaced",
                exe.display()
            ),
            fix: "run the command again with the new binary".into(),
        });
    }
    Ok(exe)
}

/// Prepare (or reuse) the init disk for the binary `exe`.
pub fn prepare(exe: &Path) -> Result<InitRoot> {
    let md = fs::metadata(exe).map_err(|e| Error::io("stat", exe, e))?;
    let key = paths::identity_hex(exe, &md, b"initdisk-v1");
    let base = paths::cache_dir()?.join("initroot");
    paths::ensure_dir(&base)?;
    let root = InitRoot {
        init: PathBuf::from("/").join(INIT_NAME),
        disk: base.join(format!("{key}.ext4")),
    };
    if root.disk.is_file() {
        return Ok(root);
    }
    // Unique per process and per call: a lab starts several guests from
    // threads of one process, and the first may find no disk yet.
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tmp = base.join(format!(
        ".tmp-{key}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&tmp);
    let built = build_tree(exe, &tmp).and_then(|()| build_disk(&tmp, &root.disk));
    let _ = fs::remove_dir_all(&tmp);
    // Another build of the same disk (a lab's devices start side by side)
    // may have put it in place first: the same bytes, so that is success.
    if built.is_err() && root.disk.is_file() {
        return Ok(root);
    }
    built?;
    // Which binary the disk belongs to, so that older disks of the same
    // binary path can go.
    let _ = fs::write(
        base.join(format!("{key}.source")),
        exe.as_os_str().as_encoded_bytes(),
    );
    prune(&base, &key, exe);
    Ok(root)
}

/// Write the init disk from `dir` (atomically: the image writer links the
/// file into place only when it is complete, so a concurrent build simply
/// replaces it with the same bytes). Read-only for everyone: UML opens it
/// read-only and every guest shares it.
fn build_disk(dir: &Path, disk: &Path) -> Result<()> {
    use umlctl_imgtools::build::{build, BuildOptions};
    use umlctl_imgtools::progress::NoProgress;
    let opts = BuildOptions {
        epoch: Some(0),
        dir_owner: Some((0, 0)),
        ..BuildOptions::default()
    };
    build(&[dir.to_path_buf()], disk, &opts, &NoProgress, &NoProgress).map_err(|e| {
        Error::Host {
            check: "init disk",
            detail: format!("cannot build {}: {e}", disk.display()),
            fix: format!(
                "check the space and permissions of {}",
                disk.parent().unwrap_or(disk).display()
            ),
        }
    })?;
    fs::set_permissions(disk, fs::Permissions::from_mode(0o444))
        .map_err(|e| Error::io("chmod", disk, e))
}

fn build_tree(exe: &Path, tmp: &Path) -> Result<()> {
    paths::ensure_dir(tmp)?;
    for d in MOUNT_POINTS {
        paths::ensure_dir(&tmp.join(d))?;
    }
    copy_into(exe, &tmp.join(INIT_NAME))?;
    for lib in dynamic_deps(exe)? {
        let rel = lib.strip_prefix("/").unwrap_or(&lib);
        let dest = tmp.join(rel);
        if let Some(parent) = dest.parent() {
            paths::ensure_dir(parent)?;
        }
        copy_into(&lib, &dest)?;
    }
    Ok(())
}

fn copy_into(src: &Path, dest: &Path) -> Result<()> {
    fs::copy(src, dest).map_err(|e| Error::io("copy into the init root", src, e))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o555))
        .map_err(|e| Error::io("chmod", dest, e))
}

/// The dynamic loader and shared libraries `exe` needs, as the loader
/// itself resolves them (`ld.so --list`). Empty for a static binary.
pub fn dynamic_deps(exe: &Path) -> Result<Vec<PathBuf>> {
    let data = fs::read(exe).map_err(|e| Error::io("read", exe, e))?;
    let elf = object::File::parse(&*data).map_err(|e| Error::Host {
        check: "umlctl binary",
        detail: format!("cannot parse {} as ELF: {e}", exe.display()),
        fix: "reinstall umlctl".into(),
    })?;
    let Some(interp) = elf.section_by_name(".interp").and_then(|s| s.data().ok()) else {
        return Ok(Vec::new());
    };
    let interp = PathBuf::from(
        String::from_utf8_lossy(interp.split(|&b| b == 0).next().unwrap_or_default()).into_owned(),
    );
    drop(elf);
    let out = Command::new(&interp)
        .arg("--list")
        .arg(exe)
        .env_remove("LD_PRELOAD")
        .output()
        .map_err(|e| Error::io("run the dynamic loader", &interp, e))?;
    if !out.status.success() {
        return Err(Error::Host {
            check: "umlctl binary",
            detail: format!(
                "`{} --list {}` failed: {}",
                interp.display(),
                exe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            fix: "reinstall umlctl".into(),
        });
    }
    let mut libs = vec![interp.clone()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') && !libs.iter().any(|l| l.as_os_str() == path) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Remove older init disks made from the same binary path (and any
/// init root directory an older umlctl left).
fn prune(base: &Path, keep: &str, exe: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        if e.path().is_dir() {
            let _ = fs::remove_dir_all(e.path());
            continue;
        }
        let Some(key) = name.strip_suffix(".source") else {
            continue;
        };
        if key == keep {
            continue;
        }
        let src = fs::read(e.path()).unwrap_or_default();
        if src == exe.as_os_str().as_encoded_bytes() {
            let _ = fs::remove_file(base.join(format!("{key}.ext4")));
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deps_of_a_dynamic_program_include_libc_and_the_loader() {
        let deps = dynamic_deps(Path::new("/bin/true")).unwrap();
        assert!(
            deps.iter()
                .any(|p| p.to_string_lossy().contains("ld-linux")),
            "{deps:?}"
        );
        assert!(
            deps.iter().any(|p| p.to_string_lossy().contains("libc.so")),
            "{deps:?}"
        );
        assert!(
            deps.iter().all(|p| p.is_absolute() && p.exists()),
            "{deps:?}"
        );
    }

    #[test]
    fn a_static_program_has_no_deps() {
        // Debian's busybox-static, installed by the test setup.
        let bb = Path::new("/bin/busybox");
        assert!(
            bb.exists(),
            "/bin/busybox is missing: apt-get install busybox-static"
        );
        assert!(dynamic_deps(bb).unwrap().is_empty());
    }
}
