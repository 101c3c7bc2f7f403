//! Running a lab: every device a detached UML guest (`umlctl start`'s
//! machinery) on its own throwaway overlay over its image, with its
//! `DEVICE/` tree layered in by umlctl's init, its interfaces `eth0`, `eth1`,
//! … on taps in bridges (one per collision domain) inside the lab's own
//! network namespace ([`ns`]), `shared/` at `/shared`, and its startup
//! scripts run in `lab.dep` order with their output kept per device.
//!
//! What a running lab is, is on disk: `<uml_dir>/labs/<id>/lab.json` (the
//! lab directory, its namespace, its devices' guest names) beside the
//! startup logs; the guests are ordinary detached guests named
//! `DEVICE.<id>`. No umlctl process stays behind.

mod external;
mod ns;
mod segment;
mod uplink;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use umlctl_kernel::detached::{self, StartSpec};
use umlctl_kernel::instance::{self, Guest, State};
use umlctl_kernel::reclaim::Reclaimed;

use crate::Lab;
pub use external::ExtLink;

/// What lab.ext needs of this host before anything is made: root, and the
/// host interfaces it names (`lab start --dry-run` checks it too).
pub fn check_external(lab: &Lab, netd_socket: Option<&Path>) -> Result<(), String> {
    external::check(lab, netd_socket)
}

/// How `lab start` starts the devices.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The image of devices whose `image` option is not in `image_for`
    /// (and of devices without one).
    pub image: Option<PathBuf>,
    /// `DEVICE[image]="NAME"` resolved: NAME → image file.
    pub image_for: BTreeMap<String, PathBuf>,
    /// The kernel (default: umlctl's default kernel).
    pub kernel: Option<PathBuf>,
    /// Memory of devices without a `mem` option.
    pub mem_bytes: Option<u64>,
    /// How UML is confined.
    pub jail: umlctl_kernel::run::JailOpts,
    /// How long a device's kernel may take to start its init.
    pub boot_timeout: Option<Duration>,
    /// How long all startup scripts of one wave may take.
    pub startup_timeout: Option<Duration>,
    /// Once every startup script has finished, give the host back the
    /// memory the devices hold but do not use (see
    /// [`umlctl_kernel::reclaim`]).
    pub reclaim: bool,
    /// netd's socket, for lab.ext's bridges when not root (default:
    /// `$UMLCTL_NETD_SOCKET`, else netd's).
    pub netd_socket: Option<PathBuf>,
}

/// What is recorded about one running device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// The device's name in the lab.
    pub name: String,
    /// Its detached guest's name.
    pub guest: String,
    /// `(interface, collision domain, MAC)`.
    pub interfaces: Vec<(String, String, String)>,
    /// The exit status of its startup scripts (`None`: not run, or still running).
    pub startup_status: Option<i32>,
    /// The image it boots.
    #[serde(default)]
    pub image: PathBuf,
}

/// What is recorded about a running lab.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LabState {
    /// The lab directory (canonical).
    pub dir: PathBuf,
    /// Its id: the first hex digits of the directory's SHA-256.
    pub id: String,
    /// The lab's network namespace (its inode number).
    pub netns: u64,
    /// Collision domain → bridge in that namespace (lab.ext's domains:
    /// their bridge in the host's, see `external`).
    pub bridges: BTreeMap<String, String>,
    /// The devices, in start order.
    pub devices: Vec<DeviceState>,
    /// Seconds since the epoch.
    pub started: u64,
    /// How the devices were started (`lab restart` starts one the same way).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// The memory of devices without a `mem` option.
    #[serde(default)]
    pub mem_bytes: Option<u64>,
    /// `--no-jail`.
    #[serde(default)]
    pub no_jail: bool,
    /// `--jail-uid`.
    #[serde(default)]
    pub jail_uid: Option<u32>,
    /// `--cpu-quota` of each device.
    #[serde(default)]
    pub cpu_quota: Option<u32>,
    /// `--memory-max` of each device.
    #[serde(default)]
    pub memory_max: Option<u64>,
    /// `lab.ext`'s links, made in the host's network namespace.
    #[serde(default)]
    pub external: Vec<ExtLink>,
    /// That namespace (its inode number), when there are such links.
    #[serde(default)]
    pub host_netns: u64,
    /// netd's socket, when lab.ext's taps come from netd.
    #[serde(default)]
    pub netd_socket: Option<PathBuf>,
}

/// The id of the lab in `dir` (canonical): stable, short, one per directory.
pub fn lab_id(dir: &Path) -> String {
    let h = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    h.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Where a lab's state lives.
pub fn state_dir(id: &str) -> Result<PathBuf, String> {
    let d = instance::uml_dir()
        .map_err(|e| e.to_string())?
        .join("labs")
        .join(id);
    Ok(d)
}

fn canonical(dir: &Path) -> Result<PathBuf, String> {
    fs::canonicalize(dir).map_err(|e| format!("lab directory {}: {e}", dir.display()))
}

/// The recorded state of the lab in `dir`, if it was started.
pub fn load_state(dir: &Path) -> Result<Option<LabState>, String> {
    let dir = canonical(dir)?;
    let p = state_dir(&lab_id(&dir))?.join("lab.json");
    match fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            format!(
                "{}: {e} (remove it with `umlctl lab stop --force`)",
                p.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("read {}: {e}", p.display())),
    }
}

fn save_state(s: &LabState) -> Result<(), String> {
    let d = state_dir(&s.id)?;
    let tmp = d.join(".lab.json.tmp");
    let text = serde_json::to_vec_pretty(s).map_err(|e| e.to_string())?;
    fs::write(&tmp, text).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, d.join("lab.json")).map_err(|e| format!("write {}: {e}", d.display()))
}

/// The device's guest, if it has a record.
pub fn guest(d: &DeviceState) -> Option<Guest> {
    instance::load(&d.guest).ok()
}

/// The log of a device's startup scripts.
pub fn startup_log(s: &LabState, device: &str) -> Result<PathBuf, String> {
    Ok(state_dir(&s.id)?.join(format!("{device}.startup.log")))
}

/// The recorded state of the started lab in `dir`, or an error saying how
/// to start it.
fn running_state(dir: &Path) -> Result<LabState, String> {
    load_state(dir)?.ok_or_else(|| {
        format!(
            "the lab in {} is not running (start it with `umlctl lab start -d {}`)",
            dir.display(),
            dir.display()
        )
    })
}

/// `umlctl exec [-i] GUEST -- ARGS…` as a child of this process (umlctl's
/// own binary): how the lab reaches into its devices.
fn exec_in(guest: &str, stdin: bool, args: &[&str]) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("find umlctl's own binary: {e}"))?;
    let mut c = Command::new(exe);
    c.arg("exec");
    if stdin {
        c.arg("-i");
    }
    c.args([guest, "--"]).args(args);
    Ok(c)
}

