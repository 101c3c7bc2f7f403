//! Inspecting a UML kernel binary: is it UML at all, which release, static
//! or dynamic, and does its configuration have what umlctl relies on.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use object::read::ReadCache;
use object::{Object, ObjectSection};

use crate::error::{Error, Result};
use crate::xstate::KernelFp;

/// How the kernel binary is linked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Linkage {
    Static,
    Dynamic { interpreter: String },
}

/// One kernel feature umlctl relies on, and whether this kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Feature {
    /// Short name shown to users (`hostfs`, `ubd`, ...).
    pub name: String,
    /// The config option(s) that provide it.
    pub config: String,
    /// What umlctl uses it for.
    pub used_for: String,
    pub present: bool,
}

/// What umlctl knows about a kernel binary.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct KernelInfo {
    pub path: PathBuf,
    /// Release as printed by `linux --version`, e.g. `6.12.117`.
    pub version: String,
    pub release: (u32, u32, u32),
    pub linkage: Linkage,
    /// How much FP state the kernel can save and restore.
    pub fp: KernelFp,
    pub features: Vec<Feature>,
    /// The shared libraries (and loader) a dynamic kernel needs, which its
    /// jail must hold.
    #[serde(default)]
    pub libs: Vec<PathBuf>,
    /// The binary keeps its symbol table (gdb can break on functions).
    #[serde(default)]
    pub symbols: bool,
    /// It carries DWARF debug information (`kernel build --debug`): gdb
    /// shows source lines, arguments and types.
    #[serde(default)]
    pub debug_info: bool,
}

/// (name, config options (any of, `|`; `help:X`: the kernel's `--help`
/// lists the boot option X), used for)
const FEATURES: &[(&str, &str, &str)] = &[
    (
        "hostfs",
        "CONFIG_HOSTFS",
        "host root filesystem and reaching the guest init",
    ),
    (
        "ubd",
        "CONFIG_BLK_DEV_UBD",
        "disk images, copy-on-write overlays (--image) and run's I/O ring",
    ),
    (
        "serial-lines",
        "CONFIG_SSL",
        "run's control and status lines and its terminal",
    ),
    (
        "vector-net",
        "CONFIG_UML_NET_VECTOR",
        "tap networking (--net)",
    ),
    ("mconsole", "CONFIG_MCONSOLE", "controlling detached guests"),
    (
        "exitcode",
        "CONFIG_PROC_FS",
        "/proc/exitcode (UML's exit status from the guest)",
    ),
    ("devtmpfs", "CONFIG_DEVTMPFS", "/dev in the guest"),
    (
        "tmpfs",
        "CONFIG_TMPFS|CONFIG_SHMEM",
        "writable /tmp, /run in the guest",
    ),
    ("ext4", "CONFIG_EXT4_FS", "ext4 root images"),
    (
        "seccomp-mode",
        "help:seccomp=",
        "guest processes under seccomp instead of ptrace (UML >= 6.16, `seccomp=`)",
    ),
    (
        "smp",
        "CONFIG_SMP",
        "several virtual CPUs (UML >= 6.19, `ncpus=`)",
    ),
    (
        "legacy-net",
        "CONFIG_UML_NET_TUNTAP|CONFIG_UML_NET_DAEMON|CONFIG_UML_NET_SLIRP",
        "UML's old network transports (gone in 6.16; umlctl uses vector)",
    ),
    ("virtio", "CONFIG_VIRTIO_UML", "vhost-user virtio devices"),
    (
        "raid6-benchmark",
        "CONFIG_RAID6_PQ_BENCHMARK",
        "times RAID6 algorithms at boot (about a second; run skips it)",
    ),
];

