//! Detached guests: `start` boots an image's own init and returns once the
//! guest kernel is up; `stop` shuts it down (gracefully first); the console
//! can be followed in its log and attached to interactively.
//!
//! A detached UML needs no umlctl process while it runs: its console output
//! goes straight to `console.log` (append), its console input comes from a
//! FIFO that UML holds open read-write (so it never sees EOF), and it is
//! controlled through its mconsole socket. `start` waits for UML's
//! `mconsole=notify` message, which arrives when the mconsole is up.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmdline::{BootPlan, BootRoot, Chan, Disk};
use crate::error::{Error, Result};
use crate::instance::{self, Guest, Layout, Record, State};
use crate::jail::{Bind, JailRoot, Launch};
use crate::mconsole::{self, Client, Notify};
use crate::run::{prepare_kernel, JailOpts, ShimMode, DEFAULT_MEM};

/// Everything that describes a detached guest.
#[derive(Debug, Clone)]
pub struct StartSpec {
    /// `None`: a generated name.
    pub name: Option<String>,
    pub image: PathBuf,
    /// Persistent overlay; `None` makes a throwaway one.
    pub overlay: Option<PathBuf>,
    pub mem_bytes: u64,
    pub kernel: Option<PathBuf>,
    /// Extra disks (ubdb, ubdc, ...).
    pub disks: Vec<PathBuf>,
    /// `None`: the kernel's default (/sbin/init, ...).
    pub init: Option<PathBuf>,
    /// How long the kernel may take to come up.
    pub boot_timeout: Duration,
    pub shim: ShimMode,
    /// Host bridges to attach through netd (vec0, vec1, …).
    pub nets: Vec<String>,
    /// netd's socket; `None`: the default.
    pub netd_socket: Option<PathBuf>,
    /// How UML is confined.
    pub jail: JailOpts,
    /// The guest's hostname (`None`: its name).
    pub hostname: Option<String>,
    /// Host ports published to the guest on its first (NAT) bridge.
    pub publish: Vec<umlctl_netd::protocol::Publish>,
    /// The mode the guest's processes run in.
    pub userspace: crate::cmdline::Userspace,
    /// `--cpus`: the guest's CPUs (more than one on SMP kernels only).
    pub cpus: u32,
    /// Tap descriptors the caller made (a lab's segments), after netd's:
    /// each with the MAC its interface gets.
    pub taps: Vec<(std::sync::Arc<std::os::fd::OwnedFd>, String)>,
    /// The guest's names for its interfaces, in order (a lab's `eth0`,
    /// `eth1`, …), brought up by umlctl's init; empty: UML's `vecN`.
    pub ifnames: Vec<String>,
    /// A disk whose tree umlctl's init copies over the root before the
    /// image's init starts (a lab device's `DEVICE/` tree and scripts).
    pub layer: Option<PathBuf>,
    /// A host directory the guest mounts read-write at `/shared` (a lab's
    /// `shared/`): hostfs reaches only it, bound into the jail.
    pub shared: Option<PathBuf>,
    /// The lab this guest is a device of (`ps` shows it).
    pub lab: Option<String>,
    /// Fixed addresses umlctl's init gives interfaces (by their names in
    /// the guest) besides netd's leases: a lab's bridged interface.
    pub addresses: Vec<crate::protocol::NicSpec>,
    /// Skip the kernel's RAID6 speed test at boot (see
    /// [`crate::run::RAID6_SELECT`]): for guests given no disks to build
    /// RAID6 arrays on (a lab's devices).
    pub skip_raid6_benchmark: bool,
    /// Descriptors UML holds for as long as it runs (and with it, whatever
    /// waits for them to close: a lab's user-mode network stack).
    pub keep: Vec<std::sync::Arc<std::os::fd::OwnedFd>>,
}

impl StartSpec {
    pub fn new(image: PathBuf) -> StartSpec {
        StartSpec {
            name: None,
            image,
            overlay: None,
            mem_bytes: DEFAULT_MEM,
            kernel: None,
            disks: Vec::new(),
            init: None,
            boot_timeout: Duration::from_secs(60),
            shim: ShimMode::Auto,
            nets: Vec::new(),
            netd_socket: None,
            jail: JailOpts::default(),
            hostname: None,
            publish: Vec::new(),
            userspace: crate::cmdline::Userspace::Ptrace,
            cpus: 1,
            taps: Vec::new(),
            ifnames: Vec::new(),
            layer: None,
            shared: None,
            lab: None,
            addresses: Vec::new(),
            keep: Vec::new(),
            skip_raid6_benchmark: false,
        }
    }
}

fn generated_name() -> String {
    let mut b = [0u8; 3];
    let _ = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    format!("guest-{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

/// The last `n` lines of a log file.
/// What `start --wait` waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// The exec agent answers.
    Exec,
    /// A TCP port on the guest's first address accepts.
    Tcp(u16),
    /// The exec agent answers, the image's init has started and, when it
    /// is systemd, it has finished booting (`systemctl is-system-running`:
    /// running or degraded). Other inits have no such notion.
    Booted,
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ready::Exec => f.write_str("exec"),
            Ready::Tcp(p) => write!(f, "tcp:{p}"),
            Ready::Booted => f.write_str("booted"),
        }
    }
}