/// The guest name of `device` in a running lab, or an error naming the
/// devices there are.
pub fn device_guest(dir: &Path, device: &str) -> Result<String, String> {
    let s = running_state(dir)?;
    s.devices
        .iter()
        .find(|d| d.name == device)
        .map(|d| d.guest.clone())
        .ok_or_else(|| {
            let names: Vec<&str> = s.devices.iter().map(|d| d.name.as_str()).collect();
            format!(
                "the lab has no device {device:?} (its devices: {})",
                names.join(", ")
            )
        })
}

/// One device's startup that failed: its name, status and output's tail.
#[derive(Debug, Clone)]
pub struct Failed {
    /// The device.
    pub device: String,
    /// How its startup ended.
    pub why: String,
    /// The last lines of its output.
    pub tail: String,
}

/// What `lab start` did.
#[derive(Debug)]
pub struct Started {
    /// The lab's state as recorded.
    pub state: LabState,
    /// Devices whose startup scripts failed.
    pub failed: Vec<Failed>,
    /// How long it took (up to the last startup script's end).
    pub elapsed: Duration,
    /// What reclaiming the devices' memory did, device by device (empty
    /// when not asked for).
    pub reclaimed: Vec<DeviceReclaim>,
}

fn image_of(lab_dev: &crate::Device, o: &StartOptions) -> Result<PathBuf, String> {
    match &lab_dev.options.image {
        Some(name) => o
            .image_for
            .get(name)
            .cloned()
            .or_else(|| o.image.clone())
            .ok_or_else(|| {
                format!(
                    "device {} wants image {name:?}: give it with --image-for {name}=FILE.ext4 (or --image FILE.ext4 for every device)",
                    lab_dev.name
                )
            }),
        None => o.image.clone().ok_or_else(|| {
            format!(
                "device {} has no image: give --image FILE.ext4 (an ext4 root, e.g. from `umlctl image build`)",
                lab_dev.name
            )
        }),
    }
}

/// Escape `s` for a single-quoted shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script that runs a device's startup (or shutdown) in the guest:
/// waits for systemd to finish booting when it is the init (startup scripts
/// start services), applies the device's sysctls and environment, then runs
/// `shared.X` and `DEVICE.X` (bash when the image has it, as Kathará does).
fn runner(d: &crate::Device, what: &str) -> String {
    let dir = umlctl_kernel::init::lab::SCRIPTS;
    let mut s = format!(
        "# written by umlctl lab start: runs this device's {what} scripts\n\
         cd /\n\
         [ -d /proc/sys ] || mount -t proc proc /proc\n"
    );
    if what == "startup" {
        s.push_str(
            "case \"$(readlink /proc/1/exe 2>/dev/null)\" in\n\
             */systemd)\n  \
             i=0; while [ ! -S /run/systemd/private ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n  \
             timeout 300 systemctl is-system-running --wait >/dev/null 2>&1;;\n\
             esac\n",
        );
        // Kathará's defaults for every device: a router forwards, no
        // reverse-path filter, no ICMP rate limit; IPv6 off unless
        // DEVICE[ipv6] asks for it. Then the device's own sysctls.
        let mut sysctls: Vec<String> = [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.lo.rp_filter=0",
            "net.ipv4.icmp_ratelimit=0",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        if d.options.ipv6 == Some(true) {
            sysctls.push("net.ipv6.conf.all.forwarding=1".into());
        } else {
            sysctls.push("net.ipv6.conf.all.disable_ipv6=1".into());
            sysctls.push("net.ipv6.conf.default.disable_ipv6=1".into());
        }
        // The defaults quietly skip what the kernel lacks (IPv6 in
        // Debian's linux.uml); the device's own say when they fail.
        let defaults = sysctls.len();
        sysctls.extend(d.options.sysctl.iter().cloned());
        for (i, kv) in sysctls.iter().enumerate() {
            if let Some((k, v)) = kv.split_once('=') {
                let path = sh_quote(&format!("/proc/sys/{}", k.trim().replace('.', "/")));
                let set = format!("echo {} > {path}", sh_quote(v.trim()));
                if i < defaults {
                    s.push_str(&format!("[ -e {path} ] && {set} 2>/dev/null\n"));
                } else {
                    s.push_str(&format!(
                        "{set} || echo 'umlctl: sysctl {} failed' >&2\n",
                        sh_quote(k.trim())
                    ));
                }
            }
        }
    }
    for kv in &d.options.env {
        if let Some((k, v)) = kv.split_once('=') {
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                s.push_str(&format!("export {k}={}\n", sh_quote(v)));
            }
        }
    }
    s.push_str(&format!(
        "run() {{ if command -v bash >/dev/null 2>&1; then bash \"$1\"; else sh \"$1\"; fi; }}\n\
         st=0\n\
         if [ -f {dir}/shared.{what} ]; then run {dir}/shared.{what} || st=$?; fi\n\
         if [ -f {dir}/device.{what} ]; then run {dir}/device.{what} || st=$?; fi\n"
    ));
    // DEVICE[exec]: a command started after the startup scripts, left
    // running (its output goes to the startup log until it closes it).
    if let (Some(cmd), "startup") = (&d.options.exec, what) {
        s.push_str(&format!(
            "( trap '' HUP; exec sh -c {} ) < /dev/null > /dev/null 2>&1 &\n",
            sh_quote(cmd)
        ));
    }
    s.push_str("exit $st\n");
    s
}

/// A script of the lab directory (someone else's files, which go into a
/// device that may be on a network): a regular file, read; `None` if there
/// is none. A symlink is refused — `r1.startup -> ~/.ssh/id_rsa` must not
/// carry a host file into a guest.
fn lab_file(p: &Path) -> Result<Option<Vec<u8>>, String> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
        Ok(m) if m.file_type().is_file() => fs::read(p)
            .map(Some)
            .map_err(|e| format!("read {}: {e}", p.display())),
        Ok(_) => Err(format!(
            "{} is not a regular file (a symlink or a special file): a lab's scripts must be files of the lab directory",
            p.display()
        )),
    }
}

