//! umlctl's kernel cache: `<cache>/kernels/NAME/` holds `linux`, its
//! `config` and `meta.json`; `<cache>/kernels/default` names the kernel that
//! `run` and `start` use when no `--kernel` is given.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::paths;

/// What umlctl records about a kernel it built.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub name: String,
    /// `make kernelrelease`, e.g. `6.12.117`.
    pub version: String,
    /// The source directory or tarball it was built from.
    pub source: PathBuf,
    /// Fingerprint of the source as it was (see `build::fingerprint`).
    pub source_fingerprint: String,
    /// Digest of every configuration input (defconfig, umlctl's options,
    /// fragments, `--set`s); same source and same key = same kernel.
    pub config_key: String,
    /// The options that were asked for and checked, `CONFIG_X=v` or `CONFIG_X=n`.
    pub requested: Vec<String>,
    /// The out-of-tree build directory (kept for incremental rebuilds).
    pub build_dir: PathBuf,
    /// The build log.
    pub log: PathBuf,
    /// Seconds since the epoch when the build finished.
    pub built_at: u64,
    /// Wall time of configure + make, seconds.
    pub build_secs: f64,
    /// umlctl's version that built it.
    pub umlctl_version: String,
    /// Built with `--debug`: debug information, and the kernel's gdb
    /// scripts in `vmlinux-gdb.py` and `scripts/gdb/` beside `linux`.
    #[serde(default)]
    pub debug: bool,
}

/// One kernel in the cache.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    pub path: PathBuf,
    pub is_default: bool,
    /// `None` for a kernel placed there by hand (no `meta.json`).
    pub meta: Option<Meta>,
    /// Size of the `linux` binary in bytes.
    pub size: u64,
}

/// `<cache>/kernels`, created if needed.
pub fn dir() -> Result<PathBuf> {
    let d = paths::cache_dir()?.join("kernels");
    paths::ensure_dir(&d)?;
    Ok(d)
}

/// Check a kernel name: letters, digits and `._+-`, not starting with `.`,
/// at most 64 bytes, and not `default`.
pub fn check_name(name: &str) -> Result<()> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
    if name.is_empty() || name.len() > 64 || !ok_chars || name.starts_with('.') || name == "default"
    {
        return Err(Error::Usage(format!(
            "invalid kernel name {name:?}: use 1 to 64 letters, digits, '.', '_', '+' or '-', not starting with '.', and not \"default\""
        )));
    }
    Ok(())
}

/// The directory of kernel `name` (which need not exist).
pub fn kernel_dir(name: &str) -> Result<PathBuf> {
    check_name(name)?;
    Ok(dir()?.join(name))
}

/// Read a kernel's `meta.json`, if it has one.
pub fn meta(name: &str) -> Result<Option<Meta>> {
    let p = kernel_dir(name)?.join("meta.json");
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::io(
                "parse",
                &p,
                io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", p, e)),
    }
}

/// The default kernel's name, if one is set.
pub fn default_name() -> Option<String> {
    let text = fs::read_to_string(dir().ok()?.join("default")).ok()?;
    let name = text.trim().to_string();
    check_name(&name).ok()?;
    Some(name)
}

/// Make `name` the default kernel. It must be in the cache.
pub fn set_default(name: &str) -> Result<()> {
    let kdir = kernel_dir(name)?;
    if !kdir.join("linux").is_file() {
        return Err(Error::Usage(format!(
            "no kernel named {name:?} in the cache ({}); `umlctl kernel list` shows what is there",
            dir()?.display()
        )));
    }
    paths::write_atomic(
        &dir()?.join("default"),
        format!("{name}\n").as_bytes(),
        0o644,
    )
}

