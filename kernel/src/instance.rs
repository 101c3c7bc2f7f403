//! The registry of detached guests.
//!
//! UML keeps its own instance directory `<uml_dir>/<umid>/` (`pid` and the
//! `mconsole` socket; default `~/.uml/`), which it removes on a clean exit
//! and leaves behind after a panic or SIGKILL. umlctl keeps what it needs
//! beside it, in `<uml_dir>/<umid>.umlctl/`: the guest's record
//! (`guest.json`), its console log and console input FIFO, and a throwaway
//! overlay. A guest's name is its umid, so names are unique per user.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::paths;

/// What umlctl records about a detached guest.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub name: String,
    /// The UML process (the kernel's main process).
    pub pid: i32,
    /// Its start time (clock ticks since boot, /proc/PID/stat field 22), to
    /// tell a reused pid apart.
    pub pid_start: u64,
    /// The jail's PID 1 (killing it ends everything in the jail) and its
    /// start time; `None` for a guest started with `--no-jail`.
    #[serde(default)]
    pub jail_pid: Option<i32>,
    #[serde(default)]
    pub jail_pid_start: Option<u64>,
    /// Seconds since the epoch.
    pub started: u64,
    pub kernel: PathBuf,
    pub kernel_version: String,
    pub mem_bytes: u64,
    pub image: PathBuf,
    /// The root overlay; `ephemeral` ones live in the state directory and
    /// go with the guest.
    pub overlay: PathBuf,
    pub ephemeral_overlay: bool,
    /// Extra disks, ubdb onwards.
    pub disks: Vec<PathBuf>,
    pub nics: Vec<String>,
    pub xstate_shim: bool,
    /// How a stopped guest ended (`shut down`, `halted`, `killed`), as
    /// `stop` saw it; `None` while it runs or if it ended otherwise.
    #[serde(default)]
    pub ended: Option<String>,
    /// The lab (its directory) this guest is a device of.
    #[serde(default)]
    pub lab: Option<String>,
    /// The guest's cgroup directories (`--cpu-quota`/`--memory-max`),
    /// removed with the guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup: Vec<PathBuf>,
    /// `--cpu-quota` and `--memory-max` as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
}

/// A guest's state as seen from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The UML process is alive.
    Running,
    /// UML exited cleanly (it removed its instance directory).
    Stopped,
    /// UML died without cleaning up (panic, SIGKILL, OOM).
    Dead,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Stopped => "stopped",
            State::Dead => "dead",
        })
    }
}

/// UML's `uml_dir`: `$UMLCTL_UML_DIR`, else `~/.uml`, else
/// `/tmp/umlctl-<uid>/uml` when there is no usable home.
pub fn uml_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("UMLCTL_UML_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        paths::ensure_dir(&d)?;
        return Ok(d);
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let d = PathBuf::from(h).join(".uml");
        if paths::ensure_dir(&d).is_ok() {
            return Ok(d);
        }
    }
    let d = PathBuf::from(format!("/tmp/umlctl-{}/uml", nix::unistd::getuid()));
    paths::ensure_dir(&d)?;
    Ok(d)
}

/// Check a guest name: it becomes UML's umid and a directory name.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['.', '-'])
        && !name.ends_with(".umlctl");
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "invalid guest name {name:?}: use 1 to 48 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )))
    }
}

/// Where a guest's files are.
#[derive(Debug, Clone)]
pub struct Layout {
    /// UML's instance directory.
    pub uml_instance: PathBuf,
    /// umlctl's directory for the guest.
    pub state: PathBuf,
}

impl Layout {
    pub fn new(uml_dir: &Path, name: &str) -> Layout {
        Layout {
            uml_instance: uml_dir.join(name),
            state: uml_dir.join(format!("{name}.umlctl")),
        }
    }
    pub fn record(&self) -> PathBuf {
        self.state.join("guest.json")
    }
    pub fn console_log(&self) -> PathBuf {
        self.state.join("console.log")
    }
    pub fn console_in(&self) -> PathBuf {
        self.state.join("console.in")
    }
    /// Exec slot `i`: the FIFO UML reads (host to guest), the one it writes
    /// (guest to host), and the lock an `exec` holds while it uses them.
    pub fn exec_in(&self, i: u32) -> PathBuf {
        self.state.join(format!("exec{i}.in"))
    }
    pub fn exec_out(&self, i: u32) -> PathBuf {
        self.state.join(format!("exec{i}.out"))
    }
    pub fn exec_lock(&self, i: u32) -> PathBuf {
        self.state.join(format!("exec{i}.lock"))
    }
    /// Slot `i`'s stdin ring (see [`crate::execproto::ring`]).
    pub fn exec_ring(&self, i: u32) -> PathBuf {
        self.state.join(format!("exec{i}.ring"))
    }
    pub fn mconsole(&self) -> PathBuf {
        self.uml_instance.join("mconsole")
    }
    pub fn notify(&self) -> PathBuf {
        self.state.join("notify.sock")
    }
    /// The directory UML makes its instance directory in (`uml_dir=`);
    /// `uml_instance` is a symlink to `<this>/<name>`.
    pub fn uml_parent(&self) -> PathBuf {
        self.state.join("uml")
    }
}

