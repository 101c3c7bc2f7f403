//! `umlctl kernel build|list|default|rm|test|ktap` end to end: Debian's
//! linux-source-6.12 built for real (once per machine, into a persistent
//! cache; later runs find it up to date), booted with `umlctl run`, an ext4
//! image with ACLs and file capabilities used in the guest, a real KUnit
//! run, and our KTAP parser checked against kunit.py's on the same files.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const SOURCE: &str = SOURCE_6_12;

fn kcache() -> PathBuf {
    kernel_cache()
}

fn umlctl_in<I, S>(cache: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(umlctl_bin())
        .args(args)
        .env("UMLCTL_CACHE_DIR", cache)
        .env_remove("UMLCTL_KERNEL")
        .output()
        .expect("run umlctl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn need_source() {
    assert!(
        Path::new(SOURCE).is_file(),
        "{SOURCE} is missing: apt-get install linux-source-6.12 (scripts/test.sh does)"
    );
}

fn built() -> &'static serde_json::Value {
    built_6_12()
}

fn built_path() -> PathBuf {
    PathBuf::from(built()["path"].as_str().unwrap())
}

/// The extracted 6.12 tree (the build directory's `source` link, made by Kbuild).
fn tree() -> PathBuf {
    let b = PathBuf::from(built()["meta"]["build_dir"].as_str().unwrap());
    fs::canonicalize(b.join("source")).unwrap()
}

/// umlctl's own option list, read from the repository.
fn umlctl_options() -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel/config/umlctl.config");
    fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_") || l.ends_with(" is not set"))
        .map(str::to_string)
        .collect()
}

/// packages.uml-kernel's configure phase, as nix/uml-kernel.nix generates
/// it, run for real on a copy of the same 6.12 tree: umlctl's options get
/// the values `umlctl kernel build` gave them, and an option that cannot
/// land fails the phase, named.
#[test]
fn the_nix_kernel_packages_configure_phase_configures_a_real_tree_like_kernel_build() {
    let src = tree();
    let dir = scratch();
    let copy = dir.path().join("linux");
    // Hard links when possible: Kconfig only creates files (.config, its
    // own objects, include/config), it never rewrites the tree's.
    let linked = Command::new("cp")
        .arg("-al")
        .arg(&src)
        .arg(&copy)
        .status()
        .unwrap();
    if !linked.success() {
        let _ = fs::remove_dir_all(&copy);
        assert!(Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&copy)
            .status()
            .unwrap()
            .success());
    }
    let configure = |script: &str| {
        Command::new("bash")
            .arg("-c")
            .arg(format!("set -eu -o pipefail\nrunHook() {{ :; }}\n{script}"))
            .current_dir(&copy)
            .output()
            .unwrap()
    };
    let v = nix_eval(dir.path(), &[]);
    let out = configure(v["kernel"]["configurePhase"].as_str().unwrap());
    assert!(
        out.status.success(),
        "the Nix configure phase failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |config: &str, name: &str| -> Option<String> {
        config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_string))
    };
    let nix_config = fs::read_to_string(copy.join(".config")).unwrap();
    let ours = fs::read_to_string(built_path().with_file_name("config")).unwrap();
    for opt in umlctl_options() {
        let name = opt
            .trim_start_matches("# ")
            .split(['=', ' '])
            .next()
            .unwrap()
            .to_string();
        assert_eq!(
            value(&nix_config, &name),
            value(&ours, &name),
            "{name}: the Nix kernel package and `umlctl kernel build` disagree"
        );
    }

    let frag = dir.path().join("bad.config");
    fs::write(&frag, "CONFIG_HOSTFS=y\nCONFIG_UMLCTL_NO_SUCH_OPTION=y\n").unwrap();
    let arg = frag.display().to_string();
    let v = nix_eval(dir.path(), &[("--arg", "kernelConfig", &arg)]);
    let out = configure(v["kernelWith"].as_str().unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an option that cannot land passed");
    assert!(
        err.contains("did not land in .config: CONFIG_UMLCTL_NO_SUCH_OPTION=y"),
        "{err}"
    );
}