impl KernelInfo {
    /// Whether the named feature is present.
    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.present)
    }

    /// Refuse the kernel for `run` if it lacks something `run` cannot do without.
    pub fn require(&self, names: &[&str]) -> Result<()> {
        let missing: Vec<&Feature> = self
            .features
            .iter()
            .filter(|f| names.contains(&f.name.as_str()) && !f.present)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = missing
            .iter()
            .map(|f| format!("{} ({}, for {})", f.name, f.config, f.used_for))
            .collect();
        Err(Error::KernelUnusable {
            path: self.path.clone(),
            reason: format!(
                "this kernel lacks {}\nfix: use a kernel built with those options (`umlctl kernel build` enables them)",
                list.join(", ")
            ),
        })
    }
}

/// Inspect `path`, reusing an earlier inspection of the very same file
/// (same path, device, inode, size and modification time) from the cache.
pub fn inspect(path: &Path) -> Result<KernelInfo> {
    let key = identity_key(path);
    let cached = key.as_ref().and_then(|k| {
        let data = std::fs::read(k).ok()?;
        serde_json::from_slice::<KernelInfo>(&data).ok()
    });
    if let Some(info) = cached.filter(|i| i.path == path) {
        return Ok(info);
    }
    let info = inspect_uncached(path)?;
    if let (Some(k), Ok(json)) = (key, serde_json::to_vec(&info)) {
        let _ = crate::paths::write_atomic(&k, &json, 0o644);
    }
    Ok(info)
}

/// Cache file for the inspection of `path` as it is now.
fn identity_key(path: &Path) -> Option<PathBuf> {
    let md = std::fs::metadata(path).ok()?;
    // Bump the salt when KernelInfo or the feature list changes.
    let hex = crate::paths::identity_hex(path, &md, b"kernel-info-v5");
    let dir = crate::paths::cache_dir().ok()?.join("kernel-info");
    crate::paths::ensure_dir(&dir).ok()?;
    Some(dir.join(format!("{hex}.json")))
}

/// Inspect `path`: check that it is an x86-64 UML ELF executable (by its
/// `.uml.setup.init` section, without running it), then ask it for its
/// release (`--version`) and configuration (`--showconfig`).
pub fn inspect_uncached(path: &Path) -> Result<KernelInfo> {
    let unusable = |reason: String| Error::KernelUnusable {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| Error::io("open kernel", path, e))?;
    let mut magic = [0u8; 4];
    (&file)
        .read_exact(&mut magic)
        .map_err(|_| unusable("not an ELF executable (file too short)".into()))?;
    if &magic != b"\x7fELF" {
        return Err(unusable(
            "not an ELF executable; a UML kernel is the `linux` ELF binary from an ARCH=um build, not a bzImage".into(),
        ));
    }
    let cache = ReadCache::new(file);
    let elf =
        object::File::parse(&cache).map_err(|e| unusable(format!("cannot parse ELF: {e}")))?;
    if elf.architecture() != object::Architecture::X86_64 {
        return Err(unusable(format!(
            "built for {:?}; umlctl runs x86-64 UML kernels",
            elf.architecture()
        )));
    }
    if elf.section_by_name(".uml.setup.init").is_none() {
        return Err(unusable(
            "not a User-mode Linux kernel (no .uml.setup.init section); build one with ARCH=um"
                .into(),
        ));
    }
    let linkage = match elf.section_by_name(".interp").and_then(|s| s.data().ok()) {
        Some(data) => Linkage::Dynamic {
            interpreter: String::from_utf8_lossy(
                data.split(|&b| b == 0).next().unwrap_or_default(),
            )
            .into_owned(),
        },
        None => Linkage::Static,
    };
    let symbols = elf.section_by_name(".symtab").is_some();
    let debug_info = elf.section_by_name(".debug_info").is_some();
    drop(elf);
    let libs = match linkage {
        Linkage::Dynamic { .. } => crate::initroot::dynamic_deps(path)?,
        Linkage::Static => Vec::new(),
    };

    let version = run_quietly(path, "--version")?;
    let version = version.trim().to_string();
    let release = parse_release(&version).ok_or_else(|| {
        unusable(format!(
            "`--version` printed {version:?}, not a kernel release"
        ))
    })?;
    let config = parse_config(&run_quietly(path, "--showconfig")?);
    // The boot options the kernel documents (seccomp=, ncpus=, ...).
    let help = run_quietly(path, "--help").unwrap_or_default();
    let features = FEATURES
        .iter()
        .map(|&(name, opts, used_for)| Feature {
            name: name.into(),
            config: opts.into(),
            used_for: used_for.into(),
            present: opts.split('|').any(|o| match o.strip_prefix("help:") {
                Some(option) => help.lines().any(|l| l.trim_start().starts_with(option)),
                None => config.get(o).is_some_and(|v| v == "y"),
            }),
        })
        .collect();
    Ok(KernelInfo {
        path: path.to_path_buf(),
        fp: KernelFp::for_release(release),
        version,
        release,
        linkage,
        features,
        libs,
        symbols,
        debug_info,
    })
}