/// Run in the guest by `--wait booted`: 0 when booted (or not systemd),
/// 10 degraded (the failed units on stdout), 11 still booting (what is
/// awaited on stdout). The exec agent answers before umlctl's init has
/// exec'd the image's init: while PID 1 is still the agent's own program
/// (its parent's), nothing has booted; while PID 1 is in the middle of
/// exec'ing it, its `exe` cannot be read (seen: empty, with its `comm`
/// already `systemd`).
const BOOTED_PROBE: &str = "if [ /proc/1/exe -ef /proc/$PPID/exe ]; then echo \"the image's init has not started yet\"; exit 11; fi\n\
c=$(cat /proc/1/comm 2>/dev/null)\n\
case \"$(readlink /proc/1/exe 2>/dev/null)\" in\n\
'') echo \"the image's init is starting\"; exit 11;;\n\
*umlctl*) echo \"the image's init has not started yet\"; exit 11;;\n\
*/systemd) ;;\n\
*) [ \"$c\" = systemd ] || exit 0;;\n\
esac\n\
s=$(systemctl is-system-running 2>/dev/null)\n\
case \"$s\" in\n\
running) exit 0;;\n\
degraded) systemctl list-units --failed --no-legend --plain 2>/dev/null | cut -d' ' -f1; exit 10;;\n\
*) echo \"systemd is ${s:-not answering}\"; exit 11;;\n\
esac\n";

/// One `--wait booted` probe: `Ok(None)` booted, `Ok(Some(note))` booted
/// with a warning, `Err(state)` not yet.
fn probe_booted(name: &str) -> std::result::Result<Option<String>, String> {
    let spec = crate::execproto::ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), BOOTED_PROBE.into()],
        ..Default::default()
    };
    let (code, out, _) = crate::exec::output(name, &spec).map_err(|e| e.to_string())?;
    let out = String::from_utf8_lossy(&out);
    let words: Vec<&str> = out.split_whitespace().collect();
    match code {
        0 => Ok(None),
        10 => Ok(Some(format!(
            "guest {name} booted degraded: failed units: {} (see `umlctl exec {name} -- systemctl --failed`)",
            match words.len() {
                0 => "(none listed)".to_string(),
                n if n > 20 => format!("{} and {} more", words[..20].join(", "), n - 20),
                _ => words.join(", "),
            }
        ))),
        11 => Err(words.iter().take(20).copied().collect::<Vec<_>>().join(" ")),
        // No /bin/sh in the image: no systemd to ask either (a distroless
        // image); the exec agent answering is all there is.
        126 | 127 => Ok(None),
        c => Err(format!("the boot probe (/bin/sh in the guest) exited with {c}")),
    }
}

impl std::str::FromStr for Ready {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Ready, String> {
        match s {
            "exec" => Ok(Ready::Exec),
            "booted" => Ok(Ready::Booted),
            _ => s
                .strip_prefix("tcp:")
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p > 0)
                .map(Ready::Tcp)
                .ok_or_else(|| format!("--wait {s:?}: expected exec, booted or tcp:PORT")),
        }
    }
}

/// How a user-mode interface (`--net user`) ends its line in the record.
const USER_NOTE: &str = " user-mode (passt)";

/// Wait until guest `g` is ready by `probe`, or fail after `timeout` with
/// the console's tail. `Some(note)`: ready, with a warning to show (a
/// systemd guest that booted degraded).
pub fn wait_ready(g: &Guest, probe: &Ready, timeout: Duration) -> Result<Option<String>> {
    let deadline = Instant::now() + timeout;
    let target = match probe {
        Ready::Exec | Ready::Booted => None,
        Ready::Tcp(port) => {
            if g.record
                .nics
                .first()
                .is_some_and(|n| n.ends_with(USER_NOTE))
            {
                return Err(Error::Usage(format!(
                    "--wait tcp:{port}: guest {}'s first interface is --net user, whose address the host cannot reach (and passt accepts a published port whether or not the guest listens): use --wait booted or --wait exec",
                    g.record.name
                )));
            }
            let addr = g
                .record
                .nics
                .first()
                .and_then(|n| n.split_whitespace().nth(1))
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--wait tcp:{port}: guest {} has no network address (give it --net BRIDGE)",
                        g.record.name
                    ))
                })?;
            Some(std::net::SocketAddr::from((addr, *port)))
        }
    };
    let last = loop {
        if g.state() != State::Running {
            break "the guest stopped".to_string();
        }
        let r = match target {
            None => crate::exec::ping(&g.record.name)
                .map_err(|e| e.to_string())
                .and_then(|()| match probe {
                    Ready::Booted => probe_booted(&g.record.name),
                    _ => Ok(None),
                }),
            Some(a) => std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1))
                .map(|_| None)
                .map_err(|e| format!("{a}: {e}")),
        };
        match r {
            Ok(note) => return Ok(note),
            Err(e) if Instant::now() >= deadline => break e,
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    Err(Error::StartFailed {
        why: format!(
            "guest {} was not ready ({probe}) within {} s: {last}",
            g.record.name,
            timeout.as_secs()
        ),
        console_tail: tail(&g.layout.console_log(), 20),
    })
}

