//! The UML kernel command line, built from a [`BootPlan`] in one place.
//!
//! UML splits its command line on whitespace, takes `,` and `:` as
//! separators inside `ubd` and channel specifications, and passes unknown
//! `key=value` words to init as environment. Every path that goes onto the
//! line is checked here, and the whole line must fit UML's 4096 bytes.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// UML's `COMMAND_LINE_SIZE`.
pub const MAX_CMDLINE: usize = 4096;

/// One end of a UML console or serial line channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chan {
    /// A file descriptor inherited by the UML process.
    Fd(i32),
    /// Reads fail, writes are discarded.
    Null,
}

impl Chan {
    fn spec(self) -> String {
        match self {
            Chan::Fd(n) => format!("fd:{n}"),
            Chan::Null => "null".into(),
        }
    }
}

/// Where the root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootRoot {
    /// The host's `/` (as the UML process sees it) through hostfs,
    /// read-only.
    Hostfs,
    /// The read-only init disk at ubd index `index`: the kernel boots
    /// umlctl's init from it, which then switches to the image on
    /// `/dev/ubda`. hostfs is unusable ([`NO_HOST_FILES`]).
    InitDisk { index: usize },
    /// The read-only init disk `file` in the last ubd slot ([`LAST_UBD`],
    /// `/dev/ubdp`), outside `disks`, so that the guest's own disks keep
    /// their names and the slots after them stay free for hot-plugging
    /// (`start`).
    InitDiskLast { file: PathBuf },
    /// The first disk (`/dev/ubda`) as root, read-write. hostfs is unusable
    /// ([`NO_HOST_FILES`]).
    Disk { fstype: String },
}

/// No BSD-style ptys (`/dev/ptyXY`, replaced by `/dev/ptmx` in Linux 2.6):
/// a kernel built with `CONFIG_LEGACY_PTYS` (Debian's `linux.uml`: 256 of
/// them) spends most of its boot — about 0.4 s of 0.6 here — registering
/// their 512 devices. Nothing uses them (`openpty`, terminals, sshd and
/// umlctl's exec take `/dev/ptmx`); a kernel without them ignores it.
pub const NO_LEGACY_PTYS: &str = "pty.legacy_count=0";

/// The last ubd slot UML has (it supports 16).
pub const LAST_UBD: usize = 15;

/// The `hostfs=` prefix for guests that must not reach host files: a path
/// below a character device, which cannot exist and cannot be created, so
/// every hostfs mount fails (ENOTDIR) whatever path the guest appends —
/// `..` chains included, since the host resolves components in order.
pub const NO_HOST_FILES: &str = "/dev/null/umlctl-no-host-files";

/// The block device name of ubd index `i` (`/dev/ubda`, `/dev/ubdb`, …).
pub fn ubd_device(i: usize) -> String {
    format!(
        "/dev/ubd{}",
        char::from(b'a' + u8::try_from(i % 26).unwrap_or(0))
    )
}

/// A block device (`ubdN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The file the guest writes to: a COW file, or the image itself.
    pub file: PathBuf,
    /// With a COW file: its backing image (opened read-only by UML).
    pub backing: Option<PathBuf>,
    pub read_only: bool,
}

/// The mode the guest's processes run in (UML's `seccomp=`, 6.16 on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Userspace {
    /// Traced with ptrace: the guest kernel's memory is out of their reach.
    #[default]
    Ptrace,
    /// seccomp: faster system calls and page faults, but guest processes
    /// can reach the guest kernel's memory (trusted workloads only).
    Seccomp,
    /// seccomp where the host allows it, else ptrace (UML decides).
    Auto,
}

impl std::str::FromStr for Userspace {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Userspace, String> {
        match s {
            "ptrace" => Ok(Userspace::Ptrace),
            "seccomp" => Ok(Userspace::Seccomp),
            "auto" => Ok(Userspace::Auto),
            _ => Err(format!(
                "--userspace {s:?}: expected ptrace, seccomp or auto"
            )),
        }
    }
}

impl Userspace {
    /// The `seccomp=` boot option for a kernel that has the mode, or an
    /// error naming what is missing for one that has not (`version`).
    pub fn boot_option(
        self,
        kernel_has_seccomp: bool,
        version: &str,
    ) -> Result<Option<&'static str>> {
        match (self, kernel_has_seccomp) {
            (Userspace::Ptrace, true) => Ok(Some("off")),
            (Userspace::Seccomp, true) => Ok(Some("on")),
            (Userspace::Auto, true) => Ok(Some("auto")),
            (Userspace::Seccomp, false) => Err(Error::Usage(format!(
                "--userspace seccomp: kernel {version} has no seccomp mode (UML 6.16 or later; `umlctl kernel info` lists the modes a kernel has)"
            ))),
            // ptrace is all there is; auto falls back to it.
            (_, false) => Ok(None),
        }
    }
}

