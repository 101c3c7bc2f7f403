//! `umlctl lab info|graph` end to end on lab directories in Kathará's
//! format; Graphviz's `dot` is the oracle for the drawing.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn lab(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(umlctl_bin())
        .arg("lab")
        .args(args)
        .arg("-d")
        .arg(dir)
        .output()
        .unwrap()
}

/// A three-router lab as Kathará's examples write it.
fn ospf_lab(dir: &Path) {
    fs::write(
        dir.join("lab.conf"),
        "LAB_NAME=\"OSPF triangle\"\nLAB_AUTHOR=\"umlctl tests\"\n\
         # routers\n\
         r1[0]=\"A\"\nr1[1]=\"B\"\nr2[0]=\"B\"\nr2[1]=\"C\"\nr3[0]=\"C\"\nr3[1]=\"A/02:00:00:00:03:01\"\n\
         r1[image]=\"frr\"\nr1[privileged]=\"true\"\n\
         pc1[0]=\"A\"\n",
    )
    .unwrap();
    fs::write(dir.join("lab.dep"), "pc1: r1 r2 r3\n").unwrap();
    fs::create_dir_all(dir.join("r1/etc/frr")).unwrap();
    fs::write(dir.join("r1/etc/frr/frr.conf"), "router ospf\n").unwrap();
    fs::write(dir.join("r1.startup"), "systemctl start frr\n").unwrap();
    fs::create_dir_all(dir.join("shared")).unwrap();
    // A device known only by its startup file (Kathará's rule).
    fs::write(
        dir.join("pc2.startup"),
        "ip address add 10.0.0.9/24 dev eth0\n",
    )
    .unwrap();
}