/// Build the layer disk of device `d`: its scripts (under
/// [`umlctl_kernel::init::lab::LAYER_SCRIPTS`]) and its `DEVICE/` tree, all
/// owned by root in the guest.
fn build_layer(lab: &Lab, d: &crate::Device, state: &Path) -> Result<PathBuf, String> {
    let stage = state.join(format!("{}.stage", d.name));
    let _ = fs::remove_dir_all(&stage);
    let scripts = stage.join(umlctl_kernel::init::lab::LAYER_SCRIPTS);
    fs::create_dir_all(&scripts).map_err(|e| format!("create {}: {e}", scripts.display()))?;
    let copy = |from: PathBuf, to: &str| -> Result<(), String> {
        match lab_file(&from)? {
            Some(text) => fs::write(scripts.join(to), text)
                .map_err(|e| format!("copy {}: {e}", from.display())),
            None => Ok(()),
        }
    };
    copy(lab.dir.join("shared.startup"), "shared.startup")?;
    copy(lab.dir.join("shared.shutdown"), "shared.shutdown")?;
    copy(
        lab.dir.join(format!("{}.startup", d.name)),
        "device.startup",
    )?;
    copy(
        lab.dir.join(format!("{}.shutdown", d.name)),
        "device.shutdown",
    )?;
    for what in ["startup", "shutdown"] {
        let p = scripts.join(format!("run-{what}"));
        fs::write(&p, runner(d, what)).map_err(|e| format!("write {}: {e}", p.display()))?;
    }
    let mut sources = Vec::new();
    if d.tree {
        sources.push(lab.dir.join(&d.name));
    }
    sources.push(stage.clone());
    let out = state.join(format!("{}.layer.ext4", d.name));
    let opts = umlctl_imgtools::build::BuildOptions {
        dir_owner: Some((0, 0)),
        ..Default::default()
    };
    let np = umlctl_imgtools::progress::NoProgress;
    let r = umlctl_imgtools::build::build(&sources, &out, &opts, &np, &np)
        .map(drop)
        .map_err(|e| format!("device {}: build its layer from {}/: {e}", d.name, d.name));
    let _ = fs::remove_dir_all(&stage);
    r.map(|()| out)
}

/// The most of a device's script output a log keeps (a hostile guest
/// could otherwise fill the host's disk); the rest is read and dropped.
const LOG_MAX: u64 = 64 << 20;

/// Run `script` (in the guest's scripts directory) in `guest`, its output
/// (stdout and stderr, at most [`LOG_MAX`]) appended to `log`; returns the
/// script to wait for.
fn spawn_script(guest: &str, script: &str, log: &Path) -> Result<Script, String> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    let path = format!("{}/{script}", umlctl_kernel::init::lab::SCRIPTS);
    let mut child = exec_in(guest, false, &["/bin/sh", &path])?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run {script} in {guest}: {e}"))?;
    let file = Arc::new(std::sync::Mutex::new((file, 0u64)));
    let streams: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    let mut copiers = Vec::new();
    for mut s in streams.into_iter().flatten() {
        let file = Arc::clone(&file);
        copiers.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut g) = file.lock() {
                    let room = usize::try_from(LOG_MAX.saturating_sub(g.1)).unwrap_or(usize::MAX);
                    let take = n.min(room);
                    if take > 0 {
                        let _ = std::io::Write::write_all(&mut g.0, &buf[..take]);
                        g.1 += take as u64;
                    }
                }
            }
        }));
    }
    Ok(Script { child, copiers })
}

/// A device's script running, its output being copied to its log.
struct Script {
    child: std::process::Child,
    copiers: Vec<std::thread::JoinHandle<()>>,
}

impl Script {
    /// Wait until `deadline` (then kill it), and until its output is all
    /// in the log.
    fn wait(mut self, deadline: Instant) -> Option<std::process::ExitStatus> {
        let st = wait_until(&mut self.child, deadline);
        for c in self.copiers {
            let _ = c.join();
        }
        st
    }
}

/// Wait for `child` until `deadline`; kill it after.
fn wait_until(
    child: &mut std::process::Child,
    deadline: Instant,
) -> Option<std::process::ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if Instant::now() < deadline && !interrupted() => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn tail_of(p: &Path, n: usize) -> String {
    detached::tail(p, n)
}