/// The most CPUs `--cpus` gives a guest.
pub const MAX_CPUS: u32 = 64;

/// The `ncpus=` boot option for `--cpus N`: none for 1 (what every kernel
/// runs with), `N` on a kernel built with SMP (UML 6.19 on) whose guest
/// processes run in seccomp mode (UML runs several CPUs only there: a
/// ptrace-mode guest with `ncpus=2` prints nothing at all), and an error
/// naming what is needed otherwise (`version` is the kernel's).
pub fn cpus_option(
    cpus: u32,
    kernel_has_smp: bool,
    userspace: Userspace,
    version: &str,
) -> Result<Option<u32>> {
    match cpus {
        0 => Err(Error::Usage(
            "--cpus 0: a guest needs at least one CPU".into(),
        )),
        1 => Ok(None),
        n if n > MAX_CPUS => Err(Error::Usage(format!(
            "--cpus {n}: at most {MAX_CPUS}"
        ))),
        n if !kernel_has_smp => Err(Error::Usage(format!(
            "--cpus {n}: kernel {version} runs one CPU (several need UML 6.19 or later built with CONFIG_SMP; `umlctl kernel info` says whether a kernel has SMP)"
        ))),
        n if userspace != Userspace::Seccomp => Err(Error::Usage(format!(
            "--cpus {n}: UML runs several CPUs only with its guest processes in seccomp mode; add --userspace seccomp (see the README on what that mode gives up)"
        ))),
        n => Ok(Some(n)),
    }
}

/// Everything that goes onto a UML command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootPlan {
    pub mem_bytes: u64,
    pub umid: String,
    /// Directory holding the instance directory `<uml_dir>/<umid>/`.
    pub uml_dir: PathBuf,
    pub root: BootRoot,
    /// The init program, as a path inside the root (`None`: the kernel's
    /// default search, /sbin/init first).
    pub init: Option<PathBuf>,
    /// `mconsole=notify:<socket>`: where UML reports that its mconsole is
    /// up, and panics.
    pub notify: Option<PathBuf>,
    pub disks: Vec<Disk>,
    /// Disks at fixed ubd indices, after `disks` and before the init disk
    /// (`start`'s exec stdin rings).
    pub fixed_disks: Vec<(usize, Disk)>,
    /// The kernel console (`ttyN`, UML's `conN`): its line, input, output.
    /// `run` uses line 0; `start` line 1, where the gettys of systemd,
    /// sysvinit and busybox images look for a terminal.
    pub console_line: u32,
    pub console: (Chan, Chan),
    /// Serial lines: (line number, input, output). The others exist but
    /// are connected to nothing.
    pub lines: Vec<(u32, Chan, Chan)>,
    /// `key=value` words the kernel passes on to init's environment.
    pub init_env: Vec<(String, String)>,
    /// Network interfaces, `vec0`, `vec1`, … in order.
    pub nics: Vec<Nic>,
    /// UML's `seccomp=` (on, off, auto); `None` for kernels without it.
    pub seccomp: Option<&'static str>,
    /// Initcalls the kernel skips (`initcall_blacklist=`): boot-time speed
    /// tests whose result nothing in the guest uses.
    pub skip_initcalls: Vec<&'static str>,
    /// UML's `ncpus=` (SMP kernels, more than one CPU).
    pub ncpus: Option<u32>,
    /// With an init disk: the one host directory hostfs may reach (a
    /// lab's `shared/`, bound into the jail); `None`: no host files
    /// ([`NO_HOST_FILES`]).
    pub hostfs: Option<PathBuf>,
}

/// How a guest interface reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicTransport {
    /// A tap UML opens by name (vnet headers, offloads).
    Tap { ifname: String },
    /// A tap descriptor UML inherits at this number (no offloads).
    Fd { fd: i32 },
    /// A packet socket (`SOCK_SEQPACKET`, one frame per packet) UML
    /// inherits at this number: the `fd` transport with its send and
    /// receive queues (sendmmsg/recvmmsg), so that a full socket makes it
    /// wait rather than drop the frame (as it does one frame at a time).
    Socket { fd: i32 },
}