#[test]
fn a_built_6_12_kernel_has_umlctls_options_and_runs_acl_and_capability_images() {
    let path = built_path();
    let meta = &built()["meta"];
    assert!(
        meta["version"].as_str().unwrap().starts_with("6.12."),
        "{meta}"
    );

    // Every option umlctl relies on is in the installed .config (read by
    // a plain text search, not by the code that checked it).
    let config = fs::read_to_string(path.with_file_name("config")).unwrap();
    let have: Vec<&str> = config.lines().collect();
    for opt in umlctl_options() {
        if let Some(name) = opt
            .strip_prefix("# ")
            .and_then(|o| o.strip_suffix(" is not set"))
        {
            assert!(
                !have.iter().any(|l| l.starts_with(&format!("{name}="))),
                "{name} is set in {}",
                path.display()
            );
        } else {
            assert!(
                have.contains(&opt.as_str()),
                "{opt} missing from the built .config"
            );
        }
    }

    // Unchanged source and options: nothing is rebuilt.
    let again = umlctl_in(&kcache(), ["kernel", "build", "--source", SOURCE, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&assert_ok(&again, "second build")).unwrap();
    assert_eq!(v["up_to_date"], true, "{v}");
    assert_eq!(v["path"], built()["path"]);

    // `run` boots it, named explicitly and as the cache's default.
    let out = umlctl_in(
        &kcache(),
        [
            "run".as_ref(),
            "--kernel".as_ref(),
            path.as_os_str(),
            "--".as_ref(),
            "uname".as_ref(),
            "-r".as_ref(),
        ],
    );
    assert!(assert_ok(&out, "run uname -r").starts_with("6.12."));
    let name = v["name"].as_str().unwrap();
    assert_ok(
        &umlctl_in(&kcache(), ["kernel", "default", name]),
        "kernel default",
    );
    let info = umlctl_in(&kcache(), ["kernel", "info", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&assert_ok(&info, "kernel info")).unwrap();
    assert_eq!(info["origin"]["kind"], "cache", "{info}");
    assert_eq!(info["path"].as_str().unwrap(), path.to_str().unwrap());
    // What the kernel offers beyond umlctl's needs is reported: 6.12 has
    // neither seccomp mode (6.16) nor SMP (6.19), and still the legacy
    // transports; Debian's 6.1 the same.
    let has = |info: &serde_json::Value, name: &str| {
        info["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {info}"))["present"]
            .as_bool()
            .unwrap()
    };
    assert!(!has(&info, "seccomp-mode") && !has(&info, "smp") && has(&info, "legacy-net"));
    let deb = umlctl_in(
        &kcache(),
        ["kernel", "info", "--json", "/usr/bin/linux.uml"],
    );
    let deb: serde_json::Value = serde_json::from_str(&assert_ok(&deb, "kernel info 6.1")).unwrap();
    assert!(!has(&deb, "seccomp-mode") && has(&deb, "legacy-net") && has(&deb, "vector-net"));
    let text = assert_ok(&umlctl_in(&kcache(), ["kernel", "info"]), "kernel info");
    assert!(
        text.contains("userspace: ptrace\n") && text.contains("cpus:      1 (no SMP)"),
        "{text}"
    );
    let out = umlctl_in(&kcache(), ["run", "--", "uname", "-r"]);
    assert!(assert_ok(&out, "run (default kernel)").starts_with("6.12."));

    // An image made by `umlctl image build` with an ACL and a file
    // capability, loop-mounted in the guest: the guest kernel reads both
    // and enforces them (the host's getfacl, getcap and setpriv run in the
    // guest through hostfs).
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("secret"), "acl-granted\n").unwrap();
    fs::write(src.join("secret2"), "cap-granted\n").unwrap();
    for f in ["secret", "secret2"] {
        fs::set_permissions(src.join(f), fs::Permissions::from_mode(0o600)).unwrap();
    }
    fs::copy("/bin/cat", src.join("capcat")).unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg("setfacl -m u:65534:r secret && setcap cap_dac_read_search+ep capcat")
        .current_dir(&src)
        .status()
        .expect("sh");
    assert!(
        st.success(),
        "setfacl/setcap failed (apt-get install acl libcap2-bin)"
    );
    let img = s.path().join("img.ext4");
    assert_ok(
        &umlctl_in(
            &kcache(),
            [
                "image".as_ref(),
                "build".as_ref(),
                "-o".as_ref(),
                img.as_os_str(),
                src.as_os_str(),
            ],
        ),
        "image build",
    );
    let script = "mkdir /tmp/m && mount -o loop,ro img.ext4 /tmp/m && getfacl -n -p /tmp/m/secret && getcap /tmp/m/capcat \
        && N='setpriv --reuid=65534 --regid=65534 --clear-groups' \
        && $N cat /tmp/m/secret && ! $N cat /tmp/m/secret2 2>/dev/null && $N /tmp/m/capcat /tmp/m/secret2";
    let out = umlctl_in(
        &kcache(),
        [
            "run".as_ref(),
            "--kernel".as_ref(),
            path.as_os_str(),
            "-w".as_ref(),
            s.path().as_os_str(),
            "--".as_ref(),
            "sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
        ],
    );
    let text = assert_ok(&out, "ACL and capability checks in the guest");
    assert!(text.contains("user:65534:r--"), "{text}");
    assert!(text.contains("cap_dac_read_search=ep"), "{text}");
    assert!(
        text.contains("acl-granted\n") && text.contains("cap-granted\n"),
        "{text}"
    );
}

