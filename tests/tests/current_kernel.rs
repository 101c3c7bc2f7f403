//! Today's kernels and kernel debugging, end to end: Debian unstable's 7.x
//! source built by `kernel build --debug` (SMP, seccomp mode, debug
//! information, the kernel's gdb scripts), `run` on it in both userspace
//! modes and on two CPUs, a detached guest on it, and Debian's gdb on the
//! guest kernel: `run --gdb-batch` stopping in a system call handler,
//! `run --gdb` on a terminal (tmux), and `debug NAME` attached to a running
//! guest that keeps running afterwards.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn gdb_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_current_kernel_builds_for_debugging_and_says_what_it_supports() {
    let b = built_7_debug();
    let name = b["name"].as_str().unwrap();
    let version = b["meta"]["version"].as_str().unwrap();
    assert!(version.starts_with("7."), "{b}");
    assert_eq!(name, format!("{version}-debug"));
    assert_eq!(b["meta"]["debug"], true);
    let requested: Vec<&str> = b["meta"]["requested"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for want in [
        "CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y",
        "CONFIG_FRAME_POINTER=y",
        "CONFIG_GDB_SCRIPTS=y",
        "CONFIG_SMP=y",
    ] {
        assert!(requested.contains(&want), "{want} not in {requested:?}");
    }
    // The gdb helpers live beside the cached kernel, independent of the
    // build directory (real files, with the generated constants).
    let dir = kernel_7().parent().unwrap().to_path_buf();
    for f in [
        "vmlinux-gdb.py",
        "scripts/gdb/linux/constants.py",
        "scripts/gdb/linux/dmesg.py",
    ] {
        let md = fs::symlink_metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(md.is_file(), "{f} is not a regular file");
    }
    let info = Command::new(umlctl_bin())
        .args(["kernel", "info", "--json"])
        .arg(kernel_7())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&assert_ok(&info, "kernel info")).unwrap();
    assert_eq!(info["symbols"], true, "{info}");
    assert_eq!(info["debug_info"], true, "{info}");
    let has = |n: &str| {
        info["features"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == n && f["present"] == true)
    };
    assert!(has("seccomp-mode") && has("smp") && has("vector-net") && !has("legacy-net"));
    // Debian's own kernel is stripped: no symbols for gdb.
    let deb = Command::new(umlctl_bin())
        .args(["kernel", "info", "--json"])
        .arg(debian_kernel())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    let deb: serde_json::Value = serde_json::from_str(&assert_ok(&deb, "kernel info")).unwrap();
    assert_eq!(deb["debug_info"], false);
}

#[test]
fn run_on_a_current_kernel_is_faithful_in_both_userspace_modes_and_on_two_cpus() {
    let k = kernel_7();
    let input: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    for mode in ["ptrace", "seccomp"] {
        let out = Run::with_kernel(
            &k,
            [
                "--userspace",
                mode,
                "--json",
                "--",
                "sh",
                "-c",
                "uname -r; cat; echo to-stderr >&2; exit 3",
            ],
        )
        .output_with(&input);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{mode}: {err}");
        let release = format!("{}\n", built_7_debug()["meta"]["version"].as_str().unwrap());
        assert!(out.stdout.starts_with(release.as_bytes()), "{mode}");
        assert!(
            out.stdout[release.len()..] == input[..],
            "{mode}: stdin did not come back byte for byte"
        );
        assert!(err.starts_with("to-stderr\n"), "{mode}: {err}");
        assert_eq!(last_json(&err)["userspace"], mode, "{err}");
    }
    // Two CPUs (UML runs several only in seccomp mode): the guest sees
    // both, and a parallel workload runs on both.
    let out = Run::with_kernel(
        &k,
        [
            "--cpus",
            "2",
            "--userspace",
            "seccomp",
            "--",
            "sh",
            "-c",
            "nproc; for j in 1 2; do (i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done) & done; wait; \
             grep '^cpu[01] ' /proc/stat",
        ],
    )
    .output();
    let text = assert_ok(&out, "run --cpus 2");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("2"), "{text}");
    for cpu in ["cpu0", "cpu1"] {
        let l = lines
            .find(|l| l.starts_with(cpu))
            .unwrap_or_else(|| panic!("{text}"));
        // user + nice + system ticks (seccomp mode accounts the guest's
        // processes as system time); each loop takes about a second, far
        // more than the boot leaves on a CPU.
        let busy: u64 = l
            .split_whitespace()
            .skip(1)
            .take(3)
            .map(|v| v.parse::<u64>().unwrap())
            .sum();
        assert!(busy >= 10, "{cpu} hardly ran: {text}");
    }
}

