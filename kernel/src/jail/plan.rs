//! The steps that build a jail, prepared in the parent (paths as C
//! strings, the order of mounts) so that the child only replays them.

use super::*;

/// One step of building the jail, on prepared data.
pub(super) enum Op {
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// mount_setattr: add these attributes (recursively or not).
    SetAttr {
        path: CString,
        set: u64,
        recursive: bool,
    },
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    /// Create an empty file (a bind target) unless something is there.
    Touch {
        path: CString,
    },
    /// Create a file with this content.
    Write {
        path: CString,
        data: Vec<u8>,
    },
    /// Create a device node owned by (uid, gid).
    Mknod {
        path: CString,
        mode: libc::mode_t,
        dev: libc::dev_t,
        owner: (u32, u32),
    },
    /// Attach a detached mount tree (prepared by the parent) here.
    MoveMount {
        fd: RawFd,
        dst: CString,
    },
}

/// Steps outside the op list, for error reports.
/// The most arguments and environment entries a jailed program gets (the
/// child builds its argv and envp in fixed arrays: no allocation there).
pub(super) const MAX_ARGS: usize = 511;
pub(super) const MAX_ENV: usize = 63;

pub(super) const STEP_SYNC: u32 = 10_000;
pub(super) const STEP_PIVOT: u32 = 10_001;
pub(super) const STEP_ROOT_RO: u32 = 10_002;
pub(super) const STEP_IDENTITY: u32 = 10_003;
pub(super) const STEP_FORK: u32 = 10_004;
pub(super) const STEP_FDS: u32 = 10_005;
pub(super) const STEP_CHDIR: u32 = 10_006;
pub(super) const STEP_EXEC: u32 = 10_007;
pub(super) const STEP_CAPS: u32 = 10_008;
/// Not a failure: the program stopped itself before exec (for a debugger).
pub(super) const STEP_STOPPED: u32 = 10_009;

/// Everything the child needs, prepared before `clone`.
pub(super) struct Plan {
    pub(super) ops: Vec<Op>,
    pub(super) descs: Vec<String>,
    /// The mount point the new root is built on.
    pub(super) work: CString,
    pub(super) empty_root: bool,
    /// Drop to this (uid, gid) with setresuid (root without a user
    /// namespace).
    pub(super) setid: Option<(u32, u32)>,
    pub(super) program: CString,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    pub(super) cwd: CString,
    pub(super) fds: Vec<(RawFd, i32)>,
    pub(super) new_session: bool,
    pub(super) die_with_parent: bool,
    pub(super) stop_before_exec: bool,
}

pub(super) fn cstr(p: impl AsRef<OsStr>) -> Result<CString> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| Error::Usage(format!("path {:?} contains a NUL byte", p.as_ref())))
}

/// `work` + `dst` (an absolute path).
pub(super) fn under(work: &Path, dst: &Path) -> PathBuf {
    let rel: PathBuf = dst
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    work.join(rel)
}

/// Directories from `work` down to `dst`'s parent, shallowest first.
pub(super) fn parents_of(work: &Path, dst: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut cur = work.to_path_buf();
    let comps: Vec<_> = dst
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    for c in comps.iter().take(comps.len().saturating_sub(1)) {
        cur.push(c);
        out.push(cur.clone());
    }
    out
}

/// Host paths that private tmpfs mounts hide in a host-root jail.
pub(super) const HOST_ROOT_PRIVATE: &[&str] =
    &["/tmp", "/var/tmp", "/run", "/proc", "/sys", "/dev"];

/// Where UML's memory file goes in the jail (its `TMPDIR`).
pub const MEMORY_DIR: &str = "/dev/shm";

/// Device nodes every jail gets.
pub(super) const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

pub(super) struct Builder {
    ops: Vec<Op>,
    descs: Vec<String>,
}

