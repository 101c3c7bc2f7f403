//! The flake and its Nix files, checked the ways this machine allows: it
//! cannot fetch nixpkgs or the binary cache, so no `nix build` runs here.
//! What does run: `nix-instantiate --parse` on every .nix file; an
//! evaluation of flake.nix against tests/nix/stub-nixpkgs.nix (attribute
//! names, every path the flake names, the Cargo.lock, the kernel option
//! list against `umlctl kernel build`'s, the NixOS module); and the build
//! scripts the flake generates for `lib.mkRootfsImage` and for its checks,
//! executed for real with this umlctl and a real UML kernel.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Run one generated build script as Nix's builder would (bash with
/// `set -eu -o pipefail`), with umlctl on PATH and `env` set.
fn run_script(what: &str, script: &str, cwd: &Path, env: &[(&str, &Path)]) {
    fs::create_dir_all(cwd).unwrap();
    let tmp = cwd.join(".tmp");
    fs::create_dir_all(&tmp).unwrap();
    let bin_dir = umlctl_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(format!("set -eu -o pipefail\n{script}"))
        .current_dir(cwd)
        .env("PATH", path)
        .env("TMPDIR", &tmp)
        .env_remove("HOME")
        .env_remove("UMLCTL_KERNEL");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run bash");
    assert!(
        out.status.success(),
        "the {what} build script failed ({}):\n--- script\n{script}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_nix_file_parses() {
    need_nix();
    let mut files = Vec::new();
    let mut stack = vec![repo()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let name = e.file_name();
            if e.file_type().unwrap().is_dir() {
                if name != "target" && name != ".git" {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "nix") {
                files.push(p);
            }
        }
    }
    files.sort();
    for must in [
        "flake.nix",
        "nix/package.nix",
        "nix/uml-kernel.nix",
        "nix/module.nix",
        "nix/lib.nix",
        "nix/checks.nix",
    ] {
        assert!(files.contains(&repo().join(must)), "{must} not found");
    }
    for f in &files {
        let out = Command::new(NIX_INSTANTIATE)
            .arg("--parse")
            .arg(f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_flake_evaluates_to_the_promised_outputs_and_names_real_paths() {
    let dir = scratch();
    let out = dir.path();
    let v = nix_eval(out, &[]);
    assert_eq!(strs(&v["inputs"]), ["nixpkgs"], "inputs: nixpkgs only");
    let outputs = strs(&v["outputs"]);
    for o in [
        "packages",
        "apps",
        "devShells",
        "nixosModules",
        "checks",
        "lib",
    ] {
        assert!(
            outputs.contains(&o.to_string()),
            "output {o} missing: {outputs:?}"
        );
    }
    let packages = strs(&v["packages"]);
    for p in ["default", "umlctl", "uml-kernel"] {
        assert!(packages.contains(&p.to_string()), "packages.{p} missing");
    }
    assert_eq!(v["defaultIsUmlctl"], true);
    assert_eq!(strs(&v["checks"]), ["boot", "image", "package"]);
    assert_eq!(strs(&v["lib"]), ["mkRootfsImage"]);

    // The package: this workspace's lock file, version and sources.
    let u = &v["umlctl"];
    assert_eq!(
        fs::canonicalize(u["lockFile"].as_str().unwrap()).unwrap(),
        repo().join("Cargo.lock")
    );
    assert_eq!(u["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(u["mainProgram"], "umlctl");
    assert_eq!(PathBuf::from(u["srcRoot"].as_str().unwrap()), repo());
    let src = strs(&u["srcPaths"]);
    for p in &src {
        assert!(
            Path::new(p).exists(),
            "the flake's source set names {p}, which does not exist"
        );
    }
    let cargo_toml = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let members_line = cargo_toml
        .lines()
        .find(|l| l.starts_with("members"))
        .unwrap();
    for m in members_line.split('"').skip(1).step_by(2) {
        let p = repo().join(m).display().to_string();
        assert!(
            src.contains(&p),
            "workspace member {m} is not in the flake's source set {src:?}"
        );
    }
    // The excluded test package is the real e2e package, and the reason is written down.
    let flags = strs(&u["cargoTestFlags"]);
    assert_eq!(flags, ["--workspace", "--exclude", env!("CARGO_PKG_NAME")]);
    let pkg_nix = fs::read_to_string(repo().join("nix/package.nix")).unwrap();
    let why = pkg_nix
        .lines()
        .skip_while(|l| !l.contains("The end-to-end suite"))
        .take_while(|l| l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    for reason in ["umlctl-tests", "UML kernels", "root", "sandbox"] {
        assert!(
            why.contains(reason),
            "package.nix must say why the e2e tests are off ({reason}): {why}"
        );
    }
    // postInstall installs the repo's unit (rewriting the path it really has) and generated docs.
    let post = u["postInstall"].as_str().unwrap();
    let unit = fs::read_to_string(repo().join("netd/systemd/umlctl-netd.service")).unwrap();
    assert!(post.contains("netd/systemd/umlctl-netd.service"));
    assert!(unit.contains("ExecStart=/usr/local/bin/umlctl netd"));
    assert!(post.contains("--replace-fail /usr/local/bin/umlctl $out/bin/umlctl"));
    for s in [
        "completions bash",
        "completions zsh",
        "completions fish",
        "manpages man",
    ] {
        assert!(post.contains(s), "postInstall lacks `umlctl {s}`");
    }
    assert_eq!(
        v["app"]["program"].as_str().unwrap(),
        format!(
            "{}/umlctl-{}/bin/umlctl",
            out.display(),
            env!("CARGO_PKG_VERSION")
        )
    );
    let shell = strs(&v["devShellPackages"]);
    for p in ["cargo", "clippy", "rustfmt", "e2fsprogs", "uml-utilities"] {
        assert!(
            shell.iter().any(|s| s.starts_with(&format!("{p}-"))),
            "devShell lacks {p}: {shell:?}"
        );
    }
    let util = &v["utilities"];
    assert!(util["url"]
        .as_str()
        .unwrap()
        .starts_with("https://deb.debian.org/"));
    assert!(util["hash"].as_str().unwrap().starts_with("sha256-"));
}

#[test]
fn the_nix_kernel_package_applies_exactly_umlctls_option_list() {
    let dir = scratch();
    let v = nix_eval(dir.path(), &[]);
    let k = &v["kernel"];
    let nix: Vec<(String, String)> = k["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                o["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let ours: Vec<(String, String)> =
        umlctl_kernel::build::parse_fragment(umlctl_kernel::build::UMLCTL_CONFIG, "umlctl.config")
            .unwrap()
            .into_iter()
            .map(|w| (w.option, w.value))
            .collect();
    assert!(ours.len() > 20);
    assert_eq!(
        nix, ours,
        "Nix's reading of kernel/config/umlctl.config differs from umlctl's"
    );
    // Every option is set and then checked by the configure phase.
    let configure = k["configurePhase"].as_str().unwrap();
    for (name, value) in &ours {
        if value == "n" {
            assert!(
                configure.contains(&format!("--disable {name}\n")),
                "{name} not disabled"
            );
            assert!(configure.contains(&format!("grep -q '^{name}=' .config")));
        } else {
            assert!(
                configure.contains(&format!("--set-val {name} '{value}'")),
                "{name} not set"
            );
            assert!(configure.contains(&format!("grep -qxF '{name}={value}' .config")));
        }
    }
    assert!(strs(&k["nativeBuildInputs"])
        .iter()
        .any(|n| n.starts_with("bison-")));
    assert!(k["buildPhase"].as_str().unwrap().contains("make ARCH=um"));
    assert!(k["installPhase"]
        .as_str()
        .unwrap()
        .contains("$out/bin/linux"));
}

/// JSON (what the module hands to `pkgs.formats.toml`) as TOML.
fn to_toml(v: &serde_json::Value) -> String {
    toml::to_string(v).unwrap()
}

fn netd_check(config: &Path) -> std::process::Output {
    Command::new(umlctl_bin())
        .args(["netd", "--check", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn the_netd_module_runs_the_repo_unit_with_a_config_netd_accepts() {
    let dir = scratch();
    let out = dir.path();
    let settings = r#"{"socket_mode":"0660","bridge":[{"name":"umlbr7","address":"10.77.7.1/24","forward":true,"mtu":9000}],"allow":[{"users":[0,65534],"bridges":["umlbr7"],"max_taps":2}]}"#;
    let v = nix_eval(out, &[("--argstr", "netdSettings", settings)]);
    let m = &v["module"];
    assert_eq!(strs(&m["options"]), ["enable", "package", "settings"]);
    assert_eq!(m["enabledWhen"], true);
    assert_eq!(strs(&m["wantedBy"]), ["multi-user.target"]);
    let exe = format!(
        "{}/umlctl-{}/bin/umlctl",
        out.display(),
        env!("CARGO_PKG_VERSION")
    );
    let cfg = m["configFile"].as_str().unwrap();
    assert_eq!(
        strs(&m["serviceConfig"]["ExecStart"]),
        ["".to_string(), format!("{exe} netd --config {cfg}")]
    );
    assert_eq!(
        strs(&m["serviceConfig"]["ExecStartPre"]),
        ["".to_string(), format!("{exe} netd --config {cfg} --check")]
    );
    assert!(strs(&m["systemdPackages"])[0].starts_with("umlctl-"));
    // The unit being overridden has exactly these two lines to clear.
    let unit = fs::read_to_string(repo().join("netd/systemd/umlctl-netd.service")).unwrap();
    assert_eq!(
        unit.lines().filter(|l| l.starts_with("ExecStart=")).count(),
        1
    );
    assert_eq!(
        unit.lines()
            .filter(|l| l.starts_with("ExecStartPre="))
            .count(),
        1
    );

    // The settings reach netd unchanged and netd accepts them; so does the documented example.
    let expect: serde_json::Value = serde_json::from_str(settings).unwrap();
    assert_eq!(m["configValue"], expect);
    assert_eq!(
        strs(&m["groups"]),
        Vec::<String>::new(),
        "no socket_group, no group"
    );
    // The example names group "uml", which the module creates on NixOS; this
    // host has no such group, so it is checked with "root" in its place.
    let example = serde_json::from_str::<serde_json::Value>(
        &m["settingsExample"]
            .to_string()
            .replace("\"uml\"", "\"root\""),
    )
    .unwrap();
    for (name, value) in [("given", &m["configValue"]), ("example", &example)] {
        let f = out.join(format!("{name}.toml"));
        fs::write(&f, to_toml(value)).unwrap();
        let o = netd_check(&f);
        assert!(
            o.status.success(),
            "netd --check refused the module's {name} settings:\n{}\n{}",
            fs::read_to_string(&f).unwrap(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let with_group = nix_eval(
        out,
        &[("--argstr", "netdSettings", r#"{"socket_group":"umlnet"}"#)],
    );
    assert_eq!(strs(&with_group["module"]["groups"]), ["umlnet"]);

    // --check is a real check: a misspelt key is refused, naming it.
    let bad = out.join("bad.toml");
    fs::write(
        &bad,
        "[[bridge]]\nname = \"umlbr7\"\naddres = \"10.0.0.1/24\"\n",
    )
    .unwrap();
    let o = netd_check(&bad);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("addres"));
}

#[test]
fn mk_rootfs_image_builds_a_root_owned_reproducible_checked_image() {
    let dir = scratch();
    let out = dir.path();
    let src = out.join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), "from-nix\n").unwrap();
    fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    // A build user's uid, as in a Nix sandbox: it must not reach the image.
    for p in [
        src.clone(),
        src.join("etc"),
        src.join("etc/hostname"),
        src.join("run.sh"),
    ] {
        std::os::unix::fs::lchown(&p, Some(4321), Some(4321)).unwrap();
    }
    let src_nix = format!("\"{}\"", src.display());
    let v = nix_eval(out, &[("--arg", "imageSource", &src_nix)]);
    let img = &v["image"];
    assert_eq!(strs(&img["outputs"]), ["out", "manifest"]);
    let script = img["script"].as_str().unwrap();
    let mut digests = Vec::new();
    for round in ["a", "b"] {
        let o = out.join(format!("{round}.img"));
        let m = out.join(format!("{round}.manifest"));
        run_script(
            "mkRootfsImage",
            script,
            &out.join(round),
            &[("out", &o), ("manifest", &m)],
        );
        assert_eq!(
            fs::metadata(&o).unwrap().len(),
            16 << 20,
            "size = \"16M\" was asked"
        );
        let fsck = Command::new("e2fsck").arg("-fn").arg(&o).output().unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let verify = Command::new(umlctl_bin())
            .args(["image", "verify"])
            .arg(&o)
            .arg("--manifest")
            .arg(&m)
            .output()
            .unwrap();
        assert_ok(&verify, "image verify against the mkRootfsImage manifest");
        let ls = Command::new(umlctl_bin())
            .args(["image", "ls", "-l"])
            .arg(&o)
            .arg("/etc")
            .output()
            .unwrap();
        let listing = assert_ok(&ls, "image ls");
        assert!(
            !listing.contains("4321"),
            "the build user's uid leaked: {listing}"
        );
        digests.push(sha256_file(&o));
    }
    assert_eq!(digests[0], digests[1], "mkRootfsImage is not reproducible");
    // Owners, mtimes: debugfs as the independent reader.
    let stat = Command::new("debugfs")
        .args(["-R", "stat /run.sh"])
        .arg(out.join("a.img"))
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    assert!(
        stat.contains("User:     0") && stat.contains("Group:     0"),
        "{stat}"
    );
    assert!(stat.contains("Mode:  0755"), "{stat}");
}

#[test]
fn the_flakes_check_scripts_boot_real_guests() {
    let dir = scratch();
    let out = dir.path();
    let kernel = kernel();
    let ver = Command::new(&kernel).arg("--version").output().unwrap();
    let ver = String::from_utf8_lossy(&ver.stdout).trim().to_string();
    assert!(
        ver.starts_with(|c: char| c.is_ascii_digit()),
        "{} --version: {ver:?}",
        kernel.display()
    );
    let v = nix_eval(out, &[("--argstr", "linuxVersion", &ver)]);
    let c = &v["checkScripts"];
    let p = |v: &serde_json::Value| PathBuf::from(v.as_str().unwrap());
    // Stand-ins for the two store paths the checks take from nixpkgs and the flake:
    // the kernel package's $out/bin/linux and static busybox's $out/bin/busybox.
    let kbin = p(&c["kernelOut"]).join("bin");
    fs::create_dir_all(&kbin).unwrap();
    std::os::unix::fs::symlink(&kernel, kbin.join("linux")).unwrap();
    let bb = p(&c["busyboxOut"]).join("bin");
    fs::create_dir_all(&bb).unwrap();
    fs::copy("/bin/busybox", bb.join("busybox")).expect("/bin/busybox (busybox-static)");

    let work = out.join("build");
    let script = |name: &str| c[name]["script"].as_str().unwrap().to_string();
    run_script(
        "busybox-root",
        &script("busyboxRoot"),
        &work.join("1"),
        &[("out", &p(&c["busyboxRoot"]["out"]))],
    );
    run_script(
        "check-rootfs image",
        &script("rootfs"),
        &work.join("2"),
        &[
            ("out", &p(&c["rootfs"]["out"])),
            ("manifest", &p(&c["rootfs"]["manifest"])),
        ],
    );
    for check in ["boot", "image"] {
        let done = p(&c[check]["out"]);
        run_script(
            &format!("checks.{check}"),
            &script(check),
            &work.join(check),
            &[("out", &done)],
        );
        assert!(done.exists(), "checks.{check} did not produce $out");
    }
}