/// Every kernel in the cache, sorted by name.
pub fn list() -> Result<Vec<Entry>> {
    let d = dir()?;
    let default = default_name();
    let mut out = Vec::new();
    let rd = fs::read_dir(&d).map_err(|e| Error::io("read directory", &d, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("read directory", &d, e))?;
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if check_name(&name).is_err() {
            continue;
        }
        let path = ent.path().join("linux");
        let Ok(md) = fs::metadata(&path) else {
            continue;
        };
        out.push(Entry {
            is_default: default.as_deref() == Some(name.as_str()),
            meta: meta(&name).ok().flatten(),
            size: md.len(),
            path,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What `remove` did.
#[derive(Debug, Serialize)]
pub struct Removed {
    pub name: String,
    pub was_default: bool,
    /// The build directory, when no other kernel used it.
    pub build_dir: Option<PathBuf>,
}

/// Remove kernel `name` (and its build directory, unless another kernel in
/// the cache was built in the same one). If it was the default, no kernel
/// is the default afterwards.
pub fn remove(name: &str) -> Result<Removed> {
    let kdir = kernel_dir(name)?;
    if !kdir.is_dir() {
        return Err(Error::Usage(format!(
            "no kernel named {name:?} in the cache ({}); `umlctl kernel list` shows what is there",
            dir()?.display()
        )));
    }
    let own = meta(name).ok().flatten();
    let was_default = default_name().as_deref() == Some(name);
    if was_default {
        let p = dir()?.join("default");
        fs::remove_file(&p).map_err(|e| Error::io("remove", p, e))?;
    }
    fs::remove_dir_all(&kdir).map_err(|e| Error::io("remove", &kdir, e))?;
    let mut build_dir = None;
    if let Some(m) = own {
        let shared = list()?
            .iter()
            .any(|e| e.meta.as_ref().is_some_and(|o| o.build_dir == m.build_dir));
        if !shared && m.build_dir.is_dir() && m.build_dir.starts_with(paths::cache_dir()?) {
            fs::remove_dir_all(&m.build_dir).map_err(|e| Error::io("remove", &m.build_dir, e))?;
            build_dir = Some(m.build_dir);
        }
    }
    Ok(Removed {
        name: name.to_string(),
        was_default,
        build_dir,
    })
}

/// Install a built kernel as `name`: `linux`, `config` and `meta.json` are
/// written to a temporary directory beside the cache entry and then renamed
/// into place, so a reader sees the old kernel or the new one, never half.
/// Install a built kernel as `name`: `linux`, `config`, `meta.json`, and
/// `extras` (file, path under the kernel's directory; symlinks followed),
/// all in a new directory that replaces the old one in one rename.
pub fn install(
    name: &str,
    linux: &Path,
    config: &Path,
    meta: &Meta,
    extras: &[(PathBuf, PathBuf)],
) -> Result<PathBuf> {
    let kdir = kernel_dir(name)?;
    let parent = dir()?;
    let tmp = parent.join(format!(".{name}.new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let res = (|| -> Result<()> {
        paths::ensure_dir(&tmp)?;
        copy(linux, &tmp.join("linux"))?;
        copy(config, &tmp.join("config"))?;
        for (src, rel) in extras {
            let dst = tmp.join(rel);
            if let Some(d) = dst.parent() {
                fs::create_dir_all(d).map_err(|e| Error::io("create", d, e))?;
            }
            copy(src, &dst)?;
        }
        let json = serde_json::to_vec_pretty(meta).unwrap_or_default();
        paths::write_atomic(&tmp.join("meta.json"), &json, 0o644)?;
        if kdir.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            fs::rename(&kdir, &old).map_err(|e| Error::io("rename", &kdir, e))?;
            fs::rename(&tmp, &kdir).map_err(|e| Error::io("rename", &tmp, e))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&tmp, &kdir).map_err(|e| Error::io("rename", &tmp, e))?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(kdir.join("linux"))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| Error::io("copy", from, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["6.12.117", "kunit-6.12", "my_kernel+rt", "a"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        let long = "x".repeat(65);
        for bad in [
            "",
            ".hidden",
            "default",
            "a/b",
            "a b",
            "é",
            long.as_str(),
            "..",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