pub fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Start a detached guest and return its record once its kernel is up.
pub fn start(spec: &StartSpec) -> Result<Guest> {
    let name = spec.name.clone().unwrap_or_else(generated_name);
    instance::check_name(&name)?;
    spec.jail.limits.validate(spec.mem_bytes)?;
    let uml_dir = instance::uml_dir()?;
    let layout = Layout::new(&uml_dir, &name);
    if let Ok(g) = instance::load(&name) {
        if g.state() == State::Running {
            return Err(Error::Usage(format!(
                "a guest named {name:?} is already running (pid {})",
                g.record.pid
            )));
        }
        // A stopped or dead guest of that name: its record, log and
        // throwaway overlay make way for the new one.
        g.remove()?;
    }
    if let Some(pid) = fs::read_to_string(layout.uml_instance.join("pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|p| instance::process_start(*p).is_some())
    {
        return Err(Error::Usage(format!(
            "UML instance {name:?} in {} is in use by pid {pid} (not started by umlctl); choose another name",
            uml_dir.display()
        )));
    }
    let image = fs::canonicalize(&spec.image).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::Usage(format!("image {} does not exist", spec.image.display()))
        }
        _ => Error::io("resolve image", &spec.image, e),
    })?;
    for d in &spec.disks {
        fs::metadata(d).map_err(|e| Error::io("open disk", d, e))?;
    }
    let prep = prepare_kernel(
        spec.kernel.as_deref(),
        &["ubd", "ext4", "mconsole"],
        spec.shim,
    )?;
    let (seccomp, ncpus) = prep.processes(spec.userspace, spec.cpus)?;

    // umlctl's directory for the guest; created fresh, removed on failure.
    match fs::DirBuilder::new().mode(0o700).create(&layout.state) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::Usage(format!(
                "{} exists without a usable guest record; remove it or choose another name",
                layout.state.display()
            )))
        }
        Err(e) => return Err(Error::io("create", &layout.state, e)),
    }
    let mut cleanup = StateGuard(Some(layout.clone()), None);
    // UML's instance directory lives in umlctl's (the only part of the
    // guest's files its jail sees); ~/.uml/NAME points there, so that
    // `uml_mconsole NAME` and UML's own conventions still hold.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(layout.uml_parent())
        .map_err(|e| Error::io("create", layout.uml_parent(), e))?;
    let _ = fs::remove_file(&layout.uml_instance);
    std::os::unix::fs::symlink(
        Path::new(&format!("{name}.umlctl")).join("uml").join(&name),
        &layout.uml_instance,
    )
    .map_err(|e| Error::io("symlink", &layout.uml_instance, e))?;
    nix::unistd::mkfifo(
        &layout.console_in(),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| Error::io("mkfifo", layout.console_in(), crate::error::errno(e)))?;
    for i in 0..crate::execproto::SLOTS {
        for p in [layout.exec_in(i), layout.exec_out(i)] {
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| Error::io("mkfifo", &p, crate::error::errno(e)))?;
        }
    }
    // A persistent overlay this start creates goes again if the start fails.
    cleanup.1 = spec
        .overlay
        .clone()
        .filter(|p| fs::symlink_metadata(p).is_err());
    let overlay = crate::overlay::prepare(&image, spec.overlay.as_deref(), &layout.state)?;
    let mut disks = vec![Disk {
        file: overlay.clone(),
        backing: None,
        read_only: false,
    }];
    for d in &spec.disks {
        disks.push(Disk {
            file: fs::canonicalize(d).map_err(|e| Error::io("resolve", d, e))?,
            backing: None,
            read_only: false,
        });
    }
    let layer = match &spec.layer {
        Some(l) => {
            disks.push(Disk {
                file: fs::canonicalize(l).map_err(|e| Error::io("resolve", l, e))?,
                backing: None,
                read_only: true,
            });
            Some(crate::cmdline::ubd_device(disks.len() - 1))
        }
        None => None,
    };
    let shared = match &spec.shared {
        Some(d) => Some(fs::canonicalize(d).map_err(|e| Error::io("resolve", d, e))?),
        None => None,
    };
    // Taps from netd. UML inherits the netd connection (fd 7) along with
    // any passed tap descriptors (from fd 8): the taps live exactly as long
    // as the guest, with no umlctl process staying behind.
    // (`--net user` is a socket with the vector driver's queues: not
    // affected.)
    let taps = spec
        .nets
        .iter()
        .filter(|b| *b != crate::run::USER_NET)
        .count();
    crate::run::check_nics(&prep.located.info, taps + spec.taps.len())?;
    let mut network = crate::run::attach_network(
        &spec.nets,
        spec.netd_socket.as_deref(),
        Some(&name),
        &spec.publish,
    )?;
    let keepalive = network.client.take().map(|c| c.into_fd());
    let mut extra: Vec<std::sync::Arc<std::os::fd::OwnedFd>> = Vec::new();
    for (fd, mac) in &spec.taps {
        let n = crate::run::FIRST_TAP_FD + crate::num::small_i32(network.fds.len() + extra.len());
        extra.push(std::sync::Arc::clone(fd));
        network.nics.push(crate::cmdline::Nic {
            transport: crate::cmdline::NicTransport::Fd { fd: n },
            mac: mac.clone(),
        });
    }
    if !spec.ifnames.is_empty() && spec.ifnames.len() != network.nics.len() {
        return Err(Error::Usage(format!(
            "{} interface names for {} interfaces",
            spec.ifnames.len(),
            network.nics.len()
        )));
    }
    let nic_notes: Vec<String> = network
        .specs
        .iter()
        .zip(&network.nics)
        .zip(&network.published)
        .map(|((n, nic), ports)| {
            let published = if ports.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = ports.iter().map(ToString::to_string).collect();
                format!(" publish {}", list.join(","))
            };
            let user = if nic.mac == crate::usernet::MAC {
                USER_NOTE
            } else {
                ""
            };
            format!(
                "{} {}/{} gateway {} mtu {}{published} mac {}{user}",
                n.device, n.address, n.prefix, n.gateway, n.mtu, nic.mac
            )
        })
        .collect();
    let notify_sock =
        UnixDatagram::bind(layout.notify()).map_err(|e| Error::io("bind", layout.notify(), e))?;
    // umlctl's init boots first, from its read-only disk after the user's,
    // sets the guest up and execs the image's init (init/boot.rs).
    let initroot = crate::initroot::prepare(&crate::initroot::current_exe()?)?;
    if let Some(h) = &spec.hostname {
        check_hostname(h)?;
    }
    let mut init_env = vec![
        (crate::init::BOOT_ENV.to_string(), "/dev/ubda".to_string()),
        (
            crate::init::HOSTNAME_ENV.to_string(),
            spec.hostname.clone().unwrap_or_else(|| name.clone()),
        ),
    ];
    if let Some(i) = &spec.init {
        init_env.push((crate::init::INIT_ENV.to_string(), check_init(i)?));
    }
    // Exec slots: serial line FIRST_LINE + i reads FIFO exec<i>.in and
    // writes exec<i>.out, both held open read-write by UML (so neither
    // side ever sees EOF while the guest runs); `umlctl exec` takes a slot.
    use crate::execproto::{FIRST_FD, FIRST_LINE, SLOTS};
    let mut exec_lines = Vec::new();
    let mut exec_fifos = Vec::new();
    for i in 0..SLOTS {
        let fd = FIRST_FD + 2 * crate::num::small_i32(i as usize);
        exec_lines.push((FIRST_LINE + i, Chan::Fd(fd), Chan::Fd(fd + 1)));
        for (p, n) in [(layout.exec_in(i), fd), (layout.exec_out(i), fd + 1)] {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|e| Error::io("open", &p, e))?;
            exec_fifos.push((f, n));
        }
    }
    let lines_list: Vec<String> = exec_lines.iter().map(|l| l.0.to_string()).collect();
    init_env.push((crate::init::EXEC_ENV.to_string(), lines_list.join(",")));
    // Each slot's stdin ring, a read-only disk for the guest in the slots
    // below the init disk — unless the guest's own disks reach there (then
    // exec's stdin stays on the serial lines).
    let mut fixed_disks = Vec::new();
    if disks.len() <= crate::execproto::ring::ubd_index(0) {
        let mut devices = Vec::new();
        for i in 0..SLOTS {
            let p = layout.exec_ring(i);
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .map_err(|e| Error::io("create", &p, e))?;
            f.set_len(crate::execproto::ring::ring_len())
                .map_err(|e| Error::io("size", &p, e))?;
            let index = crate::execproto::ring::ubd_index(i);
            devices.push(crate::cmdline::ubd_device(index));
            fixed_disks.push((
                index,
                Disk {
                    file: p,
                    backing: None,
                    read_only: true,
                },
            ));
        }
        init_env.push((crate::init::EXEC_RINGS_ENV.to_string(), devices.join(",")));
    }
    init_env.extend(net_env(&network, &spec.addresses));
    if let Some(l) = &layer {
        init_env.push((crate::init::lab::LAYER_ENV.into(), l.clone()));
    }
    if shared.is_some() {
        init_env.push((crate::init::lab::SHARED_ENV.into(), "/shared".into()));
    }
    if !spec.ifnames.is_empty() {
        for n in &spec.ifnames {
            check_ifname(n)?;
        }
        init_env.push((crate::init::lab::IFNAMES_ENV.into(), spec.ifnames.join(",")));
    }
    let plan = BootPlan {
        skip_initcalls: if spec.skip_raid6_benchmark && prep.located.info.has("raid6-benchmark") {
            vec![crate::run::RAID6_SELECT]
        } else {
            vec![]
        },
        mem_bytes: spec.mem_bytes,
        umid: name.clone(),
        uml_dir: layout.uml_parent(),
        root: BootRoot::InitDiskLast {
            file: initroot.disk.clone(),
        },
        init: Some(initroot.init.clone()),
        notify: Some(layout.notify()),
        disks,
        fixed_disks,
        console_line: 1,
        console: (Chan::Fd(0), Chan::Fd(1)),
        lines: exec_lines,
        init_env,
        seccomp,
        ncpus,
        hostfs: shared.clone(),
        nics: network.nics.clone(),
    };
    let args = plan.to_args()?;

    // The jail: the kernel's files, the guest's disks, its instance
    // directory and the notify socket. It keeps the host's network
    // namespace: mconsole replies go to the client's (abstract) address,
    // which exists only there.
    let mut jail = prep.jail(JailRoot::Empty, spec.mem_bytes, spec.jail);
    if let Some(j) = jail.as_mut() {
        crate::run::bind_disks(j, &plan.disks, std::slice::from_ref(&image))?;
        j.bind(Bind::ro(&initroot.disk));
        for (_, d) in &plan.fixed_disks {
            crate::jail::hand_over(j, &d.file)?;
            j.bind(Bind::ro(&d.file));
        }
        crate::jail::hand_over(j, &layout.uml_parent())?;
        crate::jail::hand_over(j, &layout.notify())?;
        if spec.overlay.is_none() {
            crate::jail::hand_over(j, &overlay)?;
        }
        j.bind(Bind::rw(layout.uml_parent()));
        j.bind(Bind::rw(layout.notify()));
        if let Some(d) = &shared {
            j.bind(Bind::rw(d));
        }
        j.share_net = true;
        if network
            .nics
            .iter()
            .any(|n| matches!(n.transport, crate::cmdline::NicTransport::Tap { .. }))
        {
            j.tun = true;
            crate::jail::hand_over_taps(j, &network.nics)?;
        }
    } else {
        crate::run::warn_unjailed();
    }

    let console_in = OpenOptions::new()
        .read(true)
        .write(true)
        .open(layout.console_in())
        .map_err(|e| Error::io("open", layout.console_in(), e))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(layout.console_log())
        .map_err(|e| Error::io("create", layout.console_log(), e))?;
    use std::os::fd::AsRawFd;
    let mut fds = vec![
        (console_in.as_raw_fd(), 0),
        (log.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ];
    for (f, n) in &exec_fifos {
        fds.push((f.as_raw_fd(), *n));
    }
    // The netd connection at fd 7, the tap descriptors from fd 8 (netd's,
    // then the caller's).
    if let Some(k) = &keepalive {
        fds.push((k.as_raw_fd(), crate::run::FIRST_TAP_FD - 1));
    }
    let tap_fds = network
        .fds
        .iter()
        .map(|f| f.as_raw_fd())
        .chain(extra.iter().map(|f| f.as_raw_fd()));
    let mut next = crate::run::FIRST_TAP_FD;
    for f in tap_fds {
        fds.push((f, next));
        next += 1;
    }
    for f in &spec.keep {
        fds.push((f.as_raw_fd(), next));
        next += 1;
    }
    let cgroup = crate::cgroup::for_guest(&crate::cgroup::guest_name(&name), &spec.jail.limits)?;
    network.join(cgroup.as_ref())?;
    let launch = Launch {
        program: prep.located.info.path.clone(),
        args,
        env: prep.uml_env(jail.is_some(), false)?,
        cwd: layout.state.clone(),
        fds,
        // Not in our session: a Ctrl-C at `umlctl start` must not reach the
        // guest (UML calls setsid() itself, too).
        new_session: true,
        die_with_parent: false,
        stop_before_exec: false,
        cgroup: cgroup.as_ref().map(|g| g.0.clone()),
    };
    let mut child = crate::run::launch(jail.as_ref(), &launch, false)?;
    drop((console_in, log, exec_fifos));
    let pid = child.pid.as_raw();
    let pid_start = instance::process_start(pid).unwrap_or(0);
    let jail_pid = child.jail_pid.map(|p| p.as_raw());
    let record = Record {
        name: name.clone(),
        pid,
        pid_start,
        jail_pid,
        jail_pid_start: jail_pid.and_then(instance::process_start),
        started: instance::now(),
        kernel: prep.located.info.path.clone(),
        kernel_version: prep.located.info.version.clone(),
        mem_bytes: spec.mem_bytes,
        image,
        overlay: spec.overlay.clone().unwrap_or(overlay),
        ephemeral_overlay: spec.overlay.is_none(),
        disks: spec.disks.clone(),
        nics: nic_notes,
        xstate_shim: prep.shim.is_some(),
        ended: None,
        lab: spec.lab.clone(),
        cgroup: cgroup
            .as_ref()
            .map(|c| c.0.dirs.clone())
            .unwrap_or_default(),
        cpu_quota: spec.jail.limits.cpu_percent,
        memory_max: spec.jail.limits.memory_max,
    };
    instance::save(&layout, &record)?;

    // Wait for the mconsole to come up and the image's init to start
    // (umlctl's init logs STARTING_MARK once the guest is set up and the
    // image's init exists), then a moment more, so that a broken init is
    // reported here, not discovered later. A panic notification or UML's exit is a failure.
    let deadline = Instant::now() + spec.boot_timeout;
    let _ = notify_sock.set_read_timeout(Some(Duration::from_millis(10)));
    let mut buf = [0u8; 16 + mconsole::MAX_DATA];
    let mut mconsole_up = false;
    let mut settled_at: Option<Instant> = None;
    let mut init_seen = LogSearch::new(crate::init::STARTING_MARK.as_bytes());
    let failure: Option<String> = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(format!("the guest kernel exited during boot ({st})"));
        }
        if let Some(t) = settled_at {
            if Instant::now() >= t {
                break None;
            }
        } else if Instant::now() > deadline {
            break Some(format!(
                "the guest did not start its init within {} s",
                spec.boot_timeout.as_secs()
            ));
        }
        match notify_sock.recv(&mut buf) {
            Ok(n) => match mconsole::decode_notify(&buf[..n]) {
                Ok(Notify::Socket(_)) => mconsole_up = true,
                Ok(Notify::Panic(m)) => break Some(format!("guest kernel panic: {m}")),
                _ => {}
            },
            Err(_) => {
                if mconsole_up && settled_at.is_none() && init_seen.found(&layout.console_log()) {
                    settled_at = Some(Instant::now() + Duration::from_millis(100));
                }
            }
        }
    };
    drop(notify_sock);
    let _ = fs::remove_file(layout.notify());
    if let Some(why) = failure {
        let _ = kill(child.kill_target(), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = child.wait();
        let tail = tail(&layout.console_log(), 20);
        let _ = fs::remove_dir_all(&layout.uml_instance);
        drop(cleanup);
        return Err(Error::StartFailed {
            why,
            console_tail: tail,
        });
    }
    // The guest runs on without us; it is reaped by whoever adopts it.
    child.detach();
    if let Some(c) = cgroup {
        c.keep();
    }
    std::mem::forget(cleanup);
    Ok(Guest { record, layout })
}