/// Start the lab: see the module's description. Must be called from a
/// single-threaded process (the lab's namespaces are entered here); on
/// failure, whatever was started is stopped again.
pub fn start(lab: &Lab, o: &StartOptions) -> Result<Started, String> {
    let t0 = Instant::now();
    let dir = canonical(&lab.dir)?;
    let id = lab_id(&dir);
    if let Some(s) = load_state(&dir)? {
        let running: Vec<&str> = s
            .devices
            .iter()
            .filter(|d| guest(d).is_some_and(|g| g.state() == State::Running))
            .map(|d| d.name.as_str())
            .collect();
        if !running.is_empty() {
            return Err(format!(
                "the lab in {} is already running (devices {}); `umlctl lab stop -d {}` first",
                dir.display(),
                running.join(", "),
                dir.display()
            ));
        }
        // A lab whose devices all died: clear what they left.
        let swept = stop_state(&s, Duration::from_secs(1))?;
        if let Some(x) = swept.iter().find(|x| x.device == "lab.ext") {
            return Err(format!(
                "the lab's last run left its lab.ext links behind: {}",
                x.how
            ));
        }
    }
    let mut images = BTreeMap::new();
    for d in &lab.devices {
        let img = image_of(d, o)?;
        if !img.is_file() {
            return Err(format!(
                "device {}: image {} is not a file",
                d.name,
                img.display()
            ));
        }
        images.insert(d.name.clone(), img);
    }
    external::check(lab, o.netd_socket.as_deref())?;
    let root = nix::unistd::geteuid().is_root();
    let host_netns = ns::current_netns()?;
    let host_ns = if lab.externals.is_empty() || !root {
        None
    } else {
        Some(external::current()?)
    };
    let state_path = state_dir(&id)?;
    let _ = fs::remove_dir_all(&state_path);
    fs::create_dir_all(&state_path).map_err(|e| format!("create {}: {e}", state_path.display()))?;

    // bridged devices: their user-mode network stacks start in the host's
    // network namespace, aimed at the lab's while it is being made.
    let mut uplinks: BTreeMap<String, uplink::Uplink> = BTreeMap::new();
    // lab.ext's domains: bridges (and the taps on them) in the host's.
    let mut ext_links: Vec<ExtLink> = Vec::new();
    let mut ext_taps: BTreeMap<(usize, usize), OwnedFd> = BTreeMap::new();
    // Without root, lab.ext's taps come from netd: one connection per
    // device, which its UML keeps (the taps live as long as it).
    let mut netd_keep: BTreeMap<String, Arc<OwnedFd>> = BTreeMap::new();
    ns::create(&mut |pid| {
        if !lab.externals.is_empty() && !root {
            ext_links = external::netd_links(lab);
            for (di, d) in lab.devices.iter().enumerate() {
                let wanted: Vec<(usize, String)> = d
                    .interfaces
                    .iter()
                    .enumerate()
                    .filter_map(|(ii, iface)| {
                        ext_links
                            .iter()
                            .find(|l| l.domain == iface.domain)
                            .map(|l| (ii, l.bridge.clone()))
                    })
                    .collect();
                if wanted.is_empty() {
                    continue;
                }
                let (conn, fds) = external::netd_taps(
                    o.netd_socket.as_deref(),
                    &format!("{id}/{}", d.name),
                    &wanted,
                )
                .map_err(|e| format!("device {}: {e}", d.name))?;
                netd_keep.insert(d.name.clone(), Arc::new(conn));
                for (ii, fd) in fds {
                    ext_taps.insert((di, ii), fd);
                }
            }
        } else if !lab.externals.is_empty() {
            ext_links = external::make(lab, &id)?;
            let made = (|| {
                for (di, d) in lab.devices.iter().enumerate() {
                    for (ii, iface) in d.interfaces.iter().enumerate() {
                        if let Some(l) = ext_links.iter().find(|l| l.domain == iface.domain) {
                            let fd = segment::tap(&external::tap_name(&id, di, ii), &l.bridge)
                                .map_err(|e| format!("device {} {}: {e}", d.name, iface.name))?;
                            ext_taps.insert((di, ii), fd);
                        }
                    }
                }
                Ok::<(), String>(())
            })();
            if let Err(e) = made {
                ext_taps.clear();
                external::remove(&ext_links);
                return Err(e);
            }
        }
        for (di, d) in lab.devices.iter().enumerate() {
            if needs_uplink(d) {
                let api = state_path.join(format!("{}.slirp", d.name));
                let u = uplink::spawn(pid, &format!("s{di}"), &api)
                    .map_err(|e| format!("device {} (bridged): {e}", d.name))?;
                for p in &d.options.ports {
                    uplink::forward(&api, p).map_err(|e| format!("device {}: {e}", d.name))?;
                }
                uplinks.insert(d.name.clone(), u);
            }
        }
        Ok(())
    })?;
    let mut state = LabState {
        dir: dir.clone(),
        id: id.clone(),
        netns: ns::current_netns()?,
        bridges: BTreeMap::new(),
        devices: Vec::new(),
        started: instance::now(),
        kernel: o.kernel.clone(),
        mem_bytes: o.mem_bytes,
        no_jail: !o.jail.enabled,
        jail_uid: o.jail.uid,
        cpu_quota: o.jail.limits.cpu_percent,
        memory_max: o.jail.limits.memory_max,
        host_netns: if ext_links.iter().any(ExtLink::made_anything) {
            host_netns
        } else {
            0
        },
        external: ext_links,
        netd_socket: o.netd_socket.clone(),
    };
    let mut guard = StartGuard(Some(state.clone()), host_ns);
    catch_interrupts();
    for l in &state.external {
        state.bridges.insert(l.domain.clone(), l.bridge.clone());
    }
    for (i, dom) in lab.domains.iter().enumerate() {
        if state.bridges.contains_key(&dom.name) {
            continue;
        }
        let b = format!("cd{i}");
        segment::bridge(&b).map_err(|e| format!("collision domain {}: {e}", dom.name))?;
        state.bridges.insert(dom.name.clone(), b);
    }
    // Every device's taps, made now (the namespace's only owner is this
    // process until the guests hold them).
    let mut taps: BTreeMap<String, Vec<(Arc<OwnedFd>, String)>> = BTreeMap::new();
    for (di, d) in lab.devices.iter().enumerate() {
        let mut v = Vec::new();
        let mut ifs = Vec::new();
        for (ii, iface) in d.interfaces.iter().enumerate() {
            let bridge = state
                .bridges
                .get(&iface.domain)
                .ok_or_else(|| format!("internal: no bridge for {}", iface.domain))?;
            let fd = match ext_taps.remove(&(di, ii)) {
                Some(fd) => fd,
                None => segment::tap(&format!("t{di}.{ii}"), bridge)
                    .map_err(|e| format!("device {} {}: {e}", d.name, iface.name))?,
            };
            v.push((Arc::new(fd), iface.mac.clone()));
            ifs.push((iface.name.clone(), iface.domain.clone(), iface.mac.clone()));
        }
        if let Some(u) = uplinks.get(&d.name) {
            // The bridged interface: after the lab's, on a bridge of its own
            // with slirp4netns's tap.
            let b = format!("xb{di}");
            segment::bridge(&b).map_err(|e| format!("device {} (bridged): {e}", d.name))?;
            segment::attach(&u.tap, &b).map_err(|e| format!("device {} (bridged): {e}", d.name))?;
            let k = d.interfaces.len();
            let fd = segment::tap(&format!("t{di}.{k}"), &b)
                .map_err(|e| format!("device {} (bridged): {e}", d.name))?;
            let index = u32::try_from(k).unwrap_or(u32::MAX);
            let mac = crate::plan::mac_text(crate::plan::stable_mac(
                &format!("{}/bridged", d.name),
                index,
            ));
            v.push((Arc::new(fd), mac.clone()));
            ifs.push((format!("eth{k}"), "(bridged)".into(), mac));
        }
        taps.insert(d.name.clone(), v);
        state.devices.push(DeviceState {
            name: d.name.clone(),
            guest: format!("{}.{id}", d.name),
            interfaces: ifs,
            startup_status: None,
            image: images[d.name.as_str()].clone(),
        });
    }
    save_state(&state)?;
    guard.0 = Some(state.clone());

    let mut failed = Vec::new();
    let by_name: BTreeMap<&str, &crate::Device> =
        lab.devices.iter().map(|d| (d.name.as_str(), d)).collect();
    for wave in &lab.waves {
        // Boot the wave's devices side by side.
        let mut boots = Vec::new();
        for name in wave {
            let d = by_name
                .get(name.as_str())
                .ok_or_else(|| format!("internal: no device {name}"))?;
            let mut spec = device_spec(
                lab,
                d,
                &id,
                images[name.as_str()].clone(),
                o,
                &state_path,
                taps.remove(name.as_str()).unwrap_or_default(),
            )?;
            if let Some(k) = netd_keep.remove(name.as_str()) {
                spec.keep.push(k);
            }
            if let Some(u) = uplinks.remove(name.as_str()) {
                let k = d.interfaces.len();
                spec.ifnames.push(format!("eth{k}"));
                spec.addresses.push(umlctl_kernel::protocol::NicSpec {
                    device: format!("eth{k}"),
                    address: uplink::GUEST,
                    prefix: 24,
                    gateway: uplink::GATEWAY,
                    mtu: 1500,
                    dns: vec![uplink::DNS],
                });
                spec.keep.push(u.keep);
            }
            boots.push((
                name.clone(),
                std::thread::spawn(move || detached::start(&spec)),
            ));
        }
        let mut boot_err = None;
        for (name, h) in boots {
            match h.join() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    boot_err.get_or_insert(format!("device {name}: {e}"));
                }
                Err(_) => {
                    boot_err.get_or_insert(format!("device {name}: start panicked"));
                }
            }
        }
        if let Some(e) = boot_err {
            return Err(e);
        }
        check_interrupted()?;
        // Then their startup scripts, side by side, output to their logs.
        let mut running = Vec::new();
        for name in wave {
            let guest_name = format!("{name}.{id}");
            let g = instance::load(&guest_name).map_err(|e| e.to_string())?;
            detached::wait_ready(
                &g,
                &detached::Ready::Exec,
                o.boot_timeout.unwrap_or(Duration::from_secs(120)),
            )
            .map_err(|e| format!("device {name}: {e}"))?;
            let log = startup_log(&state, name)?;
            let script = spawn_script(&guest_name, "run-startup", &log)?;
            running.push((name.clone(), script, log));
        }
        let deadline = Instant::now() + o.startup_timeout.unwrap_or(Duration::from_secs(600));
        for (name, script, log) in running {
            let st = script.wait(deadline);
            let code = st.and_then(|s| s.code());
            if let Some(ds) = state.devices.iter_mut().find(|d| d.name == name) {
                ds.startup_status = code;
            }
            match code {
                Some(0) => {}
                Some(c) => failed.push(Failed {
                    device: name,
                    why: format!("startup exited with status {c}"),
                    tail: tail_of(&log, 10),
                }),
                None => failed.push(Failed {
                    device: name,
                    why: "startup did not finish in time (killed)".into(),
                    tail: tail_of(&log, 10),
                }),
            }
        }
        save_state(&state)?;
        check_interrupted()?;
    }
    guard.0 = None;
    let elapsed = t0.elapsed();
    let reclaimed = if o.reclaim {
        reclaim_state(&state, &[], false)?
    } else {
        Vec::new()
    };
    Ok(Started {
        state,
        failed,
        elapsed,
        reclaimed,
    })
}