#[test]
fn run_gdb_batch_stops_in_a_system_call_handler_and_the_command_finishes() {
    let k = kernel_7();
    let dir = scratch();
    let script = gdb_script(dir.path(), "s.gdb", "continue\nbt 4\nlx-ps\nlx-dmesg\n");
    let out = Run::with_kernel(
        &k,
        [
            "--gdb-batch",
            s(&script),
            "--break",
            "sys_getppid",
            "--",
            "sh",
            "-c",
            "echo ppid=$PPID; exit 5",
        ],
    )
    .output();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    // The command's own output is untouched by gdb's, which goes to stderr.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ppid=1\n");
    assert!(err.contains("hit Breakpoint 2, sys_getppid ()"), "{err}");
    assert!(err.contains("#0  sys_getppid ()"), "{err}");
    // with frame pointers and debug info, the caller is named with its source
    assert!(
        err.contains("in handle_syscall (") && err.contains("arch/um/kernel/skas/syscall.c"),
        "{err}"
    );
    // lx-ps lists the guest's processes (the shell is running getppid) and
    // lx-dmesg reads the kernel's log.
    assert!(err.lines().any(|l| l.trim_end().ends_with(" sh")), "{err}");
    assert!(err.contains("Linux version 7."), "{err}");
    // UML's own signals never stopped gdb.
    assert!(!err.contains("received signal"), "{err}");
}

#[test]
fn gdb_options_that_cannot_work_are_refused_with_the_fix() {
    let k = kernel_7();
    let cases: &[(&[&str], &str)] = &[
        (&["--break", "panic"], "--break needs --gdb or --gdb-batch"),
        (&["--gdb", "--no-jail"], "need the jail"),
        (&["--gdb-batch", "/nonexistent.gdb"], "/nonexistent.gdb"),
        (&["--gdb-batch", "/"], "not a regular file"),
        (&["--gdb", "--break", ""], "--break"),
    ];
    for (args, want) in cases {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--", "true"]);
        let out = Run::with_kernel(&k, all).output();
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    // A function the kernel does not have: named before boot (gdb then
    // says the same), and the command still runs.
    let dir = scratch();
    let script = gdb_script(dir.path(), "c.gdb", "continue\n");
    let out = Run::with_kernel(
        &k,
        [
            "--gdb-batch",
            s(&script),
            "--break",
            "no_such_function_xyz",
            "--",
            "true",
        ],
    )
    .output();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--break no_such_function_xyz: ")
            && stderr(&out).contains("has no function"),
        "{}",
        stderr(&out)
    );
    // No terminal at all (a new session, stdin not a tty): --gdb says so.
    let mut r = Run::with_kernel(&k, ["--gdb", "--", "true"]);
    // SAFETY: setsid, async-signal-safe, in the child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut r.cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let out = r.output();
    assert!(
        stderr(&out).contains("--gdb needs a terminal"),
        "{}",
        stderr(&out)
    );
}

/// tmux, for a terminal gdb can own.
fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(["-L", "umlctl-gdb-test"])
        .args(args)
        .output()
        .expect("tmux is missing: apt-get install tmux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for_screen(what: &str, deadline: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let screen = tmux(&["capture-pane", "-p", "-S", "-200", "-t", "g"]);
        if screen.contains(what) {
            return screen;
        }
        assert!(
            t0.elapsed() < deadline,
            "no {what:?} on the terminal:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn run_gdb_on_a_terminal_boots_on_continue_stops_on_ctrl_c_and_ends_with_the_commands_status() {
    let k = kernel_7();
    let dir = scratch();
    let rc = dir.path().join("rc");
    let line = format!(
        "env UMLCTL_CACHE_DIR={} UMLCTL_RUNTIME_DIR={} {} run --kernel {} --gdb -- sh -c 'sleep 4; echo slept; exit 9'; echo $? > {}",
        s(&cache_dir()),
        s(dir.path()),
        s(&umlctl_bin()),
        s(&k),
        s(&rc)
    );
    tmux(&["kill-server"]);
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "g",
        "-x",
        "200",
        "-y",
        "50",
        &line,
    ]);
    let end = || {
        tmux(&["kill-server"]);
    };
    wait_for_screen(
        "stopped at the kernel's first instruction",
        Duration::from_secs(60),
    );
    tmux(&["send-keys", "-t", "g", "continue", "Enter"]);
    std::thread::sleep(Duration::from_secs(2));
    // Ctrl-C reaches gdb, which stops the guest (umlctl is not interrupted).
    tmux(&["send-keys", "-t", "g", "C-c"]);
    wait_for_screen("received signal SIGINT", Duration::from_secs(30));
    tmux(&["send-keys", "-t", "g", "info threads", "Enter"]);
    wait_for_screen("\"linux\"", Duration::from_secs(30));
    tmux(&["send-keys", "-t", "g", "continue", "Enter"]);
    let screen = wait_for_screen("exited with code 011", Duration::from_secs(60));
    assert!(screen.contains("slept"), "{screen}");
    tmux(&["send-keys", "-t", "g", "quit", "Enter"]);
    let t0 = Instant::now();
    while !rc.exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let code = fs::read_to_string(&rc).unwrap_or_default();
    end();
    assert_eq!(code.trim(), "9");
}