impl Builder {
    fn push(&mut self, op: Op, desc: String) {
        self.ops.push(op);
        self.descs.push(desc);
    }
    fn mkdir(&mut self, p: &Path, mode: libc::mode_t) -> Result<()> {
        self.push(
            Op::Mkdir {
                path: cstr(p)?,
                mode,
            },
            format!("create directory {} in the jail", p.display()),
        );
        Ok(())
    }
    fn tmpfs(&mut self, at: &Path, data: &str, what: &str) -> Result<()> {
        self.push(
            Op::Mount {
                src: Some(cstr("tmpfs")?),
                dst: cstr(at)?,
                fstype: Some(cstr("tmpfs")?),
                flags: libc::MS_NOSUID | libc::MS_NODEV,
                data: Some(cstr(data)?),
            },
            format!("mount a private tmpfs for {what}"),
        );
        Ok(())
    }
}

/// Prepare every step for `spec` and `launch`, with `work` as the mount
/// point of the new root and `idmaps` the detached idmapped trees for binds
/// the jail user could not otherwise open.
pub(super) fn plan(
    spec: &JailSpec,
    launch: &Launch,
    work: &Path,
    idmaps: &[(usize, OwnedFd)],
) -> Result<Plan> {
    let mut b = Builder {
        ops: Vec::new(),
        descs: Vec::new(),
    };
    b.push(
        Op::Mount {
            src: None,
            dst: cstr("/")?,
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        },
        "make the jail's mounts private".into(),
    );
    match spec.root {
        JailRoot::Empty => {
            b.tmpfs(work, "mode=0755,size=4m,nr_inodes=4096", "the jail's root")?;
            for d in ["dev", "proc"] {
                b.mkdir(&work.join(d), 0o755)?;
            }
        }
        JailRoot::HostReadOnly => {
            b.push(
                Op::Mount {
                    src: Some(cstr("/")?),
                    dst: cstr(work)?,
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                },
                "bind the host's root into the jail".into(),
            );
            b.push(
                Op::SetAttr {
                    path: cstr(work)?,
                    set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
                    recursive: true,
                },
                "make the host's root read-only in the jail (mount_setattr, Linux ≥ 5.12)".into(),
            );
            for p in HOST_ROOT_PRIVATE {
                if !Path::new(p).is_dir() {
                    continue;
                }
                let at = under(work, Path::new(p));
                let opt = match *p {
                    "/tmp" | "/var/tmp" => "mode=1777,size=64m",
                    _ => "mode=0755,size=4m",
                };
                b.tmpfs(&at, opt, p)?;
            }
        }
    }
    // UML's memory file: a private tmpfs sized to the guest, exec allowed.
    let shm = work.join(MEMORY_DIR.trim_start_matches('/'));
    b.mkdir(&shm, 0o1777)?;
    b.tmpfs(
        &shm,
        &format!("mode=1777,size={}", spec.tmp_bytes),
        "UML's memory file",
    )?;
    // UML reads the host's CPU flags from /proc/cpuinfo; a copy gives it
    // them without any of procfs.
    let cpuinfo = fs::read("/proc/cpuinfo").unwrap_or_default();
    b.push(
        Op::Write {
            path: cstr(work.join("proc/cpuinfo"))?,
            data: cpuinfo,
        },
        "write the jail's /proc/cpuinfo".into(),
    );
    let mut devices: Vec<&str> = DEVICES.to_vec();
    if spec.tun {
        let net = work.join("dev/net");
        b.mkdir(&net, 0o755)?;
        let (u, g) = spec.identity();
        if is_root() && u != 0 {
            // The host's node is root's (0600): the jail gets its own, for
            // its uid only, on a small tmpfs that allows device nodes.
            b.push(
                Op::Mount {
                    src: Some(cstr("tmpfs")?),
                    dst: cstr(&net)?,
                    fstype: Some(cstr("tmpfs")?),
                    flags: libc::MS_NOSUID | libc::MS_NOEXEC,
                    data: Some(cstr("mode=0755,size=64k,nr_inodes=16")?),
                },
                "mount a tmpfs for /dev/net".into(),
            );
            b.push(
                Op::Mknod {
                    path: cstr(net.join("tun"))?,
                    mode: libc::S_IFCHR | 0o600,
                    dev: libc::makedev(10, 200),
                    owner: (u, g),
                },
                format!("create /dev/net/tun for uid {u} in the jail"),
            );
        } else {
            devices.push("/dev/net/tun");
        }
    }
    for d in devices {
        if fs::symlink_metadata(d).is_err() {
            continue;
        }
        let at = under(work, Path::new(d));
        b.push(
            Op::Touch { path: cstr(&at)? },
            format!("create {d} in the jail"),
        );
        b.push(
            Op::Mount {
                src: Some(cstr(d)?),
                dst: cstr(&at)?,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            },
            format!("bind {d} into the jail"),
        );
    }
    for (i, bind) in spec.binds.iter().enumerate() {
        if !bind.dst.is_absolute() {
            return Err(Error::Usage(format!(
                "jail bind target {} is not absolute",
                bind.dst.display()
            )));
        }
        let md = fs::metadata(&bind.src).map_err(|e| Error::io("stat", &bind.src, e))?;
        if spec.root == JailRoot::HostReadOnly && !hidden_in_host_root(&bind.dst) {
            // In the host's read-only view already; a bind target there must
            // not pass through a symlink (it would resolve outside the jail
            // being built), so only resolved paths get their own mount.
            let parent = bind.dst.parent().unwrap_or(Path::new("/"));
            if fs::canonicalize(parent).ok().as_deref() != Some(parent) {
                continue;
            }
        }
        for p in parents_of(work, &bind.dst) {
            b.mkdir(&p, 0o755)?;
        }
        let at = under(work, &bind.dst);
        if md.is_dir() {
            b.mkdir(&at, 0o755)?;
        } else {
            b.push(
                Op::Touch { path: cstr(&at)? },
                format!("create {} in the jail", bind.dst.display()),
            );
        }
        if let Some((_, fd)) = idmaps.iter().find(|(j, _)| *j == i) {
            b.push(
                Op::MoveMount {
                    fd: fd.as_raw_fd(),
                    dst: cstr(&at)?,
                },
                format!("attach the id-mapped {} in the jail", bind.src.display()),
            );
            continue;
        }
        b.push(
            Op::Mount {
                src: Some(cstr(&bind.src)?),
                dst: cstr(&at)?,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            },
            format!("bind {} into the jail", bind.src.display()),
        );
        let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if !bind.writable {
            set |= MOUNT_ATTR_RDONLY;
        }
        b.push(
            Op::SetAttr {
                path: cstr(&at)?,
                set,
                recursive: false,
            },
            format!("restrict {} in the jail", bind.src.display()),
        );
    }

    let setid = if is_root() {
        let (u, g) = spec.identity();
        Some((u, g))
    } else {
        None
    };
    if launch.args.len() + 1 > MAX_ARGS || launch.env.len() > MAX_ENV {
        return Err(Error::Usage(format!(
            "{} arguments and {} environment entries for {}; a jailed program takes at most {MAX_ARGS} and {MAX_ENV}",
            launch.args.len() + 1,
            launch.env.len(),
            launch.program.display()
        )));
    }
    let mut argv = vec![cstr(&launch.program)?];
    for a in &launch.args {
        argv.push(cstr(a)?);
    }
    let mut envp = Vec::new();
    for (k, v) in &launch.env {
        envp.push(cstr(format!("{k}={v}"))?);
    }
    Ok(Plan {
        ops: b.ops,
        descs: b.descs,
        work: cstr(work)?,
        empty_root: spec.root == JailRoot::Empty,
        setid,
        program: cstr(&launch.program)?,
        argv,
        envp,
        cwd: cstr(&launch.cwd)?,
        fds: launch.fds.clone(),
        new_session: launch.new_session,
        die_with_parent: launch.die_with_parent,
        stop_before_exec: launch.stop_before_exec,
    })
}