/// One device's reclaim: its name, and what was done or why not.
pub type DeviceReclaim = (String, Result<Reclaimed, String>);

/// Give the host back the memory the running lab's devices (those named,
/// or all) hold but do not use; device by device, side by side.
pub fn reclaim(
    dir: &Path,
    devices: &[String],
    keep_cache: bool,
) -> Result<Vec<DeviceReclaim>, String> {
    reclaim_state(&running_state(dir)?, devices, keep_cache)
}

fn reclaim_state(
    s: &LabState,
    devices: &[String],
    keep_cache: bool,
) -> Result<Vec<DeviceReclaim>, String> {
    for n in devices {
        if !s.devices.iter().any(|d| &d.name == n) {
            return Err(format!("the lab has no device {n}"));
        }
    }
    let o = umlctl_kernel::reclaim::Options { keep_cache };
    let chosen: Vec<&DeviceState> = s
        .devices
        .iter()
        .filter(|d| devices.is_empty() || devices.contains(&d.name))
        .collect();
    Ok(std::thread::scope(|sc| {
        let hs: Vec<_> = chosen
            .iter()
            .map(|d| {
                let h = sc.spawn(move || match guest(d) {
                    Some(g) if g.state() == State::Running => {
                        umlctl_kernel::reclaim::reclaim(&g, &o).map_err(|e| e.to_string())
                    }
                    _ => Err(format!("device {} is not running", d.name)),
                });
                (d.name.clone(), h)
            })
            .collect();
        hs.into_iter()
            .map(|(n, h)| {
                (
                    n,
                    h.join().unwrap_or_else(|_| Err("reclaim panicked".into())),
                )
            })
            .collect()
    }))
}

/// Whether device `d` reaches the outside: `bridged`, or ports published
/// (which, as in Kathará, come through the same way).
fn needs_uplink(d: &crate::Device) -> bool {
    d.options.bridged || !d.options.ports.is_empty()
}

/// How device `d` of `lab` boots: its image, memory, CPUs, jail, taps
/// (with their MACs), interface names, layer disk and `shared/`.
fn device_spec(
    lab: &Lab,
    d: &crate::Device,
    id: &str,
    image: PathBuf,
    o: &StartOptions,
    state_path: &Path,
    taps: Vec<(Arc<OwnedFd>, String)>,
) -> Result<StartSpec, String> {
    let layer = build_layer(lab, d, state_path)?;
    let mut spec = StartSpec::new(image);
    spec.name = Some(format!("{}.{id}", d.name));
    spec.hostname = Some(d.name.clone());
    spec.kernel = o.kernel.clone();
    spec.mem_bytes = d
        .options
        .mem
        .or(o.mem_bytes)
        .unwrap_or(umlctl_kernel::run::DEFAULT_MEM);
    spec.cpus = d.options.cpus.unwrap_or(1);
    if spec.cpus > 1 {
        spec.userspace = umlctl_kernel::cmdline::Userspace::Seccomp;
    }
    spec.jail = o.jail;
    if let Some(t) = o.boot_timeout {
        spec.boot_timeout = t;
    }
    spec.taps = taps;
    spec.ifnames = d.interfaces.iter().map(|i| i.name.clone()).collect();
    spec.layer = Some(layer);
    spec.shared = lab
        .shared
        .then(|| canonical(&lab.dir))
        .transpose()?
        .map(|d| d.join("shared"));
    spec.lab = Some(canonical(&lab.dir)?.display().to_string());
    // A device gets no disks to build RAID6 arrays on: its kernel need not
    // time RAID6 at boot (most of a second on Debian's linux.uml).
    spec.skip_raid6_benchmark = true;
    Ok(spec)
}