#[test]
fn debug_attaches_to_a_detached_guest_which_keeps_running_after() {
    let k = kernel_7();
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    env.ok(&[
        "start",
        "--name",
        "dbg",
        "--image",
        s(&img),
        "--mem",
        "64M",
        "--kernel",
        s(&k),
    ]);
    let t0 = Instant::now();
    loop {
        let o = env.umlctl(&["exec", "dbg", "--", "echo", "up"]);
        if o.status.success() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", stderr(&o));
        std::thread::sleep(Duration::from_millis(300));
    }
    // A system call made while gdb holds a breakpoint: exec in the guest
    // runs sh, which asks for its parent's pid.
    let script = gdb_script(
        env.dir.path(),
        "d.gdb",
        "info threads\ncontinue\nbt 2\ndelete\nlx-ps\n",
    );
    let (out, e) = std::thread::scope(|sc| {
        let exec = sc.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            env.umlctl(&["exec", "dbg", "--", "sh", "-c", "echo child-of=$PPID"])
        });
        let out = env.umlctl(&[
            "debug",
            "dbg",
            "--break",
            "sys_getppid",
            "--gdb-batch",
            s(&script),
        ]);
        (out, exec.join().unwrap())
    });
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("hit Breakpoint") && err.contains("#0  sys_getppid ()"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&e.stdout).starts_with("child-of="),
        "{}",
        stderr(&e)
    );
    // gdb is gone from UML (no tracer left), and the guest runs on: exec
    // and ctl still answer.
    let ps = env.ps();
    let pid = ps[0]["pid"].as_i64().unwrap();
    assert_eq!(ps[0]["state"], "running");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "TracerPid:\t0"), "{status}");
    assert_eq!(env.ok(&["exec", "dbg", "--", "echo", "still"]), "still\n");
    assert!(env.ok(&["ctl", "dbg", "version"]).contains("7."));
    // A guest that is not running is named.
    let out = env.umlctl(&["debug", "nosuch", "--gdb-batch", s(&script)]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
}

#[test]
fn an_unprivileged_user_debugs_the_guest_kernel_too() {
    // uid 65534: the jail's user namespace is the user's own, and gdb (run
    // as that user) may attach to UML in it.
    use std::os::unix::fs::PermissionsExt;
    let k = kernel_7();
    let dir = tempfile::Builder::new()
        .prefix("umlctl-gdb-nobody-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let bin = dir.path().join("umlctl");
    fs::copy(umlctl_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let script = gdb_script(dir.path(), "s.gdb", "continue\nbt 2\n");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "HOME=/nonexistent",
        ])
        .arg(format!("UMLCTL_CACHE_DIR={}", s(&dir.path().join("cache"))))
        .arg(format!("UMLCTL_RUNTIME_DIR={}", s(&dir.path().join("run"))))
        .arg(&bin)
        .args([
            "run",
            "--kernel",
            s(&k),
            "--gdb-batch",
            s(&script),
            "--break",
            "sys_getppid",
        ])
        .args(["--", "sh", "-c", "echo ppid=$PPID"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux)");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ppid=1\n");
    assert!(err.contains("#0  sys_getppid ()"), "{err}");
}

#[test]
fn kunit_runs_on_a_current_kernel_with_the_counts_kunit_py_reads() {
    let src = source_7();
    let dir = scratch();
    let kc = gdb_script(dir.path(), "small.kunitconfig", SMALL_KUNITCONFIG);
    let out = Command::new(umlctl_bin())
        .args(["kernel", "test", "--json", "--source"])
        .arg(&src)
        .arg("--kunitconfig")
        .arg(&kc)
        .env("UMLCTL_CACHE_DIR", kernel_cache())
        .env_remove("UMLCTL_KERNEL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&assert_ok(&out, "kernel test (7.x)")).unwrap();
    assert_eq!(v["exit_code"], 0, "{v}");
    let o = &v["outcome"];
    assert!(
        o["kernel"]["meta"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("7.")),
        "{o}"
    );
    // kunit.py from the same tree reads the same console log the same way.
    let tree = PathBuf::from(o["kernel"]["meta"]["build_dir"].as_str().unwrap()).join("source");
    check_small_kunit_run(o, &tree);
}
