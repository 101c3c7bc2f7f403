//! Shared helpers for the end-to-end tests: the real `umlctl` binary, a real
//! UML kernel, and checks that a run left nothing behind.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// `sh -c SCRIPT`, its output.
pub fn sh(script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh")
}

/// The umlctl binary built by `cargo test` (or `$UMLCTL_BIN`).
pub fn umlctl_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("UMLCTL_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> → target/<profile>/umlctl
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("umlctl"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with `cargo test --workspace` so the binary is built",
        bin.display()
    );
    bin
}

/// Scratch space under the target directory. Without --image the guest
/// sees /tmp as an empty tmpfs (only the working directory stays visible),
/// and the checkout itself may lie under /tmp, so tests reach their files
/// through --workdir and relative paths.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("e2e-")
        .tempdir_in(base)
        .unwrap()
}

/// A cache shared by all tests (kernel inspection, init roots, shim).
pub fn cache_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("umlctl-cache");
    fs::create_dir_all(&d).unwrap();
    d
}

/// The kernel the suite boots: `$UMLCTL_TEST_KERNEL`, else whatever umlctl
/// itself would pick. There is no skipping: without a kernel the suite fails.
pub fn kernel() -> PathBuf {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        if let Some(k) = std::env::var_os("UMLCTL_TEST_KERNEL") {
            return PathBuf::from(k);
        }
        let out = Command::new(umlctl_bin())
            .args(["kernel", "info", "--json"])
            .env("UMLCTL_CACHE_DIR", cache_dir())
            .output()
            .expect("run umlctl kernel info");
        assert!(
            out.status.success(),
            "no usable UML kernel for the end-to-end tests (install Debian's user-mode-linux, or set UMLCTL_TEST_KERNEL):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        PathBuf::from(v["path"].as_str().unwrap())
    })
    .clone()
}

/// A world-readable directory in /tmp holding copies of the umlctl binary
/// and the kernel (`umlctl`, `linux`), for tests run as uid 65534, which
/// may not be able to read the build tree or the kernel's directory.
pub fn nobody_copies(prefix: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("umlctl");
    let kern = dir.path().join("linux");
    for (from, to) in [(umlctl_bin(), &bin), (kernel(), &kern)] {
        fs::copy(from, to).unwrap();
        fs::set_permissions(to, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (dir, bin, kern)
}

/// One isolated `umlctl run`: its own runtime directory, so that leftovers
/// can be checked.
pub struct Run {
    pub runtime: tempfile::TempDir,
    pub cmd: Command,
}

impl Run {
    pub fn new<I, S>(args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Run::with_kernel(&kernel(), args)
    }

    /// `umlctl run --kernel KERNEL ARGS…`.
    pub fn with_kernel<I, S>(kernel: &Path, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let runtime = scratch();
        let mut cmd = Command::new(umlctl_bin());
        cmd.arg("run")
            .arg("--kernel")
            .arg(kernel)
            .args(args)
            .env("UMLCTL_RUNTIME_DIR", runtime.path())
            .env("UMLCTL_CACHE_DIR", cache_dir())
            .stdin(Stdio::null());
        Run { runtime, cmd }
    }

    /// Run to completion with `input` on stdin; check that nothing was left
    /// behind.
    pub fn output_with(mut self, input: &[u8]) -> Output {
        self.cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shm_before = shm_entries();
        let mut child = self.cmd.spawn().expect("spawn umlctl");
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait umlctl");
        let _ = writer.join();
        assert_no_leftovers(self.runtime.path(), &shm_before);
        out
    }

    pub fn output(self) -> Output {
        self.output_with(b"")
    }
}

/// Run `umlctl run [args] -- cmd...` and return (status code, stdout, stderr).
pub fn run(args: &[&str], cmd: &[&str]) -> (i32, Vec<u8>, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--");
    all.extend_from_slice(cmd);
    let out = Run::new(all).output();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shm_entries() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(c) = fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains(needle) {
                found.push((pid, c));
            }
        }
    }
    found
}

