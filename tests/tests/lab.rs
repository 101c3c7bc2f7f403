//! `umlctl lab info|graph` end to end on lab directories in Kathará's
//! format; Graphviz's `dot` is the oracle for the drawing.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

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