#[test]
fn info_shows_the_checked_plan() {
    let t = scratch();
    ospf_lab(t.path());
    let out = lab(t.path(), &["info", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // The container-only option is accepted, with a warning naming it.
    assert!(
        err.contains("line 11") && err.contains("privileged"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["meta"]["name"], "OSPF triangle");
    let names: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pc1", "pc2", "r1", "r2", "r3"]);
    let r3 = &v["devices"][4];
    assert_eq!(r3["interfaces"][1]["mac"], "02:00:00:00:03:01");
    assert_eq!(r3["interfaces"][1]["domain"], "A");
    assert_eq!(
        v["waves"],
        serde_json::json!([["pc2", "r1", "r2", "r3"], ["pc1"]])
    );
    assert_eq!(v["shared"], true);
    assert_eq!(v["devices"][2]["tree"], true);
    // The MACs umlctl picks are the same on every run.
    let again: serde_json::Value =
        serde_json::from_slice(&lab(t.path(), &["info", "--json"]).stdout).unwrap();
    assert_eq!(again["devices"], v["devices"]);
    // The human form lists domains and the order.
    let out = lab(t.path(), &["info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("A: pc1.eth0 r1.eth0 r3.eth1"), "{text}");
    assert!(text.contains("2. pc1"), "{text}");
}

#[test]
fn a_broken_lab_is_an_error_naming_file_and_line() {
    let t = scratch();
    for (conf, dep, want) in [
        ("r1[0]=A\nr1 = B\n", "", "lab.conf line 2"),
        ("r1[0]=A\nr1[2]=B\n", "", "no eth1"),
        ("a[0]=X\nb[0]=X\n", "a: b\nb: a\n", "cycle"),
        ("a[0]=X\n", "a b\n", "lab.dep line 1"),
    ] {
        fs::write(t.path().join("lab.conf"), conf).unwrap();
        fs::write(t.path().join("lab.dep"), dep).unwrap();
        let out = lab(t.path(), &["info"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{conf:?}: {err}");
        assert!(err.contains(want), "{conf:?}: {err}");
    }
}

#[test]
fn graph_draws_every_device_domain_and_interface() {
    let t = scratch();
    ospf_lab(t.path());
    // DOT that Graphviz itself accepts and lays out (canonical form back).
    let out = lab(t.path(), &["graph"]);
    assert_eq!(out.status.code(), Some(0));
    let mut dot = Command::new("dot")
        .arg("-Tcanon")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("Graphviz's dot (apt-get install graphviz; scripts/test.sh does)");
    use std::io::Write;
    dot.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let canon = dot.wait_with_output().unwrap();
    assert!(canon.status.success());
    let canon = String::from_utf8_lossy(&canon.stdout);
    assert_eq!(canon.matches(" -- ").count(), 7, "{canon}");
    // SVG drawn by dot, written where asked; a bad extension is refused.
    let svg = t.path().join("topo.svg");
    let out = lab(t.path(), &["graph", "-o", svg.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg"));
    for name in ["r1", "r2", "r3", "pc1", "pc2", "eth1", "OSPF triangle"] {
        assert!(text.contains(name), "{name} missing from the SVG");
    }
    let out = lab(
        t.path(),
        &["graph", "-o", t.path().join("topo.jpeg").to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FILE.svg"));
    // /dev/null is written in place, never replaced.
    let out = lab(t.path(), &["graph", "-o", "/dev/null", "--format", "svg"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
}

/// A lab of four busybox devices on two segments: `a` and `b` on A, `b`
/// and `c` (and `d`, whose startup fails) on B; c starts after a and b.
fn busybox_lab(dir: &Path) {
    fs::create_dir_all(dir.join("shared")).unwrap();
    fs::create_dir_all(dir.join("a/etc")).unwrap();
    fs::write(dir.join("a/etc/motd"), "a's own tree\n").unwrap();
    fs::write(
        dir.join("lab.conf"),
        "LAB_NAME=\"tiny\"\na[0]=\"A\"\nb[0]=\"A\"\nb[1]=\"B\"\nc[0]=\"B/02:00:00:00:0c:00\"\nd[0]=\"B\"\n\
         a[sysctl]=\"net.ipv4.tcp_syncookies=0\"\na[env]=\"GREETING=hello\"\nb[shell]=\"/bin/busybox ash\"\n",
    )
    .unwrap();
    fs::write(dir.join("lab.dep"), "c: a b\n").unwrap();
    fs::write(
        dir.join("shared.startup"),
        "echo shared-ran > /tmp/shared-ran\n",
    )
    .unwrap();
    fs::write(
        dir.join("a.startup"),
        "ip address add 10.0.0.1/24 dev eth0\nsleep 1\necho \"$GREETING\" > /tmp/greeting\necho a >> /shared/order\n",
    )
    .unwrap();
    fs::write(
        dir.join("b.startup"),
        "ip address add 10.0.0.2/24 dev eth0\nip address add 10.0.1.1/24 dev eth1\necho b >> /shared/order\n",
    )
    .unwrap();
    fs::write(
        dir.join("c.startup"),
        "ip address add 10.0.1.2/24 dev eth0\necho c >> /shared/order\n",
    )
    .unwrap();
    fs::write(dir.join("d.startup"), "echo broken-startup\nexit 3\n").unwrap();
    fs::write(dir.join("a.shutdown"), "echo a-down >> /shared/down\n").unwrap();
}

fn host_links() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
        .collect()
}

/// Every process's network namespace inode.
fn netns_in_use() -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(m) = fs::metadata(e.path().join("ns/net")) {
            v.push(m.ino());
        }
    }
    v
}

/// `lab start -d DIR --image IMG --kernel K`.
fn start_lab(env: &GuestEnv, dir: &Path, img: &Path, k: &Path) -> std::process::Output {
    env.lab(
        "start",
        dir,
        &[
            "--image",
            img.to_str().unwrap(),
            "--kernel",
            k.to_str().unwrap(),
        ],
    )
}

fn lab_state(env: &GuestEnv) -> serde_json::Value {
    let labs = env.uml_dir().join("labs");
    let d = fs::read_dir(&labs).unwrap().next().unwrap().unwrap().path();
    serde_json::from_slice(&fs::read(d.join("lab.json")).unwrap()).unwrap()
}

#[test]
fn a_lab_starts_in_lab_dep_order_runs_its_scripts_and_stops_leaving_nothing() {
    let env = GuestEnv::new();
    let work = scratch();
    let img = busybox_lab_image(work.path());
    let dir = work.path().join("tiny");
    fs::create_dir_all(&dir).unwrap();
    busybox_lab(&dir);
    let links_before = host_links();
    let k = kernel();
    let out = start_lab(&env, &dir, &img, &k);
    let err = String::from_utf8_lossy(&out.stderr);
    // d's startup fails: exit 1, d named with its output; the lab runs on.
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("device d") && err.contains("broken-startup") && err.contains("status 3"),
        "{err}"
    );
    assert_eq!(
        host_links(),
        links_before,
        "the host's interfaces are not touched"
    );

    let ps: serde_json::Value =
        serde_json::from_slice(&env.lab("ps", &dir, &["--json"]).stdout).unwrap();
    let devs = ps["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 4, "{ps}");
    for d in devs {
        assert_eq!(d["state"], "running", "{ps}");
        // What of its RAM the host holds: something, far from all of its
        // 256M (a busybox device).
        let on_host = d["host_ram_bytes"].as_u64().unwrap();
        assert!(on_host > 0 && on_host < 128 << 20, "{ps}");
        let want = if d["device"] == "d" { 3 } else { 0 };
        assert_eq!(d["startup_status"], want, "{ps}");
    }
    // Addresses, asked in the running devices, in ps and in the picture.
    let b = devs.iter().find(|d| d["device"] == "b").unwrap();
    assert_eq!(b["interfaces"][1]["addresses"], "10.0.1.1/24", "{ps}");
    let dot = env.ok(&["lab", "graph", "-d", dir.to_str().unwrap()]);
    assert!(dot.contains("eth1\\n10.0.1.1/24"), "{dot}");
    // A device's kernel under gdb: attached (it stops), detached, and it
    // runs on (exec still answers).
    let script = work.path().join("d.gdb");
    fs::write(&script, "info threads\n").unwrap();
    let out = env.lab(
        "debug",
        &dir,
        &["a", "--gdb-batch", script.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("Id   Target Id"), "{err}");
    let o = env.lab("exec", &dir, &["a", "--", "cat", "/tmp/greeting"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    // lab connect: a shell on a terminal (util-linux's script gives one),
    // lab.conf's DEVICE[shell] where it names one, --shell over both; the
    // shell's exit status comes back.
    let connect = |args: &str, input: &str| {
        let mut c = env.cmd(&[]);
        c.env_remove("TERM");
        let out = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "{} lab connect -d {} {args}",
                umlctl_bin().display(),
                dir.display()
            ))
            .arg("/dev/null")
            .envs(c.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("script: apt-get install bsdutils");
        let mut child = out;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let o = connect("a", "echo connected-$((6*7)) $0; exit 3\n");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("connected-42 sh"), "{text}");
    assert_eq!(o.status.code(), Some(3), "{text}");
    let o = connect("b", "echo shell=$0; exit\n");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("shell=ash"), "DEVICE[shell]: {text}");
    let o = connect("b --shell '/bin/busybox sh'", "echo shell=$0; exit\n");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("shell=sh"), "--shell: {text}");
    let o = env.lab("connect", &dir, &["nope"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no device \"nope\""),
        "{o:?}"
    );
    // lab.dep: c's startup ran after a's and b's.
    let order = fs::read_to_string(dir.join("shared/order")).unwrap();
    let lines: Vec<&str> = order.lines().collect();
    assert_eq!(lines.len(), 3, "{order}");
    assert_eq!(lines[2], "c", "c starts after a and b: {order}");
    // Interfaces by lab.conf's names and MACs, on their segments.
    let link = env.ok(&[
        "lab",
        "exec",
        "-d",
        dir.to_str().unwrap(),
        "c",
        "--",
        "ip",
        "-o",
        "link",
        "show",
        "eth0",
    ]);
    assert!(link.contains("02:00:00:00:0c:00"), "{link}");
    let ping = env.lab(
        "exec",
        &dir,
        &["a", "--", "ping", "-c", "2", "-W", "5", "10.0.0.2"],
    );
    assert_ok(&ping, "a pings b on A");
    let ping = env.lab(
        "exec",
        &dir,
        &["c", "--", "ping", "-c", "1", "-W", "5", "10.0.1.1"],
    );
    assert_ok(&ping, "c pings b on B");
    // Segments are separate: a cannot reach B's addresses through b (no route).
    let ping = env.lab(
        "exec",
        &dir,
        &["c", "--", "ping", "-c", "1", "-W", "2", "10.0.0.1"],
    );
    assert_ne!(ping.status.code(), Some(0));
    // The device tree, shared.startup, sysctl and env.
    let a = env.ok(&[
        "lab",
        "exec",
        "-d",
        dir.to_str().unwrap(),
        "a",
        "--",
        "cat",
        "/etc/motd",
        "/tmp/shared-ran",
        "/tmp/greeting",
        "/proc/sys/net/ipv4/tcp_syncookies",
        "/proc/sys/net/ipv4/ip_forward",
    ]);
    // ip_forward: Kathará's default for every device.
    assert_eq!(a, "a's own tree\nshared-ran\nhello\n0\n1\n");
    // shared/ is the lab's directory, read-write in every device.
    env.ok(&[
        "lab",
        "exec",
        "-d",
        dir.to_str().unwrap(),
        "b",
        "--",
        "sh",
        "-c",
        "echo from-b > /shared/b-wrote",
    ]);
    assert_eq!(
        fs::read_to_string(dir.join("shared/b-wrote")).unwrap(),
        "from-b\n"
    );
    // Devices show in `umlctl ps` under their lab.
    let all = env.ok(&["ps", "--json"]);
    assert!(all.contains("\"lab\""), "{all}");

    // lab test: no signatures yet; saved; then equal; then a change shows.
    fs::create_dir_all(dir.join("_test")).unwrap();
    fs::write(dir.join("_test/c.test"), "cat /shared/order | tail -1\n").unwrap();
    let t = env.lab("test", &dir, &[]);
    assert_eq!(t.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&t.stdout).contains("no signature"));
    assert_ok(&env.lab("test", &dir, &["--save"]), "lab test --save");
    let sig = fs::read_to_string(dir.join("_test/signature/c")).unwrap();
    assert!(
        sig.contains("address eth0 10.0.1.2/24") && sig.contains("# c.test\nc\n"),
        "{sig}"
    );
    assert_ok(
        &env.lab("test", &dir, &[]),
        "lab test against its own signatures",
    );
    env.ok(&[
        "lab",
        "exec",
        "-d",
        dir.to_str().unwrap(),
        "b",
        "--",
        "ip",
        "address",
        "del",
        "10.0.1.1/24",
        "dev",
        "eth1",
    ]);
    let t = env.lab("test", &dir, &[]);
    let text = String::from_utf8_lossy(&t.stdout);
    assert_eq!(t.status.code(), Some(1), "{text}");
    assert!(
        text.contains("b: DIFFERS")
            && text.contains("  - address eth1 10.0.1.1/24")
            && text.contains("c: ok"),
        "{text}"
    );

    let state = lab_state(&env);
    let netns = state["netns"].as_u64().unwrap();
    assert!(netns_in_use().contains(&netns));
    let out = env.lab("stop", &dir, &[]);
    assert_ok(&out, "lab stop");
    assert_eq!(
        fs::read_to_string(dir.join("shared/down")).unwrap(),
        "a-down\n",
        "shutdown scripts ran"
    );
    assert!(processes_mentioning(state["id"].as_str().unwrap()).is_empty());
    assert!(
        !netns_in_use().contains(&netns),
        "the lab's namespace is gone"
    );
    assert_eq!(host_links(), links_before);
    let left: Vec<_> = fs::read_dir(env.uml_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let labs_left: Vec<_> = fs::read_dir(env.uml_dir().join("labs"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        left.iter().all(|n| n == "labs") && labs_left.is_empty(),
        "{left:?} {labs_left:?}"
    );
    // Stopping again says there is nothing to stop.
    let out = env.lab("stop", &dir, &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to stop"));
}

#[test]
fn a_killed_lab_leaves_no_namespace_and_stop_clears_the_rest() {
    let env = GuestEnv::new();
    let work = scratch();
    let img = busybox_lab_image(work.path());
    let dir = work.path().join("k");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("lab.conf"), "x[0]=\"A\"\ny[0]=\"A\"\n").unwrap();
    let k = kernel();
    assert_ok(&start_lab(&env, &dir, &img, &k), "lab start");
    let state = lab_state(&env);
    let netns = state["netns"].as_u64().unwrap();
    // SIGKILL every UML and every jail.
    let ps: serde_json::Value = serde_json::from_str(&env.ok(&["ps", "--json"])).unwrap();
    for g in ps.as_array().unwrap() {
        let pid = g["pid"].as_i64().unwrap();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while netns_in_use().contains(&netns) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !netns_in_use().contains(&netns),
        "the namespace went with the devices"
    );
    assert!(processes_mentioning(state["id"].as_str().unwrap()).is_empty());
    // Starting again over the dead lab works and stop clears everything.
    assert_ok(
        &start_lab(&env, &dir, &img, &k),
        "lab start over a dead lab",
    );
    assert_ok(&env.lab("stop", &dir, &["--timeout", "2"]), "lab stop");
    let left: Vec<_> = fs::read_dir(env.uml_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.iter().all(|n| n == "labs"), "{left:?}");
}

#[test]
fn lab_start_refuses_a_broken_lab_or_a_missing_image_by_name() {
    let env = GuestEnv::new();
    let work = scratch();
    let dir = work.path();
    fs::write(
        dir.join("lab.conf"),
        "r1[0]=\"A\"\nr1[image]=\"kathara/frr\"\nr2[0]=A\"\n",
    )
    .unwrap();
    let out = env.lab("start", dir, &["--image", "/nonexistent.ext4"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(err.contains("lab.conf line 3"), "{err}");
    fs::write(
        dir.join("lab.conf"),
        "r1[0]=\"A\"\nr1[image]=\"kathara/frr\"\n",
    )
    .unwrap();
    let out = env.lab("start", dir, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        err.contains("kathara/frr") && err.contains("--image-for"),
        "{err}"
    );
    assert!(
        !env.uml_dir().join("labs").exists()
            || fs::read_dir(env.uml_dir().join("labs"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn an_unprivileged_user_runs_a_whole_lab() {
    use std::os::unix::fs::PermissionsExt;
    let (copies, bin, kern) = nobody_copies("umlctl-lab-nobody-");
    let work = copies.path();
    let img = busybox_lab_image(work);
    let dir = work.join("lab");
    fs::create_dir_all(&dir).unwrap();
    busybox_lab(&dir);
    fs::remove_file(dir.join("d.startup")).unwrap();
    fs::write(
        dir.join("lab.conf"),
        "a[0]=\"A\"\nb[0]=\"A\"\nb[1]=\"B\"\nc[0]=\"B\"\n",
    )
    .unwrap();
    let home = work.join("home");
    fs::create_dir_all(&home).unwrap();
    Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(work)
        .status()
        .unwrap();
    fs::set_permissions(&img, fs::Permissions::from_mode(0o644)).unwrap();
    let script = format!(
        "set -e\nexport HOME={home}\ncd {dir}\n\
         {bin} lab start --image {img} --kernel {kern}\n\
         {bin} lab exec a -- ping -c 1 -W 5 10.0.0.2\n\
         {bin} lab exec c -- id -u\n\
         {bin} lab reclaim --json\n\
         {bin} lab exec b -- touch /root/before-restart\n\
         {bin} lab restart b --timeout 5\n\
         {bin} lab exec b -- ls /root\n\
         {bin} lab exec a -- ping -c 1 -W 5 10.0.0.2 | grep -o '1 packets received' | sed 's/^/after restart: /'\n\
         {bin} lab stop --timeout 2\n\
         ls -A $HOME/.uml/labs\n\
         mkdir {dir}-ext\n\
         printf 'e[0]=A\\n' > {dir}-ext/lab.conf\n\
         printf 'A lo\\n' > {dir}-ext/lab.ext\n\
         {bin} lab start -d {dir}-ext --image {img} --dry-run 2>&1 | grep -q 'as root' && echo ext-refused-for-nobody\n",
        home = home.display(),
        dir = dir.display(),
        bin = bin.display(),
        img = img.display(),
        kern = kern.display()
    );
    let out = with_private_mounts(&tun_node(0o666))
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let text = assert_ok(&out, "the lab as uid 65534");
    assert!(text.contains("1 packets received"), "{text}");
    // lab.ext changes the host's network: root only, said plainly.
    assert!(text.contains("ext-refused-for-nobody"), "{text}");
    // lab start gave back what the devices held but did not use, and so
    // does lab reclaim, for a user without privileges too.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("not reclaimed"), "{stderr}");
    assert!(text.contains("gave the host back"), "{text}");
    let reclaimed: serde_json::Value = serde_json::from_str(
        text.lines()
            .find(|l| l.starts_with('['))
            .unwrap_or_else(|| panic!("no lab reclaim --json output: {text}")),
    )
    .unwrap();
    let devices: Vec<&str> = reclaimed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["ok"], true, "{reclaimed}");
            assert!(r["balloon_kib"].as_u64().unwrap() > 0, "{reclaimed}");
            assert!(r["host_bytes_after"].as_u64().is_some(), "{reclaimed}");
            r["device"].as_str().unwrap()
        })
        .collect();
    assert_eq!(devices, ["a", "b", "c"], "{reclaimed}");
    assert!(text.contains("\n0\n"), "root in the guest: {text}");
    assert!(text.contains("b: restarted"), "{text}");
    assert!(
        !text.contains("before-restart"),
        "a restarted device is fresh: {text}"
    );
    assert!(text.contains("after restart: 1 packets received"), "{text}");
    // c after a and b; then b again, restarted.
    let order = fs::read_to_string(dir.join("shared/order")).unwrap();
    let lines: Vec<&str> = order.lines().collect();
    assert_eq!(lines.len(), 4, "{order}");
    assert_eq!(&lines[2..], ["c", "b"], "{order}");
    assert!(processes_mentioning(&dir.display().to_string()).is_empty());
}

/// Kathará's own OSPF example shape: three FRR routers in a triangle, a
/// host on each edge; `rN/etc/frr/` trees, `rN.startup` scripts that give
/// addresses and `systemctl start frr`.
fn frr_lab(dir: &Path) {
    fs::write(
        dir.join("lab.conf"),
        "LAB_NAME=\"OSPF triangle\"\n\
         r1[0]=\"A\"\nr1[1]=\"R12\"\nr1[2]=\"R13\"\n\
         r2[0]=\"R12\"\nr2[1]=\"R23\"\n\
         r3[0]=\"R23\"\nr3[1]=\"R13\"\nr3[2]=\"D\"\n\
         pc1[0]=\"A\"\npc2[0]=\"D\"\n\
         r1[image]=\"kathara/frr\"\nr2[image]=\"kathara/frr\"\nr3[image]=\"kathara/frr\"\n",
    )
    .unwrap();
    for n in 1..=3 {
        let etc = dir.join(format!("r{n}/etc/frr"));
        fs::create_dir_all(&etc).unwrap();
        fs::write(
            etc.join("daemons"),
            "zebra=yes\nospfd=yes\nvtysh_enable=yes\n\
             zebra_options=\"  -A 127.0.0.1 -s 90000000\"\nospfd_options=\"  -A 127.0.0.1\"\n",
        )
        .unwrap();
        let mut conf = format!("frr defaults traditional\nhostname r{n}\n!\n");
        for i in 0..3 {
            conf.push_str(&format!(
                "interface eth{i}\n ip ospf hello-interval 1\n ip ospf dead-interval 4\n"
            ));
        }
        conf.push_str(&format!(
            "!\nrouter ospf\n ospf router-id {n}.{n}.{n}.{n}\n network 10.0.0.0/8 area 0\n!\n"
        ));
        fs::write(etc.join("frr.conf"), conf).unwrap();
    }
    let startup = |name: &str, addrs: &[&str]| {
        let mut s = String::new();
        for (i, a) in addrs.iter().enumerate() {
            s.push_str(&format!("ip address add {a} dev eth{i}\n"));
        }
        s.push_str("systemctl start frr\n");
        fs::write(dir.join(format!("{name}.startup")), s).unwrap();
    };
    startup("r1", &["10.0.1.1/24", "10.1.12.1/24", "10.1.13.1/24"]);
    startup("r2", &["10.1.12.2/24", "10.1.23.2/24"]);
    startup("r3", &["10.1.23.3/24", "10.1.13.3/24", "10.0.4.1/24"]);
    fs::write(
        dir.join("pc1.startup"),
        "ip address add 10.0.1.2/24 dev eth0\nip route add default via 10.0.1.1\n",
    )
    .unwrap();
    fs::write(
        dir.join("pc2.startup"),
        "ip address add 10.0.4.2/24 dev eth0\nip route add default via 10.0.4.1\n",
    )
    .unwrap();
}

#[test]
fn an_ospf_lab_of_frr_routers_converges_and_routes_end_to_end() {
    let env = GuestEnv::new();
    let work = scratch();
    let dir = work.path().join("ospf");
    fs::create_dir_all(&dir).unwrap();
    frr_lab(&dir);
    let frr = debian_image_with("frr,iputils-ping");
    // The hosts need ping too: the same image.
    let plain = frr.clone();
    let k = kernel();
    let out = env.lab(
        "start",
        &dir,
        &[
            "--image",
            plain.to_str().unwrap(),
            "--image-for",
            &format!("kathara/frr={}", frr.display()),
            "--kernel",
            k.to_str().unwrap(),
        ],
    );
    assert_ok(&out, "lab start");
    let d = dir.to_str().unwrap();
    // Every router learns the two edge networks and the links it is not
    // on as OSPF routes.
    let want = [
        ("r1", ["10.0.4.0/24", "10.1.23.0/24"]),
        ("r2", ["10.0.1.0/24", "10.0.4.0/24"]),
        ("r3", ["10.0.1.0/24", "10.1.12.0/24"]),
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    for (r, nets) in want {
        loop {
            let routes = env.lab(
                "exec",
                &dir,
                &[r, "--", "vtysh", "-c", "show ip route ospf"],
            );
            let text = String::from_utf8_lossy(&routes.stdout).to_string();
            let learned = nets
                .iter()
                .all(|n| text.lines().any(|l| l.starts_with("O>*") && l.contains(n)));
            if learned {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{r} did not learn {nets:?} by OSPF:\n{text}\n{}",
                String::from_utf8_lossy(&routes.stderr)
            );
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    // Giving the host back what the routers hold but do not use (their
    // page cache dropped, free pages out of the host) leaves them routing.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gave the host back"),
        "{out:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&assert_ok(
        &env.lab("reclaim", &dir, &["--json"]),
        "lab reclaim",
    ))
    .unwrap();
    for r in v.as_array().unwrap() {
        assert_eq!(r["ok"], true, "{v}");
        assert_eq!(r["dropped_cache"], true, "{v}");
    }
    assert_eq!(v.as_array().unwrap().len(), 5, "{v}");
    // A host on one edge reaches the host on the other, three routers away.
    let ping = env.umlctl(&[
        "lab", "exec", "-d", d, "pc1", "--", "ping", "-c", "3", "-W", "5", "10.0.4.2",
    ]);
    let text = assert_ok(&ping, "pc1 pings pc2");
    assert!(text.contains("3 received"), "{text}");
    assert_ok(&env.lab("stop", &dir, &[]), "lab stop");
    let left: Vec<_> = fs::read_dir(env.uml_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.iter().all(|n| n == "labs"), "{left:?}");
}

/// Live slirp4netns processes (not zombies).
fn slirps() -> usize {
    let out = Command::new("ps")
        .args(["-eo", "stat=,comm="])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("slirp4netns") && !l.trim_start().starts_with('Z'))
        .count()
}

#[test]
fn a_bridged_device_reaches_the_outside_but_not_the_hosts_loopback() {
    // "The outside": a network namespace of this test's, with a web server
    // on an address of its own and another on its loopback; the lab is
    // started from there, so slirp4netns's sockets open there.
    let ns = format!("umlt-out-{}", std::process::id());
    let sh = |s: &str| {
        let st = Command::new("sh").arg("-c").arg(s).status().unwrap();
        assert!(st.success(), "{s}");
    };
    sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up && ip -n {ns} address add 192.0.2.1/32 dev lo"));
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip netns pids {0} | xargs -r kill -9; ip netns del {0}",
                    self.0
                ))
                .status();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    let env = GuestEnv::new();
    let work = scratch();
    let img = busybox_lab_image(work.path());
    let www = work.path().join("site");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("page.txt"), "hello from outside\n").unwrap();
    let mut servers = Vec::new();
    for addr in ["192.0.2.1", "127.0.0.1"] {
        let s = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "-b",
                addr,
                "-d",
            ])
            .arg(&www)
            .arg("8080")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        servers.push(s);
    }
    let dir = work.path().join("lab");
    fs::create_dir_all(&dir).unwrap();
    // h also publishes its web server (busybox httpd, started by lab.conf's
    // exec) on the outside's port 18080.
    fs::write(
        dir.join("lab.conf"),
        "h[0]=\"A\"\nh[bridged]=\"true\"\nh[port]=\"18080:80/tcp\"\n\
         h[exec]=\"httpd -f -p 80 -h /www\"\nz[0]=\"A\"\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join("h/www")).unwrap();
    fs::write(dir.join("h/www/index.html"), "served by h\n").unwrap();
    let before = slirps();
    let k = kernel();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(umlctl_bin())
        .args(["lab", "start", "-d"])
        .arg(&dir)
        .arg("--image")
        .arg(&img)
        .arg("--kernel")
        .arg(&k)
        .env("UMLCTL_UML_DIR", env.uml_dir())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    assert_ok(&out, "lab start with a bridged device");
    assert_eq!(
        slirps(),
        before + 1,
        "one slirp4netns for the one bridged device"
    );
    let ps: serde_json::Value =
        serde_json::from_slice(&env.lab("ps", &dir, &["--json"]).stdout).unwrap();
    let h = ps["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "h")
        .unwrap()
        .clone();
    assert_eq!(h["interfaces"][1]["name"], "eth1", "{ps}");
    // Polled: the web server may still be starting.
    let mut page = String::new();
    let mut why = String::new();
    for _ in 0..50 {
        let o = env.lab(
            "exec",
            &dir,
            &[
                "h",
                "--",
                "timeout",
                "10",
                "wget",
                "-qO-",
                "http://192.0.2.1:8080/page.txt",
            ],
        );
        page = String::from_utf8_lossy(&o.stdout).to_string();
        why = String::from_utf8_lossy(&o.stderr).to_string();
        if page.contains("hello from outside") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let addrs = env.lab("exec", &dir, &["h", "--", "ip", "-o", "address"]);
    assert_eq!(
        page,
        "hello from outside\n",
        "{why}\n{}",
        String::from_utf8_lossy(&addrs.stdout)
    );
    // The published port: the outside reaches h's httpd.
    let mut got = String::new();
    for _ in 0..50 {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c"])
            .arg("import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:18080/index.html', timeout=5).read().decode(), end='')")
            .output()
            .unwrap();
        got = String::from_utf8_lossy(&o.stdout).to_string();
        if o.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(got, "served by h\n");
    // The host's loopback (slirp's 10.0.2.2) is out of reach.
    let o = env.lab(
        "exec",
        &dir,
        &[
            "h",
            "--",
            "timeout",
            "5",
            "wget",
            "-qO-",
            "http://10.0.2.2:8080/page.txt",
        ],
    );
    assert_ne!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // A device without `bridged` has no way out.
    let o = env.lab(
        "exec",
        &dir,
        &[
            "z",
            "--",
            "timeout",
            "5",
            "wget",
            "-qO-",
            "http://192.0.2.1:8080/page.txt",
        ],
    );
    assert_ne!(o.status.code(), Some(0));
    assert_ok(&env.lab("stop", &dir, &["--timeout", "2"]), "lab stop");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while slirps() > before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(slirps(), before, "slirp4netns went with its device");
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}

#[test]
fn two_labs_with_the_same_device_names_run_side_by_side_and_apart() {
    let env = GuestEnv::new();
    let work = scratch();
    let img = busybox_lab_image(work.path());
    let k = kernel();
    // The same lab twice, in two directories: the same devices, the same
    // collision domain name, the same addresses but one.
    let mut dirs = Vec::new();
    for (n, last) in [(1, 2), (2, 3)] {
        let dir = work.path().join(format!("lab{n}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("lab.conf"), "p[0]=\"A\"\nq[0]=\"A\"\n").unwrap();
        fs::write(
            dir.join("p.startup"),
            "ip address add 10.5.0.1/24 dev eth0\n",
        )
        .unwrap();
        fs::write(
            dir.join("q.startup"),
            format!("ip address add 10.5.0.{last}/24 dev eth0\n"),
        )
        .unwrap();
        dirs.push(dir);
    }
    let starts: Vec<_> = dirs
        .iter()
        .map(|d| {
            let mut c = Command::new(umlctl_bin());
            c.args(["lab", "start", "-d"])
                .arg(d)
                .arg("--image")
                .arg(&img)
                .arg("--kernel")
                .arg(&k)
                .env("UMLCTL_UML_DIR", env.uml_dir())
                .env("UMLCTL_CACHE_DIR", cache_dir());
            c.spawn().unwrap()
        })
        .collect();
    for s in starts {
        assert!(s.wait_with_output().unwrap().status.success());
    }
    let ps = env.ok(&["ps", "--json"]);
    let guests: serde_json::Value = serde_json::from_str(&ps).unwrap();
    assert_eq!(guests.as_array().unwrap().len(), 4, "{ps}");
    let ping = |dir: &Path, to: &str| {
        env.lab("exec", dir, &["p", "--", "ping", "-c", "1", "-W", "3", to])
            .status
            .code()
    };
    // Each p reaches its own q, and not the other lab's.
    assert_eq!(ping(&dirs[0], "10.5.0.2"), Some(0));
    assert_eq!(ping(&dirs[1], "10.5.0.3"), Some(0));
    assert_ne!(ping(&dirs[0], "10.5.0.3"), Some(0));
    assert_ne!(ping(&dirs[1], "10.5.0.2"), Some(0));
    // Stopping one leaves the other running.
    assert_ok(&env.lab("stop", &dirs[0], &["--timeout", "2"]), "lab stop");
    assert_eq!(ping(&dirs[1], "10.5.0.3"), Some(0));
    assert_ok(&env.lab("stop", &dirs[1], &["--timeout", "2"]), "lab stop");
}

#[test]
fn an_interrupted_lab_start_leaves_nothing_running() {
    let env = GuestEnv::new();
    let work = scratch();
    let img = busybox_lab_image(work.path());
    let dir = work.path().join("slow");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("lab.conf"), "s[0]=\"A\"\nt[0]=\"A\"\n").unwrap();
    fs::write(dir.join("s.startup"), "sleep 120\n").unwrap();
    let k = kernel();
    let mut child = Command::new(umlctl_bin())
        .args(["lab", "start", "-d"])
        .arg(&dir)
        .arg("--image")
        .arg(&img)
        .arg("--kernel")
        .arg(&k)
        .env("UMLCTL_UML_DIR", env.uml_dir())
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both devices run (s is then in its long startup).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v: serde_json::Value = serde_json::from_str(&env.ok(&["ps", "--json"])).unwrap();
        if v.as_array().unwrap().len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the devices did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(1));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let t0 = std::time::Instant::now();
    let st = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(st.code(), Some(125), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["ps", "--all", "--json"])).unwrap();
    assert!(v.as_array().unwrap().is_empty(), "{v}");
    let labs: Vec<_> = fs::read_dir(env.uml_dir().join("labs"))
        .unwrap()
        .flatten()
        .collect();
    assert!(labs.is_empty(), "{labs:?}");
    assert!(processes_mentioning(dir.to_str().unwrap()).is_empty());
}

#[test]
fn lab_devices_run_under_the_limits_given_to_lab_start_restarts_included() {
    let env = GuestEnv::new();
    let work = scratch();
    let img = busybox_lab_image(work.path());
    let dir = work.path().join("capped");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("lab.conf"), "x[0]=\"A\"\ny[0]=\"A\"\n").unwrap();
    let k = kernel();
    let out = env.lab(
        "start",
        &dir,
        &[
            "--image",
            img.to_str().unwrap(),
            "--kernel",
            k.to_str().unwrap(),
            "--cpu-quota",
            "50%",
            "--memory-max",
            "400M",
        ],
    );
    assert_ok(&out, "lab start with limits");
    let pids = |env: &GuestEnv| -> Vec<(String, u32)> {
        env.ps()
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["state"] == "running")
            .map(|g| {
                (
                    g["name"].as_str().unwrap().to_string(),
                    g["pid"].as_u64().unwrap() as u32,
                )
            })
            .collect()
    };
    let mut all_dirs = Vec::new();
    let before = pids(&env);
    assert_eq!(before.len(), 2, "{before:?}");
    for (name, pid) in &before {
        let dirs = umlctl_cgroups(*pid);
        assert_eq!(
            limits_in(&dirs),
            (Some(50_000), Some(400 << 20)),
            "{name}: {dirs:?}"
        );
        all_dirs.extend(dirs);
    }
    // A restarted device gets the lab's limits again, in a new cgroup.
    assert_ok(
        &env.lab("restart", &dir, &["x", "--timeout", "2"]),
        "lab restart x",
    );
    let after = pids(&env);
    let (xname, xpid) = after
        .iter()
        .find(|(n, p)| before.iter().any(|(b, bp)| b == n && bp != p))
        .expect("x runs again, as a new process")
        .clone();
    let dirs = umlctl_cgroups(xpid);
    assert_eq!(
        limits_in(&dirs),
        (Some(50_000), Some(400 << 20)),
        "{xname}: {dirs:?}"
    );
    all_dirs.extend(dirs);
    assert_ok(&env.lab("stop", &dir, &["--timeout", "2"]), "lab stop");
    for d in &all_dirs {
        assert!(!d.exists(), "{} outlived the lab", d.display());
    }
}

/// Links of network namespace `ns`: `(name, master)`.
fn links_in(ns: &str) -> Vec<(String, Option<String>)> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["ifname"].as_str().unwrap().to_string(),
                l["master"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn lab_ext_puts_a_collision_domain_on_a_host_interface_and_takes_it_back() {
    // "The host": a network namespace of this test's with a veth pair —
    // hx0 goes to the lab (lab.ext), hx1 keeps an address, as a real
    // network beyond the interface would. umlctl runs in that namespace.
    let ns = format!("umlt-ext-{}", std::process::id());
    let sh = |s: &str| {
        let o = Command::new("sh").arg("-c").arg(s).output().unwrap();
        assert!(
            o.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip netns pids {0} | xargs -r kill -9; ip netns del {0}",
                    self.0
                ))
                .status();
        }
    }
    sh(&format!(
        "ip netns add {ns} && ip -n {ns} link set lo up && \
         ip -n {ns} link add hx0 type veth peer name hx1 && \
         ip -n {ns} link set hx0 up && ip -n {ns} link set hx1 up && \
         ip -n {ns} address add 10.9.0.254/24 dev hx1 && \
         ip -n {ns} route add default via 10.9.0.253 dev hx1 && \
         ip -n {ns} link add hbr0 type bridge && ip -n {ns} link set hbr0 up && \
         ip -n {ns} address add 10.11.0.254/24 dev hbr0"
    ));
    let _cleanup = Cleanup(ns.clone());
    // 802.1Q where the host kernel has it (this build machine's has not).
    let vlans = Command::new("ip")
        .args(["-n", &ns, "link", "add", "link", "hx1", "name", "hx1.10"])
        .args(["type", "vlan", "id", "10"])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    if vlans {
        sh(&format!(
            "ip -n {ns} link set hx1.10 up && ip -n {ns} address add 10.10.0.254/24 dev hx1.10"
        ));
    }
    let env = GuestEnv::new();
    let work = scratch();
    let img = busybox_lab_image(work.path());
    let k = kernel();
    let dir = work.path().join("ext");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("lab.conf"),
        "pc1[0]=\"A\"\npc1[1]=\"B\"\npc2[0]=\"A\"\npc2[1]=\"C\"\n",
    )
    .unwrap();
    fs::write(
        dir.join("pc1.startup"),
        "ip address add 10.9.0.1/24 dev eth0\nip address add 10.10.0.1/24 dev eth1\n",
    )
    .unwrap();
    fs::write(
        dir.join("pc2.startup"),
        "ip address add 10.9.0.2/24 dev eth0\nip address add 10.11.0.2/24 dev eth1\n",
    )
    .unwrap();
    let in_ns = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(umlctl_bin())
            .args(args)
            .env("UMLCTL_UML_DIR", env.uml_dir())
            .env("UMLCTL_CACHE_DIR", cache_dir())
            .output()
            .unwrap()
    };
    let d = dir.to_str().unwrap();
    let start = || {
        in_ns(&[
            "lab",
            "start",
            "-d",
            d,
            "--image",
            img.to_str().unwrap(),
            "--kernel",
            k.to_str().unwrap(),
            "--no-reclaim",
        ])
    };
    let before = links_in(&ns);
    // Bad lab.ext lines and missing interfaces are errors by name, with
    // nothing made.
    let refused = |ext: &str, extra: &[&str], want: &str| {
        fs::write(dir.join("lab.ext"), ext).unwrap();
        let mut args = vec![
            "lab",
            "start",
            "-d",
            d,
            "--image",
            img.to_str().unwrap(),
            "--kernel",
            k.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = in_ns(&args);
        assert_eq!(o.status.code(), Some(125), "{ext}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(want),
            "{ext}: {o:?}"
        );
    };
    refused("# ext\nA hx0 hx1\n", &[], "lab.ext line 2");
    refused("A nosuch0\n", &[], "no interface nosuch0");
    // The interface the host's default route goes out of is not taken
    // (a lab from elsewhere must not cut the host off); --dry-run says so.
    refused("A hx1\n", &[], "default route");
    refused("A hx1\n", &["--dry-run"], "default route");
    // A host bridge takes a domain alone.
    refused("C hbr0\nC hx0\n", &[], "is a bridge of the host's");
    refused("Z hx0\n", &[], "not used by any device");
    if !vlans {
        // Without 802.1Q in the kernel the VLAN line is refused plainly,
        // after the bridge for A was made: that is taken back.
        refused("A hx0\nB hx0.10\n", &[], "802.1Q");
    }
    assert_eq!(links_in(&ns), before, "a refused lab.ext leaves nothing");
    fs::write(
        dir.join("lab.ext"),
        if vlans {
            "A hx0\nB hx0.10\nC hbr0\n"
        } else {
            "A hx0\nC hbr0\n"
        },
    )
    .unwrap();
    let ping = |dev: &str, to: &str| {
        let o = in_ns(&[
            "lab", "exec", "-d", d, dev, "--", "ping", "-c", "1", "-W", "5", to,
        ]);
        assert_ok(&o, &format!("{dev} pings {to}"));
    };
    for round in ["stop", "kill"] {
        assert_ok(&start(), "lab start with lab.ext");
        let links = links_in(&ns);
        // pc2's eth1 joined the host's own bridge, and only it did.
        let on_hbr0: Vec<_> = links
            .iter()
            .filter(|(_, m)| m.as_deref() == Some("hbr0"))
            .collect();
        assert_eq!(on_hbr0.len(), 1, "{links:?}");
        ping("pc2", "10.11.0.254");
        let bridge = links
            .iter()
            .find(|(n, _)| n == "hx0")
            .and_then(|(_, m)| m.clone())
            .expect("hx0 is on the lab's bridge");
        assert!(bridge.starts_with("ux"), "{links:?}");
        // Both devices' taps are on it too; nothing else of the lab is here.
        let on: Vec<_> = links
            .iter()
            .filter(|(_, m)| m.as_deref() == Some(bridge.as_str()))
            .collect();
        assert_eq!(on.len(), 3, "{links:?}");
        let ps = in_ns(&["lab", "ps", "-d", d]);
        let ps = assert_ok(&ps, "lab ps");
        assert!(
            ps.contains(&format!(
                "collision domain A is on the host's hx0 (through bridge {bridge})"
            )) && ps.contains("collision domain C is on the host's hbr0\n"),
            "{ps}"
        );
        ping("pc1", "10.9.0.254");
        ping("pc2", "10.9.0.254");
        if vlans {
            ping("pc1", "10.10.0.254");
        }
        // And the "host" reaches the devices.
        let o = Command::new("ip")
            .args([
                "netns", "exec", &ns, "ping", "-c", "1", "-W", "5", "10.9.0.2",
            ])
            .output()
            .unwrap();
        assert_ok(&o, "the host side pings pc2");
        if round == "stop" {
            assert_ok(
                &in_ns(&["lab", "restart", "-d", d, "pc1", "--timeout", "2"]),
                "lab restart pc1",
            );
            ping("pc1", "10.9.0.254");
            assert_ok(
                &in_ns(&["lab", "stop", "-d", d, "--timeout", "2"]),
                "lab stop",
            );
        } else {
            // SIGKILL every UML: the bridge (and a made VLAN) stay behind
            // until lab stop.
            let ps: serde_json::Value = serde_json::from_str(&env.ok(&["ps", "--json"])).unwrap();
            for g in ps.as_array().unwrap() {
                let pid = g["pid"].as_i64().unwrap();
                Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
            assert!(
                links_in(&ns).iter().any(|(n, _)| *n == bridge),
                "the bridge outlives killed devices"
            );
            // lab stop from elsewhere (the host's own namespace) cannot
            // reach it, says so, and keeps the record for a retry.
            let o = env.lab("stop", &dir, &["--timeout", "2"]);
            assert_ne!(o.status.code(), Some(0));
            assert!(
                String::from_utf8_lossy(&o.stdout).contains("run `lab stop` there"),
                "{o:?}"
            );
            assert_ok(
                &in_ns(&["lab", "stop", "-d", d, "--timeout", "2"]),
                "lab stop",
            );
        }
        assert_eq!(links_in(&ns), before, "{round}: lab.ext's links are gone");
    }
}