#[test]
fn an_option_that_cannot_land_is_named_before_anything_compiles() {
    need_source();
    let cache = kcache();
    let before = umlctl_in(&cache, ["kernel", "list", "--json"]);
    let out = umlctl_in(
        &cache,
        [
            "kernel",
            "build",
            "--source",
            SOURCE,
            "--set",
            "CONFIG_UMLCTL_NO_SUCH_OPTION=y",
            "--set",
            "CONFIG_HOSTFS=y",
        ],
    );
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("CONFIG_UMLCTL_NO_SUCH_OPTION=y (from --set): is absent"),
        "{e}"
    );
    assert!(
        !e.contains("CONFIG_HOSTFS=y (from"),
        "a landed option is not reported: {e}"
    );
    let log = e.split("the log is ").nth(1).unwrap().trim();
    assert!(Path::new(log).is_file(), "{log}");
    // Other tests may install kernels into the shared cache meanwhile (a
    // cold cache): what must not appear is a kernel built from this request.
    let after = umlctl_in(&cache, ["kernel", "list", "--json"]);
    let from_request = |o: &std::process::Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|k| {
                k["meta"]["requested"]
                    .to_string()
                    .contains("UMLCTL_NO_SUCH_OPTION")
            })
            .count()
    };
    assert_eq!(from_request(&before), 0);
    assert_eq!(
        from_request(&after),
        0,
        "a failed build installed something"
    );
}

/// A stand-in source tree whose Makefile answers defconfig, olddefconfig
/// and `linux` quickly (the last by copying Debian's real UML kernel), for
/// the paths of `kernel build` that do not need a real compile: failures,
/// reuse, rebuilds, removal.
fn quick_tree(dir: &Path, linux_rule: &str) -> PathBuf {
    let t = dir.join("tree");
    fs::create_dir_all(t.join("arch/um")).unwrap();
    fs::write(t.join("arch/um/Makefile"), "").unwrap();
    fs::write(t.join("main.c"), "int main;\n").unwrap();
    fs::write(
        t.join("Makefile"),
        format!(
            "defconfig:\n\t@echo 'CONFIG_DEFAULT=y' > $(O)/.config\n\
             olddefconfig:\n\t@sed -i '/CONFIG_DROPPED/d' $(O)/.config\n\
             linux:\n\t@echo '  CC      main.o'\n{linux_rule}"
        ),
    )
    .unwrap();
    t
}