/// After a run: no run directory, no UML process, no new files in /dev/shm.
pub fn assert_no_leftovers(runtime: &Path, shm_before: &[String]) {
    let left: Vec<_> = fs::read_dir(runtime)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    // The cached xstate measurement is not a leftover of a run.
    let left: Vec<_> = left
        .into_iter()
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("xstate-")
        })
        .collect();
    assert!(left.is_empty(), "run directory left behind: {left:?}");
    let procs = processes_mentioning(&runtime.to_string_lossy());
    assert!(procs.is_empty(), "UML processes left behind: {procs:?}");
    let after = shm_entries();
    let new: Vec<_> = after.iter().filter(|e| !shm_before.contains(e)).collect();
    assert!(new.is_empty(), "new files in /dev/shm: {new:?}");
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn sha256_file(p: &Path) -> String {
    sha256(&fs::read(p).unwrap())
}

/// A small busybox root image made with mke2fs -d (an independent tool),
/// with a marker file. Built once per test process.
pub fn busybox_image(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "mnt",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let bb = Path::new("/bin/busybox");
    assert!(
        bb.exists(),
        "/bin/busybox is missing: apt-get install busybox-static"
    );
    fs::copy(bb, root.join("bin/busybox")).unwrap();
    for t in [
        "sh",
        "ls",
        "cat",
        "echo",
        "mount",
        "umount",
        "uname",
        "id",
        "true",
        "false",
        "sleep",
        "mkdir",
        "sha256sum",
        "head",
        "wc",
        "stat",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    fs::write(root.join("etc/marker"), "umlctl busybox test image\n").unwrap();
    let img = dir.join("root.ext4");
    mkfs_ext4(&root, &img);
    img
}

/// A 32 MiB ext4 image of the directory `root`, made by mke2fs -d (an
/// independent tool, not umlctl's own writer).
pub fn mkfs_ext4(root: &Path, img: &Path) {
    let st = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(root)
        .arg(img)
        .arg("32M")
        .status()
        .expect("mke2fs is missing: apt-get install e2fsprogs");
    assert!(st.success(), "mke2fs failed");
}

/// Check that a command succeeded (showing its output if not); its stdout.
pub fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `--json` result object: the last line of umlctl's stderr.
pub fn last_json(stderr: &str) -> serde_json::Value {
    let line = stderr.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last stderr line is not JSON ({e}): {stderr}"))
}

// --- Nix: the flake evaluated against tests/nix/stub-nixpkgs.nix ---

pub const NIX_INSTANTIATE: &str = "/usr/bin/nix-instantiate";

pub fn repo() -> PathBuf {
    fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("..")).unwrap()
}

pub fn need_nix() {
    assert!(
        Path::new(NIX_INSTANTIATE).exists(),
        "{NIX_INSTANTIATE} is missing: apt-get install nix-bin (scripts/test.sh does)"
    );
}