/// What the image's own init needs to configure interface `i`:
/// `UMLCTL_NET<i>_DEVICE` (vecN), `_ADDRESS` (a.b.c.d/prefix), `_GATEWAY`,
/// `_MTU`, `_MAC` and, when netd gives name servers, `_DNS` (comma
/// separated), passed on the kernel command line (which hands unknown
/// `K=V` parameters to init as its environment).
/// A hostname the guest can have: 1 to 63 letters, digits and '-', not
/// starting or ending with '-'.
fn check_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "--hostname {h:?}: use 1 to 63 letters, digits or '-', not starting or ending with '-'"
        )))
    }
}

/// An interface name the guest can have (and the command line carry).
fn check_ifname(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 15
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "interface name {n:?}: use 1 to 15 letters, digits, '_', '-' or '.'"
        )))
    }
}

/// `--init` as the kernel command line can carry it to umlctl's init.
fn check_init(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .filter(|s| s.starts_with('/') && s.chars().all(|c| c.is_ascii_graphic() && c != '"'));
    s.map(str::to_string).ok_or_else(|| {
        Error::Usage(format!(
            "--init {}: give an absolute path inside the image, without spaces or quotes",
            p.display()
        ))
    })
}

fn net_env(net: &crate::run::Network, fixed: &[crate::protocol::NicSpec]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let leased = net
        .specs
        .iter()
        .zip(&net.nics)
        .map(|(n, nic)| (n, nic.mac.as_str()));
    for (i, (n, mac)) in leased.chain(fixed.iter().map(|n| (n, ""))).enumerate() {
        let k = |what: &str| format!("UMLCTL_NET{i}_{what}");
        env.push((k("DEVICE"), n.device.clone()));
        env.push((k("ADDRESS"), format!("{}/{}", n.address, n.prefix)));
        env.push((k("GATEWAY"), n.gateway.to_string()));
        env.push((k("MTU"), n.mtu.to_string()));
        if !mac.is_empty() {
            env.push((k("MAC"), mac.to_string()));
        }
        if !n.dns.is_empty() {
            let list: Vec<String> = n.dns.iter().map(|a| a.to_string()).collect();
            env.push((k("DNS"), list.join(",")));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_search_reads_on_and_finds_a_needle_across_reads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut s = LogSearch::new(b" as init process");
        assert!(!s.found(&p), "no file yet");
        std::fs::write(&p, vec![b'x'; 200_000]).unwrap();
        assert!(!s.found(&p));
        assert_eq!(s.offset, 200_000);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"Run /sbin/init as in").unwrap();
        assert!(!s.found(&p));
        f.write_all(b"it process\n").unwrap();
        assert!(s.found(&p));
    }

    #[test]
    fn config_commands_name_their_files() {
        let f = |c: &str| ubd_config_files(c).map(|(_, f, w)| (f, w));
        assert_eq!(
            f("config ubdb=/d/x.img"),
            Some((vec!["/d/x.img".into()], true))
        );
        assert_eq!(
            f("config ubdbr=/d/x.img"),
            Some((vec!["/d/x.img".into()], false))
        );
        assert_eq!(
            f("config ubd1r=/d/x.img"),
            Some((vec!["/d/x.img".into()], false))
        );
        assert_eq!(
            f("config ubdc=/d/x.cow,/d/base.img"),
            Some((vec!["/d/x.cow".into(), "/d/base.img".into()], true))
        );
        assert_eq!(f("config ubdb"), None);
        assert_eq!(ubd_config_files("config ubd1r=x").unwrap().0, "ubd1r");
        assert_eq!(f("config eth0=tuntap"), None);
        assert_eq!(f("version"), None);
        assert_eq!(f("remove ubdb"), None);
    }
}

