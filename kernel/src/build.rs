//! Building UML kernels from source: `ARCH=um defconfig`, umlctl's options
//! (`config/umlctl.config`), the user's fragments and `--set`s, a check that
//! every requested option landed in the final `.config`, `make linux` out of
//! tree (the source stays clean) with its log kept, and installation into
//! the kernel cache ([`crate::cache`]).
//!
//! A build is reused when the source and every configuration input are
//! unchanged: the source is fingerprinted (every file's path, size and
//! mtime; a tarball by its identity) and the inputs are digested into a key.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::cache::{self, Meta};
use crate::error::{Error, Result};
use crate::inspect::{self, parse_config};
use crate::paths;

/// The options umlctl relies on, applied on top of defconfig. The same file
/// is read by the Nix kernel package.
pub const UMLCTL_CONFIG: &str = include_str!("../config/umlctl.config");

/// What `--debug` adds: debug information, frame pointers and the kernel's
/// gdb scripts.
pub const DEBUG_CONFIG: &str = include_str!("../config/debug.config");

/// The origin named for `--debug`'s options.
const DEBUG_ORIGIN: &str = "--debug";

/// Compile steps of a 6.12 defconfig + umlctl build, used to size the
/// progress bar before a build directory has recorded its own count.
const DEFAULT_STEPS: u64 = 1480;

/// What a configuration starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Base {
    /// `make ARCH=um defconfig` plus umlctl's options: a kernel for `run`
    /// and `start`.
    #[default]
    Umlctl,
    /// Only the fragments, completed by `olddefconfig` (as kunit.py
    /// configures): a small kernel for in-kernel tests. Never made the
    /// default kernel.
    Bare,
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec {
    /// What the configuration starts from.
    pub base: Base,
    /// A Linux source directory or a tarball of one.
    pub source: PathBuf,
    /// The cache name; default: the kernel release (plus a digest of the
    /// options when fragments or `--set`s were given).
    pub name: Option<String>,
    /// Config fragments (`CONFIG_X=v` / `# CONFIG_X is not set` lines), in order.
    pub fragments: Vec<PathBuf>,
    /// Single options, `CONFIG_X=v` (or `X=v`); `=n` means "not set".
    pub sets: Vec<String>,
    /// Extra fragment text with a label, applied after `fragments` (used by
    /// `kernel test` for its kunitconfig).
    pub extra: Vec<(String, String)>,
    /// `make -jN`; default: the number of CPUs.
    pub jobs: Option<usize>,
    /// Rebuild even if the cached kernel is up to date.
    pub force: bool,
    /// Debug information, frame pointers and the gdb scripts
    /// ([`DEBUG_CONFIG`]), for `run --gdb` and `debug`.
    pub debug: bool,
}

/// Receives a build's progress; the CLI draws it.
pub trait Observer {
    /// A new phase starts ("configuring", "building", …).
    fn phase(&self, what: &str);
    /// `done` compile steps so far, of about `estimate`.
    fn step(&self, done: u64, estimate: u64);
}

/// Reports nothing.
pub struct Quiet;
impl Observer for Quiet {
    fn phase(&self, _: &str) {}
    fn step(&self, _: u64, _: u64) {}
}

/// The result of [`build`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    pub name: String,
    /// The installed `linux` binary.
    pub path: PathBuf,
    pub meta: Meta,
    /// Nothing had changed: the cached kernel was kept as it was.
    pub up_to_date: bool,
    /// It became the default kernel (there was none).
    pub made_default: bool,
}

/// One requested option and where the request came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// `CONFIG_X`.
    pub option: String,
    /// The value; `n` for "is not set".
    pub value: String,
    /// `umlctl`, `FILE:LINE` or `--set`.
    pub origin: String,
}

impl Want {
    fn line(&self) -> String {
        if self.value == "n" {
            format!("# {} is not set", self.option)
        } else {
            format!("{}={}", self.option, self.value)
        }
    }
}