/// Evaluate tests/nix/eval.nix (the flake against the stand-in nixpkgs,
/// derivations' outputs under `out_dir`); `args` are extra `--arg`/`--argstr` pairs.
pub fn nix_eval(out_dir: &Path, args: &[(&str, &str, &str)]) -> serde_json::Value {
    need_nix();
    let mut c = Command::new(NIX_INSTANTIATE);
    c.args(["--eval", "--strict", "--json"])
        .arg(repo().join("tests/nix/eval.nix"))
        .arg("--arg")
        .arg("repo")
        .arg(repo())
        .arg("--argstr")
        .arg("outDir")
        .arg(out_dir);
    for (kind, name, value) in args {
        c.args([kind, name, value]);
    }
    let out = c.output().expect("run nix-instantiate");
    assert!(
        out.status.success(),
        "evaluating the flake failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

// --- Host conditions a test makes for itself, never on the host ---

/// A command run in a private mount namespace after `setup` (a shell
/// script, run as root) has changed what that namespace sees; add the
/// program and its arguments to the result. The host's own mounts and
/// device nodes are never touched.
pub fn with_private_mounts(setup: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("set -e\n{setup}\nexec \"$@\""))
        .arg("sh");
    c
}

/// Setup for [`with_private_mounts`]: `/dev/net/tun` is a fresh tun node
/// of mode `mode` (as a stock udev host's 0666, or a locked-down 0600).
pub fn tun_node(mode: u32) -> String {
    format!(
        "d=$(mktemp -d)\n\
         mount -t tmpfs -o mode=0755 umlctl-test-tun \"$d\"\n\
         mknod -m {mode:o} \"$d/tun\" c 10 200\n\
         mount --bind \"$d/tun\" /dev/net/tun\n\
         umount -l \"$d\"\n\
         rmdir \"$d\""
    )
}

/// Setup for [`with_private_mounts`]: /dev/shm is a fresh tmpfs mounted
/// noexec, as Docker gives containers.
pub const NOEXEC_SHM: &str = "mount -t tmpfs -o noexec,nosuid,nodev umlctl-test-shm /dev/shm";

/// The packages of the stock Debian image (on top of mmdebstrap's minbase).
pub const DEBIAN_PACKAGES: &str = "systemd-sysv,udev,iproute2,openssh-server";

/// A stock Debian bookworm root (`mmdebstrap --variant=minbase` with
/// [`DEBIAN_PACKAGES`], unchanged) as an ext4 image made by `umlctl image
/// build -` from mmdebstrap's tar on a pipe. Built once per machine (about a
/// minute) and cached beside the test kernels in `/var/tmp/umlctl-test-images`
/// (`$UMLCTL_TEST_IMAGE_CACHE` moves it), under a lock so that parallel test
/// binaries build it once; atomically, so a failed build leaves nothing.
pub fn debian_image() -> PathBuf {
    debian_image_with("")
}

/// [`debian_image`] with more Debian packages (`frr,iputils-ping`): its own
/// cached image.
pub fn debian_image_with(extra: &str) -> PathBuf {
    use std::os::fd::AsRawFd;
    let packages = if extra.is_empty() {
        DEBIAN_PACKAGES.to_string()
    } else {
        format!("{DEBIAN_PACKAGES},{extra}")
    };
    let dir = std::env::var_os("UMLCTL_TEST_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/umlctl-test-images"));
    fs::create_dir_all(&dir).unwrap();
    let key = packages.replace(',', "+");
    let img = dir.join(format!("bookworm-minbase+{key}-v1.ext4"));
    let lock = fs::File::create(dir.join(".lock")).unwrap();
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    if img.exists() {
        return img;
    }
    assert!(
        Command::new("sh")
            .args(["-c", "command -v mmdebstrap"])
            .output()
            .unwrap()
            .status
            .success(),
        "mmdebstrap is missing: apt-get install mmdebstrap (scripts/test.sh does)"
    );
    let tmp = dir.join(format!(".build-{}.ext4", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; mmdebstrap --quiet --variant=minbase --include={packages} bookworm - | '{}' image build -o '{}' -",
            umlctl_bin().display(),
            tmp.display()
        ))
        .output()
        .unwrap();
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!(
            "building the Debian test image failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::rename(&tmp, &img).unwrap();
    img
}

/// Debian's `linux-source-6.12` (scripts/test.sh installs it).
pub const SOURCE_6_12: &str = "/usr/src/linux-source-6.12.tar.xz";

/// The cache the real kernels are built into: it outlives the checkout, so
/// the ~4-minute build happens once per machine (`$UMLCTL_TEST_KERNEL_CACHE`
/// moves it).
pub fn kernel_cache() -> PathBuf {
    let d = std::env::var_os("UMLCTL_TEST_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/umlctl-test-kernels"));
    fs::create_dir_all(&d).unwrap();
    d
}