/// A registered guest.
#[derive(Debug, Clone)]
pub struct Guest {
    pub record: Record,
    pub layout: Layout,
}

/// Start time of a live, non-zombie process.
pub fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    f.nth(18)?.parse().ok()
}

impl Guest {
    /// The guest's state now.
    pub fn state(&self) -> State {
        if process_start(self.record.pid) == Some(self.record.pid_start) {
            State::Running
        } else if self.layout.uml_instance.exists() {
            State::Dead
        } else {
            State::Stopped
        }
    }

    /// Seconds since the guest started.
    pub fn uptime(&self) -> u64 {
        now().saturating_sub(self.record.started)
    }

    /// After a stop: UML's instance directory (its sockets and pid file)
    /// goes; umlctl's record and console log stay for `logs` and `ps
    /// --all` until `gc`, with how the guest ended.
    pub fn retire(&mut self, ended: &str) -> Result<()> {
        self.clear_instance()?;
        self.record.ended = Some(ended.to_string());
        save(&self.layout, &self.record)
    }

    /// Remove everything the guest left: helper processes that outlived a
    /// killed UML, umlctl's directory (record, logs, throwaway overlay) and
    /// UML's instance directory.
    pub fn remove(&self) -> Result<()> {
        self.clear_instance()?;
        crate::cgroup::Cgroup {
            dirs: self.record.cgroup.clone(),
        }
        .remove();
        remove_dir(&self.layout.state)
    }

    /// A guest that is not running: whatever of it still runs (the jail,
    /// helpers that outlived UML) is killed and UML's instance directory
    /// removed.
    fn clear_instance(&self) -> Result<()> {
        if self.state() == State::Running {
            return Err(Error::GuestRunning {
                name: self.record.name.clone(),
            });
        }
        self.kill_jail();
        self.kill_leftovers();
        remove_dir(&self.layout.uml_instance)
    }