/// Looks for `needle` in a growing log, reading each byte once (a guest
/// can write a lot to its console before `start` returns).
struct LogSearch {
    needle: &'static [u8],
    offset: u64,
    /// The end of what was read last, in case the needle straddles reads.
    carry: Vec<u8>,
}

impl LogSearch {
    fn new(needle: &'static [u8]) -> LogSearch {
        LogSearch {
            needle,
            offset: 0,
            carry: Vec::new(),
        }
    }

    fn found(&mut self, path: &Path) -> bool {
        let Ok(mut f) = File::open(path) else {
            return false;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = std::mem::take(&mut self.carry);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match f.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            self.offset += n as u64;
            buf.extend_from_slice(&chunk[..n]);
            if memchr::memmem::find(&buf, self.needle).is_some() {
                return true;
            }
            let tail = buf.len().saturating_sub(self.needle.len());
            buf.drain(..tail);
        }
        let tail = buf.len().saturating_sub(self.needle.len());
        buf.drain(..tail);
        self.carry = buf;
        false
    }
}
/// Removes a half-created guest directory, and an overlay the failed
/// start created.
struct StateGuard(Option<Layout>, Option<PathBuf>);

impl Drop for StateGuard {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            let _ = fs::remove_dir_all(&l.state);
            if fs::symlink_metadata(&l.uml_instance).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = fs::remove_file(&l.uml_instance);
            }
        }
        if let Some(o) = self.1.take() {
            let _ = fs::remove_file(o);
        }
    }
}