/// One guest network interface (UML's vector driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub transport: NicTransport,
    /// `02:…`, six hex octets.
    pub mac: String,
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Nic {
    /// `vecN:transport=…` for interface `n`.
    fn arg(&self, n: usize) -> Result<String> {
        if !valid_mac(&self.mac) {
            return Err(Error::Usage(format!("invalid MAC address {:?}", self.mac)));
        }
        Ok(match &self.transport {
            NicTransport::Tap { ifname } => {
                let ok = !ifname.is_empty()
                    && ifname.len() <= 15
                    && ifname
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return Err(Error::Usage(format!(
                        "tap name {ifname:?} cannot be passed on UML's command line"
                    )));
                }
                format!(
                    "vec{n}:transport=tap,ifname={ifname},depth=128,mac={}",
                    self.mac
                )
            }
            NicTransport::Fd { fd } => {
                format!("vec{n}:transport=fd,fd={fd},vec=0,mac={}", self.mac)
            }
            NicTransport::Socket { fd } => {
                format!(
                    "vec{n}:transport=fd,fd={fd},vec=1,depth=1024,mac={}",
                    self.mac
                )
            }
        })
    }
}

/// Characters that cannot appear in a path on the UML command line.
fn check_path(what: &str, p: &Path) -> Result<String> {
    let s = p.to_str().ok_or_else(|| {
        Error::Usage(format!(
            "{what} path {} is not valid UTF-8, which UML's command line cannot carry",
            p.display()
        ))
    })?;
    if let Some(c) = s
        .chars()
        .find(|c| matches!(c, ',' | ':' | '"') || c.is_whitespace() || c.is_control())
    {
        return Err(Error::Usage(format!(
            "{what} path {s:?} contains {c:?}, which UML's command line cannot carry (it splits on whitespace, ',' and ':'); move or symlink the file to a plain path"
        )));
    }
    Ok(s.to_string())
}

/// Format a byte count for `mem=`, exactly (UML's memparse suffixes).
fn mem_arg(bytes: u64) -> String {
    const K: u64 = 1024;
    if bytes % (K * K * K) == 0 {
        format!("{}G", bytes / (K * K * K))
    } else if bytes % (K * K) == 0 {
        format!("{}M", bytes / (K * K))
    } else if bytes % K == 0 {
        format!("{}K", bytes / K)
    } else {
        bytes.to_string()
    }
}

/// Parse a size such as `256M`, `1G`, `512m`, `1048576`, `64MiB`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let bad = || {
        Error::Usage(format!(
            "invalid size {s:?}: expected a number with an optional K, M, G or T suffix, e.g. 256M"
        ))
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