fn valid_option(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

fn valid_value(v: &str) -> bool {
    !v.is_empty() && !v.contains('\n')
}

/// Parse fragment text: `CONFIG_X=v` and `# CONFIG_X is not set` lines;
/// blank lines and other comments are ignored; anything else is an error
/// naming `label:line`.
pub fn parse_fragment(text: &str, label: &str) -> Result<Vec<Want>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let origin = format!("{label}:{}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            if let Some(name) = rest.trim().strip_suffix(" is not set") {
                if valid_option(name) {
                    out.push(Want {
                        option: name.to_string(),
                        value: "n".into(),
                        origin,
                    });
                }
            }
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if valid_option(k) && valid_value(v) => out.push(Want {
                option: k.to_string(),
                value: v.to_string(),
                origin,
            }),
            _ => {
                return Err(Error::Usage(format!(
                    "{origin}: {raw:?} is not a config line; write CONFIG_NAME=value or `# CONFIG_NAME is not set`"
                )))
            }
        }
    }
    Ok(out)
}

/// Parse one `--set`: `CONFIG_X=v` or `X=v`.
pub fn parse_set(s: &str) -> Result<Want> {
    let bad = || {
        Error::Usage(format!(
            "--set {s:?}: expected CONFIG_NAME=value (for example CONFIG_KASAN=y, or CONFIG_NAME=n to turn one off)"
        ))
    };
    let (k, v) = s.split_once('=').ok_or_else(bad)?;
    let k = if k.starts_with("CONFIG_") {
        k.to_string()
    } else {
        format!("CONFIG_{k}")
    };
    if !valid_option(&k) || !valid_value(v) {
        return Err(bad());
    }
    Ok(Want {
        option: k,
        value: v.to_string(),
        origin: "--set".into(),
    })
}

/// Every requested option of `spec`, later requests replacing earlier ones
/// for the same option (as in Kconfig).
pub fn wants(spec: &BuildSpec) -> Result<Vec<Want>> {
    let mut all = match spec.base {
        Base::Umlctl => parse_fragment(UMLCTL_CONFIG, "umlctl.config")?,
        Base::Bare => Vec::new(),
    };
    if spec.debug {
        all.extend(parse_fragment(DEBUG_CONFIG, DEBUG_ORIGIN)?);
    }
    for f in &spec.fragments {
        let text = fs::read_to_string(f).map_err(|e| Error::io("read config fragment", f, e))?;
        all.extend(parse_fragment(&text, &f.display().to_string())?);
    }
    for (label, text) in &spec.extra {
        all.extend(parse_fragment(text, label)?);
    }
    for s in &spec.sets {
        all.push(parse_set(s)?);
    }
    let mut seen = BTreeMap::new();
    let mut out: Vec<Want> = Vec::new();
    for w in all {
        if let Some(&i) = seen.get(&w.option) {
            out[i] = w;
        } else {
            seen.insert(w.option.clone(), out.len());
            out.push(w);
        }
    }
    Ok(out)
}

