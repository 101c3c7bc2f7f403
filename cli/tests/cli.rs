//! Argument handling of the binary. (Having an integration test here also
//! makes `cargo test --workspace` build `target/<profile>/umlctl`, which the
//! end-to-end suite in `tests/` drives.)

use std::process::Command;

fn umlctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_umlctl"))
}

#[test]
fn version_and_help_exit_zero() {
    let out = umlctl().arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("umlctl "));
    let out = umlctl().args(["run", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--image",
        "--mem",
        "--env",
        "--workdir",
        "--timeout",
        "--console-log",
        "--no-xstate-shim",
        "--json",
    ] {
        assert!(help.contains(opt), "run --help lacks {opt}");
    }
}

#[test]
fn usage_errors_exit_125() {
    for args in [
        &["frobnicate"][..],
        &["run"],
        &["run", "--timeout", "-1", "--", "true"],
        &["kernel"],
    ] {
        let out = umlctl().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(125),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn guest_init_refuses_to_run_on_the_host() {
    let out = umlctl().arg("guest-init").output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PID 1"));
}