    /// SIGKILL the guest's jail (its PID 1, and with it everything in the
    /// jail), if it is still the process the record names.
    pub fn kill_jail(&self) {
        if let (Some(p), Some(start)) = (self.record.jail_pid, self.record.jail_pid_start) {
            if process_start(p) == Some(start) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// SIGKILL processes of this guest's UML that are still around: members
    /// of its process group whose command line names its umid (so a reused
    /// process group id is never hit).
    pub fn kill_leftovers(&self) {
        let needle = format!("umid={}", self.record.name);
        let Ok(procs) = fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let pgid = fs::read_to_string(p.path().join("stat"))
                .ok()
                .and_then(|s| {
                    let rest = s[s.rfind(')')? + 1..].to_string();
                    rest.split_whitespace().nth(2)?.parse::<i32>().ok()
                });
            if pgid != Some(self.record.pid) {
                continue;
            }
            let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.split(' ').any(|w| w == needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn remove_dir(d: &Path) -> Result<()> {
    match fs::remove_dir_all(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", d, e)),
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Load one guest by name.
pub fn load(name: &str) -> Result<Guest> {
    check_name(name)?;
    let layout = Layout::new(&uml_dir()?, name);
    let data = match fs::read(layout.record()) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoSuchGuest {
                name: name.to_string(),
            })
        }
        Err(e) => return Err(Error::io("read", layout.record(), e)),
    };
    let record: Record = serde_json::from_slice(&data).map_err(|e| Error::Host {
        check: "guest registry",
        detail: format!("{} is damaged: {e}", layout.record().display()),
        fix: format!(
            "remove {} (the guest can no longer be managed by umlctl)",
            layout.state.display()
        ),
    })?;
    Ok(Guest { record, layout })
}

/// Every registered guest, by name.
pub fn list() -> Result<Vec<Guest>> {
    let dir = uml_dir()?;
    let mut out = Vec::new();
    let entries = fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(name) = n.strip_suffix(".umlctl") {
            if let Ok(g) = load(name) {
                out.push(g);
            }
        }
    }
    out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    Ok(out)
}

/// Save a record (atomically).
pub fn save(layout: &Layout, record: &Record) -> Result<()> {
    let json = serde_json::to_vec_pretty(record)
        .map_err(|e| Error::sys("encode guest record", std::io::Error::other(e)))?;
    paths::write_atomic(&layout.record(), &json, 0o600)
}

/// A guest directory (`NAME.umlctl`) whose record cannot be read: damaged,
/// or never written (a `start` that died before saving it).
#[derive(Debug, Clone)]
pub struct Damaged {
    pub name: String,
    pub layout: Layout,
    /// Why the record cannot be read.
    pub why: String,
    /// UML's own pid file says this process is alive: leave it alone.
    pub running: Option<i32>,
    /// No record yet and changed within the last minute: maybe a `start`
    /// under way.
    pub fresh: bool,
}

impl Damaged {
    /// Whether `gc` may remove it.
    pub fn collectable(&self) -> bool {
        self.running.is_none() && !self.fresh
    }

    /// Remove umlctl's and UML's directories for it (UML's instance
    /// directory is a symlink into umlctl's).
    pub fn remove(&self) -> Result<()> {
        if let Ok(md) = fs::symlink_metadata(&self.layout.uml_instance) {
            if md.file_type().is_symlink() {
                fs::remove_file(&self.layout.uml_instance)
                    .map_err(|e| Error::io("remove", &self.layout.uml_instance, e))?;
            }
        }
        remove_dir(&self.layout.state)
    }
}

/// Guest directories whose record cannot be read (`list` leaves them out).
pub fn damaged() -> Result<Vec<Damaged>> {
    let dir = uml_dir()?;
    let mut out = Vec::new();
    let entries = fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(name) = n.strip_suffix(".umlctl") else {
            continue;
        };
        if check_name(name).is_err() || !e.path().is_dir() {
            continue;
        }
        let why = match load(name) {
            Ok(_) => continue,
            Err(Error::NoSuchGuest { .. }) => {
                "no record (a start that did not finish?)".to_string()
            }
            Err(Error::Host { detail, .. }) => detail,
            Err(e) => e.to_string(),
        };
        let layout = Layout::new(&dir, name);
        let running = fs::read_to_string(layout.uml_parent().join(name).join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|&p| p > 0 && process_start(p).is_some());
        let fresh = !layout.record().exists()
            && fs::metadata(&layout.state)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() < 60);
        out.push(Damaged {
            name: name.to_string(),
            layout,
            why,
            running,
            fresh,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// UML instance directories under `uml_dir` that no umlctl guest owns and
/// whose UML process is gone (left by a panic or SIGKILL of any UML).
pub fn orphaned_uml_dirs() -> Result<Vec<PathBuf>> {
    let dir = uml_dir()?;
    let mut out = Vec::new();
    let entries = fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".umlctl") || !e.path().is_dir() {
            continue;
        }
        if dir.join(format!("{n}.umlctl")).exists() {
            continue; // a guest of ours: handled through its record
        }
        let pid: Option<i32> = fs::read_to_string(e.path().join("pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        // Alive (as UML itself decides: kill(pid, 0) succeeds) → in use.
        let alive = pid.is_some_and(|p| p > 0 && process_start(p).is_some());
        // Only what UML itself puts there: a directory holding anything
        // else is someone's, whatever its pid file says.
        let only_uml = fs::read_dir(e.path()).is_ok_and(|d| {
            d.flatten()
                .all(|f| matches!(f.file_name().to_str(), Some("pid" | "mconsole")))
        });
        if !alive
            && only_uml
            && (e.path().join("mconsole").exists() || e.path().join("pid").exists())
        {
            out.push(e.path());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "guest-1", "x.y_z", &"n".repeat(48)] {
            check_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "ä",
            "x.umlctl",
            &"n".repeat(49),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_process_is_running_and_a_dead_pid_is_not() {
        let me = std::process::id() as i32;
        assert!(process_start(me).is_some());
        assert_eq!(process_start(i32::MAX), None);
    }
}