/// The requested options that the final `.config` does not have, each as
/// "what was asked (origin): what it is".
pub fn not_applied(wants: &[Want], config: &str) -> Vec<String> {
    let have = parse_config(config);
    wants
        .iter()
        .filter_map(|w| {
            let actual = have.get(&w.option).map(String::as_str);
            let ok = match (w.value.as_str(), actual) {
                ("n", None | Some("n")) => true,
                (v, Some(a)) => v == a,
                _ => false,
            };
            (!ok).then(|| {
                let is = match actual {
                    None => "absent (its dependencies are not met, or no such option)".to_string(),
                    Some("n") => "not set".to_string(),
                    Some(a) => format!("{}={a}", w.option),
                };
                format!("  {} (from {}): is {is}", w.line(), w.origin)
            })
        })
        .collect()
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of the configuration inputs.
pub fn config_key(base: Base, wants: &[Want]) -> String {
    let mut h = Sha256::new();
    h.update(match base {
        Base::Umlctl => &b"ARCH=um defconfig\n"[..],
        Base::Bare => &b"ARCH=um olddefconfig\n"[..],
    });
    for w in wants {
        h.update(w.line().as_bytes());
        h.update(b"\n");
    }
    hex(h.finalize())
}

/// A source tree's fingerprint: every file's relative path, size and
/// modification time (`.git` skipped), in a fixed order. It changes when any
/// file is edited, added, removed or checked out again.
pub fn fingerprint_dir(root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| Error::io("read directory", &dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            if n == ".git" {
                continue;
            }
            let p = dir.join(&n);
            let md = fs::symlink_metadata(&p).map_err(|e| Error::io("stat", &p, e))?;
            let rel = p.strip_prefix(root).unwrap_or(&p);
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update([0]);
            for v in [
                i64::from(md.mode()),
                i64::try_from(md.size()).unwrap_or(i64::MAX),
                md.mtime(),
                md.mtime_nsec(),
            ] {
                h.update(v.to_le_bytes());
            }
            if md.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(hex(h.finalize()))
}

/// A source, ready to build from.
struct Source {
    /// The tree (for a tarball: where it was extracted in the cache).
    tree: PathBuf,
    /// What the user named (directory or tarball), canonical.
    given: PathBuf,
    fingerprint: String,
}

fn run_logged(
    mut cmd: Command,
    log: &mut fs::File,
    log_path: &Path,
    step: &'static str,
) -> Result<()> {
    writeln!(log, "$ {cmd:?}").map_err(|e| Error::io("write", log_path, e))?;
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::sys(step, e))?;
    log.write_all(&out.stdout)
        .and_then(|_| log.write_all(&out.stderr))
        .map_err(|e| Error::io("write", log_path, e))?;
    if !out.status.success() {
        return Err(Error::BuildFailed {
            step,
            status: out.status.to_string(),
            tail: tail_of(&[&out.stdout[..], &out.stderr[..]].concat(), 25),
            log: log_path.to_path_buf(),
        });
    }
    Ok(())
}

fn tail_of(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_tree(tree: &Path, given: &Path) -> Result<()> {
    if !tree.join("Makefile").is_file() || !tree.join("arch/um/Makefile").is_file() {
        return Err(Error::Usage(format!(
            "{} is not a Linux source tree (no Makefile and arch/um/Makefile); pass the top directory of a kernel source tree or a tarball of one",
            given.display()
        )));
    }
    for leftover in [".config", "include/config/auto.conf"] {
        if tree.join(leftover).exists() {
            return Err(Error::Usage(format!(
                "{} has been configured in place ({} exists); umlctl builds out of tree, which needs a clean source: run `make -C {} mrproper` (it deletes that configuration)",
                tree.display(),
                leftover,
                tree.display()
            )));
        }
    }
    Ok(())
}

/// Resolve a source directory, or extract a tarball into the cache (once
/// per tarball identity; a half-extracted tree is never used).
fn resolve_source(given: &Path, obs: &dyn Observer) -> Result<Source> {
    let md = fs::metadata(given).map_err(|e| Error::io("open kernel source", given, e))?;
    let canon = fs::canonicalize(given).map_err(|e| Error::io("resolve", given, e))?;
    if md.is_dir() {
        check_tree(&canon, given)?;
        let fingerprint = fingerprint_dir(&canon)?;
        return Ok(Source {
            tree: canon.clone(),
            given: canon,
            fingerprint,
        });
    }
    let id = paths::identity_hex(&canon, &md, b"kernel-source-tarball");
    let root = paths::cache_dir()?.join("kernel-src");
    paths::ensure_dir(&root)?;
    let dest = root.join(&id);
    // One extraction at a time per tarball; a waiter finds it complete.
    let _lock = lock(&root.join(format!(".{id}.lock")))?;
    if !dest.join(".umlctl-complete").exists() {
        obs.phase("extracting the source tarball");
        let tmp = root.join(format!(".{id}.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        paths::ensure_dir(&tmp)?;
        let out = Command::new("tar")
            .arg("-xf")
            .arg(&canon)
            .arg("-C")
            .arg(&tmp)
            .stdin(Stdio::null())
            .output();
        let ok = matches!(&out, Ok(o) if o.status.success());
        if !ok {
            let _ = fs::remove_dir_all(&tmp);
            let why = match out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => format!("cannot run tar: {e}"),
            };
            return Err(Error::Usage(format!(
                "{} is neither a directory nor a tarball tar can extract: {why}",
                given.display()
            )));
        }
        fs::write(tmp.join(".umlctl-complete"), b"").map_err(|e| Error::io("write", &tmp, e))?;
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&tmp, &dest).map_err(|e| Error::io("rename", &tmp, e))?;
    }
    // The tree is the archive's single top directory (or the archive root).
    let mut tops: Vec<PathBuf> = fs::read_dir(&dest)
        .map_err(|e| Error::io("read directory", &dest, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != ".umlctl-complete")
        .map(|e| e.path())
        .collect();
    let tree = if tops.len() == 1 && tops[0].is_dir() {
        tops.remove(0)
    } else {
        dest.clone()
    };
    check_tree(&tree, given)?;
    Ok(Source {
        tree,
        given: canon,
        fingerprint: id,
    })
}

/// Hold an exclusive lock on `path` (created if missing) until dropped.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io("lock", path, crate::error::errno(e)))
}

/// The source tree `given` names: the directory itself, or where its
/// tarball is extracted in the cache (extracting it now if needed).
pub fn source_tree(given: &Path, obs: &dyn Observer) -> Result<PathBuf> {
    resolve_source(given, obs).map(|s| s.tree)
}

fn make(src: &Path, build: &Path) -> Command {
    let mut c = Command::new("make");
    c.arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=um")
        .env("LC_ALL", "C")
        .env("KBUILD_BUILD_USER", "umlctl")
        .env("KBUILD_BUILD_HOST", "umlctl");
    c
}

/// A Kbuild quiet-mode step line: two spaces, an upper-case tag, spaces, a target.
fn is_step(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("  ") else {
        return false;
    };
    let tag: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    !tag.is_empty()
        && tag
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && rest.len() > tag.len()
}

/// Run `make linux`, teeing its output to the log and counting steps.
fn compile(
    src: &Path,
    build: &Path,
    targets: &[&str],
    jobs: usize,
    log: &mut fs::File,
    log_path: &Path,
    obs: &dyn Observer,
) -> Result<()> {
    let steps_file = build.join(".umlctl-steps");
    let estimate = fs::read_to_string(&steps_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_STEPS);
    let (reader, writer) =
        nix::unistd::pipe().map_err(|e| Error::sys("pipe", crate::error::errno(e)))?;
    let reader = fs::File::from(reader);
    let writer = fs::File::from(writer);
    let mut cmd = make(src, build);
    cmd.arg(format!("-j{jobs}")).args(targets);
    writeln!(log, "$ {cmd:?}").map_err(|e| Error::io("write", log_path, e))?;
    let err_w = writer.try_clone().map_err(|e| Error::sys("dup", e))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(err_w)
        .spawn()
        .map_err(|e| Error::sys("run make (is it installed?)", e))?;
    // Our copies of the write end are gone with `cmd`: EOF comes when make exits.
    drop(cmd);
    let mut done = 0u64;
    let mut last: Vec<String> = Vec::new();
    for line in BufReader::new(reader).split(b'\n') {
        let line = line.map_err(|e| Error::sys("read make output", e))?;
        log.write_all(&line)
            .and_then(|_| log.write_all(b"\n"))
            .map_err(|e| Error::io("write", log_path, e))?;
        let text = String::from_utf8_lossy(&line).into_owned();
        if is_step(&text) {
            done += 1;
            obs.step(done, estimate.max(done + 1));
        }
        last.push(text);
        if last.len() > 25 {
            last.remove(0);
        }
    }
    let status = child.wait().map_err(|e| Error::sys("wait for make", e))?;
    if !status.success() {
        return Err(Error::BuildFailed {
            step: "make linux",
            status: status.to_string(),
            tail: last
                .iter()
                .map(|l| format!("  | {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
            log: log_path.to_path_buf(),
        });
    }
    // A from-scratch build's count sizes the next bar on this directory.
    if done > estimate / 2 {
        let _ = fs::write(&steps_file, done.to_string());
    }
    Ok(())
}

/// Every symbol the source's Kconfig files define (`config X`,
/// `menuconfig X`); empty if none could be read.
fn kconfig_symbols(tree: &Path) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let name = e.file_name();
            if ft.is_dir() {
                if name != ".git" {
                    stack.push(e.path());
                }
            } else if ft.is_file() && name.to_string_lossy().starts_with("Kconfig") {
                let Ok(text) = fs::read_to_string(e.path()) else {
                    continue;
                };
                for line in text.lines() {
                    let mut w = line.split_whitespace();
                    if let (Some("config" | "menuconfig"), Some(sym)) = (w.next(), w.next()) {
                        out.insert(sym.to_string());
                    }
                }
            }
        }
    }
    out
}

/// The CPUs an SMP build of umlctl's supports (`run --cpus` allows up to
/// [`crate::cmdline::MAX_CPUS`]; 8 covers the hosts UML runs on without
/// making every per-CPU structure 64 wide).
pub const SMP_CPUS: u32 = 8;

/// UML gained SMP in 6.19 (`config SMP` in arch/um/Kconfig): umlctl's
/// options turn it on where the source has it, unless the user's fragments
/// or `--set`s say otherwise, so that `--cpus` works on what `kernel build`
/// makes.
fn with_smp(mut wants: Vec<Want>, tree: &Path) -> Vec<Want> {
    let kconfig = fs::read_to_string(tree.join("arch/um/Kconfig")).unwrap_or_default();
    let has_smp = kconfig.lines().any(|l| l.trim() == "config SMP");
    if !has_smp {
        return wants;
    }
    let origin = "umlctl.config (this kernel's UML has SMP)".to_string();
    if !wants.iter().any(|w| w.option == "CONFIG_SMP") {
        wants.push(Want {
            option: "CONFIG_SMP".into(),
            value: "y".into(),
            origin: origin.clone(),
        });
        if !wants.iter().any(|w| w.option == "CONFIG_NR_CPUS") {
            wants.push(Want {
                option: "CONFIG_NR_CPUS".into(),
                value: SMP_CPUS.to_string(),
                origin,
            });
        }
    }
    wants
}

/// Build (or reuse) a kernel and install it into the cache.
pub fn build(spec: &BuildSpec, obs: &dyn Observer) -> Result<Built> {
    if let Some(n) = &spec.name {
        cache::check_name(n)?;
    }
    if spec.jobs == Some(0) {
        return Err(Error::Usage("--jobs must be at least 1".into()));
    }
    let wants = wants(spec)?;
    obs.phase("checking the source");
    let source = resolve_source(&spec.source, obs)?;
    let wants = if spec.base == Base::Umlctl {
        with_smp(wants, &source.tree)
    } else {
        wants
    };
    let key = config_key(spec.base, &wants);

    // One build directory per (source, configuration).
    let mut h = Sha256::new();
    h.update(source.tree.as_os_str().as_encoded_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    let build_dir = paths::cache_dir()?
        .join("kernel-build")
        .join(&hex(h.finalize())[..20]);
    paths::ensure_dir(&build_dir)?;
    let _lock = lock(&build_dir.join(".umlctl-lock"))?;

    let release_file = build_dir.join("include/config/kernel.release");
    let default_name = |release: &str| {
        let extra = !spec.fragments.is_empty() || !spec.sets.is_empty() || !spec.extra.is_empty();
        let debug = if spec.debug { "-debug" } else { "" };
        if spec.base == Base::Bare {
            format!("kunit-{release}{debug}-{}", &key[..8])
        } else if extra {
            format!("{release}{debug}-{}", &key[..8])
        } else {
            format!("{release}{debug}")
        }
    };

    // Up to date: the same source, fingerprint and inputs as the cached kernel.
    if !spec.force {
        if let Ok(release) = fs::read_to_string(&release_file) {
            let name = spec
                .name
                .clone()
                .unwrap_or_else(|| default_name(release.trim()));
            if let Ok(Some(m)) = cache::meta(&name) {
                let path = cache::kernel_dir(&name)?.join("linux");
                if m.source == source.given
                    && m.source_fingerprint == source.fingerprint
                    && m.config_key == key
                    && path.is_file()
                    && (!spec.debug || cache::kernel_dir(&name)?.join(GDB_LOADER).is_file())
                {
                    let made_default = spec.base == Base::Umlctl && ensure_default(&name)?;
                    return Ok(Built {
                        name,
                        path,
                        meta: m,
                        up_to_date: true,
                        made_default,
                    });
                }
            }
        }
    }

    let started = Instant::now();
    let log_path = build_dir.join("umlctl-build.log");
    let mut log = fs::File::create(&log_path).map_err(|e| Error::io("create", &log_path, e))?;
    obs.phase("configuring");
    let config_path = build_dir.join(".config");
    match spec.base {
        Base::Umlctl => {
            let mut defconfig = make(&source.tree, &build_dir);
            defconfig.arg("defconfig");
            run_logged(defconfig, &mut log, &log_path, "make defconfig")?;
        }
        Base::Bare => {
            fs::write(&config_path, b"").map_err(|e| Error::io("write", &config_path, e))?
        }
    }
    // umlctl's own options that this kernel does not define at all (the
    // legacy network transports, gone in 6.16) are skipped with a note;
    // a user's fragments and --sets are always checked.
    let known = kconfig_symbols(&source.tree);
    let (wants, skipped): (Vec<Want>, Vec<Want>) = wants.into_iter().partition(|w| {
        !w.origin.starts_with("umlctl.config")
            || known.is_empty()
            || known.contains(w.option.trim_start_matches("CONFIG_"))
    });
    for w in &skipped {
        let _ = writeln!(
            log,
            "{}: {} is not an option of this kernel; skipped",
            w.origin, w.option
        );
    }
    let mut fragment = String::from("\n# --- umlctl: requested options ---\n");
    for w in &wants {
        fragment.push_str(&w.line());
        fragment.push('\n');
    }
    fs::OpenOptions::new()
        .append(true)
        .open(&config_path)
        .and_then(|mut f| f.write_all(fragment.as_bytes()))
        .map_err(|e| Error::io("append to", &config_path, e))?;
    let mut olddefconfig = make(&source.tree, &build_dir);
    olddefconfig.arg("olddefconfig");
    run_logged(olddefconfig, &mut log, &log_path, "make olddefconfig")?;
    let final_config =
        fs::read_to_string(&config_path).map_err(|e| Error::io("read", &config_path, e))?;
    let missing = not_applied(&wants, &final_config);
    if !missing.is_empty() {
        let _ = writeln!(
            log,
            "requested options that did not land:\n{}",
            missing.join("\n")
        );
        return Err(Error::ConfigNotApplied {
            config: config_path,
            missing: missing.join("\n"),
            log: log_path,
        });
    }

    obs.phase("building");
    let jobs = spec
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut targets = vec!["linux"];
    if spec.debug {
        targets.push("scripts_gdb");
    }
    compile(
        &source.tree,
        &build_dir,
        &targets,
        jobs,
        &mut log,
        &log_path,
        obs,
    )?;
    let build_secs = started.elapsed().as_secs_f64();

    let release = fs::read_to_string(&release_file)
        .map_err(|e| Error::io("read", &release_file, e))?
        .trim()
        .to_string();
    let name = spec.name.clone().unwrap_or_else(|| default_name(&release));
    cache::check_name(&name)?;
    obs.phase("installing");
    let meta = Meta {
        name: name.clone(),
        version: release,
        source: source.given,
        source_fingerprint: source.fingerprint,
        config_key: key,
        requested: wants.iter().map(Want::line).collect(),
        build_dir: build_dir.clone(),
        log: log_path,
        built_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        build_secs,
        umlctl_version: env!("CARGO_PKG_VERSION").to_string(),
        debug: spec.debug,
    };
    let extras = if spec.debug {
        gdb_scripts(&build_dir)?
    } else {
        Vec::new()
    };
    let path = cache::install(
        &name,
        &build_dir.join("linux"),
        &config_path,
        &meta,
        &extras,
    )?;
    // The installed binary must be a kernel umlctl can use.
    inspect::inspect(&path)?;
    let made_default = spec.base == Base::Umlctl && ensure_default(&name)?;
    Ok(Built {
        name,
        path,
        meta,
        up_to_date: false,
        made_default,
    })
}

/// The gdb loader a `--debug` kernel keeps beside its `linux`.
pub const GDB_LOADER: &str = "vmlinux-gdb.py";

/// The kernel's gdb scripts in a `--debug` build directory, as (file,
/// path under the cached kernel's directory): `vmlinux-gdb.py` and
/// `scripts/gdb/linux/*.py` (symlinks into the source, and the generated
/// `constants.py`), so that the cached kernel does not depend on the build
/// or source directory staying where it is.
fn gdb_scripts(build_dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let loader = build_dir.join(GDB_LOADER);
    let dir = build_dir.join("scripts/gdb/linux");
    let missing = |what: &Path| Error::BuildFailed {
        step: "make scripts_gdb",
        status: "finished".into(),
        tail: format!(
            "  | {} is missing (CONFIG_GDB_SCRIPTS did not take effect?)",
            what.display()
        ),
        log: build_dir.join("umlctl-build.log"),
    };
    if !loader.exists() {
        return Err(missing(&loader));
    }
    let mut out = vec![(loader, PathBuf::from(GDB_LOADER))];
    let entries = fs::read_dir(&dir).map_err(|_| missing(&dir.join("constants.py")))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(|e| Error::io("read", &dir, e))?;
        let name = e.file_name();
        if Path::new(&name).extension().is_some_and(|x| x == "py") {
            names.push(name);
        }
    }
    if !names.iter().any(|n| n == "constants.py") {
        return Err(missing(&dir.join("constants.py")));
    }
    names.sort();
    for n in names {
        out.push((dir.join(&n), Path::new("scripts/gdb/linux").join(&n)));
    }
    Ok(out)
}

/// Make `name` the default kernel when there is none.
fn ensure_default(name: &str) -> Result<bool> {
    if cache::default_name().is_some() {
        return Ok(false);
    }
    cache::set_default(name)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umlctl_config_parses_and_has_what_run_needs() {
        let w = parse_fragment(UMLCTL_CONFIG, "umlctl.config").unwrap();
        for opt in [
            "CONFIG_HOSTFS",
            "CONFIG_BLK_DEV_UBD",
            "CONFIG_SSL",
            "CONFIG_UML_NET_VECTOR",
            "CONFIG_MCONSOLE",
            "CONFIG_DEVTMPFS",
            "CONFIG_TMPFS",
            "CONFIG_EXT4_FS_POSIX_ACL",
            "CONFIG_EXT4_FS_SECURITY",
        ] {
            assert!(
                w.iter().any(|x| x.option == opt && x.value == "y"),
                "{opt} missing from config/umlctl.config"
            );
        }
        assert!(w
            .iter()
            .any(|x| x.option == "CONFIG_STATIC_LINK" && x.value == "n"));
    }

    #[test]
    fn fragments() {
        let w = parse_fragment(
            "# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n  CONFIG_D=0x10  \n",
            "f",
        )
        .unwrap();
        let lines: Vec<String> = w.iter().map(Want::line).collect();
        assert_eq!(
            lines,
            [
                "CONFIG_A=y",
                "# CONFIG_B is not set",
                "CONFIG_C=\"x y\"",
                "CONFIG_D=0x10"
            ]
        );
        assert_eq!(w[1].origin, "f:4");
        let e = parse_fragment("CONFIG_A=y\nKASAN=y\n", "frag.config").unwrap_err();
        assert!(e.to_string().contains("frag.config:2"), "{e}");
        assert!(parse_fragment("CONFIG_lower=y", "f").is_err());
        assert!(parse_fragment("CONFIG_A=", "f").is_err());
    }

    #[test]
    fn sets() {
        assert_eq!(
            parse_set("CONFIG_KASAN=y").unwrap().line(),
            "CONFIG_KASAN=y"
        );
        assert_eq!(
            parse_set("KASAN=n").unwrap().line(),
            "# CONFIG_KASAN is not set"
        );
        for bad in ["CONFIG_KASAN", "=y", "CONFIG_=y", "config_x=y", "X="] {
            assert!(parse_set(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn later_requests_win_and_keep_their_place() {
        let spec = BuildSpec {
            sets: vec!["CONFIG_HOSTFS=n".into(), "CONFIG_NEW=y".into()],
            ..Default::default()
        };
        let w = wants(&spec).unwrap();
        let hostfs: Vec<_> = w.iter().filter(|x| x.option == "CONFIG_HOSTFS").collect();
        assert_eq!(hostfs.len(), 1);
        assert_eq!(hostfs[0].value, "n");
        assert_eq!(hostfs[0].origin, "--set");
        assert_eq!(w.last().unwrap().option, "CONFIG_NEW");
        let base = wants(&BuildSpec::default()).unwrap();
        assert_ne!(
            config_key(Base::Umlctl, &w),
            config_key(Base::Umlctl, &base)
        );
        assert_ne!(
            config_key(Base::Umlctl, &base),
            config_key(Base::Bare, &base)
        );
    }

    #[test]
    fn applied_or_not() {
        let wants = [
            parse_set("CONFIG_A=y").unwrap(),
            parse_set("CONFIG_B=n").unwrap(),
            parse_set("CONFIG_C=n").unwrap(),
            parse_set("CONFIG_D=y").unwrap(),
            parse_set("CONFIG_E=y").unwrap(),
            parse_set("CONFIG_F=\"s\"").unwrap(),
        ];
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=m\nCONFIG_F=\"s\"\n";
        let missing = not_applied(&wants, config);
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert!(missing[0].contains("CONFIG_D=y (from --set): is CONFIG_D=m"));
        assert!(missing[1].contains("CONFIG_E=y") && missing[1].contains("absent"));
    }

    #[test]
    fn step_lines() {
        assert!(is_step("  CC      kernel/fork.o"));
        assert!(is_step("  LD      vmlinux"));
        assert!(is_step("  HOSTCC  scripts/basic/fixdep"));
        assert!(!is_step("make[1]: Entering directory"));
        assert!(!is_step("  "));
        assert!(!is_step("kernel/fork.c:12: warning: x"));
    }

    #[test]
    fn fingerprint_follows_edits() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/a.c"), "a").unwrap();
        let f1 = fingerprint_dir(d.path()).unwrap();
        assert_eq!(f1, fingerprint_dir(d.path()).unwrap());
        fs::write(d.path().join("sub/a.c"), "ab").unwrap();
        let f2 = fingerprint_dir(d.path()).unwrap();
        assert_ne!(f1, f2);
        fs::write(d.path().join("b.c"), "").unwrap();
        assert_ne!(f2, fingerprint_dir(d.path()).unwrap());
        // .git is not part of the source.
        let f3 = fingerprint_dir(d.path()).unwrap();
        fs::create_dir(d.path().join(".git")).unwrap();
        assert_eq!(f3, fingerprint_dir(d.path()).unwrap());
    }

    #[test]
    fn smp_is_asked_for_where_umls_kconfig_has_it_and_the_user_did_not_say() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("arch/um")).unwrap();
        let base = || parse_fragment("CONFIG_HOSTFS=y\n", "umlctl.config").unwrap();
        // 6.12: no SMP for UML.
        std::fs::write(d.path().join("arch/um/Kconfig"), "config UML\n\tbool\n").unwrap();
        assert_eq!(with_smp(base(), d.path()).len(), 1);
        // 7.x: SMP, with CPUs.
        std::fs::write(
            d.path().join("arch/um/Kconfig"),
            "config UML\n\tbool\nconfig SMP\n\tbool \"SMP\"\n",
        )
        .unwrap();
        let w = with_smp(base(), d.path());
        let opts: Vec<(&str, &str)> = w
            .iter()
            .map(|w| (w.option.as_str(), w.value.as_str()))
            .collect();
        assert_eq!(
            opts,
            [
                ("CONFIG_HOSTFS", "y"),
                ("CONFIG_SMP", "y"),
                ("CONFIG_NR_CPUS", "8")
            ]
        );
        // The user's word wins.
        let mut mine = base();
        mine.extend(parse_fragment("# CONFIG_SMP is not set\n", "mine").unwrap());
        let w = with_smp(mine, d.path());
        assert_eq!(w.iter().filter(|w| w.option.contains("SMP")).count(), 1);
        assert!(!w.iter().any(|w| w.option == "CONFIG_NR_CPUS"));
    }

    #[test]
    fn kconfig_symbols_are_read_from_every_kconfig_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("arch/um/drivers")).unwrap();
        std::fs::write(
            d.path().join("arch/um/drivers/Kconfig"),
            "menuconfig UML_NET_VECTOR\n\tbool \"vector\"\nconfig MCONSOLE\n\tbool\n# config NOT_ME\n",
        )
        .unwrap();
        std::fs::write(d.path().join("Kconfig.debug"), "config KASAN\n").unwrap();
        let k = kconfig_symbols(d.path());
        for s in ["UML_NET_VECTOR", "MCONSOLE", "KASAN"] {
            assert!(k.contains(s), "{s}");
        }
        assert!(!k.contains("NOT_ME") && !k.contains("UML_NET"));
    }
}