/// The mconsole client for a running guest.
pub fn client(g: &Guest) -> Result<Client> {
    if g.state() != State::Running {
        return Err(Error::Usage(format!(
            "guest {} is {}",
            g.record.name,
            g.state()
        )));
    }
    Client::new(&g.layout.mconsole())
        .map_err(|e| Error::sys("mconsole client", std::io::Error::other(e)))
}

/// Send an mconsole command to a running guest. `config ubdN[flags]=FILE[,BACKING]`
/// first makes the files (and the backing file a COW header names) visible
/// at their own paths in the guest's jail, since a jailed UML sees no other
/// host file, and passes UML their absolute paths.
pub fn ctl(g: &Guest, command: &str) -> Result<mconsole::Reply> {
    let c = client(g)?;
    let mut command = command.to_string();
    if let (Some(jp), Some((dev, files, writable))) =
        (g.record.jail_pid, ubd_config_files(&command))
    {
        let (jp, up) = (Pid::from_raw(jp), Pid::from_raw(g.record.pid));
        let mut resolved = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let abs = fs::canonicalize(f).map_err(|e| Error::io("resolve", f, e))?;
            // The backing file (the second name) is opened read-only.
            crate::jail::attach(jp, up, &abs, writable && i == 0, true)?;
            resolved.push(abs);
        }
        if resolved.len() == 1 {
            if let Ok(cow) = umlctl_imgtools::cow::Cow::open(&resolved[0]) {
                if let Ok(b) = fs::canonicalize(cow.backing_path()) {
                    crate::jail::attach(jp, up, &b, false, false)?;
                }
            }
        }
        let names: Vec<String> = resolved.iter().map(|p| p.display().to_string()).collect();
        command = format!("config {dev}={}", names.join(","));
    }
    c.request(&command).map_err(|source| Error::Mconsole {
        guest: g.record.name.clone(),
        source,
    })
}

