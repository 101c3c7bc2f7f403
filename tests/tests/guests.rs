//! Detached guests end to end: start, ps, ctl (mconsole, checked against
//! uml_mconsole), console, logs, stop, gc.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `data` on the stdin of `exec -i NAME -- cat`, written while the output
/// is read; the output.
fn cat_through_exec(env: &GuestEnv, name: &str, data: &[u8]) -> std::process::Output {
    let mut c = env.cmd(&["exec", "-i", name, "--", "cat"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut w = child.stdin.take().unwrap();
    let d = data.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&d).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What uml_mconsole prints for a command, without its "OK "/"ERR " prefix.
fn uml_mconsole(sock: &Path, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("uml_mconsole")
        .arg(sock)
        .args(cmd)
        .output()
        .expect("uml_mconsole: apt-get install uml-utilities");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("Warning"))
        .collect::<Vec<_>>()
        .join("\n");
    if let Some(r) = body.strip_prefix("OK ") {
        (true, r.to_string())
    } else {
        (
            false,
            body.strip_prefix("ERR ").unwrap_or(&body).to_string(),
        )
    }
}

#[test]
fn start_ctl_console_stop_and_the_same_answers_as_uml_mconsole() {
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    let overlay = env.dir.path().join("g.cow");
    let k = kernel();
    let name = env
        .ok(&[
            "start",
            "--name",
            "g1",
            "--image",
            s(&img),
            "--overlay",
            s(&overlay),
            "--mem",
            "64M",
            "--kernel",
            s(&k),
        ])
        .trim()
        .to_string();
    assert_eq!(name, "g1");
    assert_eq!(env.state("g1").as_deref(), Some("running"));
    let ps = env.ps();
    let g = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "g1")
        .unwrap()
        .clone();
    assert_eq!(g["mem_bytes"], 64 << 20);
    assert!(g["pid"].as_i64().unwrap() > 1);

    // Names are unique.
    let out = env.umlctl(&[
        "start",
        "--name",
        "g1",
        "--image",
        s(&img),
        "--kernel",
        s(&k),
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));

    // ctl answers, and uml_mconsole on the same socket says the same.
    let sock = env.uml_dir().join("g1/mconsole");
    let version = env.ok(&["ctl", "g1", "version"]);
    let info: serde_json::Value = serde_json::from_slice(
        &Command::new(umlctl_bin())
            .args(["kernel", "info", "--json", s(&k)])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        version.contains(info["version"].as_str().unwrap()),
        "{version}"
    );
    assert_eq!(
        uml_mconsole(&sock, &["version"]),
        (true, version.trim_end().to_string())
    );
    let ostype = env.ok(&["ctl", "g1", "proc", "sys/kernel/ostype"]);
    assert_eq!(ostype.trim(), "Linux");
    assert_eq!(
        uml_mconsole(&sock, &["proc", "sys/kernel/ostype"]).1.trim(),
        "Linux"
    );
    let sysrq = env.ok(&["ctl", "g1", "sysrq", "m"]);
    assert!(sysrq.contains("Mem-Info"), "{sysrq}");

    // Hot-plug a disk; the guest sees it.
    let disk = env.dir.path().join("extra.img");
    fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    env.ok(&["ctl", "g1", "config", &format!("ubdb={}", s(&disk))]);
    assert_eq!(env.ok(&["ctl", "g1", "config", "ubdb"]).trim(), s(&disk));
    assert_eq!(
        uml_mconsole(&sock, &["config", "ubdb"]),
        (true, s(&disk).to_string())
    );
    let parts = env.ok(&["ctl", "g1", "proc", "partitions"]);
    assert!(parts.contains("ubdb"), "{parts}");

    // Errors from the guest are errors, the same ones uml_mconsole shows.
    let out = env.umlctl(&["ctl", "g1", "remove", "ubdz"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let (ok, theirs) = uml_mconsole(&sock, &["remove", "ubdz"]);
    assert!(!ok);
    assert!(err.contains(theirs.trim()), "{err} vs {theirs}");
    let out = env.umlctl(&["ctl", "g1", "no-such-command"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown command"));

    // The console: the log has the boot, and keystrokes reach the guest's shell.
    let t = Instant::now();
    while !env.ok(&["logs", "g1"]).contains("guest-up") && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(env.ok(&["logs", "g1"]).contains("guest-up"));
    let mut c = Command::new("script")
        .args([
            "-qec",
            &format!("'{}' console g1", umlctl_bin().display()),
            "/dev/null",
        ])
        .env("UMLCTL_UML_DIR", env.uml_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = c.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    input.write_all(b"echo typed-$((6*7))\r").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    input.write_all(b"\x1d").unwrap();
    let out = c.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("typed-42"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(env.ok(&["logs", "g1"]).contains("typed-42"));
    assert_eq!(
        env.state("g1").as_deref(),
        Some("running"),
        "detaching must leave the guest running"
    );

    // A graceful stop runs the guest's own shutdown.
    let out = env.ok(&["stop", "g1"]);
    assert!(out.contains("shut down"), "{out}");
    // Stopped, not forgotten: the record and console log stay until gc,
    // so `logs` works and `ps --all` says how it ended.
    assert_eq!(env.state("g1").as_deref(), Some("stopped"));
    assert!(env.ok(&["logs", "g1"]).contains("typed-42"));
    let ps = env.ok(&["ps", "--all"]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("g1 ") && l.contains("stopped") && l.contains("(shut down)")),
        "{ps}"
    );
    assert!(
        !env.uml_dir().join("g1").exists(),
        "UML's instance directory stayed"
    );
    let merged = env.dir.path().join("merged.ext4");
    env.ok(&["cow", "merge", s(&overlay), "-o", s(&merged)]);
    let cat = Command::new("debugfs")
        .args(["-R", "cat /shutdown-marker", s(&merged)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "shutdown-ran\n");
    assert!(processes_mentioning("umid=g1 ").is_empty());

    // The name of a stopped guest can be started again; `stop --rm`
    // leaves nothing.
    env.ok(&[
        "start",
        "--name",
        "g1",
        "--image",
        s(&img),
        "--mem",
        "64M",
        "--kernel",
        s(&k),
    ]);
    assert_eq!(env.state("g1").as_deref(), Some("running"));
    let out = env.ok(&["stop", "--rm", "g1"]);
    assert!(out.contains("shut down"), "{out}");
    assert_eq!(env.state("g1"), None);
    assert!(!env.uml_dir().join("g1").exists() && !env.uml_dir().join("g1.umlctl").exists());
}

#[test]
fn a_killed_guest_shows_as_dead_and_gc_cleans_it() {
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    let name = env
        .ok(&[
            "start",
            "--image",
            s(&img),
            "--mem",
            "64M",
            "--kernel",
            s(&kernel()),
        ])
        .trim()
        .to_string();
    assert!(name.starts_with("guest-"), "{name}");
    let pid = env.ps().as_array().unwrap()[0]["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    while env.state(&name).as_deref() == Some("running") && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.state(&name).as_deref(), Some("dead"));
    // Not listed without --all, but ps says there is something to collect.
    let out = env.umlctl(&["ps"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&name));
    assert!(String::from_utf8_lossy(&out.stderr).contains("umlctl gc"));
    // A dead guest's mconsole is a clear error.
    let out = env.umlctl(&["ctl", &name, "version"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is dead"));
    let out = env.ok(&["gc"]);
    assert!(out.contains(&name), "{out}");
    assert_eq!(env.state(&name), None);
    assert!(
        fs::read_dir(env.uml_dir()).unwrap().next().is_none(),
        "gc left files"
    );
    assert!(processes_mentioning(&format!("umid={name} ")).is_empty());
    assert!(env.ok(&["gc"]).contains("nothing to collect"));
    // A foreign UML's leftover instance directory is collected; a directory
    // with a dead pid file and anything else in it is not gc's to remove.
    let foreign = env.uml_dir().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("pid"), "999999999\n").unwrap();
    let precious = env.uml_dir().join("precious");
    fs::create_dir(&precious).unwrap();
    fs::write(precious.join("pid"), "999999999\n").unwrap();
    fs::write(precious.join("thesis.tex"), "years of work").unwrap();
    let out = env.ok(&["gc"]);
    assert!(out.contains("foreign"), "{out}");
    assert!(!foreign.exists());
    assert!(
        precious.join("thesis.tex").exists(),
        "gc removed a directory that was not UML's"
    );
    // A damaged record, and one never written (an old start that died):
    // listed as damaged and collected; a record-less one younger than a
    // minute may be a start under way and stays.
    let bad = env.uml_dir().join("bad.umlctl");
    fs::create_dir(&bad).unwrap();
    fs::write(bad.join("guest.json"), "{garbage").unwrap();
    let empty = env.uml_dir().join("empty.umlctl");
    fs::create_dir(&empty).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::open(&empty).unwrap().set_modified(old).unwrap();
    let young = env.uml_dir().join("young.umlctl");
    fs::create_dir(&young).unwrap();
    let ps = String::from_utf8_lossy(&env.umlctl(&["ps", "--all"]).stdout).into_owned();
    for n in ["bad", "empty", "young"] {
        assert!(
            ps.lines()
                .any(|l| l.starts_with(n) && l.contains("damaged")),
            "{ps}"
        );
    }
    let out = env.ok(&["gc"]);
    assert!(out.contains("removed bad (damaged record:"), "{out}");
    assert!(
        out.contains("removed empty (damaged record: no record"),
        "{out}"
    );
    assert!(!bad.exists() && !empty.exists());
    assert!(young.exists(), "gc removed a guest that may be starting");
}

#[test]
fn a_boot_failure_is_reported_with_the_console_tail_and_leaves_nothing() {
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    // An init that does not exist: the kernel panics at boot.
    let overlay = env.dir.path().join("new.cow");
    let out = env.umlctl(&[
        "start",
        "--name",
        "bad",
        "--image",
        s(&img),
        "--overlay",
        s(&overlay),
        "--init",
        "/no/such/init",
        "--mem",
        "64M",
        "--kernel",
        s(&kernel()),
    ]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("last console lines") && err.contains("/no/such/init"),
        "{err}"
    );
    assert_eq!(env.state("bad"), None);
    assert!(!env.uml_dir().join("bad.umlctl").exists());
    assert!(fs::symlink_metadata(env.uml_dir().join("bad")).is_err());
    assert!(
        !overlay.exists(),
        "the overlay this failed start created was left behind"
    );
    assert!(processes_mentioning("umid=bad ").is_empty());
}

/// `exec` needs nothing in the image (the test image has no agent, no
/// sshd): exit codes, stdout and stderr kept apart, stdin byte-exact in
/// both directions, a terminal with the host's size, several at once (more
/// than there are slots: the rest wait), a stopped guest refused.
#[test]
fn exec_runs_commands_in_a_running_guest() {
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    let k = kernel();
    // --wait returns when the exec channel answers.
    env.ok(&[
        "start",
        "--name",
        "ex",
        "--hostname",
        "box-1",
        "--wait",
        "--image",
        s(&img),
        "--mem",
        "64M",
        "--kernel",
        s(&k),
    ]);
    let exec = |args: &[&str]| {
        let mut a = vec!["exec", "ex"];
        a.extend_from_slice(args);
        env.umlctl(&a)
    };
    // The hostname (--hostname; by default the guest's name), set before
    // the image's init.
    let o = exec(&["--", "cat", "/proc/sys/kernel/hostname"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "box-1\n");
    assert_eq!(o.status.code(), Some(0));
    // What a finished command leaves running in the background stays (as
    // after `docker exec`: a script that starts a daemon), also after later
    // execs on the same slots.
    let o = exec(&[
        "--",
        "sh",
        "-c",
        "sleep 300 > /dev/null 2>&1 & echo $! > /bg; exit 0",
    ]);
    assert_eq!(o.status.code(), Some(0));
    for _ in 0..5 {
        assert_eq!(exec(&["--", "true"]).status.code(), Some(0));
    }
    let o = exec(&["--", "sh", "-c", "kill -0 $(cat /bg) && echo alive"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "alive\n");
    let o = exec(&["--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    let o = exec(&["--", "no-such-command"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such-command: command not found"));
    let o = exec(&["--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(128 + 9));
    // -e, -w and -u.
    let o = exec(&[
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "-u",
        "65534",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING\" $(pwd) $(cat /proc/self/status | grep ^Uid | cut -f2)",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi there /tmp 65534\n");
    let o = exec(&["-w", "/nonexistent", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    // stdin, byte-exact (every byte value, more than the flow-control
    // window many times over); without -i the command's stdin is empty.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let out = cat_through_exec(&env, "ex", &data);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout == data,
        "stdin came back changed ({} bytes)",
        out.stdout.len()
    );
    let o = exec(&["--", "wc", "-c"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "0");
    // Much more goes through the slot's stdin ring (a read-only disk the
    // guest reads with O_DIRECT), byte-exact; the guest kernel's own disk
    // counters show that the ring carried it.
    let ring_sectors = || -> u64 {
        let o = exec(&["--", "cat", "/proc/diskstats"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 5 && ["ubdl", "ubdm", "ubdn", "ubdo"].contains(&f[2]))
                    .then(|| f[5].parse::<u64>().unwrap())
            })
            .sum()
    };
    let before = ring_sectors();
    let big: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = cat_through_exec(&env, "ex", &big);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        sha256(&out.stdout) == sha256(&big),
        "32 MiB through the ring came back changed ({} bytes)",
        out.stdout.len()
    );
    let read = ring_sectors() - before;
    assert!(read >= (32 << 20) / 512, "the rings gave {read} sectors");
    // A terminal (script(1) gives exec one): the command sees a tty of the
    // host's size.
    let cmd = format!(
        "stty rows 33 cols 111; UMLCTL_UML_DIR='{}' UMLCTL_CACHE_DIR='{}' '{}' exec -t ex -- sh -c 'tty; stty size'",
        env.uml_dir().display(),
        cache_dir().display(),
        umlctl_bin().display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("/dev/pts/") && text.contains("33 111"),
        "{text:?}"
    );
    // Six at once on four slots: all finish, each with its own output.
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let mut c = env.cmd(&[
                "exec",
                "ex",
                "--",
                "sh",
                "-c",
                &format!("sleep 1; echo n{i}"),
            ]);
            c.stdout(Stdio::piped());
            (i, c.spawn().unwrap())
        })
        .collect();
    for (i, h) in handles {
        let o = h.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0));
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("n{i}\n"));
    }
    // The agent killed under a running command (its parent): the exec
    // says so instead of waiting forever.
    let o = exec(&["--", "sh", "-c", "kill -9 $PPID; sleep 100"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exec agent stopped answering"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    env.ok(&["stop", "ex"]);
    let o = exec(&["--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not running"));
    // A guest that is not ready in time is stopped and removed, with the
    // reason.
    let o = env.umlctl(&[
        "start",
        "--name",
        "nr",
        "--wait",
        "tcp:22",
        "--image",
        s(&img),
        "--mem",
        "64M",
        "--kernel",
        s(&k),
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no network address"));
    assert_eq!(env.state("nr"), None, "the unready guest was left behind");
    let o = env.umlctl(&["exec", "nosuch", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no guest named"));
}

/// A busybox image with busybox's built-in init table (no /etc/inittab):
/// its console shell appears on `umlctl console` and takes input, and exec
/// works beside it.
#[test]
fn a_busybox_default_init_gives_its_console_shell() {
    let env = GuestEnv::new();
    let root = env.dir.path().join("bbroot");
    for d in [
        "bin",
        "sbin",
        "etc/init.d",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
    ] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for t in ["sh", "mount", "echo", "true", "cat", "hostname"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    std::os::unix::fs::symlink("../bin/busybox", root.join("sbin/init")).unwrap();
    let rcs = root.join("etc/init.d/rcS");
    fs::write(&rcs, "#!/bin/sh\nmount -t proc proc /proc\n").unwrap();
    fs::set_permissions(&rcs, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let img = env.dir.path().join("bb.ext4");
    mkfs_ext4(&root, &img);
    let k = kernel();
    env.ok(&[
        "start",
        "--name",
        "bb",
        "--wait",
        "--image",
        s(&img),
        "--mem",
        "64M",
        "--kernel",
        s(&k),
    ]);
    let cmd = format!(
        "UMLCTL_UML_DIR='{}' UMLCTL_CACHE_DIR='{}' '{}' console bb",
        env.uml_dir().display(),
        cache_dir().display(),
        umlctl_bin().display()
    );
    let o = Command::new("bash")
        .arg("-c")
        .arg("(sleep 2; printf '\\r'; sleep 1; printf 'echo typed-$((20+22))\\r'; sleep 2; printf '\\035') | script -qec \"$0\" /dev/null")
        .arg(&cmd)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("Please press Enter to activate this console") && text.contains("typed-42"),
        "{text:?}"
    );
    let o = env.umlctl(&["exec", "bb", "--", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "bb\n");
    env.ok(&["stop", "--force", "bb"]);
}

/// A guest whose own disks take the slots of the stdin rings: exec's
/// stdin stays on the serial lines, byte-exact, and the disks keep their
/// names.
#[test]
fn exec_stdin_without_rings_when_the_guests_disks_take_their_slots() {
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    let k = kernel();
    let mut args = vec![
        "start".to_string(),
        "--name".into(),
        "full".into(),
        "--wait".into(),
        "--image".into(),
        s(&img).into(),
        "--mem".into(),
        "64M".into(),
        "--kernel".into(),
        s(&k).into(),
    ];
    for i in 0..11 {
        let d = env.dir.path().join(format!("d{i}.img"));
        fs::write(&d, vec![i as u8; 4096]).unwrap();
        args.push("--disk".into());
        args.push(s(&d).into());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    env.ok(&a);
    let o = env.umlctl(&["exec", "full", "--", "cat", "/proc/diskstats"]);
    let stats = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        stats.contains(" ubdl ") && !stats.contains(" ubdm "),
        "{stats}"
    );
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 256) as u8).collect();
    let out = cat_through_exec(&env, "full", &data);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == data, "{} bytes", out.stdout.len());
    env.ok(&["stop", "--rm", "full"]);
}

/// `start --wait booted` on a stock Debian image returns once systemd has
/// finished booting (so the next `exec` finds the system running, not
/// "starting" or without a bus); when a unit fails, the guest is still
/// ready and a warning names the unit.
#[test]
fn wait_booted_returns_when_systemd_has_booted_and_names_failed_units() {
    let env = GuestEnv::new();
    let img = debian_image();
    let overlay = env.dir.path().join("deb.cow");
    let k = kernel();
    let start = |wait: &str| {
        env.umlctl(&[
            "start",
            "--name",
            "deb",
            "--image",
            s(&img),
            "--overlay",
            s(&overlay),
            "--kernel",
            s(&k),
            "--mem",
            "384M",
            "--wait",
            wait,
        ])
    };
    let o = start("booted");
    assert_ok(&o, "start --wait booted");
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        env.ok(&["exec", "deb", "--", "systemctl", "is-system-running"])
            .trim(),
        "running"
    );
    // A unit that fails on every boot, on the guest's overlay.
    env.ok(&[
        "exec",
        "deb",
        "--",
        "sh",
        "-c",
        "printf '[Unit]\\nDescription=fails\\n[Service]\\nType=oneshot\\nExecStart=/bin/false\\n[Install]\\nWantedBy=multi-user.target\\n' \
         > /etc/systemd/system/umlctl-fails.service && systemctl enable umlctl-fails.service",
    ]);
    env.ok(&["stop", "deb"]);
    env.ok(&["gc"]);
    let o = start("booted");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_ok(&o, "start --wait booted, a unit failing");
    assert!(
        err.contains("warning: guest deb booted degraded") && err.contains("umlctl-fails.service"),
        "{err}"
    );
    let o = env.umlctl(&["exec", "deb", "--", "systemctl", "is-system-running"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "degraded");
    env.ok(&["stop", "deb"]);
}

/// `MemTotal` and `MemFree` (KiB) of guest `name`.
fn guest_meminfo(env: &GuestEnv, name: &str) -> (u64, u64) {
    let text = env.ok(&["exec", name, "--", "cat", "/proc/meminfo"]);
    let field = |f: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(f)?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {f} in {text}"))
    };
    (field("MemTotal:"), field("MemFree:"))
}

#[test]
fn reclaim_returns_what_a_guest_touched_and_freed_and_the_guest_keeps_all_its_memory() {
    let env = GuestEnv::new();
    let img = guest_image(env.dir.path());
    const MIB: u64 = 1024 * 1024;
    let start = |name: &str, mem: &str, k: &Path, extra: &[&str]| {
        let mut args = vec!["start", "--name", name, "--wait", "--image", s(&img)];
        args.extend_from_slice(&["--mem", mem, "--kernel", s(k)]);
        args.extend_from_slice(extra);
        env.ok(&args);
    };
    // Debian's kernel, a one-CPU 7.2 build, and an SMP 7.2 build with two
    // CPUs in seccomp mode (the balloon fills while the other CPU runs).
    let smp: &[&str] = &["--cpus", "2", "--userspace", "seccomp"];
    // (What comes back, at least: with two CPUs the balloon leaves twice
    // the headroom, and each CPU keeps free pages of its own.)
    for (name, k, extra, least) in [
        ("rc-a", kernel(), &[][..], 45 * MIB),
        ("rc-b", kernel_7_one_cpu(), &[][..], 45 * MIB),
        ("rc-s", kernel_7(), smp, 30 * MIB),
    ] {
        start(name, "128M", &k, extra);
        // 48 MiB touched and freed (a tmpfs file), and the 32 MiB disk
        // read into the guest's cache.
        env.ok(&[
            "exec", name, "--", "sh", "-c",
            "mount -t tmpfs -o size=120M none /mnt && busybox dd if=/dev/zero of=/mnt/f bs=1M count=48 2>/dev/null && rm /mnt/f && busybox dd if=/dev/ubda of=/dev/null bs=1M 2>/dev/null",
        ]);
        let (total, _) = guest_meminfo(&env, name);
        let v: serde_json::Value =
            serde_json::from_str(&env.ok(&["reclaim", "--json", name])).unwrap();
        let r = &v[0];
        assert_eq!(r["ok"], true, "{v}");
        assert_eq!(r["guest"], name, "{v}");
        assert_eq!(r["dropped_cache"], true, "{v}");
        assert!(r["balloon_kib"].as_u64().unwrap() > 48 * 1024, "{v}");
        let (before, after) = (
            r["host_bytes_before"]
                .as_u64()
                .expect("the memory file is measured"),
            r["host_bytes_after"].as_u64().unwrap(),
        );
        // What the guest touched came back (its kernel, processes and
        // the headroom the balloon leaves stay).
        assert!(before >= 70 * MIB, "{v}");
        assert!(before - after >= least, "{v}");
        assert_eq!(r["returned_bytes"].as_u64(), Some(before - after), "{v}");
        // ps shows what the host holds now.
        let ps = env.ps();
        let on_host = ps
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .and_then(|g| g["host_ram_bytes"].as_u64())
            .unwrap_or_else(|| panic!("no host_ram_bytes for {name}: {ps}"));
        assert!(on_host < before - least + 5 * MIB, "{on_host} {v}");
        // The guest keeps all its RAM: the balloon gave every page back,
        // and they work (fresh pages, written and read back).
        let (total2, free2) = guest_meminfo(&env, name);
        assert_eq!(total2, total);
        assert!(free2 > 64 * 1024, "only {free2} KiB free after reclaim");
        let o = env.ok(&[
            "exec", name, "--", "sh", "-c",
            "busybox dd if=/dev/urandom of=/mnt/g bs=1M count=88 2>/dev/null && busybox sha256sum /mnt/g > /sum && busybox sha256sum -c /sum && busybox wc -c < /mnt/g",
        ]);
        assert!(o.ends_with(&format!("{}\n", 88 * MIB)), "{o}");
        // A page cache that is kept when asked; the human form.
        let o = env.ok(&["reclaim", "--keep-cache", name]);
        assert!(o.starts_with(&format!("{name}: returned ")), "{o}");
        assert!(o.contains("page cache kept (--keep-cache)"), "{o}");
        if name == "rc-a" {
            // A guest that never answers the cache drop (its /bin/sh hangs;
            // the overlay is throwaway): reclaim goes on without it.
            env.ok(&[
                "exec", name, "--", "sh", "-c",
                "printf '#!/bin/busybox sh\\nexec /bin/busybox sleep 1000\\n' > /hang && busybox rm /mnt/g && busybox chmod 755 /hang && busybox rm /bin/sh && busybox cp /hang /bin/sh",
            ]);
            let v: serde_json::Value =
                serde_json::from_str(&env.ok(&["reclaim", "--json", name])).unwrap();
            assert_eq!(v[0]["ok"], true, "{v}");
            assert_eq!(v[0]["dropped_cache"], false, "{v}");
            assert!(v[0]["balloon_kib"].as_u64().unwrap() > 0, "{v}");
            assert!(
                v[0]["note"]
                    .as_str()
                    .unwrap()
                    .contains("did not finish within 30 s"),
                "{v}"
            );
        }
        env.ok(&["stop", "--rm", name]);
    }
    // Guests that are not running, or not there, are errors by name.
    start("rc-c", "64M", &kernel(), &[]);
    env.ok(&["stop", "rc-c"]);
    let o = env.umlctl(&["reclaim", "rc-c"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("rc-c"), "{o:?}");
    let o = env.umlctl(&["reclaim", "no-such"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no-such"),
        "{o:?}"
    );
    let o = env.umlctl(&["reclaim"]);
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("<NAMES>"),
        "{o:?}"
    );
}
