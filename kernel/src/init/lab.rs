//! The guest side of a lab device (`umlctl lab start`), done by umlctl's
//! init before the image's init starts: the device's `DEVICE/` tree copied
//! over its root from the layer disk (and the lab's scripts for this device
//! into `/run/umlctl-lab`), the lab's `shared/` mounted at `/shared`
//! through hostfs (confined to that one directory by the jail), and the
//! interfaces named as the lab says (`eth0`, `eth1`, …) and up.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::mount::{umount2, MntFlags, MsFlags};

/// The layer disk's device (`/dev/ubdb`).
pub(crate) const LAYER_ENV: &str = "UMLCTL_LAYER";
/// Where hostfs is mounted (`/shared`); hostfs's root is the lab's
/// `shared/` directory.
pub(crate) const SHARED_ENV: &str = "UMLCTL_SHARED";
/// The names the interfaces get, in order (`eth0,eth1`): `vecN` becomes
/// the Nth.
pub(crate) const IFNAMES_ENV: &str = "UMLCTL_IFNAMES";
/// The layer's top-level directory that holds the lab's scripts for this
/// device; it goes to [`SCRIPTS`], not into the root.
pub const LAYER_SCRIPTS: &str = ".umlctl-lab";
/// Where the device's scripts are (on the guest's /run tmpfs).
pub const SCRIPTS: &str = "/run/umlctl-lab";

const LAYER_MOUNT: &str = "/run/umlctl-layer";

/// Everything a lab device needs before its init, from the environment
/// umlctl put on the kernel command line. Runs with the image as `/`, /dev
/// and a tmpfs /run mounted.
pub(super) fn prepare(lookup: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    if let Some(dev) = lookup(LAYER_ENV).filter(|d| !d.is_empty()) {
        apply_layer(&dev)?;
    }
    if let Some(at) = lookup(SHARED_ENV).filter(|d| !d.is_empty()) {
        super::mount_fs(
            "none",
            &at,
            "hostfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None,
        )
        .map_err(|e| format!("{e} (the lab's shared/ directory)"))?;
    }
    if let Some(names) = lookup(IFNAMES_ENV).filter(|d| !d.is_empty()) {
        for (i, name) in names.split(',').enumerate() {
            crate::guestnet::rename(&format!("vec{i}"), name)?;
            crate::guestnet::up(name)?;
        }
    }
    Ok(())
}

fn apply_layer(dev: &str) -> Result<(), String> {
    super::mount_fs(
        dev,
        LAYER_MOUNT,
        "ext4",
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    let r = (|| {
        let top = Path::new(LAYER_MOUNT);
        for e in fs::read_dir(top).map_err(|e| format!("read the layer disk: {e}"))? {
            let e = e.map_err(|e| format!("read the layer disk: {e}"))?;
            let name = e.file_name();
            if name == "lost+found" {
                continue;
            }
            let dst = if name == LAYER_SCRIPTS {
                Path::new(SCRIPTS).to_path_buf()
            } else {
                Path::new("/").join(&name)
            };
            copy_over(&e.path(), &dst, 0)?;
        }
        Ok(())
    })();
    let _ = umount2(LAYER_MOUNT, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(LAYER_MOUNT);
    r
}

/// Copy `src` over `dst` as `cp -a` onto an existing tree would: a
/// directory that exists (also through a symlink, as merged-/usr's `/lib`)
/// is entered and keeps what it has; files and symlinks replace what is
/// there; owners, modes and times come from the layer.
fn copy_over(src: &Path, dst: &Path, depth: u32) -> Result<(), String> {
    if depth > 64 {
        return Err(format!("{}: the device tree is too deep", src.display()));
    }
    let err = |op: &str, p: &Path, e: std::io::Error| format!("{op} {}: {e}", p.display());
    let md = fs::symlink_metadata(src).map_err(|e| err("stat", src, e))?;
    let ft = md.file_type();
    if ft.is_dir() {
        match fs::metadata(dst) {
            Ok(d) if d.is_dir() => {}
            Ok(_) => {
                fs::remove_file(dst).map_err(|e| err("replace", dst, e))?;
                fs::DirBuilder::new()
                    .mode(md.mode() & 0o7777)
                    .create(dst)
                    .map_err(|e| err("create", dst, e))?;
            }
            Err(_) => {
                let _ = fs::remove_file(dst);
                fs::DirBuilder::new()
                    .mode(md.mode() & 0o7777)
                    .create(dst)
                    .map_err(|e| err("create", dst, e))?;
                own(dst, &md)?;
            }
        }
        for e in fs::read_dir(src).map_err(|e| err("read", src, e))? {
            let e = e.map_err(|e| err("read", src, e))?;
            copy_over(&e.path(), &dst.join(e.file_name()), depth + 1)?;
        }
        return Ok(());
    }
    if fs::symlink_metadata(dst).is_ok_and(|m| m.is_dir()) {
        return Err(format!(
            "{}: the device tree has a file where the image has a directory",
            dst.display()
        ));
    }
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(|e| err("read link", src, e))?;
        let _ = fs::remove_file(dst);
        std::os::unix::fs::symlink(&target, dst).map_err(|e| err("create link", dst, e))?;
        own(dst, &md)
    } else if ft.is_file() {
        let _ = fs::remove_file(dst);
        fs::copy(src, dst).map_err(|e| err("copy to", dst, e))?;
        own(dst, &md)?;
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(|e| err("chmod", dst, e))
    } else {
        // Device nodes, FIFOs and sockets are not copied.
        Ok(())
    }
}

fn own(dst: &Path, md: &fs::Metadata) -> Result<(), String> {
    std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))
        .map_err(|e| format!("chown {}: {e}", dst.display()))
}
