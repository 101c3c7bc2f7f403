//! Containment, tried as a hostile guest would: from inside `--image`
//! guests (run and start), as guest root, hostfs mounts of every shape must
//! fail and a canary outside the jail must never be read or written; a
//! host-root guest cannot write the host even after remounting; the UML
//! process itself sees only its jail; all of it as root and as an
//! unprivileged user; and `doctor` names the fix when the jail cannot be
//! built.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// hostfs options a guest might try: the root, `..` chains, absolute and
/// relative paths, the canary's own directory.
fn hostfs_attempts(canary_dir: &Path) -> String {
    let c = canary_dir.display();
    let opts = [
        String::new(),
        "/".into(),
        "..".into(),
        "../../../../../../..".into(),
        "../../../../../../../etc".into(),
        "/etc".into(),
        "etc".into(),
        "tmp".into(),
        format!("{c}"),
        format!("../../../../../../..{c}"),
        "/dev/null/../../..".into(),
    ];
    let mut s = String::from("mkdir -p /mnt; ");
    for o in opts {
        let opt = if o.is_empty() {
            String::new()
        } else {
            format!("-o '{o}'")
        };
        s.push_str(&format!(
            "if mount -t hostfs none /mnt {opt} 2>/dev/null; then echo 'MOUNTED [{o}]'; \
             cat /mnt/canary /mnt{c}/canary /mnt/etc/hostname 2>/dev/null; \
             echo pwned > /mnt/guest_wrote 2>/dev/null; echo pwned > /mnt{c}/guest_wrote 2>/dev/null; \
             ls /mnt | head -5; umount /mnt; fi; "
        ));
    }
    s.push_str("echo attempts-done");
    s
}

/// A directory outside any jail holding a secret, writable by `owner`.
struct Canary {
    dir: tempfile::TempDir,
    token: String,
}

impl Canary {
    fn new(owner: u32) -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("umlctl-canary-")
            .tempdir_in("/tmp")
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let token = format!("canary-{}-{}", std::process::id(), owner);
        fs::write(dir.path().join("canary"), &token).unwrap();
        fs::set_permissions(dir.path().join("canary"), fs::Permissions::from_mode(0o644)).unwrap();
        chown(dir.path(), owner);
        chown(&dir.path().join("canary"), owner);
        Canary { dir, token }
    }

    /// Nothing of the canary reached the guest's output, and nothing was
    /// written next to it.
    fn assert_untouched(&self, guest_output: &str) {
        assert!(
            !guest_output.contains(&self.token),
            "the guest read the host's canary:\n{guest_output}"
        );
        let entries: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            entries,
            vec!["canary".to_string()],
            "the guest wrote next to the canary"
        );
        assert!(!Path::new("/guest_wrote").exists());
        assert!(!Path::new("/tmp/guest_wrote").exists());
    }
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
}

/// Who runs umlctl: root, or uid 65534 with its own copies of the binary
/// and the kernel (the build tree may be private) in a world-readable
/// directory.
struct Invoker {
    uid: u32,
    dir: tempfile::TempDir,
    bin: PathBuf,
    kernel: PathBuf,
}

impl Invoker {
    fn root() -> Invoker {
        let dir = scratch();
        Invoker {
            uid: 0,
            bin: umlctl_bin(),
            kernel: kernel(),
            dir,
        }
    }

    fn nobody() -> Invoker {
        let (dir, bin, kern) = nobody_copies("umlctl-jail-nobody-");
        for d in ["home", "work"] {
            fs::create_dir(dir.path().join(d)).unwrap();
            chown(&dir.path().join(d), 65534);
        }
        Invoker {
            uid: 65534,
            bin,
            kernel: kern,
            dir,
        }
    }