impl BootPlan {
    /// The UML argument vector (without argv\[0\]).
    pub fn to_args(&self) -> Result<Vec<String>> {
        if self.mem_bytes < 16 << 20 {
            return Err(Error::Usage(format!(
                "guest memory {} is too small: UML needs at least 16M",
                mem_arg(self.mem_bytes)
            )));
        }
        if self.umid.is_empty()
            || self.umid.len() > 63
            || !self
                .umid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(Error::Usage(format!(
                "invalid umid {:?}: use up to 63 letters, digits, '-', '_' or '.'",
                self.umid
            )));
        }
        if self.disks.len() > 16 {
            return Err(Error::Usage(format!(
                "{} disks given; UML supports at most 16",
                self.disks.len()
            )));
        }
        let mut a = Vec::new();
        a.push(format!("mem={}", mem_arg(self.mem_bytes)));
        let mut uml_dir = check_path("instance directory", &self.uml_dir)?;
        if !uml_dir.ends_with('/') {
            uml_dir.push('/');
        }
        a.push(format!("uml_dir={uml_dir}"));
        a.push(format!("umid={}", self.umid));
        match &self.root {
            BootRoot::Hostfs => {
                a.push("root=/dev/root".into());
                a.push("rootfstype=hostfs".into());
                a.push("rootflags=/".into());
                a.push("ro".into());
            }
            BootRoot::InitDisk { index } => {
                if self.disks.len() <= *index || !self.disks[*index].read_only {
                    return Err(Error::Usage(format!(
                        "the init disk must be read-only disk {index}"
                    )));
                }
                a.push(format!("hostfs={NO_HOST_FILES}"));
                a.push(format!("root={}", ubd_device(*index)));
                a.push("rootfstype=ext4".into());
                a.push("ro".into());
            }
            BootRoot::InitDiskLast { file } => {
                if self.disks.len() > LAST_UBD {
                    return Err(Error::Usage(format!(
                        "{} disks given; with umlctl's init disk UML takes at most {LAST_UBD}",
                        self.disks.len()
                    )));
                }
                match &self.hostfs {
                    Some(d) => a.push(format!("hostfs={}", check_path("shared directory", d)?)),
                    None => a.push(format!("hostfs={NO_HOST_FILES}")),
                }
                a.push(format!("root={}", ubd_device(LAST_UBD)));
                a.push("rootfstype=ext4".into());
                a.push("ro".into());
                a.push(format!("ubd{LAST_UBD}r={}", check_path("init disk", file)?));
            }
            BootRoot::Disk { fstype } => {
                if self.disks.is_empty() {
                    return Err(Error::Usage("a disk root needs at least one disk".into()));
                }
                a.push(format!("hostfs={NO_HOST_FILES}"));
                a.push("root=/dev/ubda".into());
                if !fstype.is_empty() {
                    a.push(format!("rootfstype={fstype}"));
                }
                a.push("rw".into());
            }
        }
        for (i, d) in self.disks.iter().enumerate() {
            let flags = if d.read_only { "r" } else { "" };
            let file = check_path("disk", &d.file)?;
            match &d.backing {
                Some(b) => a.push(format!(
                    "ubd{i}{flags}={file},{}",
                    check_path("backing image", b)?
                )),
                None => a.push(format!("ubd{i}{flags}={file}")),
            }
        }
        for (i, d) in &self.fixed_disks {
            if *i < self.disks.len() || *i >= LAST_UBD {
                return Err(Error::Usage(format!(
                    "ubd slot {i} is taken ({} disks given; slots {}..{LAST_UBD} are umlctl's)",
                    self.disks.len(),
                    self.fixed_disks.iter().map(|d| d.0).min().unwrap_or(*i)
                )));
            }
            let flags = if d.read_only { "r" } else { "" };
            a.push(format!("ubd{i}{flags}={}", check_path("disk", &d.file)?));
        }
        a.push("con=null".into());
        a.push(format!(
            "con{}={},{}",
            self.console_line,
            self.console.0.spec(),
            self.console.1.spec()
        ));
        a.push("ssl=null".into());
        for (n, i, o) in &self.lines {
            a.push(format!("ssl{n}={},{}", i.spec(), o.spec()));
        }
        for (n, nic) in self.nics.iter().enumerate() {
            a.push(nic.arg(n)?);
        }
        a.push(format!("console=tty{}", self.console_line));
        if let Some(s) = self.seccomp {
            a.push(format!("seccomp={s}"));
        }
        if let Some(n) = self.ncpus {
            a.push(format!("ncpus={n}"));
        }
        if !self.skip_initcalls.is_empty() {
            a.push(format!(
                "initcall_blacklist={}",
                self.skip_initcalls.join(",")
            ));
        }
        a.push(NO_LEGACY_PTYS.into());
        a.push("noreboot".into());
        for (k, v) in &self.init_env {
            let ok = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_graphic() && c != '"' && c != '=')
            };
            if !ok(k) || !(v.is_empty() || ok(v)) {
                return Err(Error::Usage(format!(
                    "invalid init environment entry {k:?}={v:?}"
                )));
            }
            a.push(format!("{k}={v}"));
        }
        if let Some(n) = &self.notify {
            let n = check_path("notify socket", n)?;
            if n.len() >= 108 {
                return Err(Error::Usage(format!(
                    "notify socket path {n:?} is too long for a unix socket (108 bytes)"
                )));
            }
            a.push(format!("mconsole=notify:{n}"));
        }
        if let Some(init) = &self.init {
            a.push(format!("init={}", check_path("init", init)?));
        }
        let len: usize = a.iter().map(|s| s.len() + 1).sum();
        if len >= MAX_CMDLINE {
            return Err(Error::Usage(format!(
                "the UML command line would be {len} bytes; UML accepts at most {MAX_CMDLINE}"
            )));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_need_smp_and_stay_in_range() {
        let s = Userspace::Seccomp;
        assert_eq!(
            cpus_option(1, false, Userspace::Ptrace, "6.1.176").unwrap(),
            None
        );
        assert_eq!(cpus_option(4, true, s, "7.2.13").unwrap(), Some(4));
        let e = cpus_option(2, false, s, "6.12.118")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("6.12.118") && e.contains("6.19") && e.contains("CONFIG_SMP"),
            "{e}"
        );
        let e = cpus_option(2, true, Userspace::Ptrace, "7.2.13")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--userspace seccomp"), "{e}");
        assert!(cpus_option(2, true, Userspace::Auto, "7.2.13").is_err());
        assert!(cpus_option(0, true, s, "7.2").is_err());
        assert!(cpus_option(MAX_CPUS + 1, true, s, "7.2").is_err());
    }

    #[test]
    fn userspace_modes_need_a_kernel_that_has_them() {
        assert_eq!(
            Userspace::Ptrace.boot_option(true, "7.2.13").unwrap(),
            Some("off")
        );
        assert_eq!(
            Userspace::Seccomp.boot_option(true, "7.2.13").unwrap(),
            Some("on")
        );
        assert_eq!(
            Userspace::Auto.boot_option(true, "7.2.13").unwrap(),
            Some("auto")
        );
        assert_eq!(
            Userspace::Ptrace.boot_option(false, "6.1.176").unwrap(),
            None
        );
        assert_eq!(Userspace::Auto.boot_option(false, "6.1.176").unwrap(), None);
        let e = Userspace::Seccomp
            .boot_option(false, "6.1.176")
            .unwrap_err()
            .to_string();
        assert!(e.contains("6.1.176") && e.contains("6.16"), "{e}");
        assert!("nope".parse::<Userspace>().is_err());
        let mut p = plan();
        p.seccomp = Some("on");
        assert!(p.to_args().unwrap().contains(&"seccomp=on".to_string()));
    }

    #[test]
    fn nics() {
        let mut p = plan();
        p.nics = vec![
            Nic {
                transport: NicTransport::Tap {
                    ifname: "umltap0".into(),
                },
                mac: "02:aa:bb:cc:dd:ee".into(),
            },
            Nic {
                transport: NicTransport::Fd { fd: 8 },
                mac: "02:00:00:00:00:01".into(),
            },
        ];
        let a = p.to_args().unwrap();
        assert!(
            a.contains(
                &"vec0:transport=tap,ifname=umltap0,depth=128,mac=02:aa:bb:cc:dd:ee".to_string()
            ),
            "{a:?}"
        );
        assert!(
            a.contains(&"vec1:transport=fd,fd=8,vec=0,mac=02:00:00:00:00:01".to_string()),
            "{a:?}"
        );
        for (t, mac) in [
            (
                NicTransport::Tap {
                    ifname: "a,b".into(),
                },
                "02:00:00:00:00:01",
            ),
            (
                NicTransport::Tap {
                    ifname: "a=b".into(),
                },
                "02:00:00:00:00:01",
            ),
            (
                NicTransport::Tap {
                    ifname: "umltap0".into(),
                },
                "02:00:00:00:00",
            ),
            (
                NicTransport::Tap {
                    ifname: "umltap0".into(),
                },
                "zz:00:00:00:00:01",
            ),
        ] {
            p.nics = vec![Nic {
                transport: t,
                mac: mac.into(),
            }];
            assert!(p.to_args().is_err());
        }
    }

    fn plan() -> BootPlan {
        BootPlan {
            mem_bytes: 256 << 20,
            umid: "r-abc".into(),
            uml_dir: "/run/user/1000/umlctl/r-abc".into(),
            root: BootRoot::Hostfs,
            init: Some("/usr/bin/umlctl".into()),
            notify: None,
            disks: vec![],
            fixed_disks: vec![],
            console_line: 0,
            seccomp: None,
            skip_initcalls: vec![],
            ncpus: None,
            hostfs: None,
            console: (Chan::Fd(0), Chan::Fd(1)),
            lines: vec![(0, Chan::Fd(3), Chan::Null), (1, Chan::Null, Chan::Fd(4))],
            init_env: vec![],
            nics: vec![],
        }
    }

    #[test]
    fn host_root_line() {
        let a = plan().to_args().unwrap().join(" ");
        assert_eq!(
            a,
            "mem=256M uml_dir=/run/user/1000/umlctl/r-abc/ umid=r-abc root=/dev/root rootfstype=hostfs rootflags=/ ro \
             con=null con0=fd:0,fd:1 ssl=null ssl0=fd:3,null ssl1=null,fd:4 console=tty0 pty.legacy_count=0 noreboot init=/usr/bin/umlctl"
        );
    }

    #[test]
    fn fixed_disks_go_at_their_slots_and_never_over_the_guests_own() {
        let mut p = plan();
        p.root = BootRoot::InitDiskLast {
            file: "/c/init.ext4".into(),
        };
        let disk = |f: &str, ro| Disk {
            file: f.into(),
            backing: None,
            read_only: ro,
        };
        p.disks.push(disk("/s/overlay.cow", false));
        p.fixed_disks.push((11, disk("/s/exec0.ring", true)));
        let a = p.to_args().unwrap();
        assert!(a.contains(&"ubd11r=/s/exec0.ring".to_string()), "{a:?}");
        assert!(a.contains(&"ubd15r=/c/init.ext4".to_string()), "{a:?}");
        while p.disks.len() < 12 {
            p.disks.push(disk("/s/more.img", false));
        }
        assert!(p.to_args().is_err(), "disk 11 given twice");
        p.disks.truncate(1);
        p.fixed_disks.push((LAST_UBD, disk("/s/x", true)));
        assert!(p.to_args().is_err(), "the init disk's slot");
    }

    #[test]
    fn image_with_cow_and_init_disk() {
        let mut p = plan();
        p.root = BootRoot::InitDisk { index: 1 };
        p.init = Some("/umlctl".into());
        p.disks.push(Disk {
            file: "/run/x/overlay.cow".into(),
            backing: Some("/img/root.ext4".into()),
            read_only: false,
        });
        assert!(p.to_args().is_err(), "no init disk");
        p.disks.push(Disk {
            file: "/c/initroot/abc.ext4".into(),
            backing: None,
            read_only: false,
        });
        assert!(p.to_args().is_err(), "a writable init disk");
        p.disks[1].read_only = true;
        let a = p.to_args().unwrap();
        assert!(a.contains(&format!("hostfs={NO_HOST_FILES}")), "{a:?}");
        assert!(a.contains(&"root=/dev/ubdb".to_string()), "{a:?}");
        assert!(a.contains(&"ubd0=/run/x/overlay.cow,/img/root.ext4".to_string()));
        assert!(a.contains(&"ubd1r=/c/initroot/abc.ext4".to_string()));
        assert!(a.contains(&"init=/umlctl".to_string()));
        assert!(!a.iter().any(|w| w == "rw"));
    }

    #[test]
    fn no_host_files_cannot_exist() {
        // A path below a character device is never a directory.
        assert!(std::fs::metadata(NO_HOST_FILES).is_err());
        assert!(std::fs::metadata(format!("{NO_HOST_FILES}/../../etc")).is_err());
        assert_eq!(ubd_device(0), "/dev/ubda");
        assert_eq!(ubd_device(15), "/dev/ubdp");
    }

    #[test]
    fn disk_root_for_detached_guests() {
        let mut p = plan();
        p.root = BootRoot::Disk {
            fstype: "ext4".into(),
        };
        p.init = None;
        p.notify = Some("/s/notify.sock".into());
        assert!(p.to_args().is_err(), "no disk");
        p.disks.push(Disk {
            file: "/s/overlay.cow".into(),
            backing: None,
            read_only: false,
        });
        let a = p.to_args().unwrap().join(" ");
        assert!(
            a.contains(&format!(
                "hostfs={NO_HOST_FILES} root=/dev/ubda rootfstype=ext4 rw"
            )),
            "{a}"
        );
        assert!(
            a.ends_with("noreboot mconsole=notify:/s/notify.sock"),
            "{a}"
        );
        assert!(!a.contains("init="));
    }

    #[test]
    fn reserved_characters_are_refused() {
        for bad in ["/a b/img", "/a,b", "/a:b", "/a\"b", "/a\tb"] {
            let mut p = plan();
            p.disks.push(Disk {
                file: bad.into(),
                backing: None,
                read_only: false,
            });
            let e = p.to_args().unwrap_err().to_string();
            assert!(e.contains("cannot carry"), "{bad}: {e}");
        }
    }

    #[test]
    fn limits() {
        let mut p = plan();
        p.mem_bytes = 1 << 20;
        assert!(p.to_args().is_err());
        let mut p = plan();
        p.umid = "x".repeat(64);
        assert!(p.to_args().is_err());
        let mut p = plan();
        p.init = Some(PathBuf::from(format!("/{}", "a".repeat(5000))));
        assert!(p
            .to_args()
            .unwrap_err()
            .to_string()
            .contains("at most 4096"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert_eq!(mem_arg(256 << 20), "256M");
        assert_eq!(mem_arg(2 << 30), "2G");
        assert_eq!(mem_arg(1536 << 10), "1536K");
    }
}
