// A build script: cargo sets what it reads, and a failure is a build error.
#![allow(clippy::expect_used, clippy::unwrap_used)]
//! Builds the xstate compatibility shim (`shim/xstate_shim.c`) into a shared
//! object that the crate embeds with `include_bytes!` and writes out,
//! content-addressed, when a guest needs it (see `src/xstate.rs`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("shim/xstate_shim.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("xstate_shim.so");

    let compiler = cc::Build::new()
        .opt_level(2)
        .pic(true)
        .cargo_metadata(false)
        .get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror"])
        .arg("-Wl,--build-id=none")
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .arg("-ldl");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler to build {}: {e}; install gcc (apt-get install build-essential)", src.display()));
    if !status.success() {
        panic!(
            "building {} failed ({status}); the command was {cmd:?}",
            src.display()
        );
    }
}
