//! Launching a guest's UML: the kernel prepared (located, checked, the
//! xstate shim decided), its jail and disks, its network attachment.

#[allow(unused_imports)]
use super::*;

/// Guest interfaces from netd: the connection (which keeps the taps alive),
/// the command-line entries, the guest-side configuration, and the tap
/// descriptors UML inherits (fd mode), in order from fd [`FIRST_TAP_FD`].
pub struct Network {
    pub client: Option<umlctl_netd::client::Client>,
    pub nics: Vec<crate::cmdline::Nic>,
    pub specs: Vec<crate::protocol::NicSpec>,
    pub fds: Vec<OwnedFd>,
    /// The host ports published to each interface's guest.
    pub published: Vec<Vec<umlctl_netd::protocol::Publish>>,
    /// Processes that serve the guest's interfaces (`--net user`'s passt
    /// and relay): they join the guest's cgroup.
    pub helpers: Vec<i32>,
}

impl Network {
    /// Put the interfaces' helper processes in the guest's cgroup, so that
    /// `--cpu-quota` and `--memory-max` count them too.
    pub fn join(&self, cg: Option<&crate::cgroup::Owned>) -> Result<()> {
        if let Some(cg) = cg {
            for &p in &self.helpers {
                cg.0.add(p)?;
            }
        }
        Ok(())
    }
}

/// UML's vector driver, as an interface comes up, takes the locks of its
/// receive and transmit queues to reset statistics (`vector_reset_stats`),
/// but its tap transport never creates those queues, and the tap-descriptor
/// path (`fd` with `vec=0`) neither: a no-op on a one-CPU kernel, a NULL
/// dereference (a kernel panic) on an SMP one (seen on 7.2.13 with both an
/// owned tap and a passed descriptor; the code is the same in 6.12, which
/// has no SMP). Refuse any network interface on an SMP kernel, before a tap
/// is made, with the way out instead of booting into the panic.
pub fn check_nics(info: &crate::inspect::KernelInfo, nics: usize) -> Result<()> {
    if nics > 0 && info.has("smp") {
        return Err(Error::Usage(format!(
            "kernel {} ({}) is built with SMP, and UML's vector driver panics on SMP kernels as soon as a network interface comes up (it locks receive and transmit queues that its tap transports never create: a no-op on one CPU, a NULL dereference on several; a kernel bug): give networked guests and labs a one-CPU kernel (umlctl kernel build --set CONFIG_SMP=n --name NAME, then --kernel with its path), or use --net user (passt, through a socket with those queues: not affected)",
            info.version,
            info.path.display()
        )));
    }
    Ok(())
}

/// Where UML finds the first fd-mode tap descriptor.
pub const FIRST_TAP_FD: i32 = 8;

/// The `--net` value for user-mode networking (passt) instead of a bridge.
pub const USER_NET: &str = "user";