/// `kernel build --json` of Debian's 6.12 source with umlctl's options,
/// once per test binary (later binaries find the cached build up to date).
pub fn built_6_12() -> &'static serde_json::Value {
    static B: OnceLock<serde_json::Value> = OnceLock::new();
    B.get_or_init(|| {
        assert!(
            Path::new(SOURCE_6_12).is_file(),
            "{SOURCE_6_12} is missing: apt-get install linux-source-6.12 (scripts/test.sh does)"
        );
        let out = Command::new(umlctl_bin())
            .args(["kernel", "build", "--source", SOURCE_6_12, "--json"])
            .env("UMLCTL_CACHE_DIR", kernel_cache())
            .env_remove("UMLCTL_KERNEL")
            .output()
            .expect("run umlctl kernel build");
        let text = assert_ok(&out, "umlctl kernel build (6.12)");
        serde_json::from_str(&text).unwrap()
    })
}

/// Debian unstable's newest Linux source (7.x): `$UMLCTL_TEST_SOURCE_7`,
/// else fetched once per machine by scripts/sid-linux-source.sh into the
/// kernel cache (no change to the host's apt configuration).
pub fn source_7() -> PathBuf {
    static S: OnceLock<PathBuf> = OnceLock::new();
    S.get_or_init(|| {
        if let Some(p) = std::env::var_os("UMLCTL_TEST_SOURCE_7") {
            return PathBuf::from(p);
        }
        let out = Command::new(repo().join("scripts/sid-linux-source.sh"))
            .arg(kernel_cache().join("sid"))
            .output()
            .expect("run scripts/sid-linux-source.sh");
        let path = assert_ok(
            &out,
            "scripts/sid-linux-source.sh (Debian unstable's linux-source-7.x)",
        );
        PathBuf::from(path.trim())
    })
    .clone()
}

/// `kernel build --debug --json` of the 7.x source: umlctl's options plus
/// debug information and the gdb scripts (SMP, as `kernel build` enables
/// it on kernels that have it). Built once per machine.
pub fn built_7_debug() -> &'static serde_json::Value {
    static B: OnceLock<serde_json::Value> = OnceLock::new();
    B.get_or_init(|| {
        let src = source_7();
        let out = Command::new(umlctl_bin())
            .args(["kernel", "build", "--debug", "--json", "--source"])
            .arg(&src)
            .env("UMLCTL_CACHE_DIR", kernel_cache())
            .env_remove("UMLCTL_KERNEL")
            .output()
            .expect("run umlctl kernel build");
        let text = assert_ok(&out, "umlctl kernel build --debug (7.x)");
        serde_json::from_str(&text).unwrap()
    })
}

/// `kernel build --json` of the 7.x source with one CPU (`--set
/// CONFIG_SMP=n`): what a 7.x guest needs for `--net` (UML's vector driver
/// is not SMP-safe with tap transports). Built once per machine.
pub fn kernel_7_one_cpu() -> PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let src = source_7();
        let out = Command::new(umlctl_bin())
            .args([
                "kernel",
                "build",
                "--json",
                "--set",
                "CONFIG_SMP=n",
                "--source",
            ])
            .arg(&src)
            .env("UMLCTL_CACHE_DIR", kernel_cache())
            .env_remove("UMLCTL_KERNEL")
            .output()
            .expect("run umlctl kernel build");
        let text = assert_ok(&out, "umlctl kernel build --set CONFIG_SMP=n (7.x)");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        PathBuf::from(v["path"].as_str().unwrap())
    })
    .clone()
}

/// Where the 7.x debug build's kernel binary is.
pub fn kernel_7() -> PathBuf {
    PathBuf::from(built_7_debug()["path"].as_str().unwrap())
}

/// Where the 6.12 build's kernel binary is.
pub fn kernel_6_12() -> PathBuf {
    PathBuf::from(built_6_12()["path"].as_str().unwrap())
}

/// Debian's own `linux.uml` (the user-mode-linux package).
pub fn debian_kernel() -> PathBuf {
    let p = PathBuf::from("/usr/bin/linux.uml");
    assert!(
        p.is_file(),
        "{} is missing: apt-get install user-mode-linux (scripts/test.sh does)",
        p.display()
    );
    p
}

// --- Detached guests ---

/// An isolated place for detached guests and labs: UML's instance
/// directories and umlctl's records (and labs' state) in a scratch
/// directory. Dropping it stops every guest still running there.
pub struct GuestEnv {
    pub dir: tempfile::TempDir,
}