/// The device, the host files named by an mconsole `config ubd…=SPEC`
/// command, and whether the first is writable (no `r` flag).
fn ubd_config_files(command: &str) -> Option<(String, Vec<PathBuf>, bool)> {
    let rest = command.trim().strip_prefix("config")?.trim_start();
    let (dev, spec) = rest.split_once('=')?;
    // ubd + (a number | a letter) + flags (r s d c t).
    let tail = dev.trim().strip_prefix("ubd")?;
    let flags = if tail.starts_with(|c: char| c.is_ascii_digit()) {
        tail.trim_start_matches(|c: char| c.is_ascii_digit())
    } else {
        tail.get(1..)?
    };
    let writable = !flags.contains('r');
    let files: Vec<PathBuf> = spec
        .trim()
        .split([',', ':'])
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    (!files.is_empty()).then(|| (dev.trim().to_string(), files, writable))
}

/// How a guest was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopHow {
    /// It shut itself down after ctrl-alt-del.
    Graceful,
    /// mconsole `halt`.
    Halted,
    /// SIGKILL.
    Killed,
    /// It was not running.
    AlreadyDown,
}

impl StopHow {
    /// How `stop` and `ps` say it.
    pub fn describe(self) -> &'static str {
        match self {
            StopHow::Graceful => "shut down",
            StopHow::Halted => "halted",
            StopHow::Killed => "killed",
            StopHow::AlreadyDown => "was not running",
        }
    }
}