#[test]
fn build_failures_keep_their_log_and_install_nothing() {
    let s = scratch();
    let cache = s.path().join("cache");

    // Not a source tree; configured in place; bad --set; bad fragment.
    let out = umlctl_in(
        &cache,
        [
            "kernel".as_ref(),
            "build".as_ref(),
            "--source".as_ref(),
            s.path().as_os_str(),
        ],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("is not a Linux source tree"),
        "{}",
        stderr(&out)
    );

    let t = quick_tree(s.path(), "\t@echo 'error: boom' >&2; exit 2\n");
    fs::write(t.join(".config"), "").unwrap();
    let out = umlctl_in(
        &cache,
        [
            "kernel".as_ref(),
            "build".as_ref(),
            "--source".as_ref(),
            t.as_os_str(),
        ],
    );
    assert!(stderr(&out).contains("mrproper"), "{}", stderr(&out));
    fs::remove_file(t.join(".config")).unwrap();

    let out = umlctl_in(
        &cache,
        [
            "kernel".as_ref(),
            "build".as_ref(),
            "--source".as_ref(),
            t.as_os_str(),
            "--set".as_ref(),
            "KASAN".as_ref(),
        ],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("expected CONFIG_NAME=value"),
        "{}",
        stderr(&out)
    );

    let frag = s.path().join("frag.config");
    fs::write(&frag, "CONFIG_OK=y\nthis is wrong\n").unwrap();
    let out = umlctl_in(
        &cache,
        [
            "kernel".as_ref(),
            "build".as_ref(),
            "--source".as_ref(),
            t.as_os_str(),
            "--config-fragment".as_ref(),
            frag.as_os_str(),
        ],
    );
    assert!(stderr(&out).contains("frag.config:2"), "{}", stderr(&out));

    // An option the configuration drops is named with the fragment line.
    fs::write(&frag, "CONFIG_OK=y\nCONFIG_DROPPED=y\n").unwrap();
    let out = umlctl_in(
        &cache,
        [
            "kernel".as_ref(),
            "build".as_ref(),
            "--source".as_ref(),
            t.as_os_str(),
            "--config-fragment".as_ref(),
            frag.as_os_str(),
        ],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr(&out).contains("CONFIG_DROPPED=y (from "),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("frag.config:2): is absent"),
        "{}",
        stderr(&out)
    );

    // A failing compile: the error shows the tail and names the kept log.
    let out = umlctl_in(
        &cache,
        [
            "kernel".as_ref(),
            "build".as_ref(),
            "--source".as_ref(),
            t.as_os_str(),
        ],
    );
    assert_eq!(out.status.code(), Some(125));
    let e = stderr(&out);
    assert!(
        e.contains("make linux failed") && e.contains("| error: boom"),
        "{e}"
    );
    let log = e
        .split("the build log is ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    let log_text = fs::read_to_string(log).unwrap();
    assert!(
        log_text.contains("error: boom") && log_text.contains("CC      main.o"),
        "{log_text}"
    );
    let list = umlctl_in(&cache, ["kernel", "list", "--json"]);
    assert_eq!(assert_ok(&list, "list").trim(), "[]");
    assert!(!cache.join("kernels/default").exists());
}

#[test]
fn cached_kernels_are_reused_rebuilt_listed_defaulted_and_removed() {
    let s = scratch();
    let cache = s.path().join("cache");
    let uml = Path::new("/usr/bin/linux.uml");
    assert!(
        uml.is_file(),
        "/usr/bin/linux.uml is missing: apt-get install user-mode-linux"
    );
    let rule = format!(
        "\t@cp {} $(O)/linux && mkdir -p $(O)/include/config && echo 6.1.0-quick > $(O)/include/config/kernel.release\n",
        uml.display()
    );
    let t = quick_tree(s.path(), &rule);
    let build = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "kernel".into(),
            "build".into(),
            "--source".into(),
            t.clone().into(),
            "--json".into(),
        ];
        args.extend(extra.iter().map(Into::into));
        let out = umlctl_in(&cache, &args);
        serde_json::from_str::<serde_json::Value>(&assert_ok(&out, "kernel build")).unwrap()
    };
    let first = build(&[]);
    assert_eq!(first["name"], "6.1.0-quick");
    assert_eq!(
        (first["up_to_date"].clone(), first["made_default"].clone()),
        (false.into(), true.into())
    );
    let installed = PathBuf::from(first["path"].as_str().unwrap());
    assert_eq!(sha256_file(&installed), sha256_file(uml));
    assert_eq!(build(&[])["up_to_date"], true);
    // Editing the source rebuilds; so does --force.
    std::thread::sleep(std::time::Duration::from_millis(10));
    fs::write(t.join("main.c"), "int main = 1;\n").unwrap();
    assert_eq!(build(&[])["up_to_date"], false);
    assert_eq!(build(&[])["up_to_date"], true);
    assert_eq!(build(&["--force"])["up_to_date"], false);
    // Other options: another name; the first stays the default.
    let other = build(&["--set", "CONFIG_EXTRA=y"]);
    let other_name = other["name"].as_str().unwrap().to_string();
    assert!(other_name.starts_with("6.1.0-quick-"), "{other_name}");
    assert_eq!(other["made_default"], false);

    let list = umlctl_in(&cache, ["kernel", "list"]);
    let text = assert_ok(&list, "kernel list");
    assert!(
        text.lines().any(|l| l.starts_with("* 6.1.0-quick ")),
        "{text}"
    );
    assert!(text.contains(&other_name));
    // A kernel placed by hand is listed too, and can be the default.
    let hand = cache.join("kernels/handmade");
    fs::create_dir_all(&hand).unwrap();
    fs::copy(uml, hand.join("linux")).unwrap();
    let text = assert_ok(&umlctl_in(&cache, ["kernel", "list"]), "kernel list");
    assert!(
        text.lines()
            .any(|l| l.contains("handmade") && l.contains("(placed by hand)")),
        "{text}"
    );
    assert_ok(
        &umlctl_in(&cache, ["kernel", "default", "handmade"]),
        "default handmade",
    );
    let info = umlctl_in(&cache, ["kernel", "info", "--json"]);
    let info: serde_json::Value = serde_json::from_str(&assert_ok(&info, "info")).unwrap();
    assert_eq!(
        info["origin"],
        serde_json::json!({"kind": "cache", "name": "handmade"})
    );

    for bad in [
        ["kernel", "default", "nope"],
        ["kernel", "rm", "nope"],
        ["kernel", "default", "../x"],
    ] {
        let out = umlctl_in(&cache, bad);
        assert_eq!(out.status.code(), Some(125), "{bad:?}");
        assert!(
            stderr(&out).contains("nope") || stderr(&out).contains("invalid kernel name"),
            "{}",
            stderr(&out)
        );
    }

    // rm: the kernel, its build directory, and the default mark.
    let build_dir = PathBuf::from(first["meta"]["build_dir"].as_str().unwrap());
    assert!(build_dir.is_dir());
    let out = umlctl_in(&cache, ["kernel", "rm", "6.1.0-quick"]);
    assert!(assert_ok(&out, "rm").contains("and its build directory"));
    assert!(!build_dir.exists() && !installed.exists());
    let out = umlctl_in(&cache, ["kernel", "rm", "handmade"]);
    assert!(assert_ok(&out, "rm handmade").contains("it was the default"));
    assert!(!cache.join("kernels/default").exists());
    let left: Vec<serde_json::Value> = serde_json::from_str(&assert_ok(
        &umlctl_in(&cache, ["kernel", "list", "--json"]),
        "list",
    ))
    .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["name"], other_name.as_str());
}

