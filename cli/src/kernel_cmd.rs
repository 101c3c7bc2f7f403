//! `umlctl kernel ...` and `umlctl doctor`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use umlctl_kernel::inspect::Linkage;
use umlctl_kernel::locate::{locate, Located};
use umlctl_kernel::preflight::{self, Check, Level};
use umlctl_kernel::xstate::{self, KernelFp};

use crate::exit;

#[derive(Subcommand)]
pub enum KernelCmd {
    /// Show which kernel would be used and why, its version, linkage and features.
    Info(InfoArgs),
}

#[derive(Args)]
pub struct InfoArgs {
    /// Inspect this kernel instead of the one umlctl would pick.
    path: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct DoctorArgs {
    /// Check against this kernel instead of the one umlctl would pick.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Report as if `run --no-xstate-shim` were used.
    #[arg(long)]
    no_xstate_shim: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn kernel_main(cmd: KernelCmd) -> u8 {
    match cmd {
        KernelCmd::Info(a) => info(a),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

fn info(a: InfoArgs) -> u8 {
    let located = match locate(a.path.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("umlctl: {e}");
            return exit::FAILURE;
        }
    };
    let host = xstate::host_xstate().ok();
    let needs_shim = host.map(|h| located.info.fp.needs_shim(h));
    let shim_path = if needs_shim == Some(true) {
        xstate::shim_path().ok()
    } else {
        None
    };
    if a.json {
        let v = serde_json::json!({
            "path": located.info.path,
            "origin": located.origin,
            "tried": located.tried,
            "version": located.info.version,
            "linkage": located.info.linkage,
            "fp": located.info.fp,
            "features": located.info.features,
            "host_xstate": host,
            "needs_xstate_shim": needs_shim,
            "xstate_shim_path": shim_path,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    print_info(&located, host, needs_shim);
    0
}

fn print_info(l: &Located, host: Option<xstate::HostXstate>, needs_shim: Option<bool>) {
    let i = &l.info;
    println!("kernel:    {}", i.path.display());
    println!("chosen by: {}", l.origin);
    for t in &l.tried {
        println!("  tried {}: {}", t.source, t.outcome);
    }
    println!("version:   {}", i.version);
    match &i.linkage {
        Linkage::Static => println!("linkage:   static"),
        Linkage::Dynamic { interpreter } => println!("linkage:   dynamic ({interpreter})"),
    }
    match i.fp {
        KernelFp::Fixed { bytes } => {
            println!("fp state:  fixed {bytes}-byte XSTATE buffer (UML < 6.13)")
        }
        KernelFp::Dynamic => println!("fp state:  sized at run time (UML ≥ 6.13)"),
    }
    match (host, needs_shim) {
        (Some(h), Some(true)) => {
            let how = match i.linkage {
                Linkage::Dynamic { .. } => "umlctl preloads its xstate shim",
                Linkage::Static => {
                    "but the kernel is static, so the shim cannot help: use a kernel ≥ 6.13"
                }
            };
            println!(
                "xstate:    host XSAVE area {} bytes is larger than the kernel handles; {how}",
                h.bytes()
            );
        }
        (Some(h), _) => println!(
            "xstate:    host XSAVE area {} bytes; no shim needed",
            h.bytes()
        ),
        (None, _) => println!("xstate:    could not measure the host (see `umlctl doctor`)"),
    }
    println!("features:");
    for f in &i.features {
        println!(
            "  {:<13} {:<4} {:<27} {}",
            f.name,
            yes(f.present),
            f.config,
            f.used_for
        );
    }
}

fn level(l: Level) -> &'static str {
    match l {
        Level::Ok => "ok",
        Level::Warn => "warn",
        Level::Fail => "FAIL",
    }
}

pub fn doctor_main(a: DoctorArgs) -> u8 {
    let located = locate(a.kernel.as_deref());
    let kernel_check = match &located {
        Ok(l) => Check {
            name: "kernel",
            level: Level::Ok,
            detail: format!(
                "{} ({}, {}) via {}",
                l.info.path.display(),
                l.info.version,
                match l.info.linkage {
                    Linkage::Static => "static",
                    Linkage::Dynamic { .. } => "dynamic",
                },
                l.origin
            ),
            fix: None,
        },
        Err(e) => Check {
            name: "kernel",
            level: Level::Fail,
            detail: e.to_string().lines().next().unwrap_or_default().to_string(),
            fix: Some(e.to_string().lines().skip(1).collect::<Vec<_>>().join("\n")),
        },
    };
    let mut checks = vec![kernel_check];
    checks.extend(preflight::host_checks(
        located.as_ref().ok().map(|l| &l.info),
        !a.no_xstate_shim,
    ));
    let failed = checks.iter().any(|c| c.level == Level::Fail);
    if a.json {
        let v = serde_json::json!({ "ok": !failed, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for c in &checks {
            println!("{:<5} {:<18} {}", level(c.level), c.name, c.detail);
            if let Some(f) = &c.fix {
                for line in f.lines() {
                    println!("{:<24} fix: {line}", "");
                }
            }
        }
    }
    if failed {
        exit::CHECK_FAILED
    } else {
        0
    }
}