fn wait_gone(g: &Guest, t: Duration) -> bool {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if g.state() != State::Running {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    g.state() != State::Running
}

/// Stop a guest: ctrl-alt-del (the guest's own shutdown) and up to
/// `timeout` for it; then mconsole `halt`; then SIGKILL to UML's process
/// group. `force` skips the graceful step. Everything the guest left is
/// removed in every case.
pub fn stop(g: &Guest, timeout: Duration, force: bool, rm: bool) -> Result<StopHow> {
    let mut how = StopHow::AlreadyDown;
    let was = g.state();
    if g.state() == State::Running {
        let mc = client(g).ok();
        how = StopHow::Killed;
        let graceful = !force
            && mc
                .as_ref()
                .and_then(|c| c.request("cad").ok())
                .is_some_and(|r| r.ok())
            && wait_gone(g, timeout);
        if graceful {
            how = StopHow::Graceful;
        } else {
            let halted = mc
                .as_ref()
                .and_then(|c| c.request("halt").ok())
                .is_some_and(|r| r.ok())
                && wait_gone(g, Duration::from_secs(5));
            if halted {
                how = StopHow::Halted;
            } else {
                g.kill_jail();
                let pid = g.record.pid;
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                wait_gone(g, Duration::from_secs(5));
            }
        }
    }
    // UML's helpers share its process group; none may outlive it.
    g.kill_leftovers();
    if rm {
        g.remove()?;
    } else if how != StopHow::AlreadyDown {
        // The record and console log stay for `logs` and `ps --all`.
        g.clone().retire(how.describe())?;
    } else {
        let ended = match (was, g.record.ended.as_deref()) {
            (State::Dead, _) => "died (a kernel panic or a kill)",
            (_, Some(e)) => e,
            (_, None) => "ended on its own",
        };
        g.clone().retire(ended)?;
    }
    Ok(how)
}

/// Copy the console log to `out`; with `follow`, keep copying until the
/// guest stops running.
pub fn logs(g: &Guest, follow: bool, out: &mut dyn Write) -> Result<()> {
    let path = g.layout.console_log();
    let mut f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io("read", &path, e))?;
        if n > 0 {
            out.write_all(&buf[..n])
                .map_err(|e| Error::sys("write", e))?;
            continue;
        }
        let _ = out.flush();
        if !follow || g.state() != State::Running {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Byte that detaches `console` (Ctrl-]).
pub const DETACH_KEY: u8 = 0x1d;

/// Attach the terminal to a guest's console until Ctrl-] or the guest
/// stops. Output starts with the last part of the log.
/// `umlctl debug NAME`: gdb attached to a running guest's kernel (see
/// [`crate::gdb`]); returns gdb's exit status when it leaves (the guest
/// runs on).
pub fn debug(g: &Guest, spec: &crate::gdb::GdbSpec) -> Result<std::process::ExitStatus> {
    spec.validate()?;
    if g.state() != State::Running {
        return Err(Error::Usage(format!(
            "guest {} is {}",
            g.record.name,
            g.state()
        )));
    }
    crate::gdb::find_gdb()?;
    if spec.interactive() {
        crate::gdb::check_terminal()?;
    }
    let kernel = crate::inspect::inspect(&g.record.kernel);
    if kernel.as_ref().is_ok_and(|k| !k.symbols) {
        eprintln!(
            "umlctl: warning: {} has no symbols (a stripped kernel, like Debian's): gdb shows addresses only; `umlctl kernel build --debug` makes one with symbols, source lines and the lx- helpers",
            g.record.kernel.display()
        );
    }
    crate::gdb::warn_unknown_functions(&g.record.kernel, &spec.breaks);
    let target = crate::gdb::Target {
        pid: Pid::from_raw(g.record.pid),
        kernel: g.record.kernel.clone(),
        before_exec: false,
        label: format!("guest {}", g.record.name),
    };
    crate::gdb::start(&target, spec, &mut || {})?.wait()
}

pub fn attach(g: &Guest) -> Result<()> {
    if g.state() != State::Running {
        return Err(Error::Usage(format!(
            "guest {} is {}",
            g.record.name,
            g.state()
        )));
    }
    let mut input = OpenOptions::new()
        .write(true)
        .open(g.layout.console_in())
        .map_err(|e| Error::io("open", g.layout.console_in(), e))?;
    let log_path = g.layout.console_log();
    let mut log = File::open(&log_path).map_err(|e| Error::io("open", &log_path, e))?;
    let len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = log.seek(SeekFrom::Start(len.saturating_sub(2048)));

    let raw = crate::terminal::TermGuard::raw(0);
    // The guest's console follows the host terminal's size (through the
    // exec agent; a guest without one keeps its size).
    if raw.is_some() {
        let name = g.record.name.clone();
        let resize = move || {
            if let Some((rows, cols)) = crate::run::winsize(0) {
                let _ = crate::exec::console_size(&name, rows, cols);
            }
        };
        // In the background: an agent that does not answer must not hold
        // up the console.
        if let Ok(mut sigs) = signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH]) {
            std::thread::spawn(move || {
                resize();
                for _ in sigs.forever() {
                    resize();
                }
            });
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    // Keyboard → console FIFO, until the detach key.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(i) = buf[..n].iter().position(|&b| b == DETACH_KEY) {
                let _ = input.write_all(&buf[..i]);
                break;
            }
            if input.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        stop2.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 16 * 1024];
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match log.read(&mut buf) {
            Ok(n) if n > 0 => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
            _ => {
                if g.state() != State::Running {
                    break;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        }
    }
    drop(raw);
    Ok(())
}