/// kunit.py's summary counts for a console log: (passed, failed, skipped, crashed).
#[test]
fn the_ktap_parser_agrees_with_kunit_py_on_kunits_own_captured_logs() {
    let data = tree().join("tools/testing/kunit/test_data");
    let mut n = 0;
    for e in fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        if !matches!(p.extension(), Some(x) if x == "log") {
            continue;
        }
        let (kp, kf, ks, kc, k_ok) = kunit_py_counts(&tree(), &p);
        let out = umlctl_in(
            &kcache(),
            [
                "kernel".as_ref(),
                "ktap".as_ref(),
                p.as_os_str(),
                "--json".as_ref(),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            our_counts(&v["report"]),
            (kp, kf, ks, kc),
            "{}",
            p.display()
        );
        // kunit.py exits 1 for every non-pass; we tell crashes (2) apart.
        let code = out.status.code().unwrap();
        if k_ok {
            assert_eq!(code, 0, "{}", p.display());
        } else {
            assert!(code == 1 || code == 2, "{}: {code}", p.display());
        }
        n += 1;
    }
    assert!(n >= 20, "only {n} logs in {}", data.display());
}

#[test]
fn kunit_runs_a_real_suite_and_reports_its_real_counts() {
    need_source();
    let s = scratch();
    let kc = s.path().join("small.kunitconfig");
    fs::write(&kc, SMALL_KUNITCONFIG).unwrap();
    let junit = s.path().join("junit.xml");
    let out = umlctl_in(
        &kcache(),
        [
            "kernel".as_ref(),
            "test".as_ref(),
            "--source".as_ref(),
            SOURCE.as_ref(),
            "--kunitconfig".as_ref(),
            kc.as_os_str(),
            "--junit".as_ref(),
            junit.as_os_str(),
            "--json".as_ref(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&assert_ok(&out, "kernel test")).unwrap();
    assert_eq!(v["exit_code"], 0);
    let o = &v["outcome"];
    let (passed, _, skipped, _) = check_small_kunit_run(o, &tree());
    let xml = fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(&format!("tests=\"{}\"", passed + skipped)),
        "{xml}"
    );
    assert_eq!(xml.matches("<testcase ").count() as u32, passed + skipped);
    // The KUnit kernel is cached but never becomes the default.
    assert!(!o["kernel"]["name"].as_str().unwrap().is_empty());
    assert_eq!(o["kernel"]["made_default"], false);

    // A filter: only the example suite runs.
    let out = umlctl_in(
        &kcache(),
        [
            "kernel".as_ref(),
            "test".as_ref(),
            "--source".as_ref(),
            SOURCE.as_ref(),
            "--kunitconfig".as_ref(),
            kc.as_os_str(),
            "--json".as_ref(),
            "example".as_ref(),
        ],
    );
    let v: serde_json::Value =
        serde_json::from_str(&assert_ok(&out, "kernel test example")).unwrap();
    let names: Vec<&str> = v["outcome"]["report"]["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["example"]);
    assert_eq!(v["outcome"]["kernel"]["up_to_date"], true);

    // A filter that matches nothing is not a pass.
    let out = umlctl_in(
        &kcache(),
        [
            "kernel".as_ref(),
            "test".as_ref(),
            "--source".as_ref(),
            SOURCE.as_ref(),
            "--kunitconfig".as_ref(),
            kc.as_os_str(),
            "no_such_suite*".as_ref(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no tests ran"), "{}", stderr(&out));

    // Too little memory to boot: no KTAP at all is a crash (2), not a pass.
    let out = umlctl_in(
        &kcache(),
        [
            "kernel".as_ref(),
            "test".as_ref(),
            "--source".as_ref(),
            SOURCE.as_ref(),
            "--kunitconfig".as_ref(),
            kc.as_os_str(),
            "--mem".as_ref(),
            "2M".as_ref(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

/// What a command wrote just before it crashed the guest reaches the host:
/// `echo before; echo c > /proc/sysrq-trigger` lost `before` in about half
/// of the runs on 6.12 (the guest init's output relay had not run yet when
/// the kernel died). Both kernels, several runs each. Once in about a
/// hundred runs, on a host loaded by the suite's own kernel builds, the
/// line was still lost (seen once, 2026-12-07, not understood): at most one
/// loss per kernel is tolerated, which the old behaviour (half) fails.
#[test]
fn output_written_just_before_a_guest_crash_is_kept() {
    for k in [built_path(), kernel()] {
        let mut lost = Vec::new();
        for i in 0..6 {
            let out = Command::new(umlctl_bin())
                .arg("run")
                .arg("--kernel")
                .arg(&k)
                .args([
                    "--",
                    "sh",
                    "-c",
                    "echo before; echo c > /proc/sysrq-trigger",
                ])
                .env("UMLCTL_CACHE_DIR", cache_dir())
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
            let got = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                got.is_empty() || got == "before\n",
                "run {i} with {}: {got:?}",
                k.display()
            );
            if got.is_empty() {
                lost.push(format!("run {i}: {}", stderr(&out)));
            }
        }
        assert!(
            lost.len() <= 1,
            "{} of 6 runs with {} lost the output written before the crash:\n{}",
            lost.len(),
            k.display(),
            lost.join("\n")
        );
    }
}