/// Ask netd for a tap on each bridge. An owned tap (UML opens it, with
/// offloads) when this process can open /dev/net/tun, else netd's
/// descriptor (the `fd` transport). [`USER_NET`] instead of a bridge: an
/// interface through passt (see [`crate::usernet`]), no netd. `publish`:
/// host ports for the guest on the first interface (a NAT bridge, or user).
pub fn attach_network(
    bridges: &[String],
    socket: Option<&Path>,
    tag: Option<&str>,
    publish: &[umlctl_netd::protocol::Publish],
) -> Result<Network> {
    use crate::cmdline::{Nic, NicTransport};
    use umlctl_netd::protocol::TapMode;
    let mut net = Network {
        client: None,
        nics: vec![],
        specs: vec![],
        fds: vec![],
        published: vec![],
        helpers: vec![],
    };
    if bridges.is_empty() {
        if !publish.is_empty() {
            return Err(Error::Usage(
                "--publish needs --net BRIDGE (a NAT bridge: the ports reach the guest on it) or --net user"
                    .into(),
            ));
        }
        return Ok(net);
    }
    if bridges.len() > 16 {
        return Err(Error::Usage(format!(
            "{} --net given; at most 16",
            bridges.len()
        )));
    }
    let users = bridges.iter().filter(|b| *b == USER_NET).count();
    if users > 1 {
        return Err(Error::Usage(format!(
            "--net user given {users} times: a guest has at most one user-mode interface (each would be 10.0.2.15 behind its own 10.0.2.2)"
        )));
    }
    let mut client = if users < bridges.len() {
        let path = umlctl_netd::client::socket_path(socket);
        Some(umlctl_netd::client::Client::connect(&path)?)
    } else {
        None
    };
    let mode = if umlctl_netd::client::can_open_tun() {
        TapMode::Owned
    } else {
        TapMode::Fd
    };
    for (i, bridge) in bridges.iter().enumerate() {
        let tag = tag.map(|t| format!("{t}/{i}"));
        let ports = if i == 0 { publish } else { &[] };
        let client = match client.as_mut() {
            Some(c) if bridge != USER_NET => c,
            _ => {
                let u = crate::usernet::spawn(ports)?;
                net.helpers.extend(&u.pids);
                let n = FIRST_TAP_FD + crate::num::small_i32(net.fds.len());
                net.fds.push(u.uml);
                net.nics.push(Nic {
                    transport: NicTransport::Socket { fd: n },
                    mac: crate::usernet::MAC.into(),
                });
                net.published.push(ports.to_vec());
                net.specs.push(crate::usernet::spec(i));
                continue;
            }
        };
        let (lease, fd) = client.create_tap_publishing(bridge, mode, tag.as_deref(), ports)?;
        let transport = match fd {
            Some(fd) => {
                let n = FIRST_TAP_FD + crate::num::small_i32(net.fds.len());
                net.fds.push(fd);
                NicTransport::Fd { fd: n }
            }
            None => {
                if !Path::new("/sys/class/net").join(&lease.ifname).exists() {
                    return Err(Error::Usage(format!(
                        "netd's tap {} is not in this network namespace: run umlctl in the network namespace netd runs in",
                        lease.ifname
                    )));
                }
                NicTransport::Tap {
                    ifname: lease.ifname.clone(),
                }
            }
        };
        net.nics.push(Nic {
            transport,
            mac: lease.mac.clone(),
        });
        net.published.push(lease.publish.clone());
        net.specs.push(crate::protocol::NicSpec {
            device: format!("vec{i}"),
            address: lease.address,
            prefix: lease.prefix,
            gateway: lease.gateway,
            mtu: lease.mtu,
            dns: lease.dns.clone(),
        });
    }
    net.client = client;
    Ok(net)
}

/// A kernel ready to start: found, checked for the features a caller
/// needs, and with the xstate shim decided.
pub struct PreparedKernel {
    pub located: Located,
    pub host_xstate: HostXstate,
    /// Whether this host needs the shim for this kernel.
    pub needs_shim: bool,
    /// The shim to preload, if it will be used.
    pub shim: Option<PathBuf>,
}

impl PreparedKernel {
    /// The boot options for how the guest's processes run: UML's
    /// `seccomp=` and `ncpus=`, or an error naming what this kernel lacks
    /// for `--userspace` and `--cpus`.
    pub fn processes(
        &self,
        userspace: crate::cmdline::Userspace,
        cpus: u32,
    ) -> Result<(Option<&'static str>, Option<u32>)> {
        let info = &self.located.info;
        let seccomp = userspace.boot_option(info.has("seccomp-mode"), &info.version)?;
        let ncpus = crate::cmdline::cpus_option(cpus, info.has("smp"), userspace, &info.version)?;
        Ok((seccomp, ncpus))
    }

    /// UML's environment: in a jail the whole of it (a private `/tmp` for
    /// its memory file, the shim if used); without one, what is added to
    /// umlctl's own (the shim, or nothing: an LD_PRELOAD meant for
    /// something else is dropped).
    ///
    /// Unjailed, UML's memory file goes where an executable mapping works
    /// (see [`crate::preflight::memory_dir_unjailed`]); a change from what
    /// UML would pick is said under `verbose` (always, if it passes over
    /// the user's own `$TMPDIR`).
    pub fn uml_env(&self, jailed: bool, verbose: bool) -> Result<Vec<(String, String)>> {
        let mut env = Vec::new();
        if jailed {
            env.push(("TMPDIR".into(), crate::jail::MEMORY_DIR.into()));
            env.push(("PATH".into(), "/usr/bin:/bin".into()));
        } else {
            let m = crate::preflight::memory_dir_unjailed()?;
            if let Some(w) = &m.warning {
                eprintln!("umlctl: warning: {w}");
            }
            if let (Some(n), true) = (&m.note, verbose) {
                eprintln!("umlctl: {n}");
            }
            env.push(("TMPDIR".into(), m.dir.to_string_lossy().into_owned()));
        }
        if let Some(s) = &self.shim {
            env.push(("LD_PRELOAD".into(), s.to_string_lossy().into_owned()));
        }
        Ok(env)
    }