impl GuestEnv {
    pub fn new() -> GuestEnv {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch();
        // A root umlctl's jails run as uid 65534, which must reach the
        // guests' directories.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        GuestEnv { dir }
    }
    pub fn uml_dir(&self) -> PathBuf {
        self.dir.path().join("uml")
    }
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(umlctl_bin());
        c.args(args)
            .env("UMLCTL_UML_DIR", self.uml_dir())
            .env("UMLCTL_CACHE_DIR", cache_dir())
            .stdin(Stdio::null());
        c
    }
    pub fn umlctl(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    pub fn ok(&self, args: &[&str]) -> String {
        assert_ok(&self.umlctl(args), &format!("umlctl {args:?}"))
    }
    /// `lab SUB -d DIR ARGS…`
    pub fn lab(&self, sub: &str, dir: &Path, args: &[&str]) -> Output {
        let mut a = vec!["lab", sub, "-d", dir.to_str().unwrap()];
        a.extend_from_slice(args);
        self.umlctl(&a)
    }
    pub fn ps(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["ps", "--all", "--json"])).unwrap()
    }
    pub fn state(&self, name: &str) -> Option<String> {
        self.ps()
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .map(|g| g["state"].as_str().unwrap().to_string())
    }
}

impl Drop for GuestEnv {
    fn drop(&mut self) {
        // Never leave a guest or a lab running after a failed test.
        if let Ok(v) =
            serde_json::from_slice::<serde_json::Value>(&self.umlctl(&["ps", "--json"]).stdout)
        {
            for g in v.as_array().into_iter().flatten() {
                let _ = self.umlctl(&[
                    "stop",
                    "--force",
                    "--rm",
                    g["name"].as_str().unwrap_or_default(),
                ]);
            }
        }
    }
}

