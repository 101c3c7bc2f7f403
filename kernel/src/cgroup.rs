//! Resource limits for a guest: `--cpu-quota` and `--memory-max`, through a
//! cgroup of its own.
//!
//! The jail ([`crate::jail`]) takes away what a guest can *see*; it does not
//! bound what the UML process *uses*. With limits, every process of the
//! guest (UML, its helpers, the jail's PID 1) runs in one new cgroup whose
//! `cpu` and `memory` controllers cap it, so even a guest that broke out of
//! its kernel into the UML process cannot take more CPU time or memory than
//! it was given. UML's memory file lives on the jail's tmpfs, whose pages are
//! charged to that cgroup, so the guest's RAM counts against `--memory-max`.
//!
//! Where the cgroup goes, by what the host offers:
//!
//! * a controller on a **cgroup v1** hierarchy (hybrid hosts, older
//!   distributions): a child of umlctl's own cgroup in that hierarchy (v1
//!   lets a cgroup hold processes and children), which needs write access
//!   there — in practice root;
//! * on **cgroup v2** as root: `umlctl/` under the hierarchy's root (as
//!   Docker's `docker/`), with the controllers enabled on the way down;
//! * on **cgroup v2** as a user: umlctl's own cgroup, if it was delegated to
//!   the user (`systemd-run --user --scope -p Delegate=yes umlctl …`):
//!   umlctl moves itself into a leaf of it (v2 forbids processes beside
//!   enabled controllers), enables the controllers and puts the guest in a
//!   sibling leaf.
//!
//! Anything else is an error that says which of these to use. A cgroup is
//! created complete (limits written) before any process enters it, and is
//! removed when the guest ends (`run`) or is removed (`rm`).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The CFS period for `--cpu-quota` (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;

/// What UML itself needs beside the guest's memory (its kernel image, page
/// tables, helper threads, the host page cache of its disks under
/// pressure): `--memory-max` below the guest's memory plus this is refused.
pub const UML_OVERHEAD: u64 = 32 << 20;

/// Prefix of every cgroup umlctl creates.
const PREFIX: &str = "umlctl-";

/// The limits asked for. Empty: no cgroup is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `--cpu-quota`: CPU time, in percent of one host CPU (150 = one and a
    /// half CPUs' worth).
    pub cpu_percent: Option<u32>,
    /// `--memory-max`: bytes of host memory (RAM, no swap) for everything
    /// the guest runs on the host.
    pub memory_max: Option<u64>,
}

impl Limits {
    /// Whether any limit is asked for.
    pub fn is_empty(&self) -> bool {
        self.cpu_percent.is_none() && self.memory_max.is_none()
    }

    /// Check the limits against the guest's memory (no host state).
    pub fn validate(&self, mem_bytes: u64) -> Result<()> {
        if self.cpu_percent == Some(0) {
            return Err(Error::Usage(
                "--cpu-quota 0%: give a share of CPU time above 0, e.g. 50% (half a CPU) or 200% (two CPUs)".into(),
            ));
        }
        if let Some(m) = self.memory_max {
            let need = mem_bytes.saturating_add(UML_OVERHEAD);
            if m < need {
                return Err(Error::Usage(format!(
                    "--memory-max {} is below what the guest needs: its memory ({}) plus {} for UML itself; give at least {}, or lower --mem",
                    mib(m),
                    mib(mem_bytes),
                    mib(UML_OVERHEAD),
                    mib(need)
                )));
            }
        }
        Ok(())
    }
}

fn mib(b: u64) -> String {
    if b % (1 << 20) == 0 {
        format!("{}M", b >> 20)
    } else {
        format!("{b} bytes")
    }
}

/// Parse `--cpu-quota`: a percentage of one CPU (`50%`, `150%`; the `%` may
/// be left out).
pub fn parse_cpu_quota(s: &str) -> std::result::Result<u32, String> {
    let t = s.trim();
    let n = t.strip_suffix('%').unwrap_or(t).trim();
    n.parse::<u32>()
        .ok()
        .filter(|&p| p <= 100_000)
        .ok_or_else(|| {
            format!("{s:?}: expected a whole percentage of one CPU, e.g. 50% (half a CPU) or 200% (two CPUs)")
        })
}

