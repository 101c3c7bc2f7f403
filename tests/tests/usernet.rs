//! `--net user`: user-mode networking through passt, with no root, no netd
//! and no tap, end to end with real passt and a real UML kernel. Traffic
//! stays inside two network namespaces the test makes: "inside", where
//! umlctl (and so passt) runs, and "outside", a server one hop away.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn need_passt() {
    assert!(
        sh("command -v passt").status.success(),
        "passt is missing: apt-get install passt"
    );
}

/// Two namespaces joined by a veth pair: inside 10.213.0.2 (default
/// route through outside), outside 10.213.0.1 serving `www` on port 8000;
/// inside also serves on its own loopback (port 8001), which a guest must
/// not reach.
struct Pair {
    inside: String,
    outside: String,
    servers: Vec<Child>,
}

const OUTSIDE: &str = "10.213.0.1";
const INSIDE: &str = "10.213.0.2";

impl Pair {
    fn new(www: &Path) -> Pair {
        let tag = std::process::id();
        let (inside, outside) = (format!("umlctl-ui-{tag}"), format!("umlctl-uo-{tag}"));
        let veth = format!("uv{}", tag % 100_000);
        let o = sh(&format!(
            "set -e; ip netns add {inside}; ip netns add {outside}; \
             ip link add {veth}a type veth peer name {veth}b; \
             ip link set {veth}a netns {inside}; ip link set {veth}b netns {outside}; \
             ip -n {inside} addr add {INSIDE}/24 dev {veth}a; ip -n {outside} addr add {OUTSIDE}/24 dev {veth}b; \
             for n in {inside} {outside}; do ip -n $n link set lo up; done; \
             ip -n {inside} link set {veth}a up; ip -n {outside} link set {veth}b up; \
             ip -n {inside} route add default via {OUTSIDE}"
        ));
        let mut p = Pair {
            inside,
            outside,
            servers: Vec::new(),
        };
        assert!(
            o.status.success(),
            "namespaces: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        for (ns, bind, port) in [
            (&p.outside, OUTSIDE, "8000"),
            (&p.inside, "127.0.0.1", "8001"),
        ] {
            let c = Command::new("ip")
                .args(["netns", "exec", ns, "python3", "-m", "http.server"])
                .args(["--bind", bind, port, "--directory"])
                .arg(www)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3");
            p.servers.push(c);
        }
        let t = Instant::now();
        while !sh(&format!(
            "ip netns exec {} python3 -c \"import urllib.request as u; u.urlopen('http://{OUTSIDE}:8000/index.html')\"",
            p.inside
        ))
        .status
        .success()
        {
            assert!(t.elapsed() < Duration::from_secs(20), "the server never came up");
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// umlctl in the inside namespace, as root.
    fn umlctl(&self, env: &GuestEnv, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.inside])
            .arg(umlctl_bin())
            .args(args)
            .env("UMLCTL_UML_DIR", env.uml_dir())
            .env("UMLCTL_CACHE_DIR", cache_dir())
            .stdin(Stdio::null());
        c
    }

    /// umlctl (copied where it may read it) in the inside namespace as
    /// uid 65534, with directories of its own under `work`.
    fn umlctl_nobody(&self, bin: &Path, work: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.inside])
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
            ])
            .arg(bin)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("UMLCTL_UML_DIR", work.join("uml"))
            .env("UMLCTL_RUNTIME_DIR", work.join("rt"))
            .env("UMLCTL_CACHE_DIR", work.join("cache"))
            .env("HOME", work)
            .current_dir(work)
            .stdin(Stdio::null());
        c
    }

    /// What a client in the outside namespace reads from `port` on the
    /// inside address after sending `send`, within a few seconds.
    fn fetch(&self, port: u16, send: &str) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.outside, "python3", "-c"])
            .arg(format!(
                "import socket,sys\n\
                 s=socket.create_connection(('{INSIDE}',{port}),timeout=5)\n\
                 s.sendall({send:?}.encode())\n\
                 d=b''\n\
                 try:\n  \
                   while True:\n    \
                     b=s.recv(4096)\n    \
                     if not b: break\n    \
                     d+=b\n\
                 except Exception: pass\n\
                 sys.stdout.write(d.decode(errors='replace'))\n"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = sh(&format!(
            "ip netns del {}; ip netns del {}",
            self.inside, self.outside
        ));
    }
}

fn passts() -> Vec<(u32, String)> {
    processes_mentioning("passt --foreground")
}