/// A busybox image whose init stays up, powers off on ctrl-alt-del and
/// leaves a marker when its shutdown actions run.
pub fn guest_image(dir: &Path) -> PathBuf {
    let root = dir.join("groot");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "mnt",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox: apt-get install busybox-static");
    for t in [
        "sh", "ls", "cat", "echo", "mount", "umount", "sleep", "sync", "poweroff", "mkdir", "true",
        "pwd", "grep", "cut", "wc", "tty", "stty", "kill",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    std::os::unix::fs::symlink("../bin/busybox", root.join("sbin/init")).unwrap();
    fs::write(
        root.join("etc/inittab"),
        "::sysinit:/bin/mount -t proc proc /proc\n\
         ::sysinit:/bin/echo guest-up\n\
         ::respawn:/bin/sh\n\
         ::ctrlaltdel:/bin/poweroff\n\
         ::shutdown:/bin/sh -c 'echo shutdown-ran > /shutdown-marker; sync'\n",
    )
    .unwrap();
    let img = dir.join("guest.ext4");
    mkfs_ext4(&root, &img);
    img
}

// --- KUnit ---

/// What kunit.py (from `tree`) counts in a saved console log: passed,
/// failed, skipped, crashed, and whether it succeeded.
pub fn kunit_py_counts(tree: &Path, log: &Path) -> (u32, u32, u32, u32, bool) {
    let out = Command::new("python3")
        .arg(tree.join("tools/testing/kunit/kunit.py"))
        .arg("parse")
        .arg(log)
        .output()
        .expect("python3 is missing: apt-get install python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("Ran ") && l.contains(" tests"))
        .unwrap_or_else(|| panic!("no summary from kunit.py parse {}:\n{text}", log.display()))
        .to_string();
    let field = |name: &str| -> u32 {
        line.split(&format!("{name}: "))
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (
        field("passed"),
        field("failed"),
        field("skipped"),
        field("crashed"),
        out.status.success(),
    )
}

pub fn our_counts(v: &serde_json::Value) -> (u32, u32, u32, u32) {
    let c = &v["counts"];
    let n = |k: &str| c[k].as_u64().unwrap() as u32;
    (n("passed"), n("failed"), n("skipped"), n("crashed"))
}

/// The small KUnit config both kernel test suites build (the example suite
/// and KUnit's own tests).
pub const SMALL_KUNITCONFIG: &str =
    "CONFIG_KUNIT=y\nCONFIG_KUNIT_EXAMPLE_TEST=y\nCONFIG_KUNIT_TEST=y\n";

/// Check a `kernel test --json` outcome of [`SMALL_KUNITCONFIG`]: at least
/// 30 passed, nothing failed or crashed, both suites there, and kunit.py
/// (from `tree`) counting the same in the same console log. Returns our
/// counts (passed, failed, skipped, crashed).
pub fn check_small_kunit_run(o: &serde_json::Value, tree: &Path) -> (u32, u32, u32, u32) {
    let (passed, failed, skipped, crashed) = our_counts(&o["report"]);
    assert!(
        passed >= 30 && failed == 0 && crashed == 0,
        "{passed} {failed} {crashed}"
    );
    let suites: Vec<&str> = o["report"]["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        suites.contains(&"example") && suites.contains(&"kunit-try-catch-test"),
        "{suites:?}"
    );
    let log = PathBuf::from(o["console_log"].as_str().unwrap());
    let (kp, kf, ks, kc, k_ok) = kunit_py_counts(tree, &log);
    assert_eq!((passed, failed, skipped, crashed), (kp, kf, ks, kc));
    assert!(k_ok, "kunit.py parse failed on {}", log.display());
    (passed, failed, skipped, crashed)
}

// --- Resource limits ---

/// The cgroup directories umlctl made that `pid` is in (one per hierarchy
/// on cgroup v1, one on v2), found through the host's own records.
pub fn umlctl_cgroups(pid: u32) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut mounts = Vec::new();
    for l in mountinfo.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if matches!(f[sep + 1], "cgroup" | "cgroup2") && f[3] == "/" {
            mounts.push((
                f[sep + 1] == "cgroup2",
                PathBuf::from(f[4]),
                f[sep + 3].to_string(),
            ));
        }
    }
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut dirs = Vec::new();
    for l in own.lines() {
        let mut p = l.splitn(3, ':');
        let (_, ctl, path) = (p.next(), p.next().unwrap_or(""), p.next().unwrap_or(""));
        let last = path.rsplit('/').next().unwrap_or("");
        if !last.starts_with("umlctl-") {
            continue;
        }
        for (v2, mnt, opts) in &mounts {
            let fits = if ctl.is_empty() {
                *v2
            } else {
                !v2 && ctl.split(',').any(|c| opts.split(',').any(|o| o == c))
            };
            if fits {
                dirs.push(mnt.join(path.trim_start_matches('/')));
            }
        }
    }
    dirs
}

/// The CPU quota (µs per 100 ms) and memory limit a cgroup directory holds.
pub fn limits_in(dirs: &[PathBuf]) -> (Option<u64>, Option<u64>) {
    let num = |p: PathBuf| {
        fs::read_to_string(p)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    };
    let mut cpu = None;
    let mut mem = None;
    for d in dirs {
        cpu = cpu
            .or_else(|| num(d.join("cpu.max")))
            .or_else(|| num(d.join("cpu.cfs_quota_us")));
        mem = mem
            .or_else(|| num(d.join("memory.max")))
            .or_else(|| num(d.join("memory.limit_in_bytes")));
    }
    (cpu, mem)
}

/// A busybox image with every applet (ip, ping, date…), whose init stays
/// up and powers off on ctrl-alt-del.
pub fn busybox_lab_image(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("bbroot");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox: apt-get install busybox-static");
    let list = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet.ends_with("/busybox") || applet.is_empty() {
            continue;
        }
        let _ = std::os::unix::fs::symlink("/bin/busybox", root.join(applet));
    }
    fs::write(
        root.join("etc/inittab"),
        "::sysinit:/bin/mount -t proc proc /proc\n\
         ::respawn:/bin/sh\n\
         ::ctrlaltdel:/bin/poweroff\n",
    )
    .unwrap();
    let img = dir.join("bb.ext4");
    mkfs_ext4(&root, &img);
    img
}