/// Which cgroup version holds a controller, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// A v1 hierarchy: the directory of umlctl's own cgroup in it.
    V1 { own: PathBuf },
    /// The v2 hierarchy: its mount point and umlctl's own cgroup directory.
    V2 { mount: PathBuf, own: PathBuf },
}

/// The host's cgroup layout as read from `/proc/self/mountinfo` and
/// `/proc/self/cgroup` (passed in, so that tests can describe any host).
#[derive(Debug, Clone)]
struct Layout {
    /// `(mount point, mount root, controllers)` of each v1 hierarchy.
    v1: Vec<(PathBuf, String, Vec<String>)>,
    /// `(mount point, mount root)` of the v2 hierarchy.
    v2: Option<(PathBuf, String)>,
    /// `/proc/self/cgroup`: `(controllers, path)` per hierarchy; v2's has
    /// no controllers.
    own: Vec<(Vec<String>, String)>,
}

impl Layout {
    fn parse(mountinfo: &str, self_cgroup: &str) -> Layout {
        let mut v1 = Vec::new();
        let mut v2 = None;
        for line in mountinfo.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(sep) = f.iter().position(|x| *x == "-") else {
                continue;
            };
            if f.len() < sep + 4 || sep < 5 {
                continue;
            }
            let (root, mnt) = (unescape(f[3]), PathBuf::from(unescape(f[4])));
            match f[sep + 1] {
                "cgroup2" => v2 = Some((mnt, root)),
                "cgroup" => {
                    let ctl = f[sep + 3]
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .map(str::to_string)
                        .collect();
                    v1.push((mnt, root, ctl));
                }
                _ => {}
            }
        }
        let own = self_cgroup
            .lines()
            .filter_map(|l| {
                let mut p = l.splitn(3, ':');
                let _id = p.next()?;
                let ctl = p.next()?;
                let path = p.next()?;
                Some((
                    ctl.split(',')
                        .filter(|c| !c.is_empty())
                        .map(str::to_string)
                        .collect(),
                    path.to_string(),
                ))
            })
            .collect();
        Layout { v1, v2, own }
    }

    /// Where `controller` lives. `v2_has` says whether the v2 hierarchy
    /// offers it (its root's `cgroup.controllers`).
    fn place(&self, controller: &str, v2_has: &dyn Fn(&Path) -> bool) -> Option<Place> {
        if let Some((mnt, root, _)) = self
            .v1
            .iter()
            .find(|(_, _, c)| c.iter().any(|c| c == controller))
        {
            let path = self
                .own
                .iter()
                .find(|(c, _)| c.iter().any(|c| c == controller))
                .map_or("/", |(_, p)| p.as_str());
            return Some(Place::V1 {
                own: join_cgroup(mnt, root, path),
            });
        }
        let (mnt, root) = self.v2.as_ref()?;
        if !v2_has(mnt) {
            return None;
        }
        let path = self
            .own
            .iter()
            .find(|(c, _)| c.is_empty())
            .map_or("/", |(_, p)| p.as_str());
        Some(Place::V2 {
            mount: mnt.clone(),
            own: join_cgroup(mnt, root, path),
        })
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` in a hierarchy mounted at `mnt` showing
/// the subtree `root`.
fn join_cgroup(mnt: &Path, root: &str, path: &str) -> PathBuf {
    let rel = path
        .strip_prefix(root.trim_end_matches('/'))
        .unwrap_or(path)
        .trim_start_matches('/');
    if rel.is_empty() {
        mnt.to_path_buf()
    } else {
        mnt.join(rel)
    }
}

/// A guest's cgroup: one directory per hierarchy it spans (one on v2; the
/// `cpu` and `memory` hierarchies' on v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// The directories, each complete with its limits.
    pub dirs: Vec<PathBuf>,
}

/// What the guest's cgroup saw, for `--json` and error messages.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Usage {
    /// CFS periods in which the guest used up its quota.
    pub throttled_periods: Option<u64>,
    /// Times the host's OOM killer killed a process of the guest.
    pub oom_kills: Option<u64>,
    /// The most memory the guest's processes held at once (where the host
    /// records it).
    pub memory_peak_bytes: Option<u64>,
}

fn write(path: &Path, what: &str) -> Result<()> {
    fs::write(path, what).map_err(|e| Error::io("write", path, e))
}

fn read_key(path: &Path, key: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    s.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some(key))
            .then(|| w.next()?.parse().ok())
            .flatten()
    })
}

fn read_num(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn mkdir(d: &Path) -> Result<bool> {
    match fs::create_dir(d) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io("create the cgroup", d, e)),
    }
}

/// Add `+ctl` to `dir`'s `cgroup.subtree_control` unless it is there.
fn enable(dir: &Path, ctl: &str) -> Result<()> {
    let f = dir.join("cgroup.subtree_control");
    let on = fs::read_to_string(&f).map_err(|e| Error::io("read", &f, e))?;
    if on.split_whitespace().any(|c| c == ctl) {
        return Ok(());
    }
    fs::write(&f, format!("+{ctl}")).map_err(|e| Error::io("enable the controller in", &f, e))
}

fn no_cgroup(detail: String, fix: &str) -> Error {
    Error::Host {
        check: "cgroup",
        detail,
        fix: fix.into(),
    }
}

const FIX_V2_USER: &str = "run umlctl in a cgroup delegated to you, e.g. `systemd-run --user --scope -p Delegate=yes umlctl run --cpu-quota … -- …`; or run it as root; or drop --cpu-quota/--memory-max";

impl Cgroup {
    /// Create the cgroup `name` (unique among umlctl's) with `limits`,
    /// using the host's own description of its cgroups.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup> {
        let read = |p: &str| fs::read_to_string(p).map_err(|e| Error::io("read", Path::new(p), e));
        let layout = Layout::parse(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?);
        Cgroup::create_in(&layout, name, limits, nix::unistd::geteuid().is_root())
    }

    fn create_in(layout: &Layout, name: &str, limits: &Limits, root: bool) -> Result<Cgroup> {
        let v2_has = |mnt: &Path| {
            fs::read_to_string(mnt.join("cgroup.controllers")).is_ok_and(|s| {
                let want: &[&str] = &["cpu", "memory"];
                want.iter()
                    .all(|w| !needs(limits, w) || s.split_whitespace().any(|c| c == *w))
            })
        };
        let mut places = Vec::new();
        for ctl in ["cpu", "memory"] {
            if !needs(limits, ctl) {
                continue;
            }
            let p = layout.place(ctl, &v2_has).ok_or_else(|| {
                no_cgroup(
                    format!("this host's cgroups offer no `{ctl}` controller umlctl can use (neither a cgroup v1 hierarchy with it nor cgroup v2 with it enabled)"),
                    "mount the controller (cgroup v2: `cgroup_no_v1=all` on the host's kernel command line, or enable it in the root's cgroup.subtree_control); or drop the option that needs it",
                )
            })?;
            places.push((ctl, p));
        }
        let leaf = format!("{PREFIX}{name}");
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| -> Result<()> {
            for (ctl, place) in &places {
                let dir = match place {
                    Place::V1 { own } => {
                        if !root && !writable(own) {
                            return Err(no_cgroup(
                                format!("the `{ctl}` controller is on a cgroup v1 hierarchy, where {} is writable only by root", own.display()),
                                "run umlctl as root; or use a host with cgroup v2 and run umlctl in a cgroup delegated to you (`systemd-run --user --scope -p Delegate=yes umlctl …`); or drop --cpu-quota/--memory-max",
                            ));
                        }
                        sweep(own);
                        own.join(&leaf)
                    }
                    Place::V2 { mount, own } => {
                        let parent = v2_parent(mount, own, root)?;
                        sweep(&parent);
                        parent.join(&leaf)
                    }
                };
                if !made.contains(&dir) {
                    if !mkdir(&dir)? {
                        return Err(no_cgroup(
                            format!("{} exists already (another guest of this name?)", dir.display()),
                            "remove the other guest first (`umlctl rm NAME`), or rmdir the cgroup if nothing runs in it",
                        ));
                    }
                    made.push(dir.clone());
                }
                apply(&dir, ctl, limits, matches!(place, Place::V1 { .. }))?;
            }
            Ok(())
        })();
        let cg = Cgroup { dirs: made };
        if let Err(e) = result {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// Put process `pid` (and, later, everything it forks) in the cgroup.
    pub fn add(&self, pid: i32) -> Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files (a process writes `0` to one to enter).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// What the guest's cgroup recorded.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        for d in self.dirs.iter().filter(|d| ours(d)) {
            // v2 and v1 name these alike (cpu.stat), or apart.
            if let Some(n) = read_key(&d.join("cpu.stat"), "nr_throttled") {
                u.throttled_periods = Some(n);
            }
            if let Some(n) = read_key(&d.join("memory.events"), "oom_kill")
                .or_else(|| read_key(&d.join("memory.oom_control"), "oom_kill"))
            {
                u.oom_kills = Some(n);
            }
            if let Some(n) = read_num(&d.join("memory.peak"))
                .or_else(|| read_num(&d.join("memory.max_usage_in_bytes")))
            {
                u.memory_peak_bytes = Some(n);
            }
        }
        u
    }

    /// Remove the cgroup (once its processes are gone; tried again for up
    /// to ~2 s, from 1 ms on, as the last ones may still be exiting: a run
    /// waits for this before it returns). Best effort.
    pub fn remove(&self) {
        // Only ever a cgroup umlctl made (a record names these).
        for d in self.dirs.iter().rev().filter(|d| ours(d)) {
            let mut pause = std::time::Duration::from_millis(1);
            let mut waited = std::time::Duration::ZERO;
            loop {
                match fs::remove_dir(d) {
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && waited < std::time::Duration::from_secs(2) =>
                    {
                        std::thread::sleep(pause);
                        waited += pause;
                        pause = (pause * 2).min(std::time::Duration::from_millis(50));
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Whether `d` is named as umlctl names its cgroups.
fn ours(d: &Path) -> bool {
    d.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(PREFIX))
}

fn needs(l: &Limits, ctl: &str) -> bool {
    match ctl {
        "cpu" => l.cpu_percent.is_some(),
        "memory" => l.memory_max.is_some(),
        _ => false,
    }
}

/// Write `ctl`'s limits into `dir`.
fn apply(dir: &Path, ctl: &str, l: &Limits, v1: bool) -> Result<()> {
    match (ctl, v1) {
        ("cpu", false) => {
            if let Some(p) = l.cpu_percent {
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {PERIOD_US}", u64::from(p) * PERIOD_US / 100),
                )?;
            }
        }
        ("cpu", true) => {
            if let Some(p) = l.cpu_percent {
                write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(
                    &dir.join("cpu.cfs_quota_us"),
                    &(u64::from(p) * PERIOD_US / 100).to_string(),
                )?;
            }
        }
        ("memory", false) => {
            if let Some(m) = l.memory_max {
                write(&dir.join("memory.max"), &m.to_string())?;
                // RAM only: a guest over its limit must not live on in swap.
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
            }
        }
        ("memory", true) => {
            if let Some(m) = l.memory_max {
                write(&dir.join("memory.limit_in_bytes"), &m.to_string())?;
                let sw = dir.join("memory.memsw.limit_in_bytes");
                if sw.exists() {
                    write(&sw, &m.to_string())?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The v2 cgroup under which a guest's leaf goes, prepared: root uses
/// `umlctl` under the hierarchy's root; a user their own, delegated cgroup,
/// after moving umlctl itself into a leaf of it.
fn v2_parent(mount: &Path, own: &Path, root: bool) -> Result<PathBuf> {
    if root {
        let base = mount.join("umlctl");
        mkdir(&base)?;
        for ctl in ["cpu", "memory"] {
            enable(mount, ctl)?;
            enable(&base, ctl)?;
        }
        return Ok(base);
    }
    if !(writable(own)
        && writable(&own.join("cgroup.procs"))
        && writable(&own.join("cgroup.subtree_control")))
    {
        return Err(no_cgroup(
            format!(
                "your cgroup {} is not delegated to you (cgroup v2 lets a user create cgroups only in a subtree handed to them)",
                own.display()
            ),
            FIX_V2_USER,
        ));
    }
    // v2: no processes beside enabled controllers. umlctl moves into a leaf
    // of its own cgroup first; anything else there is the user's to move.
    let me = own.join(format!("{PREFIX}self"));
    mkdir(&me)?;
    write(&me.join("cgroup.procs"), &std::process::id().to_string())?;
    for ctl in ["cpu", "memory"] {
        if let Err(e) = enable(own, ctl) {
            return Err(no_cgroup(
                format!(
                    "cannot enable `{ctl}` in your cgroup {} ({e}); other processes share it, or it was not delegated with that controller",
                    own.display()
                ),
                FIX_V2_USER,
            ));
        }
    }
    Ok(own.to_path_buf())
}

fn writable(p: &Path) -> bool {
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Remove empty leftovers: `umlctl-…-PID` cgroups whose creating umlctl
/// (PID) is gone — a run killed before it could clean up, a detached guest
/// that ended and was never removed. rmdir fails on a cgroup still in use,
/// and one being set up has a live creator.
fn sweep(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name();
        let Some(pid) = n
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, p)| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// A cgroup that is removed when this is dropped, unless kept.
#[derive(Debug)]
pub struct Owned(pub Cgroup, bool);

impl Owned {
    /// Own `c`: remove it on drop.
    pub fn new(c: Cgroup) -> Owned {
        Owned(c, false)
    }
    /// Keep the cgroup (a detached guest lives on in it).
    pub fn keep(mut self) -> Cgroup {
        self.1 = true;
        self.0.clone()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if !self.1 {
            self.0.remove();
        }
    }
}

/// Create `name`'s cgroup if `limits` ask for one.
pub fn for_guest(name: &str, limits: &Limits) -> Result<Option<Owned>> {
    if limits.is_empty() {
        return Ok(None);
    }
    Cgroup::create(name, limits).map(|c| Some(Owned::new(c)))
}

/// The name of `run`'s cgroup (ending in the umlctl process's id, as
/// every name does: see [`sweep`]).
pub fn run_name() -> String {
    format!("run-{}", std::process::id())
}

/// The name of detached guest `name`'s cgroup.
pub fn guest_name(name: &str) -> String {
    format!("guest-{name}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
39 35 0:34 / /sys/fs/cgroup/cpu,cpuacct rw shared:14 - cgroup cgroup rw,cpu,cpuacct
40 35 0:35 / /sys/fs/cgroup/memory rw shared:15 - cgroup cgroup rw,memory
41 35 0:36 / /sys/fs/cgroup/systemd rw shared:16 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn v1_controllers_are_found_in_their_hierarchies_under_our_own_cgroup() {
        let l = Layout::parse(
            HYBRID,
            "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n",
        );
        let none = |_: &Path| false;
        assert_eq!(
            l.place("cpu", &none),
            Some(Place::V1 {
                own: "/sys/fs/cgroup/cpu,cpuacct".into()
            })
        );
        assert_eq!(
            l.place("memory", &none),
            Some(Place::V1 {
                own: "/sys/fs/cgroup/memory/process_api/abc".into()
            })
        );
        assert_eq!(l.place("pids", &none), None);
    }

    #[test]
    fn v2_is_used_when_it_offers_the_controller() {
        let l = Layout::parse(
            "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
            "0::/user.slice/user-1000.slice/session-2.scope\n",
        );
        let has = |_: &Path| true;
        assert_eq!(
            l.place("memory", &has),
            Some(Place::V2 {
                mount: "/sys/fs/cgroup".into(),
                own: "/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope".into()
            })
        );
        assert_eq!(l.place("memory", &|_: &Path| false), None);
    }

    #[test]
    fn a_mount_of_a_subtree_and_escaped_mount_points() {
        // A container sees its own cgroup as the mount's root.
        let l = Layout::parse(
            "30 24 0:26 /docker/abc /sys/fs/cg\\040x rw - cgroup2 cgroup2 rw\n",
            "0::/docker/abc/inner\n",
        );
        assert_eq!(
            l.place("cpu", &|_: &Path| true),
            Some(Place::V2 {
                mount: "/sys/fs/cg x".into(),
                own: "/sys/fs/cg x/inner".into()
            })
        );
    }

    #[test]
    fn limits_are_checked_against_the_guest_memory() {
        let l = Limits {
            cpu_percent: Some(50),
            memory_max: Some(300 << 20),
        };
        l.validate(256 << 20).unwrap();
        let e = l.validate(512 << 20).unwrap_err().to_string();
        assert!(
            e.contains("--memory-max 300M") && e.contains("at least 544M"),
            "{e}"
        );
        let z = Limits {
            cpu_percent: Some(0),
            memory_max: None,
        };
        assert!(z
            .validate(1 << 30)
            .unwrap_err()
            .to_string()
            .contains("--cpu-quota 0%"));
        assert!(Limits::default().is_empty());
    }

    #[test]
    fn cpu_quota_is_a_percentage() {
        assert_eq!(parse_cpu_quota("50%"), Ok(50));
        assert_eq!(parse_cpu_quota("150"), Ok(150));
        assert_eq!(parse_cpu_quota(" 200 % "), Ok(200));
        for bad in ["", "%", "1.5", "-5%", "fast", "100001%"] {
            assert!(parse_cpu_quota(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_v1_cgroup_is_made_complete_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let cpu = d.path().join("cpu");
        let mem = d.path().join("memory");
        fs::create_dir_all(&cpu).unwrap();
        fs::create_dir_all(mem.join("inner")).unwrap();
        // A leftover of a killed run (its PID cannot exist) is swept.
        fs::create_dir_all(cpu.join("umlctl-run-2147483646")).unwrap();
        fs::create_dir_all(cpu.join("umlctl-guest-a-b-2147483646")).unwrap();
        let live = cpu.join(format!("umlctl-guest-x-{}", std::process::id()));
        fs::create_dir_all(&live).unwrap();
        let mi = format!(
            "39 35 0:34 / {} rw - cgroup cgroup rw,cpu,cpuacct\n40 35 0:35 / {} rw - cgroup cgroup rw,memory\n",
            cpu.display(),
            mem.display()
        );
        let l = Layout::parse(&mi, "4:memory:/inner\n2:cpu,cpuacct:/\n");
        let lim = Limits {
            cpu_percent: Some(150),
            memory_max: Some(1 << 30),
        };
        let cg = Cgroup::create_in(&l, "g1", &lim, true).unwrap();
        assert_eq!(
            cg.dirs,
            vec![cpu.join("umlctl-g1"), mem.join("inner/umlctl-g1")]
        );
        assert!(!cpu.join("umlctl-run-2147483646").exists());
        assert!(!cpu.join("umlctl-guest-a-b-2147483646").exists());
        assert!(live.exists());
        fs::remove_dir(&live).unwrap();
        let rd = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(rd(cpu.join("umlctl-g1/cpu.cfs_quota_us")), "150000");
        assert_eq!(rd(cpu.join("umlctl-g1/cpu.cfs_period_us")), "100000");
        assert_eq!(
            rd(mem.join("inner/umlctl-g1/memory.limit_in_bytes")),
            "1073741824"
        );
        // The same name again is refused, and the first is left alone.
        let e = Cgroup::create_in(&l, "g1", &lim, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists already"), "{e}");
        assert!(cpu.join("umlctl-g1").exists());
        // (A real cgroup's files vanish with it; here they must go first.)
        for f in ["cpu.cfs_quota_us", "cpu.cfs_period_us"] {
            fs::remove_file(cpu.join("umlctl-g1").join(f)).unwrap();
        }
        fs::remove_file(mem.join("inner/umlctl-g1/memory.limit_in_bytes")).unwrap();
        cg.remove();
        assert!(!cpu.join("umlctl-g1").exists() && !mem.join("inner/umlctl-g1").exists());
    }

    /// A cgroup v2 hierarchy in a directory: the files cgroupfs would have.
    fn v2_tree(root: &Path, own: &str) -> Layout {
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let own_dir = root.join(own.trim_start_matches('/'));
        fs::create_dir_all(&own_dir).unwrap();
        for d in [root.join("umlctl"), own_dir.clone()] {
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("cgroup.subtree_control"), "").unwrap();
            fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        Layout::parse(
            &format!("30 24 0:26 / {} rw - cgroup2 cgroup2 rw\n", root.display()),
            &format!("0::{own}\n"),
        )
    }

    #[test]
    fn on_cgroup_v2_root_uses_umlctl_under_the_root_and_a_user_their_own_cgroup() {
        let lim = Limits {
            cpu_percent: Some(250),
            memory_max: Some(3 << 30),
        };
        // Root: umlctl/ under the hierarchy's root, controllers enabled on
        // the way down (here each write replaces the file's content).
        let d = tempfile::tempdir().unwrap();
        let l = v2_tree(d.path(), "/user.slice/session-1.scope");
        let cg = Cgroup::create_in(&l, "run-1", &lim, true).unwrap();
        let leaf = d.path().join("umlctl/umlctl-run-1");
        assert_eq!(cg.dirs, vec![leaf.clone()]);
        let rd = |p: PathBuf| fs::read_to_string(p).unwrap();
        assert_eq!(rd(leaf.join("cpu.max")), "250000 100000");
        assert_eq!(rd(leaf.join("memory.max")), (3u64 << 30).to_string());
        assert_eq!(
            rd(d.path().join("umlctl/cgroup.subtree_control")),
            "+memory"
        );
        // A user: their own (delegated) cgroup; umlctl moves itself into a
        // leaf of it first, then the guest's leaf goes beside it.
        let d = tempfile::tempdir().unwrap();
        let own = "/user.slice/user-1000.slice/user@1000.service/app.slice/run-x.scope";
        let l = v2_tree(d.path(), own);
        let cg = Cgroup::create_in(&l, "guest-web-7", &lim, false).unwrap();
        let own_dir = d.path().join(own.trim_start_matches('/'));
        assert_eq!(cg.dirs, vec![own_dir.join("umlctl-guest-web-7")]);
        assert_eq!(
            rd(own_dir.join("umlctl-self/cgroup.procs")),
            std::process::id().to_string()
        );
        assert_eq!(rd(own_dir.join("cgroup.subtree_control")), "+memory");
        // A hierarchy without the controller: the error names it.
        fs::write(d.path().join("cgroup.controllers"), "pids\n").unwrap();
        let e = Cgroup::create_in(&l, "g", &lim, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `cpu` controller"), "{e}");
    }

    #[test]
    fn a_failed_creation_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let cpu = d.path().join("cpu");
        fs::create_dir_all(&cpu).unwrap();
        // The memory hierarchy's directory does not exist: mkdir fails after
        // the cpu cgroup was made.
        let mi = format!(
            "39 35 0:34 / {} rw - cgroup cgroup rw,cpu\n40 35 0:35 / {} rw - cgroup cgroup rw,memory\n",
            cpu.display(),
            d.path().join("nope").display()
        );
        let l = Layout::parse(&mi, "");
        let lim = Limits {
            cpu_percent: Some(10),
            memory_max: Some(1 << 30),
        };
        let e = Cgroup::create_in(&l, "g", &lim, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("create the cgroup"), "{e}");
        // The cpu cgroup's limit file keeps the directory; everything else
        // was undone.
        fs::remove_file(cpu.join("umlctl-g/cpu.cfs_quota_us")).ok();
        fs::remove_file(cpu.join("umlctl-g/cpu.cfs_period_us")).ok();
        Cgroup {
            dirs: vec![cpu.join("umlctl-g")],
        }
        .remove();
        assert_eq!(fs::read_dir(&cpu).unwrap().count(), 0);
    }

    #[test]
    fn usage_reads_both_versions() {
        // A cgroup directory holding `files` (name, content).
        let with = |files: &[(&str, &str)]| {
            let t = tempfile::tempdir().unwrap();
            let d = t.path().join("umlctl-run-1");
            fs::create_dir(&d).unwrap();
            for (f, c) in files {
                fs::write(d.join(f), c).unwrap();
            }
            (t, Cgroup { dirs: vec![d] }.usage())
        };
        let (_t, u) = with(&[
            (
                "cpu.stat",
                "nr_periods 10\nnr_throttled 7\nthrottled_time 5\n",
            ),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
            ),
            ("memory.max_usage_in_bytes", "123\n"),
        ]);
        assert_eq!(
            (u.throttled_periods, u.oom_kills, u.memory_peak_bytes),
            (Some(7), Some(1), Some(123))
        );
        let (_t, u) = with(&[
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n"),
            ("memory.peak", "456\n"),
        ]);
        assert_eq!((u.oom_kills, u.memory_peak_bytes), (Some(2), Some(456)));
        // A directory umlctl did not name is never read (a record names it).
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("memory.peak"), "9\n").unwrap();
        let u = Cgroup {
            dirs: vec![t.path().to_path_buf()],
        }
        .usage();
        assert_eq!(u.memory_peak_bytes, None);
    }
}