/// `lab restart DEVICE`: stop the device (its shutdown scripts first) and
/// start it again, fresh from its image and the lab's current files, on
/// the same segments, then run its startup scripts. The lab's namespace is
/// reached through another running device, so at least one must run; a
/// `bridged` device cannot be restarted alone (its way out starts with the
/// lab). Must be called from a single-threaded process. Returns the
/// failure of its startup, if it failed.
pub fn restart(dir: &Path, device: &str, timeout: Duration) -> Result<Option<Failed>, String> {
    let mut s = running_state(dir)?;
    let lab = Lab::load(&s.dir).map_err(|e| format!("lab {}: {e}", s.dir.display()))?;
    let di = s
        .devices
        .iter()
        .position(|d| d.name == device)
        .ok_or_else(|| format!("the lab has no running device {device:?}"))?;
    let d = lab
        .devices
        .iter()
        .find(|d| d.name == device)
        .ok_or_else(|| {
            format!("lab.conf no longer has device {device:?}: restart the whole lab")
        })?;
    let now_ifs: Vec<(String, String)> = d
        .interfaces
        .iter()
        .map(|i| (i.name.clone(), i.domain.clone()))
        .collect();
    let was_ifs: Vec<(String, String)> = s.devices[di]
        .interfaces
        .iter()
        .filter(|(_, dom, _)| dom != "(bridged)")
        .map(|(n, dom, _)| (n.clone(), dom.clone()))
        .collect();
    if needs_uplink(d)
        || s.devices[di]
            .interfaces
            .iter()
            .any(|(_, dom, _)| dom == "(bridged)")
    {
        return Err(format!(
            "{device} is bridged (or publishes ports): its way out starts with the lab; restart the whole lab (lab stop, lab start)"
        ));
    }
    if now_ifs != was_ifs {
        return Err(format!(
            "lab.conf changed {device}'s interfaces since the lab started: restart the whole lab (lab stop, lab start)"
        ));
    }
    // lab.ext's taps are made in the host's network namespace (this one).
    let host_ns = if s.external.iter().any(|l| !l.via_netd) {
        Some(external::current()?)
    } else {
        None
    };
    // Into the lab's namespaces, through any running device (this one
    // too: this process then holds them while it restarts).
    enter(&s)?;
    // Stop it, shutdown scripts first.
    let dev = s.devices[di].clone();
    if let Some(g) = guest(&dev) {
        if g.state() == State::Running {
            let log = state_dir(&s.id)?.join(format!("{}.shutdown.log", dev.name));
            if let Ok(c) = spawn_script(&dev.guest, "run-shutdown", &log) {
                let _ = c.wait(Instant::now() + timeout);
            }
        }
        detached::stop(&g, timeout, false, true).map_err(|e| format!("stop {device}: {e}"))?;
    }
    let mut taps = Vec::new();
    // lab.ext's bridges of netd's: the taps come from netd again.
    let wanted: Vec<(usize, String)> = d
        .interfaces
        .iter()
        .enumerate()
        .filter_map(|(ii, iface)| {
            s.external
                .iter()
                .find(|l| l.via_netd && l.domain == iface.domain)
                .map(|l| (ii, l.bridge.clone()))
        })
        .collect();
    let mut netd_fds = BTreeMap::new();
    let mut netd_keep = None;
    if !wanted.is_empty() {
        let (conn, fds) = external::netd_taps(
            s.netd_socket.as_deref(),
            &format!("{}/{device}", s.id),
            &wanted,
        )?;
        netd_keep = Some(Arc::new(conn));
        netd_fds.extend(fds);
    }
    for (ii, iface) in d.interfaces.iter().enumerate() {
        let bridge = s
            .bridges
            .get(&iface.domain)
            .ok_or_else(|| format!("no segment {} in the running lab", iface.domain))?;
        if let Some(fd) = netd_fds.remove(&ii) {
            taps.push((Arc::new(fd), iface.mac.clone()));
            continue;
        }
        let fd = match &host_ns {
            Some(h) if s.external.iter().any(|l| l.domain == iface.domain) => {
                external::inside(h, || {
                    segment::tap(&external::tap_name(&s.id, di, ii), bridge)
                })
            }
            _ => segment::tap(&format!("t{di}.{ii}"), bridge),
        }
        .map_err(|e| format!("device {device} {}: {e}", iface.name))?;
        taps.push((Arc::new(fd), iface.mac.clone()));
    }
    let o = StartOptions {
        kernel: s.kernel.clone(),
        mem_bytes: s.mem_bytes,
        jail: umlctl_kernel::run::JailOpts {
            enabled: !s.no_jail,
            uid: s.jail_uid,
            limits: umlctl_kernel::cgroup::Limits {
                cpu_percent: s.cpu_quota,
                memory_max: s.memory_max,
            },
        },
        ..Default::default()
    };
    let state_path = state_dir(&s.id)?;
    let mut spec = device_spec(&lab, d, &s.id, dev.image.clone(), &o, &state_path, taps)?;
    spec.keep.extend(netd_keep);
    let g = detached::start(&spec).map_err(|e| format!("start {device}: {e}"))?;
    detached::wait_ready(&g, &detached::Ready::Exec, Duration::from_secs(120))
        .map_err(|e| format!("device {device}: {e}"))?;
    let log = startup_log(&s, device)?;
    let _ = fs::remove_file(&log);
    let script = spawn_script(&dev.guest, "run-startup", &log)?;
    let st = script.wait(Instant::now() + Duration::from_secs(600));
    let code = st.and_then(|x| x.code());
    s.devices[di].startup_status = code;
    save_state(&s)?;
    Ok(match code {
        Some(0) => None,
        Some(c) => Some(Failed {
            device: device.to_string(),
            why: format!("startup exited with status {c}"),
            tail: tail_of(&log, 10),
        }),
        None => Some(Failed {
            device: device.to_string(),
            why: "startup did not finish in time (killed)".into(),
            tail: tail_of(&log, 10),
        }),
    })
}

/// Set when `lab start` is asked to stop (Ctrl-C, SIGTERM, SIGHUP).
static INTERRUPTED: std::sync::OnceLock<Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

fn interrupted() -> bool {
    INTERRUPTED
        .get()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
}

/// From now on, Ctrl-C, SIGTERM and SIGHUP make `start` stop what it
/// started (at its next step) instead of leaving half a lab running.
fn catch_interrupts() {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(std::sync::atomic::AtomicBool::new(false)));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        let _ = signal_hook::flag::register(sig, Arc::clone(flag));
    }
}

fn check_interrupted() -> Result<(), String> {
    if interrupted() {
        Err("interrupted: the devices started so far were stopped again".into())
    } else {
        Ok(())
    }
}

/// Stops what a failed `start` started (with the host's network
/// namespace, where lab.ext's links are, when there are any).
struct StartGuard(Option<LabState>, Option<fs::File>);

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _ = stop_state_from(&s, Duration::from_secs(5), self.1.as_ref());
        }
    }
}

/// What `lab stop` did to one device.
#[derive(Debug)]
pub struct Stopped {
    /// The device.
    pub device: String,
    /// How it went (`shut down`, `killed`, `was not running`, or an error).
    pub how: String,
}