fn wait_no_passt(what: &str) {
    let t = Instant::now();
    while !passts().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "passt left after {what}: {:?}",
            passts()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A busybox image whose init serves a greeting on port 22 (the server
/// speaks first, as sshd does) and a web page on port 80.
fn server_image(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("sroot");
    for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "www"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox: apt-get install busybox-static");
    for t in ["sh", "mount", "echo", "poweroff", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    std::os::unix::fs::symlink("../bin/busybox", root.join("sbin/init")).unwrap();
    fs::write(root.join("www/index.html"), "page-from-the-guest\n").unwrap();
    fs::write(
        root.join("etc/inittab"),
        "::sysinit:/bin/mount -t proc proc /proc\n\
         ::sysinit:/bin/busybox httpd -p 80 -h /www\n\
         ::respawn:/bin/busybox nc -ll -p 22 -e /bin/echo greeting-first\n\
         ::ctrlaltdel:/bin/poweroff\n",
    )
    .unwrap();
    let img = dir.join("server.ext4");
    mkfs_ext4(&root, &img);
    img
}

#[test]
fn a_user_without_root_or_netd_reaches_out_and_publishes_ports_through_passt() {
    need_passt();
    let env = GuestEnv::new();
    let www = env.dir.path().join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "hello-from-outside\n").unwrap();
    let big: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(www.join("big"), &big).unwrap();
    let pair = Pair::new(&www);
    let img = busybox_image(env.dir.path());
    let k = kernel();
    let (img_s, k_s) = (img.to_str().unwrap(), k.to_str().unwrap());

    // `run`, as nobody: no root, no netd, no /dev/net/tun (0600 here).
    let script = format!(
        "cat /etc/resolv.conf; busybox ip -4 addr show vec0; \
         busybox wget -q -O- http://{OUTSIDE}:8000/index.html; \
         busybox wget -q -O- http://{OUTSIDE}:8000/big | sha256sum; \
         busybox wget -q -T 3 -O- http://10.0.2.2:8001/index.html && echo host-loopback-reached || echo host-loopback-refused"
    );
    let (copies, bin, kern) = nobody_copies("umlctl-usernet-nobody-");
    let work = copies.path().join("work");
    fs::create_dir(&work).unwrap();
    assert!(sh(&format!("chown 65534:65534 '{}'", work.display()))
        .status
        .success());
    let o = pair
        .umlctl_nobody(
            &bin,
            &work,
            &[
                "run",
                "--kernel",
                kern.to_str().unwrap(),
                "--image",
                img_s,
                "--net",
                "user",
                "--",
                "sh",
                "-c",
                &script,
            ],
        )
        .output()
        .unwrap();
    let out = assert_ok(&o, "run --net user as nobody");
    assert!(out.contains("nameserver 10.0.2.3"), "{out}");
    assert!(out.contains("inet 10.0.2.15/24"), "{out}");
    assert!(out.contains("hello-from-outside"), "{out}");
    assert!(out.contains(&sha256(&big)), "8 MiB not byte-exact: {out}");
    assert!(out.contains("host-loopback-refused"), "{out}");
    wait_no_passt("run");

    // A sender that hands the guest's kernel 64 MiB, closes its socket and
    // exits at once: everything reaches the outside before the guest powers
    // off (the guest's transmit queue waits for passt instead of dropping,
    // and init lets the kernel finish sending).
    let blast = env.dir.path().join("tcpblast");
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&blast)
        .arg(repo().join("bench/net/tcpblast.c"))
        .output()
        .expect("cc: apt-get install build-essential");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let mut recv = Command::new("ip")
        .args(["netns", "exec", &pair.outside])
        .arg(&blast)
        .args(["recv", "5001"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    {
        use std::io::{BufRead, BufReader};
        let mut r = BufReader::new(recv.stdout.take().unwrap());
        r.read_line(&mut said).unwrap();
        assert_eq!(said.trim(), "listening");
        let o = pair
            .umlctl(
                &env,
                &[
                    "run",
                    "--kernel",
                    k_s,
                    "--net",
                    "user",
                    "--workdir",
                    env.dir.path().to_str().unwrap(),
                    "--",
                    "./tcpblast",
                    "send",
                    OUTSIDE,
                    "5001",
                    "64",
                ],
            )
            .output()
            .unwrap();
        assert_ok(&o, "run --net user -- tcpblast send");
        said.clear();
        r.read_line(&mut said).unwrap();
    }
    recv.wait().unwrap();
    assert_eq!(
        said.split_whitespace().next(),
        Some("67108864"),
        "the outside did not get all 64 MiB: {said}"
    );
    wait_no_passt("run");

    // `run --publish`: a port on the host while the command runs (here a
    // one-shot server; the run ends after its one connection).
    let mut c = pair.umlctl(
        &env,
        &[
            "run",
            "--kernel",
            k_s,
            "--image",
            img_s,
            "--net",
            "user",
            "--publish",
            "8089:80",
            "--",
            "busybox",
            "nc",
            "-l",
            "-p",
            "80",
            "-e",
            "busybox",
            "echo",
            "run-published",
        ],
    );
    let mut child = c.stdout(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    let mut got = String::new();
    while !got.contains("run-published") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "run --publish 8089:80 never answered: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
        got = pair.fetch(8089, "");
    }
    assert!(child.wait().unwrap().success());
    wait_no_passt("run --publish");

    // An SMP 7.x kernel with two CPUs, which refuses taps (its vector
    // driver's tap transports lack the queues it locks): --net user's
    // socket has them.
    let k7 = kernel_7();
    let o = pair
        .umlctl(
            &env,
            &[
                "run",
                "--kernel",
                k7.to_str().unwrap(),
                "--userspace",
                "seccomp",
                "--cpus",
                "2",
                "--image",
                img_s,
                "--net",
                "user",
                "--",
                "sh",
                "-c",
                &format!("busybox nproc; busybox wget -q -O- http://{OUTSIDE}:8000/index.html"),
            ],
        )
        .output()
        .unwrap();
    let out = assert_ok(&o, "run --net user on an SMP 7.x kernel with 2 CPUs");
    assert_eq!(out, "2\nhello-from-outside\n");
    wait_no_passt("run on 7.x");

    // `start --publish`, as root in the namespace: a server that speaks
    // first (the handshake Debian 12's passt leaves half-open) and one
    // that is spoken to first both answer from the outside namespace.
    let simg = server_image(env.dir.path());
    let s_s = simg.to_str().unwrap();
    let start = |name: &str, extra: &[&str]| {
        let mut a = vec![
            "start", "--name", name, "--kernel", k_s, "--image", s_s, "--mem", "64M", "--net",
            "user",
        ];
        a.extend_from_slice(extra);
        pair.umlctl(&env, &a).output().unwrap()
    };
    let o = start(
        "srv",
        &[
            "--publish",
            "2222:22",
            "--publish",
            "8080:80",
            "--wait",
            "booted",
        ],
    );
    assert_ok(&o, "start --net user --publish");
    let t = Instant::now();
    let mut greeting = String::new();
    while !greeting.contains("greeting-first") {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no greeting through the published port 2222: {greeting:?}\n{}",
            String::from_utf8_lossy(&env.umlctl(&["logs", "srv"]).stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
        greeting = pair.fetch(2222, "");
    }
    let page = pair.fetch(8080, "GET /index.html HTTP/1.0\r\n\r\n");
    assert!(page.contains("page-from-the-guest"), "{page}");
    let ps: serde_json::Value = serde_json::from_str(&env.ok(&["ps", "--json"])).unwrap();
    let nic = ps[0]["nics"][0].as_str().unwrap_or_default().to_string();
    assert!(
        nic.starts_with("vec0 10.0.2.15/24") && nic.contains("publish 2222:22/tcp,8080:80/tcp"),
        "{nic}"
    );
    assert!(nic.ends_with("user-mode (passt)"), "{nic}");
    // A port that is taken is refused by name before anything boots.
    let o = start("taken", &["--publish", "2222:22"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("--publish 2222:22/tcp: the host port is in use"),
        "{e}"
    );
    assert_eq!(env.state("taken"), None, "a refused guest left a record");
    // --wait tcp: cannot probe a user-mode interface: refused up front.
    let o = start("probe", &["--wait", "tcp:22"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("cannot probe a --net user interface"), "{e}");
    assert_eq!(env.state("probe"), None);
    // Stopping the guest takes passt and the relay with it.
    env.ok(&["stop", "srv"]);
    wait_no_passt("stop");
    assert!(
        pair.fetch(8080, "GET / HTTP/1.0\r\n\r\n").is_empty(),
        "the published port still answers after stop"
    );
    // And so does a guest that is killed.
    assert_ok(&start("killed", &["--wait", "booted"]), "start");
    let ps: serde_json::Value = serde_json::from_str(&env.ok(&["ps", "--json"])).unwrap();
    let pid = ps[0]["pid"].as_i64().unwrap();
    assert!(!passts().is_empty(), "no passt for the running guest");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    wait_no_passt("a SIGKILL of UML");
    env.ok(&["gc"]);

    // With limits, passt and the relay are in the guest's cgroup too.
    // (In the inside namespace through nsenter: `ip netns exec` remounts
    // /sys, hiding the cgroup tree.)
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", pair.inside))
        .arg(umlctl_bin())
        .env("UMLCTL_UML_DIR", env.uml_dir())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .stdin(Stdio::null());
    c.args([
        "run",
        "--kernel",
        k_s,
        "--net",
        "user",
        "--memory-max",
        "512M",
        "--",
        "sleep",
        "3",
    ]);
    let mut child = c.spawn().unwrap();
    let t = Instant::now();
    let found = loop {
        if let Some((pid, _)) = passts().first() {
            let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if cg.contains("umlctl-run-") {
                break true;
            }
        }
        if t.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let st = child.wait().unwrap();
    assert!(found, "passt is not in the run's cgroup");
    assert!(st.success());
    wait_no_passt("a run with limits");

    // Where nothing is routed, passt cannot start: refused by name, not a
    // guest with a dead interface.
    let o = Command::new("unshare")
        .args(["-n", "sh", "-c", "ip link set lo up && exec \"$@\"", "sh"])
        .arg(umlctl_bin())
        .args(["run", "--kernel", k_s, "--net", "user", "--", "true"])
        .env("UMLCTL_UML_DIR", env.uml_dir())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no IPv4 default route"), "{e}");
    wait_no_passt("a refused run");
}