/// Run the kernel with one informational switch (these exit before any
/// host checks) and return its stdout.
fn run_quietly(path: &Path, arg: &str) -> Result<String> {
    let unusable = |reason: String| Error::KernelUnusable {
        path: path.to_path_buf(),
        reason,
    };
    let mut child = Command::new(path)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_remove("LD_PRELOAD")
        .spawn()
        .map_err(|e| Error::io("execute kernel", path, e))?;
    let mut out = Vec::new();
    let mut stdout = child.stdout.take().ok_or_else(|| {
        Error::io(
            "read the output of",
            path,
            std::io::Error::other("no stdout pipe"),
        )
    })?;
    // The output is small (a release, or a .config of ~100 KiB); read it in
    // a thread so a misbehaving binary cannot make us wait forever.
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(unusable(format!("`{arg}` did not finish within 20 s")));
            }
            Err(e) => return Err(Error::io("wait for kernel", path, e)),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(unusable(format!(
            "`{} {arg}` failed ({status})",
            path.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `6.12.117` or `6.1.0-rc3+` → (6, 12, 117) / (6, 1, 0).
pub fn parse_release(s: &str) -> Option<(u32, u32, u32)> {
    let s = s.split_whitespace().next()?;
    let mut it = s.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// Parse `.config` text into option → value (`y`, `m`, `"str"`, numbers).
/// `# CONFIG_X is not set` lines are recorded as `n`.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") {
                    map.insert(name.to_string(), "n".to_string());
                }
            }
        } else if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") {
                map.insert(k.to_string(), v.to_string());
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.12.117"), Some((6, 12, 117)));
        assert_eq!(parse_release("6.1.176\n"), Some((6, 1, 176)));
        assert_eq!(parse_release("6.13-rc3+"), Some((6, 13, 0)));
        assert_eq!(parse_release("6.14.0-um-dirty"), Some((6, 14, 0)));
        assert_eq!(parse_release("hello"), None);
        assert_eq!(parse_release(""), None);
    }

    #[test]
    fn config_lines() {
        let c = parse_config("#\n# comment\nCONFIG_HOSTFS=y\n# CONFIG_FOO is not set\nCONFIG_CON_CHAN=\"pts\"\nCONFIG_NR=4\n");
        assert_eq!(c.get("CONFIG_HOSTFS").map(String::as_str), Some("y"));
        assert_eq!(c.get("CONFIG_FOO").map(String::as_str), Some("n"));
        assert_eq!(
            c.get("CONFIG_CON_CHAN").map(String::as_str),
            Some("\"pts\"")
        );
        assert_eq!(c.get("CONFIG_NR").map(String::as_str), Some("4"));
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn refuses_non_elf_and_non_uml() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("linux");
        std::fs::write(&script, "#!/bin/sh\necho 6.1.0\n").unwrap();
        let e = inspect_uncached(&script).unwrap_err().to_string();
        assert!(e.contains("not an ELF executable"), "{e}");
        // An ordinary ELF program is not UML.
        let e = inspect_uncached(Path::new("/bin/true"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a User-mode Linux kernel"), "{e}");
    }
}