    /// A directory the invoker may write.
    fn work(&self) -> PathBuf {
        if self.uid == 0 {
            self.dir.path().to_path_buf()
        } else {
            self.dir.path().join("work")
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = if self.uid == 0 {
            Command::new(&self.bin)
        } else {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(&self.bin);
            c
        };
        c.args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("UMLCTL_KERNEL", &self.kernel)
            .env("UMLCTL_UML_DIR", self.work().join("uml"))
            .env("UMLCTL_RUNTIME_DIR", self.work().join("rt"))
            .env("UMLCTL_CACHE_DIR", self.work().join("cache"))
            .env("HOME", self.dir.path().join("home"))
            .current_dir(self.work())
            .stdin(Stdio::null());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// A busybox image with `init` as /sbin/init (if given), readable by the
    /// invoker.
    fn image(&self, init: Option<&str>) -> PathBuf {
        let root = self.work().join("root");
        let _ = fs::remove_dir_all(&root);
        for d in [
            "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "mnt",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
        for t in [
            "sh", "ls", "cat", "echo", "mount", "umount", "mkdir", "head", "sleep", "id",
            "poweroff",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
        }
        if let Some(init) = init {
            fs::write(root.join("sbin/init"), init).unwrap();
            fs::set_permissions(root.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let img = self.work().join("root.ext4");
        let _ = fs::remove_file(&img);
        mkfs_ext4(&root, &img);
        fs::set_permissions(&img, fs::Permissions::from_mode(0o644)).unwrap();
        chown(&img, self.uid);
        img
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn image_run_cannot_reach_the_host(inv: &Invoker) {
    let canary = Canary::new(inv.uid);
    let img = inv.image(None);
    let script = hostfs_attempts(canary.dir.path());
    let o = inv.output(&[
        "run",
        "--image",
        img.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("attempts-done"), "{out}");
    assert!(!out.contains("MOUNTED"), "a hostfs mount succeeded:\n{out}");
    canary.assert_untouched(&out);
}

#[test]
fn image_run_guests_cannot_mount_host_files_as_root() {
    image_run_cannot_reach_the_host(&Invoker::root());
}

#[test]
fn image_run_guests_cannot_mount_host_files_as_a_user() {
    image_run_cannot_reach_the_host(&Invoker::nobody());
}

fn detached_init_cannot_reach_the_host(inv: &Invoker) {
    let canary = Canary::new(inv.uid);
    let init = format!(
        "#!/bin/sh\nmount -t proc proc /proc\n{{ {} ; }} > /dev/console 2>&1\nwhile true; do sleep 1; done\n",
        hostfs_attempts(canary.dir.path())
    );
    let img = inv.image(Some(&init));
    let name = format!("jailed-{}", inv.uid);
    assert_ok(
        &inv.output(&[
            "start",
            "--name",
            &name,
            "--image",
            img.to_str().unwrap(),
            "--mem",
            "64M",
        ]),
        "start",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let logs = loop {
        let l = text(&inv.output(&["logs", &name]));
        if l.contains("attempts-done") || Instant::now() > deadline {
            break l;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = inv.output(&["stop", "--force", &name]);
    assert!(
        logs.contains("attempts-done"),
        "the guest's init did not finish:\n{logs}"
    );
    assert!(
        !logs.contains("MOUNTED"),
        "a hostfs mount succeeded:\n{logs}"
    );
    canary.assert_untouched(&logs);
}

#[test]
fn a_detached_guests_init_cannot_mount_host_files_as_root() {
    detached_init_cannot_reach_the_host(&Invoker::root());
}

#[test]
fn a_detached_guests_init_cannot_mount_host_files_as_a_user() {
    detached_init_cannot_reach_the_host(&Invoker::nobody());
}

fn host_root_stays_read_only(inv: &Invoker) {
    // The canary's directory is writable by the invoker outside the jail;
    // it is the command's working directory, so the guest sees it.
    let canary = Canary::new(inv.uid);
    let c = canary.dir.path().display().to_string();
    let script = format!(
        "cat {c}/canary > /dev/null && echo sees-cwd; \
         mount -o remount,rw / 2>/dev/null; echo x > {c}/guest_wrote 2>/dev/null && echo WROTE-1; \
         mkdir -p /mnt2 2>/dev/null; mount -t hostfs none /mnt -o / 2>/dev/null && \
         {{ mount -o remount,rw /mnt 2>/dev/null; echo x > /mnt{c}/guest_wrote 2>/dev/null && echo WROTE-2; \
            echo x > /mnt/guest_wrote 2>/dev/null && echo WROTE-3; }}; echo done"
    );
    let o = inv.output(&["run", "--workdir", &c, "--", "sh", "-c", &script]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("sees-cwd") && out.contains("done"), "{out}");
    assert!(
        !out.contains("WROTE"),
        "the guest wrote to the host:\n{out}"
    );
    let entries: Vec<_> = fs::read_dir(canary.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec!["canary".to_string()]);
    assert!(!Path::new("/guest_wrote").exists());
}

#[test]
fn a_host_root_guest_cannot_remount_and_write_as_root() {
    host_root_stays_read_only(&Invoker::root());
}

#[test]
fn a_host_root_guest_cannot_remount_and_write_as_a_user() {
    host_root_stays_read_only(&Invoker::nobody());
}

/// Every non-directory under `root` (no symlink following), as paths
/// relative to it.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    assert!(depth < 40, "too deep under {}", root.display());
    let Ok(rd) = fs::read_dir(root.join(rel)) else {
        return;
    };
    for e in rd.flatten() {
        let r = rel.join(e.file_name());
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            walk(root, &r, out, depth + 1);
        } else {
            out.push(Path::new("/").join(r));
        }
    }
}

fn status_field(pid: u32, key: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// What the UML process `pid` sees is only `allowed` (plus device nodes and
/// /proc/cpuinfo); it holds no privilege; it lives in its own namespaces.
fn assert_jailed(pid: u32, allowed: &[PathBuf], uid: u32, own_net: bool, canary: &Canary) {
    // Started without address randomization, as UML wants: UML ≥ 7 would
    // otherwise re-execute itself through /proc/self/exe, which the jail
    // has not got ("readlink failure").
    let persona = fs::read_to_string(format!("/proc/{pid}/personality")).unwrap();
    let persona = u32::from_str_radix(persona.trim(), 16).unwrap();
    assert_ne!(
        persona & 0x0040000,
        0,
        "ADDR_NO_RANDOMIZE not set: {persona:#x}"
    );
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut files = Vec::new();
    walk(&root, Path::new(""), &mut files, 0);
    let fixed: Vec<PathBuf> = [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/proc/cpuinfo",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for f in &files {
        let ok = fixed.contains(f) || allowed.iter().any(|a| f == a || f.starts_with(a));
        assert!(
            ok,
            "the jail of UML pid {pid} holds {} (all: {files:?})",
            f.display()
        );
    }
    for gone in [
        "/etc/passwd",
        "/etc/shadow",
        "/root",
        "/home",
        "/usr/bin/sh",
    ] {
        assert!(
            !root.join(gone.trim_start_matches('/')).exists(),
            "{gone} is visible in the jail"
        );
    }
    assert!(!root
        .join(canary.dir.path().strip_prefix("/").unwrap())
        .join("canary")
        .exists());
    let uids = status_field(pid, "Uid:");
    assert!(
        uids.split_whitespace().all(|u| u == uid.to_string()),
        "UML runs as {uids}, not {uid}"
    );
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(
        status_field(pid, "NSpid:").split_whitespace().count(),
        2,
        "UML is not in a PID namespace of its own"
    );
    let ns = |p: &str, n: &str| fs::read_link(format!("/proc/{p}/ns/{n}")).unwrap();
    for n in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(
            ns(&pid.to_string(), n),
            ns("self", n),
            "{n} namespace is the host's"
        );
    }
    if own_net {
        assert_ne!(ns(&pid.to_string(), "net"), ns("self", "net"));
    }
}

fn kernel_files(k: &Path) -> Vec<PathBuf> {
    let out = Command::new(umlctl_bin())
        .args(["kernel", "info", "--json"])
        .arg(k)
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut files = vec![fs::canonicalize(k).unwrap()];
    for l in v["libs"].as_array().into_iter().flatten() {
        files.push(PathBuf::from(l.as_str().unwrap()));
    }
    files
}

/// The UML processes (main, not helpers) whose command line mentions `needle`.
fn uml_pid(needle: &str) -> Option<u32> {
    processes_mentioning(needle)
        .into_iter()
        .filter(|(_, c)| c.contains("mem="))
        .map(|(p, _)| p)
        .find(|p| status_field(*p, "NSpid:").split_whitespace().nth(1) == Some("2"))
}

#[test]
fn the_uml_process_of_an_image_run_sees_only_its_jail() {
    let inv = Invoker::root();
    let canary = Canary::new(0);
    let img = inv.image(None);
    let rt = inv.work().join("rt");
    let mut child = inv
        .cmd(&["run", "--image", img.to_str().unwrap(), "--", "sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        if let Some(p) = uml_pid(&rt.to_string_lossy()) {
            // Give the guest a moment to have opened its disks.
            std::thread::sleep(Duration::from_millis(500));
            break p;
        }
        assert!(Instant::now() < deadline, "no UML process appeared");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut allowed = kernel_files(&inv.kernel);
    allowed.push(fs::canonicalize(&img).unwrap());
    allowed.push(fs::canonicalize(&rt).unwrap());
    allowed.push(fs::canonicalize(inv.work().join("cache/initroot")).unwrap());
    assert_jailed(pid, &allowed, 65534, true, &canary);
    let _ = nix_kill(child.id());
    let _ = child.wait();
}

#[test]
fn the_uml_process_of_a_detached_guest_sees_only_its_jail() {
    let inv = Invoker::root();
    let canary = Canary::new(0);
    let img = inv.image(Some("#!/bin/sh\nwhile true; do sleep 1; done\n"));
    let cow = inv.work().join("kept.cow");
    let disk = inv.work().join("data.img");
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o600)).unwrap();
    assert_ok(
        &inv.output(&[
            "start",
            "--name",
            "seen",
            "--image",
            img.to_str().unwrap(),
            "--overlay",
            cow.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--mem",
            "64M",
        ]),
        "start",
    );
    let ps: serde_json::Value =
        serde_json::from_slice(&inv.output(&["ps", "--json"]).stdout).unwrap();
    let pid = ps[0]["pid"].as_u64().unwrap() as u32;
    // A disk attached later appears in the jail too, and nothing else does.
    let later = inv.work().join("later.img");
    fs::write(&later, vec![0u8; 1 << 20]).unwrap();
    fs::set_permissions(&later, fs::Permissions::from_mode(0o600)).unwrap();
    assert_ok(
        &inv.output(&[
            "ctl",
            "seen",
            "config",
            &format!("ubdc={}", later.display()),
        ]),
        "ctl config ubdc",
    );
    let parts = assert_ok(
        &inv.output(&["ctl", "seen", "proc", "partitions"]),
        "proc partitions",
    );
    assert!(parts.contains("ubdc"), "{parts}");
    let mut allowed = kernel_files(&inv.kernel);
    for f in [&img, &cow, &disk, &later] {
        allowed.push(fs::canonicalize(f).unwrap());
    }
    allowed.push(fs::canonicalize(inv.work().join("uml/seen.umlctl")).unwrap());
    // umlctl's init disk, which boots first and sets the guest up.
    allowed.push(fs::canonicalize(inv.work().join("cache/initroot")).unwrap());
    let result = std::panic::catch_unwind(|| assert_jailed(pid, &allowed, 65534, false, &canary));
    let _ = inv.output(&["stop", "--force", "seen"]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    // The user's files were id-mapped for the jail, not changed.
    let md = fs::metadata(&disk).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.uid(), md.mode() & 0o777), (0, 0o600));
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let st = Command::new("kill").arg(pid.to_string()).status()?;
    assert!(st.success());
    Ok(())
}

/// Run `sh -c script` as uid 65534 in a user namespace of its own where no
/// further user namespace may be created (user.max_user_namespaces = 0
/// there; the host's setting is not touched).
fn without_user_namespaces(inv: &Invoker, args: &[&str]) -> Output {
    let mut inner = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --reuid=65534 --regid=65534 --clear-groups -- {}",
        inv.bin.display()
    );
    for a in args {
        inner.push_str(&format!(" '{a}'"));
    }
    // unshare(1) makes the namespace; this (root) process writes its maps
    // (root and 65534 only), then lets the shell go on.
    let mut child = Command::new("unshare")
        .args(["--user", "--", "sh", "-c"])
        // The shell was exec'd before its uid was mapped (so without
        // capabilities); exec'ing again as the mapped root gives them back.
        .arg(format!(
            "read go; exec sh -c \"{}\"",
            inner.replace('"', "\\\"")
        ))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("UMLCTL_KERNEL", &inv.kernel)
        .env("UMLCTL_RUNTIME_DIR", inv.work().join("rt"))
        .env("UMLCTL_CACHE_DIR", inv.work().join("cache"))
        .env("HOME", inv.dir.path().join("home"))
        .current_dir(inv.work())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare (util-linux) is needed for this test");
    let pid = child.id();
    let ours = fs::read_link("/proc/self/ns/user").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_link(format!("/proc/{pid}/ns/user")).ok().as_ref() == Some(&ours) {
        assert!(Instant::now() < deadline, "unshare --user did not happen");
        std::thread::sleep(Duration::from_millis(5));
    }
    fs::write(format!("/proc/{pid}/uid_map"), "0 0 1\n65534 65534 1\n").unwrap();
    fs::write(format!("/proc/{pid}/gid_map"), "0 0 1\n65534 65534 1\n").unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    child.wait_with_output().unwrap()
}

#[test]
fn doctor_and_run_name_the_fix_when_user_namespaces_are_disabled() {
    let inv = Invoker::nobody();
    let o = without_user_namespaces(&inv, &["doctor", "--json"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "doctor must fail:\n{out}");
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let jail = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "jail")
        .unwrap_or_else(|| panic!("no jail check: {v}"));
    assert_eq!(jail["level"], "fail", "{jail}");
    let fix = jail["fix"].as_str().unwrap();
    assert!(
        fix.contains("user.max_user_namespaces") && fix.contains("--no-jail"),
        "{fix}"
    );
    // run refuses the same way, before anything boots…
    let o = without_user_namespaces(&inv, &["run", "--", "true"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(125), "{out}");
    assert!(out.contains("user namespaces are disabled"), "{out}");
    // …and --no-jail runs, saying what it gives up.
    let o = without_user_namespaces(&inv, &["run", "--no-jail", "--", "echo", "unjailed"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "unjailed\n");
    assert!(
        out.contains("--no-jail: UML runs with your identity"),
        "{out}"
    );
}

#[test]
fn doctor_reports_a_working_jail() {
    let inv = Invoker::nobody();
    let o = inv.output(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let jail = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "jail")
        .unwrap()
        .clone();
    assert_eq!(jail["level"], "ok", "{jail}");
    assert!(
        jail["detail"].as_str().unwrap().contains("uid 65534"),
        "{jail}"
    );
}

#[test]
fn a_cow_disk_cannot_make_root_expose_a_file_it_names() {
    // A COW file is data: its header may name any host file as backing.
    // Run by root, the jail must not hand a file the jail's uid could not
    // read to the guest just because a header names it.
    let inv = Invoker::root();
    let secret = inv.work().join("secret.img");
    fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let hostile = inv.work().join("hostile.cow");
    assert_ok(
        &inv.output(&[
            "cow",
            "create",
            "--backing",
            secret.to_str().unwrap(),
            hostile.to_str().unwrap(),
        ]),
        "cow create",
    );
    let img = inv.image(Some("#!/bin/sh\nwhile true; do sleep 1; done\n"));
    let o = inv.output(&[
        "start",
        "--name",
        "hostile",
        "--image",
        img.to_str().unwrap(),
        "--disk",
        hostile.to_str().unwrap(),
        "--mem",
        "64M",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(125), "{out}");
    assert!(
        out.contains("COW header names") && out.contains(&secret.display().to_string()),
        "{out}"
    );
    assert!(
        !inv.work().join("uml/hostile.umlctl").exists(),
        "the failed start left its directory"
    );
    assert!(
        fs::symlink_metadata(inv.work().join("uml/hostile")).is_err(),
        "the failed start left its instance link"
    );
    // Through mconsole, the same.
    assert_ok(
        &inv.output(&[
            "start",
            "--name",
            "plain",
            "--image",
            img.to_str().unwrap(),
            "--mem",
            "64M",
        ]),
        "start",
    );
    let o = inv.output(&[
        "ctl",
        "plain",
        "config",
        &format!("ubdb={}", hostile.display()),
    ]);
    let _ = inv.output(&["stop", "--force", "plain"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(125), "{out}");
    assert!(out.contains("COW header names"), "{out}");
}

// --- Resource limits (--cpu-quota, --memory-max) ---

/// Every UML process (main, helpers, guest processes) whose command line
/// mentions `needle`, once one exists.
fn wait_uml_processes(needle: &str, child: &mut std::process::Child) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ps: Vec<u32> = processes_mentioning(needle)
            .into_iter()
            .filter(|(_, c)| c.contains("mem="))
            .map(|(p, _)| p)
            .collect();
        if !ps.is_empty() {
            return ps;
        }
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "no UML process mentioning {needle} appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_cpu_quota_and_memory_max_bound_every_process_of_a_run_jailed_or_not() {
    let inv = Invoker::root();
    let rt = inv.work().join("rt");
    for jail in [&[][..], &["--no-jail"][..]] {
        let mut args = vec![
            "run",
            "--cpu-quota",
            "20%",
            "--memory-max",
            "400M",
            "--json",
        ];
        args.extend_from_slice(jail);
        args.extend_from_slice(&[
            "--",
            "sh",
            "-c",
            "sleep 2; i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; echo spun",
        ]);
        let mut child = inv
            .cmd(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pids = wait_uml_processes(&rt.to_string_lossy(), &mut child);
        let mut seen = Vec::new();
        for p in pids {
            let dirs = umlctl_cgroups(p);
            if dirs.is_empty() && !Path::new(&format!("/proc/{p}")).exists() {
                continue;
            }
            assert!(
                !dirs.is_empty(),
                "{jail:?}: UML process {p} is in no cgroup of umlctl's"
            );
            assert_eq!(
                limits_in(&dirs),
                (Some(20_000), Some(400 << 20)),
                "{jail:?}: limits of {dirs:?}"
            );
            seen = dirs;
        }
        assert!(!seen.is_empty());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{jail:?}: {err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "spun\n");
        let v = last_json(&err);
        assert!(
            v["limits"]["throttled_periods"].as_u64().unwrap_or(0) > 0,
            "{jail:?}: a CPU-bound guest at 20% was never throttled: {v}"
        );
        for d in &seen {
            assert!(
                !d.exists(),
                "{jail:?}: the run's cgroup {} is left behind",
                d.display()
            );
        }
    }
}

#[test]
fn memory_max_counts_the_guests_ram_and_bad_limits_are_refused() {
    let inv = Invoker::root();
    // The guest fills its memory (a tmpfs file, then a process the guest's
    // own OOM killer ends): all of it is charged to the cgroup, and no more
    // than the limit.
    let out = inv.output(&[
        "run",
        "--mem",
        "128M",
        "--memory-max",
        "160M",
        "--json",
        "--",
        "sh",
        "-c",
        "head -c 50M /dev/zero > /dev/shm/x; tail /dev/zero; echo tail=$?",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tail=137\n");
    let v = last_json(&err);
    let peak = v["limits"]["memory_peak_bytes"]
        .as_u64()
        .expect("memory peak");
    assert!(
        peak > 100 << 20 && peak <= 160 << 20,
        "peak {peak}: the guest's RAM must be charged, within the limit"
    );
    assert_eq!(v["limits"]["oom_kills"], 0, "{v}");

    for (args, needle) in [
        (
            &["--mem", "128M", "--memory-max", "100M"][..],
            "at least 160M",
        ),
        (&["--cpu-quota", "0%"][..], "--cpu-quota 0%"),
        (&["--cpu-quota", "1.5"][..], "whole percentage"),
        (&["--memory-max", "lots"][..], "invalid size"),
    ] {
        let mut a = vec!["run"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--", "true"]);
        let o = inv.output(&a);
        let e = String::from_utf8_lossy(&o.stderr);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert!(e.contains(needle), "{args:?}: {e}");
    }

    // A user without a delegated cgroup is told how to get one.
    let user = Invoker::nobody();
    let o = user.output(&["run", "--cpu-quota", "50%", "--", "true"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{e}");
    assert!(
        e.contains("host check `cgroup` failed") && e.contains("Delegate=yes"),
        "{e}"
    );
    // doctor says the same, and that root has them.
    let d = String::from_utf8_lossy(&user.output(&["doctor"]).stdout).into_owned();
    assert!(
        d.contains("warn  cgroup limits") && d.contains("Delegate=yes"),
        "{d}"
    );
    let d = String::from_utf8_lossy(&inv.output(&["doctor"]).stdout).into_owned();
    assert!(d.contains("ok    cgroup limits"), "{d}");
}

#[test]
fn a_detached_guest_keeps_its_limits_until_it_is_removed() {
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    env.ok(&[
        "start",
        "--name",
        "capped",
        "--cpu-quota",
        "150%",
        "--memory-max",
        "512M",
        "--image",
        img.to_str().unwrap(),
    ]);
    let g = env.ps();
    let pid = g
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "capped")
        .unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    let dirs = umlctl_cgroups(pid);
    assert!(
        !dirs.is_empty(),
        "the guest's UML is in no cgroup of umlctl's"
    );
    assert_eq!(limits_in(&dirs), (Some(150_000), Some(512 << 20)));
    // ps shows the limits, the cgroup the host puts UML in, and its usage.
    let l = &g
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "capped")
        .unwrap()["limits"];
    assert_eq!(l["cpu_quota_percent"], 150, "{l}");
    assert_eq!(l["memory_max"], 512u64 << 20, "{l}");
    let mut listed: Vec<PathBuf> = l["cgroup"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    let mut found = dirs.clone();
    listed.sort();
    found.sort();
    assert_eq!(listed, found);
    assert!(
        l["usage"]["memory_peak_bytes"].as_u64().unwrap() > 16 << 20,
        "{l}"
    );
    // What the guest touched counts against its limit until reclaim gives
    // it back to the host (and so to the cgroup).
    let current = || -> u64 {
        dirs.iter()
            .find_map(|d| {
                fs::read_to_string(d.join("memory.current"))
                    .or_else(|_| fs::read_to_string(d.join("memory.usage_in_bytes")))
                    .ok()
            })
            .and_then(|s| s.trim().parse().ok())
            .expect("the guest's cgroup counts its memory")
    };
    env.ok(&[
        "exec", "capped", "--", "sh", "-c",
        "mount -t tmpfs -o size=100M none /mnt && busybox dd if=/dev/zero of=/mnt/f bs=1M count=64 2>/dev/null && busybox rm /mnt/f",
    ]);
    let before = current();
    env.ok(&["reclaim", "capped"]);
    let after = current();
    assert!(
        before > after + (40 << 20),
        "the cgroup held {before} bytes before reclaim, {after} after"
    );
    // Everything UML runs is inside, the guest's processes too.
    let all = processes_mentioning(&env.uml_dir().to_string_lossy());
    assert!(all.len() > 1);
    for (p, c) in all.iter().filter(|(_, c)| c.contains("mem=")) {
        let d = umlctl_cgroups(*p);
        assert!(
            d == dirs || !Path::new(&format!("/proc/{p}")).exists(),
            "{p} {c}: {d:?}"
        );
    }
    env.ok(&["stop", "--force", "capped"]);
    // Stopped, it keeps its record (and its empty cgroup, unless another
    // umlctl swept it) until removed.
    env.ok(&["gc"]);
    for d in &dirs {
        assert!(!d.exists(), "{} outlived the guest", d.display());
    }
    // A limit the guest's memory does not fit is refused before anything.
    let o = env.umlctl(&[
        "start",
        "--mem",
        "256M",
        "--memory-max",
        "200M",
        "--image",
        img.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 288M"));
    assert!(env.ps().as_array().unwrap().is_empty());
}
