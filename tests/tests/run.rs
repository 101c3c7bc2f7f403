//! `umlctl run` end to end: the real binary, a real UML kernel.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn exit_statuses_pass_through() {
    for code in [0, 1, 3, 255] {
        let (rc, out, err) = run(&[], &["sh", "-c", &format!("exit {code}")]);
        assert_eq!(rc, code, "stderr: {err}");
        assert!(out.is_empty());
        assert_eq!(err, "", "umlctl must not add to stderr on a normal exit");
    }
}

#[test]
fn signal_death_is_128_plus_n() {
    let (rc, _, err) = run(&[], &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(rc, 143, "{err}");
    let (rc, _, err) = run(&["--json"], &["sh", "-c", "kill -KILL $$"]);
    assert_eq!(rc, 137, "{err}");
    let v = last_json(&err);
    assert_eq!(v["reason"], "signaled");
    assert_eq!(v["signal"], 9);
}

#[test]
fn stdout_and_stderr_stay_separate() {
    let (rc, out, err) = run(
        &[],
        &[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; echo out2; echo err2 >&2",
        ],
    );
    assert_eq!(rc, 0);
    assert_eq!(String::from_utf8_lossy(&out), "out1\nout2\n");
    assert_eq!(err, "err1\nerr2\n");
}

#[test]
fn stdin_passes_through() {
    let out = Run::new(["--", "cat"]).output_with(b"hi\n");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"hi\n");
    // Empty stdin is EOF at once, not a hang.
    let out = Run::new(["--timeout", "60", "--", "cat"]).output_with(b"");
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn binary_stdin_and_stdout_are_byte_exact() {
    // Every byte value, including the ones a tty would interpret
    // (\r, \n, ^C, ^D, ^S, ^Q, ^Z, DEL, NUL).
    let mut data: Vec<u8> = (0..=255u8).collect();
    data.extend((0..=255u8).rev());
    data.extend(b"\r\n\r\n\x03\x04\x13\x11\x1a\x7f\x00");
    for i in 0..200_000u32 {
        data.push((i.wrapping_mul(2654435761) >> 13) as u8);
    }
    let out = Run::new(["--", "cat"]).output_with(&data);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "stdout differs from stdin");
}

#[test]
fn hundred_megabytes_of_output_match() {
    let dir = scratch();
    let file = dir.path().join("big.bin");
    let mut data = vec![0u8; 100_000_000];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    fs::write(&file, &data).unwrap();
    let want = sha256(&data);
    drop(data);
    // Relative to --workdir: the scratch directory may lie under /tmp, which
    // the guest sees as a fresh tmpfs except for the working directory.
    let (rc, out, err) = run(
        &["--workdir", dir.path().to_str().unwrap()],
        &["cat", "big.bin"],
    );
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out.len(), 100_000_000);
    assert_eq!(sha256(&out), want);
}

#[test]
fn command_not_found_is_127() {
    let (rc, out, err) = run(&[], &["no-such-command-xyz"]);
    assert_eq!(rc, 127);
    assert!(out.is_empty());
    assert!(
        err.contains("no-such-command-xyz") && err.contains("not found"),
        "{err}"
    );
    // A command that exists but exits 127 itself is told apart in --json.
    let (rc, _, err) = run(&["--json"], &["sh", "-c", "exit 127"]);
    assert_eq!(rc, 127);
    let v = last_json(&err);
    assert_eq!(v["reason"], "exited");
}

#[test]
fn command_not_executable_is_126() {
    let dir = scratch();
    let f = dir.path().join("not-exec");
    fs::write(&f, "#!/bin/sh\necho no\n").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    let (rc, _, err) = run(
        &["--workdir", dir.path().to_str().unwrap()],
        &["./not-exec"],
    );
    assert_eq!(rc, 126, "{err}");
    assert!(err.contains("ermission denied"), "{err}");
}