/// Stop the lab in `dir`: each running device's shutdown scripts, then a
/// graceful stop (forced after `timeout`), all devices side by side; then
/// its records, overlays, logs and state go. The lab's namespace, bridges
/// and taps go with its last device.
pub fn stop(dir: &Path, timeout: Duration) -> Result<Vec<Stopped>, String> {
    let s = load_state(dir)?.ok_or_else(|| {
        format!(
            "no lab was started in {} (nothing to stop)",
            canonical(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
        )
    })?;
    stop_state(&s, timeout)
}

fn stop_state(s: &LabState, timeout: Duration) -> Result<Vec<Stopped>, String> {
    stop_state_from(s, timeout, None)
}

/// [`stop_state`], reaching lab.ext's links through `host` (the host's
/// network namespace) when this thread is elsewhere.
fn stop_state_from(
    s: &LabState,
    timeout: Duration,
    host: Option<&fs::File>,
) -> Result<Vec<Stopped>, String> {
    let state_path = state_dir(&s.id)?;
    let mut handles = Vec::new();
    for d in s.devices.clone() {
        let log = state_path.join(format!("{}.shutdown.log", d.name));
        handles.push(std::thread::spawn(move || {
            let how = match instance::load(&d.guest) {
                Err(_) => "was not started".to_string(),
                Ok(g) => {
                    if g.state() == State::Running {
                        if let Ok(c) = spawn_script(&d.guest, "run-shutdown", &log) {
                            let _ = c.wait(Instant::now() + timeout);
                        }
                    }
                    match detached::stop(&g, timeout, false, true) {
                        Ok(detached::StopHow::AlreadyDown) => "was not running".into(),
                        Ok(h) => h.describe().to_string(),
                        Err(e) => format!("failed: {e}"),
                    }
                }
            };
            Stopped {
                device: d.name,
                how,
            }
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        if let Ok(s) = h.join() {
            out.push(s);
        }
    }
    // The devices (and their taps) are gone: lab.ext's bridges and VLANs.
    let made: Vec<ExtLink> = s
        .external
        .iter()
        .filter(|l| l.made_anything())
        .cloned()
        .collect();
    if !made.is_empty() {
        let failed = match host {
            Some(h) => external::inside(h, || Ok(external::remove(&made)))
                .unwrap_or_else(|e| vec![e]),
            None if ns::current_netns().ok() == Some(s.host_netns) => external::remove(&made),
            None => vec![format!(
                "lab.ext's bridges are in the network namespace `lab start` ran in; run `lab stop` there to delete {}",
                made.iter()
                    .map(|l| l.bridge.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        };
        if !failed.is_empty() {
            // Kept, so that `lab stop` can try again.
            return Ok(out
                .into_iter()
                .chain(failed.into_iter().map(|e| Stopped {
                    device: "lab.ext".into(),
                    how: format!("failed: {e}"),
                }))
                .collect());
        }
    }
    let _ = fs::remove_dir_all(&state_path);
    Ok(out)
}

/// The running device whose jail can be entered to reach the lab's
/// namespaces, and enter them (single-threaded callers only).
pub fn enter(s: &LabState) -> Result<(), String> {
    for d in &s.devices {
        if let Some(g) = guest(d).filter(|g| g.state() == State::Running) {
            if let Some(jp) = g.record.jail_pid {
                if ns::join(jp, s.netns).is_ok() {
                    return Ok(());
                }
            }
        }
    }
    Err("no running device of the lab to reach its network namespace through".into())
}

/// Read a whole file, for logs.
pub fn read_log(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// The builtin check every device gets (Netkit's `ltest` idea): its IPv4
/// addresses and routes, sorted, so that a lab compares with a reference
/// run of it.
const BUILTIN_TEST: &str =
    "ip -o -4 address show | while read n i f a rest; do echo \"address $i $a\"; done | sort\n\
ip -4 route show | sed 's/^/route /' | sort\n";

/// How one device's test went.
#[derive(Debug, Clone)]
pub enum TestOutcome {
    /// Its output is its signature.
    Pass,
    /// `--save` wrote its signature.
    Saved,
    /// Its output differs: the first differing lines.
    Differs(String),
    /// No signature to compare with.
    NoSignature(PathBuf),
    /// The test could not run.
    Failed(String),
}

/// One device's test.
#[derive(Debug, Clone)]
pub struct TestResult {
    /// The device.
    pub device: String,
    /// What happened.
    pub outcome: TestOutcome,
}

/// Where a device's signature is kept: `_test/signature/DEVICE`.
pub fn signature_path(dir: &Path, device: &str) -> PathBuf {
    dir.join("_test").join("signature").join(device)
}

/// What differs between `want` and `got`, line by line as `diff` shows it
/// (`- ` only in the signature, `+ ` only in the output; a longest common
/// subsequence), at most 20 lines.
fn differences(want: &str, got: &str) -> String {
    let w: Vec<&str> = want.lines().collect();
    let g: Vec<&str> = got.lines().collect();
    if w.len() * g.len() > 4_000_000 {
        return format!(
            "  ({} lines expected, {} produced; too long to compare line by line)",
            w.len(),
            g.len()
        );
    }
    // lcs[i][j]: the longest common subsequence of w[i..] and g[j..].
    let mut lcs = vec![vec![0u32; g.len() + 1]; w.len() + 1];
    for i in (0..w.len()).rev() {
        for j in (0..g.len()).rev() {
            lcs[i][j] = if w[i] == g[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while (i < w.len() || j < g.len()) && out.len() < 20 {
        if i < w.len() && j < g.len() && w[i] == g[j] {
            i += 1;
            j += 1;
        } else if j < g.len() && (i == w.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("  + {}", g[j]));
            j += 1;
        } else {
            out.push(format!("  - {}", w[i]));
            i += 1;
        }
    }
    if i < w.len() || j < g.len() {
        out.push("  …".into());
    }
    out.join("\n")
}

/// The most of a test's output `lab test` keeps (a device's output is a
/// hostile guest's to choose); more is an error.
const TEST_OUTPUT_MAX: u64 = 4 << 20;

/// How long one device's tests may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Run one script in `guest` (fed on stdin to `/bin/sh -s`); its stdout,
/// or why it could not run.
fn run_test_script(guest: &str, script: &str) -> Result<String, String> {
    let mut child = exec_in(guest, true, &["/bin/sh", "-s"])?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run a test in {guest}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let text = script.to_string();
    let w = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(text.as_bytes());
    });
    // Both streams read with a bound; a device that says more is cut off
    // (its pipe closes) and killed at the deadline.
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut b);
        b
    });
    let mut out = Vec::new();
    if let Some(so) = child.stdout.take() {
        let _ = so.take(TEST_OUTPUT_MAX + 1).read_to_end(&mut out);
    }
    let st = wait_until(&mut child, Instant::now() + TEST_TIMEOUT);
    let _ = w.join();
    let err = e.join().unwrap_or_default();
    if out.len() as u64 > TEST_OUTPUT_MAX {
        return Err(format!(
            "its output is over {} MiB (cut off)",
            TEST_OUTPUT_MAX >> 20
        ));
    }
    match st.and_then(|s| s.code()) {
        Some(c) if c < 125 => Ok(String::from_utf8_lossy(&out).into_owned()),
        None => Err(format!(
            "did not finish within {} s (killed)",
            TEST_TIMEOUT.as_secs()
        )),
        _ => Err(String::from_utf8_lossy(&err).trim().to_string()),
    }
}

/// `lab test`: in every running device, the builtin check (addresses and
/// routes) and then `_test/shared.test` and `_test/DEVICE.test` when they
/// exist; their output compared with `_test/signature/DEVICE`, or written
/// there with `save`.
pub fn test(dir: &Path, save: bool) -> Result<Vec<TestResult>, String> {
    let s = running_state(dir)?;
    let tests = s.dir.join("_test");
    let read = |p: PathBuf| lab_file(&p);
    let shared = read(tests.join("shared.test"))?;
    let mut handles = Vec::new();
    for d in s.devices.clone() {
        let mut script = format!("echo '# builtin'\n{BUILTIN_TEST}");
        if let Some(t) = &shared {
            let t = String::from_utf8_lossy(t);
            script.push_str(&format!("echo '# shared.test'\n{t}\n"));
        }
        if let Some(t) = read(tests.join(format!("{}.test", d.name)))? {
            let t = String::from_utf8_lossy(&t);
            script.push_str(&format!("echo '# {}.test'\n{t}\n", d.name));
        }
        let sig = signature_path(&s.dir, &d.name);
        handles.push(std::thread::spawn(move || {
            let outcome = match run_test_script(&d.guest, &script) {
                Err(e) => TestOutcome::Failed(e),
                Ok(got) if save => {
                    let r = sig
                        .parent()
                        .map(fs::create_dir_all)
                        .transpose()
                        .and_then(|_| fs::write(&sig, &got));
                    match r {
                        Ok(_) => TestOutcome::Saved,
                        Err(e) => TestOutcome::Failed(format!("write {}: {e}", sig.display())),
                    }
                }
                Ok(got) => match fs::read_to_string(&sig) {
                    Err(_) => TestOutcome::NoSignature(sig),
                    Ok(want) if want == got => TestOutcome::Pass,
                    Ok(want) => TestOutcome::Differs(differences(&want, &got)),
                },
            };
            TestResult {
                device: d.name,
                outcome,
            }
        }));
    }
    Ok(handles.into_iter().filter_map(|h| h.join().ok()).collect())
}

/// `(interface, a.b.c.d/len)` pairs from `ip -o -4 address show` output
/// ("2: eth0    inet 10.0.0.1/24 brd … scope global eth0"), loopback left
/// out. What a device prints is a hostile guest's to choose: only names
/// and addresses that look like names and addresses go on, nothing a
/// terminal or a graph would interpret.
pub fn parse_addresses(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(ifname), Some(pos)) = (w.get(1), w.iter().position(|x| *x == "inet")) else {
            continue;
        };
        let ifname = ifname.split('@').next().unwrap_or_default();
        let name_ok = !ifname.is_empty()
            && ifname.len() <= 15
            && ifname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !name_ok || ifname == "lo" {
            continue;
        }
        let Some(a) = w.get(pos + 1) else { continue };
        if a.is_empty()
            || a.len() > 18
            || !a
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
        {
            continue;
        }
        out.push((ifname.to_string(), (*a).to_string()));
    }
    out
}

/// The IPv4 addresses of every running device's interfaces, asked in the
/// devices (`ip -o -4 address show`, side by side): `(device, interface)` →
/// `a.b.c.d/len` (several joined by `, `). Devices that do not answer
/// within a few seconds are left out.
pub fn addresses(s: &LabState) -> BTreeMap<(String, String), String> {
    let mut running = Vec::new();
    for d in &s.devices {
        if !guest(d).is_some_and(|g| g.state() == State::Running) {
            continue;
        }
        let child =
            exec_in(&d.guest, false, &["ip", "-o", "-4", "address", "show"]).and_then(|mut c| {
                c.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())
            });
        if let Ok(c) = child {
            running.push((d.name.clone(), c));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out: BTreeMap<(String, String), String> = BTreeMap::new();
    for (name, mut c) in running {
        // At most 64 KiB of it; then the pipe closes (a device that goes
        // on writing gets EPIPE, and is killed at the deadline anyway).
        let mut text = String::new();
        if let Some(so) = c.stdout.take() {
            let _ = so.take(64 << 10).read_to_string(&mut text);
        }
        if wait_until(&mut c, deadline).and_then(|st| st.code()) != Some(0) {
            continue;
        }
        for (ifname, a) in parse_addresses(&text) {
            out.entry((name.clone(), ifname))
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&a);
                })
                .or_insert(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_show_what_went_and_what_came() {
        assert_eq!(differences("a\nb\nc\n", "a\nb\nc\n"), "");
        assert_eq!(differences("a\nb\nc\n", "a\nc\n"), "  - b");
        assert_eq!(differences("a\nc\n", "a\nb\nc\n"), "  + b");
        assert_eq!(differences("a\nb\n", "a\nx\n"), "  + x\n  - b");
        let long_w: String = (0..100).map(|i| format!("{i}\n")).collect();
        let d = differences(&long_w, "");
        assert!(d.ends_with('…') && d.lines().count() == 21, "{d}");
    }

    #[test]
    fn runners_quote_what_lab_conf_gives() {
        let lab_dir = tempfile::tempdir().unwrap();
        std::fs::write(
            lab_dir.path().join("lab.conf"),
            "a[0]=\"A\"\na[env]=\"X=$(reboot)\"\na[sysctl]=\"net.ipv4.tcp_syncookies=0\"\n",
        )
        .unwrap();
        let lab = Lab::load(lab_dir.path()).unwrap();
        let r = runner(&lab.devices[0], "startup");
        assert!(r.contains("export X='$(reboot)'"), "{r}");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert!(
            r.contains("echo '0' > '/proc/sys/net/ipv4/tcp_syncookies'"),
            "{r}"
        );
        assert!(
            r.contains("[ -e '/proc/sys/net/ipv4/ip_forward' ] && echo '1'"),
            "Kathará's defaults, quietly: {r}"
        );
    }

    #[test]
    fn addresses_are_read_and_a_hostile_device_cannot_inject() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\n\
                    2: eth0    inet 10.0.0.1/24 brd 10.0.0.255 scope global eth0\n\
                    2: eth0    inet 10.0.9.1/24 scope global eth0\n\
                    3: eth1@if4    inet 192.0.2.7/32 scope global eth1\n\
                    4: e\x1b[2J    inet 10.1.1.1/24\n\
                    5: eth2    inet 10.2.2.2/24\x1b]0;pwned\x07\n\
                    6: eth3    inet \n\
                    garbage\n";
        assert_eq!(
            parse_addresses(text),
            vec![
                ("eth0".to_string(), "10.0.0.1/24".to_string()),
                ("eth0".to_string(), "10.0.9.1/24".to_string()),
                ("eth1".to_string(), "192.0.2.7/32".to_string()),
            ]
        );
    }

    #[test]
    fn lab_scripts_are_regular_files_never_symlinks_to_host_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r1.startup");
        assert_eq!(lab_file(&p).unwrap(), None);
        std::fs::write(&p, "ip link\n").unwrap();
        assert_eq!(lab_file(&p).unwrap(), Some(b"ip link\n".to_vec()));
        let secret = d.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        let l = d.path().join("r2.startup");
        std::os::unix::fs::symlink(&secret, &l).unwrap();
        let e = lab_file(&l).unwrap_err();
        assert!(
            e.contains("r2.startup") && e.contains("not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn lab_ids_are_short_and_per_directory() {
        let a = lab_id(Path::new("/home/u/lab1"));
        assert_eq!(a.len(), 8);
        assert_eq!(a, lab_id(Path::new("/home/u/lab1")));
        assert_ne!(a, lab_id(Path::new("/home/u/lab2")));
    }
}