    /// A jail for this kernel: its binary, libraries and shim, read-only;
    /// the caller adds the guest's own files. `None` with `--no-jail`.
    pub fn jail(&self, root: JailRoot, mem_bytes: u64, opts: JailOpts) -> Option<JailSpec> {
        if !opts.enabled {
            return None;
        }
        let mut j = JailSpec::new(root, mem_bytes);
        j.uid = opts.uid;
        let info = &self.located.info;
        j.bind(Bind::ro(&info.path));
        for lib in &info.libs {
            j.bind(Bind::ro(lib));
        }
        if let Some(s) = &self.shim {
            j.bind(Bind::ro(s));
        }
        Some(j)
    }
}

/// Say loudly, once per command, what `--no-jail` gives up.
pub fn warn_unjailed() {
    eprintln!(
        "umlctl: warning: --no-jail: UML runs with your identity and sees every host file you can; \
a guest (even one booted from an image) that breaks out of its kernel acts as you on this host"
    );
}

/// Start UML: in `jail`, or (`None`) as a plain child process.
pub fn launch(jail: Option<&JailSpec>, l: &Launch, want_status: bool) -> Result<Spawned> {
    match jail {
        Some(j) => crate::jail::spawn(j, l, want_status),
        None => crate::jail::spawn_unjailed(l),
    }
}

/// Add the guest's disks to its jail: each file read-write (read-only if
/// the disk is), and the backing file its COW header names, read-only,
/// under both the resolved path and the path the header names. Backing
/// files the user did not name in `explicit` (an image given with
/// `--image`) must be readable by the jail's uid on their own: a COW file
/// cannot make a root umlctl open an arbitrary host file for the guest.
pub fn bind_disks(jail: &mut JailSpec, disks: &[Disk], explicit: &[PathBuf]) -> Result<()> {
    for d in disks {
        let file = fs::canonicalize(&d.file).map_err(|e| Error::io("resolve", &d.file, e))?;
        jail.bind(Bind {
            writable: !d.read_only,
            ..Bind::ro(&file)
        });
        // The path as given, when it is not itself a symlink (one in a bound
        // directory, as overlay.rs makes, resolves to `file` in the jail).
        let literal = std::path::absolute(&d.file).map_err(|e| Error::io("resolve", &d.file, e))?;
        let is_link = fs::symlink_metadata(&d.file).is_ok_and(|m| m.file_type().is_symlink());
        if literal != file && !is_link {
            jail.bind(Bind {
                src: file.clone(),
                dst: literal,
                writable: !d.read_only,
                explicit: true,
            });
        }
        if let Ok(c) = umlctl_imgtools::cow::Cow::open(&file) {
            let named = c.header.backing.clone();
            let real = c.backing_path();
            if let Ok(src) = fs::canonicalize(&real) {
                let explicit = explicit
                    .iter()
                    .any(|e| fs::canonicalize(e).is_ok_and(|e| e == src));
                jail.bind(Bind {
                    explicit,
                    ..Bind::ro(&src)
                });
                if named.is_absolute() && named != src {
                    jail.bind(Bind {
                        src,
                        dst: named,
                        writable: false,
                        explicit,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Locate the kernel, require `features`, and decide on the xstate shim.
pub fn prepare_kernel(
    kernel: Option<&Path>,
    features: &[&str],
    mode: ShimMode,
) -> Result<PreparedKernel> {
    let located: Located = locate(kernel)?;
    let info = &located.info;
    info.require(features)?;
    let host_xstate = xstate::host_xstate()?;
    let needs_shim = info.fp.needs_shim(host_xstate);
    let use_shim = match mode {
        ShimMode::Auto => needs_shim,
        ShimMode::Off => false,
        ShimMode::Always => true,
    };
    if needs_shim && use_shim && info.linkage == crate::inspect::Linkage::Static {
        return Err(Error::KernelUnusable {
            path: info.path.clone(),
            reason: format!(
                "this {} kernel is statically linked and has a fixed {}-byte FP state buffer, but this host's XSAVE area is {} bytes, so it dies at init (\"ptrace set fp regs failed, errno = 14\") and the xstate shim cannot be preloaded into a static binary\nfix: use a kernel ≥ 6.13, or a dynamically linked build of this one",
                info.version,
                xstate::LEGACY_UML_XSTATE,
                host_xstate.bytes()
            ),
        });
    }
    let shim = if use_shim {
        Some(xstate::shim_path()?)
    } else {
        None
    };
    Ok(PreparedKernel {
        located,
        host_xstate,
        needs_shim,
        shim,
    })
}