#[test]
fn timeout_is_124_and_the_guest_is_gone() {
    let t = Instant::now();
    let (rc, out, err) = run(&["--timeout", "3", "--json"], &["sleep", "1000"]);
    assert_eq!(rc, 124, "{err}");
    assert!(out.is_empty());
    assert!(t.elapsed() < Duration::from_secs(60));
    let v = last_json(&err);
    assert_eq!(v["reason"], "timeout");
    // Run::output already checked: no UML process, no run directory.
}

#[test]
fn working_directory_and_environment() {
    let dir = scratch();
    fs::write(dir.path().join("here.txt"), "present\n").unwrap();
    let (rc, out, err) = run(
        &[
            "--workdir",
            dir.path().to_str().unwrap(),
            "--env",
            "FOO=bar baz",
            "-e",
            "EMPTY=",
        ],
        &["sh", "-c", "cat here.txt; pwd; echo \"$FOO|$EMPTY|$HOME\""],
    );
    assert_eq!(rc, 0, "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("present\n{}\nbar baz||/root\n", dir.path().display())
    );
}

#[test]
fn host_root_is_read_only_with_writable_tmp() {
    let dir = scratch();
    let (rc, out, err) = run(
        &["--workdir", dir.path().to_str().unwrap()],
        &[
            "sh",
            "-c",
            "touch ./x 2>/dev/null && echo wrote-host || echo host-ro; echo t > /tmp/t && cat /tmp/t; test -e /etc/passwd && echo sees-host",
        ],
    );
    assert_eq!(rc, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "host-ro\nt\nsees-host\n");
    assert!(!dir.path().join("x").exists());
}

#[test]
fn guest_panic_is_125_with_a_message() {
    let (rc, out, err) = run(
        &["--json"],
        &["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 100"],
    );
    assert_eq!(rc, 125, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("guest kernel panic"), "{err}");
    let v = last_json(&err);
    assert_eq!(v["reason"], "panic");
}

#[test]
fn image_root_runs_and_the_image_is_unchanged() {
    let dir = scratch();
    let img = busybox_image(dir.path());
    let before = sha256_file(&img);
    let mtime_before = fs::metadata(&img).unwrap().modified().unwrap();
    let (rc, out, err) = run(
        &["--image", img.to_str().unwrap()],
        &[
            "sh",
            "-c",
            "cat /etc/marker; echo written > /newfile; cat /newfile; \
             test -e /etc/passwd && echo host-visible; \
             mount -t hostfs none /mnt 2>/dev/null && echo mounted || echo no-hostfs; exit 7",
        ],
    );
    assert_eq!(rc, 7, "{err}");
    // The host's files are not reachable: hostfs cannot even be mounted.
    assert_eq!(
        String::from_utf8_lossy(&out),
        "umlctl busybox test image\nwritten\nno-hostfs\n"
    );
    assert_eq!(sha256_file(&img), before, "the image was modified");
    assert_eq!(
        fs::metadata(&img).unwrap().modified().unwrap(),
        mtime_before
    );
    // The image is checked by an independent tool, too.
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn a_missing_or_bad_image_is_a_clear_error() {
    let (rc, _, err) = run(&["--image", "/nonexistent/root.ext4"], &["true"]);
    assert_eq!(rc, 125);
    assert!(
        err.contains("/nonexistent/root.ext4") && err.contains("does not exist"),
        "{err}"
    );
    let dir = scratch();
    let junk = dir.path().join("junk.img");
    fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
    let (rc, _, err) = run(&["--image", junk.to_str().unwrap()], &["true"]);
    assert_eq!(rc, 125, "{err}");
    assert!(err.contains("cannot mount the image"), "{err}");
}

#[test]
fn sigterm_to_umlctl_reaches_the_command() {
    let mut r = Run::new(["--json", "--", "sleep", "1000"]);
    r.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = r.cmd.spawn().unwrap();
    // Wait until the guest is up (its instance directory exists).
    let t = Instant::now();
    while fs::read_dir(r.runtime.path())
        .unwrap()
        .flatten()
        .all(|e| e.file_name().to_string_lossy().starts_with("xstate-"))
        && t.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(t.elapsed() < Duration::from_secs(15));
    assert_no_leftovers(r.runtime.path(), &[]);
}

#[test]
fn a_closed_stdout_stops_the_command() {
    // `yes | head -1`: the guest's `yes` must die of SIGPIPE, not run forever.
    let runtime = scratch();
    let sh = format!(
        "'{}' run --kernel '{}' --timeout 60 -- yes | head -1",
        umlctl_bin().display(),
        kernel().display()
    );
    let out = Command::new("sh")
        .args(["-c", &sh])
        .env("UMLCTL_RUNTIME_DIR", runtime.path())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"y\n");
    assert_no_leftovers(runtime.path(), &[]);
}

#[test]
fn json_result_has_timings() {
    let (rc, _, err) = run(&["--json"], &["true"]);
    assert_eq!(rc, 0);
    let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["reason"], "exited");
    assert!(v["timings"]["boot_ms"].as_f64().unwrap() > 0.0);
    assert!(
        v["timings"]["total_ms"].as_f64().unwrap() >= v["timings"]["boot_ms"].as_f64().unwrap()
    );
    assert_eq!(v["kernel"], kernel().to_str().unwrap());
}

#[test]
fn usage_errors_are_125() {
    let out = Command::new(umlctl_bin()).args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    let out = Command::new(umlctl_bin())
        .args(["run", "--mem", "lots", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid size"));
}

#[test]
fn missing_kernel_is_a_clear_error_naming_what_was_tried() {
    let empty = scratch();
    let out = Command::new(umlctl_bin())
        .args(["run", "--", "true"])
        .env("PATH", empty.path())
        .env_remove("UMLCTL_KERNEL")
        .env("UMLCTL_CACHE_DIR", empty.path().join("cache"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "no UML kernel found",
        "--kernel",
        "$UMLCTL_KERNEL",
        "kernel cache",
        "linux.uml",
        "fix:",
    ] {
        assert!(err.contains(want), "missing {want:?} in: {err}");
    }
    let out = Command::new(umlctl_bin())
        .args(["run", "--kernel", "/bin/true", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a User-mode Linux kernel"));
}

#[test]
fn works_for_an_unprivileged_user() {
    // nobody cannot read the build tree (nor, maybe, the kernel's place).
    let (_dir, bin, kern) = nobody_copies("umlctl-nobody-");
    let setpriv = Command::new("setpriv").arg("--version").output();
    assert!(
        setpriv.is_ok(),
        "setpriv (util-linux) is needed for this test"
    );
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["run", "--kernel"])
        .arg(&kern)
        .args(["--", "sh", "-c", "echo guest-uid=$(id -u)"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/nonexistent")
        .current_dir("/")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "guest-uid=0\n");
    let leftovers = processes_mentioning("/tmp/umlctl-65534/");
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let runs: Vec<_> = fs::read_dir("/tmp/umlctl-65534")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("umlctl-"))
        .collect();
    assert!(runs.is_empty(), "run directories left: {runs:?}");
}

#[test]
fn boots_with_the_xstate_shim_preloaded() {
    // The shim must be harmless where it is not needed, and on hosts that
    // need it every boot goes through it; force it here.
    let mut r = Run::new(["--json", "--", "sh", "-c", "echo shimmed"]);
    r.cmd.env("UMLCTL_XSTATE_SHIM", "always");
    let out = r.output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(out.stdout, b"shimmed\n");
    let v = last_json(&err);
    assert_eq!(v["xstate_shim"], true);
    // And --no-xstate-shim wins over it.
    let mut r = Run::new(["--json", "--no-xstate-shim", "--", "true"]);
    r.cmd.env("UMLCTL_XSTATE_SHIM", "always");
    let out = r.output();
    let err = String::from_utf8_lossy(&out.stderr);
    let v = last_json(&err);
    assert_eq!(v["xstate_shim"], false);
}

#[test]
fn a_killed_umlctl_takes_its_guest_along_and_the_next_run_sweeps_up() {
    let mut r = Run::new(["--", "sleep", "1000"]);
    r.cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = r.cmd.spawn().unwrap();
    let runtime = r.runtime.path().to_path_buf();
    // Wait for the guest to be up.
    let t = Instant::now();
    while processes_mentioning(&runtime.to_string_lossy()).is_empty()
        && t.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    // UML dies with its parent (PR_SET_PDEATHSIG), helpers with UML.
    let t = Instant::now();
    while !processes_mentioning(&runtime.to_string_lossy()).is_empty()
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(processes_mentioning(&runtime.to_string_lossy()).is_empty());
    // Its run directory is stale now; the next run in the same place removes it.
    let mut next = Run::new(["--", "true"]);
    next.runtime = r.runtime;
    let out = next.output();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_working_directory_under_tmp_stays_visible() {
    let dir = tempfile::Builder::new()
        .prefix("umlctl-wd-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::write(dir.path().join("f"), "seen\n").unwrap();
    let (rc, out, err) = run(
        &["--workdir", dir.path().to_str().unwrap()],
        &["sh", "-c", "cat f; ls /tmp | wc -l"],
    );
    assert_eq!(rc, 0, "{err}");
    // The rest of /tmp is a fresh tmpfs: only the path to the workdir exists.
    assert_eq!(String::from_utf8_lossy(&out), "seen\n1\n");
}

#[test]
fn an_interactive_terminal_works_and_is_restored() {
    // script(1) gives umlctl a pseudo-terminal as stdin and stdout.
    let runtime = scratch();
    let inner = format!(
        "stty rows 33 cols 101; before=$(stty -g); \
         '{}' run --kernel '{}' -- sh -c 'tty; stty size; test -t 0 && echo stdin-is-tty; exit 4'; rc=$?; \
         after=$(stty -g); [ \"$before\" = \"$after\" ] && echo restored; exit $rc",
        umlctl_bin().display(),
        kernel().display()
    );
    // `script -qec SHELL-LINE`: the line runs on a fresh pseudo-terminal.
    let in_terminal = |line: &str| {
        Command::new("script")
            .args(["-qec", line, "/dev/null"])
            .env("UMLCTL_RUNTIME_DIR", runtime.path())
            .env("UMLCTL_CACHE_DIR", cache_dir())
            .stdin(Stdio::null())
            .output()
            .expect("script (bsdutils) is needed for this test")
    };
    let out = in_terminal(&inner);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert!(text.contains("/dev/ttyS0"), "{text}");
    assert!(text.contains("33 101"), "window size not passed: {text}");
    assert!(text.contains("stdin-is-tty"), "{text}");
    assert!(
        text.contains("restored"),
        "terminal settings not restored: {text}"
    );
    assert_no_leftovers(runtime.path(), &[]);
    // A terminal without a size stays without one (it used to become 24×80).
    let inner = format!(
        "stty rows 0 cols 0; echo host $(stty size); '{}' run --kernel '{}' -- sh -c 'echo guest $(stty size)'",
        umlctl_bin().display(),
        kernel().display()
    );
    let out = in_terminal(&inner);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("host 0 0") && text.contains("guest 0 0"),
        "{text}"
    );
}

#[test]
fn a_relative_overlay_path_works_and_keeps_the_guests_writes() {
    // The README's own example: `--overlay work.cow`, relative to where
    // umlctl runs (UML itself runs elsewhere).
    let dir = scratch();
    let img = busybox_image(dir.path());
    for (round, script) in [(1, "echo kept > /kept"), (2, "cat /kept")] {
        let mut r = Run::new([
            "--image",
            img.to_str().unwrap(),
            "--overlay",
            "work.cow",
            "--",
            "sh",
            "-c",
            script,
        ]);
        r.cmd.current_dir(dir.path());
        let out = r.output();
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if round == 2 {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "kept\n");
        }
    }
    assert!(dir.path().join("work.cow").is_file());
}

#[test]
fn a_guest_flooding_the_status_line_is_stopped_and_umlctl_stays_small() {
    // Guest root writes 300 MB without a newline to umlctl's status line
    // (the repro made umlctl grow to 592 MB and misreport the end).
    let mut r = Run::new([
        "--json",
        "--",
        "sh",
        "-c",
        "head -c 300000000 /dev/zero | tr '\\0' A > /dev/ttyS4; sleep 60",
    ]);
    r.cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = r.cmd.spawn().unwrap();
    let pid = child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let peak = peak.clone();
        std::thread::spawn(move || {
            while let Ok(st) = fs::read_to_string(format!("/proc/{pid}/status")) {
                let kb = st
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
                peak.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
    };
    let out = child.wait_with_output().unwrap();
    let _ = watcher.join();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let v = last_json(&err);
    assert_eq!(v["reason"], "protocol", "{err}");
    assert!(err.contains("status line"), "{err}");
    let peak_mb = peak.load(std::sync::atomic::Ordering::Relaxed) / 1024;
    assert!(peak_mb < 100, "umlctl grew to {peak_mb} MB");
}

#[test]
fn a_guest_that_powers_itself_off_is_a_shutdown_not_a_boot_failure() {
    let (rc, _, err) = run(
        &["--json"],
        &["sh", "-c", "echo o > /proc/sysrq-trigger; sleep 60"],
    );
    assert_eq!(rc, 125, "{err}");
    let v = last_json(&err);
    assert_eq!(v["reason"], "shutdown", "{err}");
    assert!(err.contains("the guest shut down"), "{err}");
}

#[test]
fn stdin_keeps_flowing_after_the_guest_stops_reading_for_a_while() {
    // The guest reads nothing for a second (its tty fills and UML used to
    // throttle the line, which loses the line's input interrupt for good),
    // then reads on while the host's input arrives in two bursts with a
    // pause between them: all of it must arrive (it used to stop at the
    // first burst, for ever).
    let dir = scratch();
    let script = format!(
        "(head -c 300000 /dev/zero; sleep 2; head -c 300000 /dev/zero) | \
         UMLCTL_RUNTIME_DIR='{}' UMLCTL_CACHE_DIR='{}' '{}' run --kernel '{}' --timeout 120 -- sh -c 'sleep 1; wc -c'",
        dir.path().display(),
        cache_dir().display(),
        umlctl_bin().display(),
        kernel().display()
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "600000",
        "{err}"
    );
}

/// Docker's /dev/shm is noexec, and UML maps its memory file (by default
/// in /dev/shm) executable: unjailed, umlctl picks a directory where that
/// works and says which under -v; jailed, the jail's own tmpfs is used.
#[test]
fn a_noexec_dev_shm_is_worked_around() {
    let dir = scratch();
    for (no_jail, verbose) in [(true, true), (false, false)] {
        let mut c = with_private_mounts(NOEXEC_SHM);
        c.arg(umlctl_bin()).args(["run", "--kernel"]).arg(kernel());
        if no_jail {
            c.arg("--no-jail");
        }
        if verbose {
            c.arg("-v");
        }
        let out = c
            .args(["--", "sh", "-c", "echo ran; cat /proc/meminfo | head -1"])
            .env_remove("TMPDIR")
            .env_remove("TMP")
            .env_remove("TEMP")
            .env("UMLCTL_RUNTIME_DIR", dir.path())
            .env("UMLCTL_CACHE_DIR", cache_dir())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "no_jail={no_jail}: {err}");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("ran\nMemTotal:"),
            "{err}"
        );
        if no_jail {
            assert!(
                err.contains(&format!(
                    "/dev/shm is mounted noexec, and UML maps guest memory executable; its memory file goes in {} instead",
                    dir.path().display()
                )),
                "{err}"
            );
        } else {
            assert!(!err.contains("noexec"), "{err}");
        }
    }
    // The user's own TMPDIR, if it is noexec, is passed over loudly.
    let out = with_private_mounts(NOEXEC_SHM)
        .arg(umlctl_bin())
        .args(["run", "--no-jail", "--kernel"])
        .arg(kernel())
        .args(["--", "true"])
        .env("TMPDIR", "/dev/shm")
        .env("UMLCTL_RUNTIME_DIR", dir.path())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: $TMPDIR=/dev/shm is mounted noexec"),
        "{err}"
    );
}

/// `--userspace`: ptrace by default; seccomp on a kernel that has the mode
/// (UML ≥ 6.16), refused with the version needed on one that has not;
/// `auto` falls back to ptrace there. `--json` says which ran.
#[test]
fn userspace_modes_are_chosen_or_refused_with_the_version_needed() {
    let info = std::process::Command::new(umlctl_bin())
        .args(["kernel", "info", "--json"])
        .arg(kernel())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&assert_ok(&info, "kernel info")).unwrap();
    let has_seccomp = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["name"] == "seccomp-mode" && f["present"] == true);
    let (rc, _, err) = run(&["--json"], &["true"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(last_json(&err)["userspace"], "ptrace");
    let (rc, _, err) = run(&["--json", "--userspace", "auto"], &["true"]);
    assert_eq!(rc, 0, "{err}");
    let (rc, _, err) = run(&["--json", "--userspace", "seccomp"], &["true"]);
    if has_seccomp {
        assert_eq!(rc, 0, "{err}");
        assert_eq!(last_json(&err)["userspace"], "seccomp");
    } else {
        assert_eq!(rc, 125, "{err}");
        assert!(
            err.contains("has no seccomp mode (UML 6.16 or later"),
            "{err}"
        );
    }
    let (rc, _, err) = run(&["--userspace", "fast"], &["true"]);
    assert_eq!(rc, 125, "{err}");
    assert!(err.contains("expected ptrace, seccomp or auto"), "{err}");
}

/// Debian's linux.uml times its RAID6 algorithms at boot (most of a second);
/// `run` skips that and says so in --json, `--full-boot` keeps it. The
/// kernel's own log is the oracle.
#[test]
fn the_raid6_speed_test_is_skipped_unless_full_boot_is_asked_for() {
    let dir = scratch();
    let log = |name: &str| dir.path().join(name);
    for (full, name) in [(false, "fast.log"), (true, "full.log")] {
        let mut args: Vec<String> = vec![
            "--json".into(),
            "--console-log".into(),
            log(name).to_str().unwrap().into(),
        ];
        if full {
            args.push("--full-boot".into());
        }
        args.extend(["--".into(), "true".into()]);
        let out = Run::with_kernel(&debian_kernel(), &args).output();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        let v = last_json(&err);
        let kernel_log = fs::read_to_string(log(name)).unwrap();
        let timed = kernel_log.contains("raid6: using algorithm");
        if full {
            assert_eq!(v["skipped_initcalls"], serde_json::json!([]), "{err}");
            assert!(
                timed,
                "the full boot chose a RAID6 algorithm:\n{kernel_log}"
            );
        } else {
            assert_eq!(
                v["skipped_initcalls"],
                serde_json::json!(["raid6_select_algo"]),
                "{err}"
            );
            assert!(!timed, "the RAID6 test ran:\n{kernel_log}");
        }
        assert!(v["timings"]["kernel_ms"].as_f64().unwrap() > 0.0, "{err}");
    }
}

/// `--cpus`: one CPU runs anywhere; more than one on a kernel without SMP
/// is refused before anything boots, naming the kernel and what it needs.
#[test]
fn cpus_beyond_one_need_an_smp_kernel() {
    let (rc, out, err) = run(&["--cpus", "1"], &["nproc"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1");
    let (rc, _, err) = run(&["--cpus", "2"], &["true"]);
    assert_eq!(rc, 125, "{err}");
    assert!(
        err.contains("--cpus 2") && err.contains("6.19") && err.contains("CONFIG_SMP"),
        "{err}"
    );
}
