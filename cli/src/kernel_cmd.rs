//! `umlctl kernel ...` and `umlctl doctor`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use umlctl_kernel::build::{self, BuildSpec};
use umlctl_kernel::cache;
use umlctl_kernel::inspect::Linkage;
use umlctl_kernel::ktap;
use umlctl_kernel::kunit::{self, KunitSpec};
use umlctl_kernel::locate::{locate, Located};
use umlctl_kernel::preflight::{self, Check, Level};
use umlctl_kernel::xstate::{self, KernelFp};

use crate::exit;
use crate::fmt::{human, utc};
use crate::progress::BuildBar;

#[derive(Subcommand)]
pub enum KernelCmd {
    /// Show which kernel would be used and why, its version, linkage and features.
    Info(InfoArgs),
    /// Build a UML kernel from source (out of tree) into umlctl's kernel cache.
    Build(BuildArgs),
    /// List the kernels in the cache.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Make a cached kernel the default for `run` and `start`.
    Default(NameArg),
    /// Remove a kernel (and its build directory) from the cache.
    #[command(alias = "remove")]
    Rm(NameArg),
    /// Build a KUnit kernel from source, boot it, and report the in-kernel tests.
    Test(TestArgs),
    /// Parse a saved kernel console log's KTAP results (like `kunit.py parse`).
    Ktap(KtapArgs),
}

#[derive(Args)]
pub struct KtapArgs {
    /// The console log; `-` reads stdin.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Write the results as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TestArgs {
    /// A Linux source directory, or a tarball of one.
    #[arg(long, value_name = "DIR|TARBALL")]
    source: PathBuf,
    /// The KUnit config (default: the tree's .kunitconfig, else tools/testing/kunit/configs/default.config).
    #[arg(long, value_name = "FILE")]
    kunitconfig: Option<PathBuf>,
    /// Run only matching suites (glob), or `suite.case`.
    #[arg(value_name = "FILTER_GLOB")]
    filter: Option<String>,
    /// One more kernel option for the test kernel; repeatable.
    #[arg(long = "set", value_name = "CONFIG_X=VALUE")]
    sets: Vec<String>,
    /// Seconds the kernel may run before it counts as hung (exit 124).
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    timeout: u64,
    /// Guest memory.
    #[arg(long, default_value = "1G")]
    mem: String,
    #[command(flatten)]
    jail: crate::run_cmd::JailArgs,
    /// Parallel make jobs (default: the number of CPUs).
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Write the results as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BuildArgs {
    /// A Linux source directory, or a tarball of one (extracted into the cache once).
    #[arg(long, value_name = "DIR|TARBALL")]
    source: PathBuf,
    /// Name in the cache (default: the kernel release, plus a digest of the options when any are given).
    #[arg(long)]
    name: Option<String>,
    /// A config fragment (CONFIG_X=y lines) applied after defconfig and umlctl's options; repeatable.
    #[arg(long = "config-fragment", value_name = "FILE")]
    fragments: Vec<PathBuf>,
    /// One option, applied last; repeatable (CONFIG_X=n turns one off).
    #[arg(long = "set", value_name = "CONFIG_X=VALUE")]
    sets: Vec<String>,
    /// Parallel make jobs (default: the number of CPUs).
    #[arg(long, short = 'j', value_name = "N")]
    jobs: Option<usize>,
    /// Rebuild even when the cached kernel is up to date.
    #[arg(long)]
    force: bool,
    /// Build for debugging: debug information, frame pointers and the kernel's gdb scripts (kept beside the kernel), for `run --gdb` and `umlctl debug` (the default name gets `-debug`).
    #[arg(long)]
    debug: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct NameArg {
    /// The kernel's name in the cache (see `umlctl kernel list`).
    name: String,
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
        KernelCmd::Build(a) => build(a),
        KernelCmd::List(a) => list(a),
        KernelCmd::Default(a) => set_default(a),
        KernelCmd::Rm(a) => rm(a),
        KernelCmd::Test(a) => test(a),
        KernelCmd::Ktap(a) => ktap_file(a),
    }
}

fn fail(e: impl std::fmt::Display) -> u8 {
    eprintln!("umlctl: {e}");
    exit::FAILURE
}

fn build(a: BuildArgs) -> u8 {
    let spec = BuildSpec {
        source: a.source,
        name: a.name,
        fragments: a.fragments,
        sets: a.sets,
        extra: vec![],
        base: build::Base::Umlctl,
        jobs: a.jobs,
        force: a.force,
        debug: a.debug,
    };
    let obs = BuildBar::new();
    let built = match build::build(&spec, &obs) {
        Ok(b) => b,
        Err(e) => {
            obs.done();
            return fail(e);
        }
    };
    obs.done();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&built).unwrap_or_default()
        );
        return 0;
    }
    let m = &built.meta;
    if built.up_to_date {
        println!(
            "{}: up to date ({}, {})",
            built.name,
            m.version,
            built.path.display()
        );
    } else {
        println!(
            "{}: built {} in {:.0} s, installed as {}",
            built.name,
            m.version,
            m.build_secs,
            built.path.display()
        );
        println!("  build log: {}", m.log.display());
    }
    if built.made_default {
        println!("  it is now the default kernel (`umlctl kernel default NAME` changes that)");
    }
    0
}

fn status_word(s: ktap::Status) -> &'static str {
    match s {
        ktap::Status::Passed => "PASSED",
        ktap::Status::Failed => "FAILED",
        ktap::Status::Skipped => "SKIPPED",
        ktap::Status::Crashed => "CRASHED",
    }
}

/// One line per suite; failing and crashed cases with their log lines.
fn print_tests(tests: &[ktap::Test], depth: usize) {
    let pad = "    ".repeat(depth);
    for t in tests {
        let mut line = format!("{pad}[{}] {}", status_word(t.status), t.name);
        if let Some(r) = &t.reason {
            line.push_str(&format!(" ({r})"));
        }
        let bad = matches!(t.status, ktap::Status::Failed | ktap::Status::Crashed);
        if depth == 0 || bad {
            println!("{line}");
        }
        if bad {
            if t.subtests.is_empty() {
                for l in t.log.iter().take(40) {
                    println!("{pad}    {l}");
                }
            }
            print_tests(&t.subtests, depth + 1);
        }
    }
}

fn test(a: TestArgs) -> u8 {
    let spec = KunitSpec {
        source: a.source,
        kunitconfig: a.kunitconfig,
        filter_glob: a.filter,
        sets: a.sets,
        jobs: a.jobs,
        timeout: std::time::Duration::from_secs(a.timeout),
        mem: a.mem,
        jail: a.jail.opts(),
    };
    let obs = BuildBar::new();
    let out = kunit::test(&spec, &obs);
    obs.done();
    let out = match out {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let code = exit_code(&out.report, out.timed_out);
    if let Err(e) = write_junit(&out.report, a.junit.as_deref(), &out.kernel.meta.version) {
        return fail(e);
    }
    if a.json {
        let v = serde_json::json!({ "exit_code": code, "outcome": out });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return code;
    }
    print_summary(
        &out.report,
        &format!("on {} in {:.1} s", out.kernel.name, out.run_secs),
    );
    let log = out.console_log.display();
    if out.timed_out {
        eprintln!(
            "umlctl: the kernel was still running after {} s and was stopped (hung?); its console is in {log}",
            a.timeout
        );
    } else {
        explain(&out.report, &format!("; its console is in {log}"));
    }
    if code == exit::KERNEL_CRASHED || code == exit::TIMEOUT {
        eprintln!("umlctl: the console ended with:");
        eprintln!("{}", umlctl_kernel::detached::tail(&out.console_log, 8));
    }
    code
}

/// 124 hung, 2 crashed (or no KTAP at all), 0 passed, 1 failed or nothing ran.
fn exit_code(r: &ktap::Report, timed_out: bool) -> u8 {
    if timed_out {
        exit::TIMEOUT
    } else if r.crashed() || !r.found {
        exit::KERNEL_CRASHED
    } else if r.passed() {
        0
    } else {
        exit::TESTS_FAILED
    }
}

fn write_junit(
    r: &ktap::Report,
    path: Option<&std::path::Path>,
    version: &str,
) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let xml = ktap::junit(r, &format!("kunit {version}"));
    std::fs::write(path, xml).map_err(|e| format!("write {}: {e}", path.display()))
}

fn print_summary(r: &ktap::Report, how: &str) {
    let c = r.counts;
    print_tests(&r.tests, 0);
    println!("{}", "=".repeat(60));
    let mut parts = vec![format!("passed: {}", c.passed)];
    for (n, what) in [
        (c.failed, "failed"),
        (c.skipped, "skipped"),
        (c.crashed, "crashed"),
    ] {
        if n > 0 {
            parts.push(format!("{what}: {n}"));
        }
    }
    println!("Ran {} tests {how}: {}", c.total(), parts.join(", "));
}

/// Why the result is not a pass, on stderr.
fn explain(r: &ktap::Report, more: &str) {
    if !r.found {
        eprintln!("umlctl: no KTAP output (is CONFIG_KUNIT on, and did the kernel boot?){more}");
    } else if r.crashed() {
        eprintln!(
            "umlctl: the kernel crashed or stopped before every test reported{}{more}",
            r.crash
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default(),
        );
    } else if r.counts.total() == 0 {
        eprintln!("umlctl: no tests ran (does the filter match any suite?)");
    } else if r.counts.passed == 0 && r.counts.failed == 0 {
        eprintln!("umlctl: every test was skipped, so nothing was tested");
    }
}

fn ktap_file(a: KtapArgs) -> u8 {
    let text = if a.file.as_os_str() == "-" {
        let mut b = Vec::new();
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut b) {
            return fail(format!("read stdin: {e}"));
        }
        b
    } else {
        match std::fs::read(&a.file) {
            Ok(b) => b,
            Err(e) => return fail(format!("read {}: {e}", a.file.display())),
        }
    };
    let r = ktap::parse(&String::from_utf8_lossy(&text));
    let code = exit_code(&r, false);
    if let Err(e) = write_junit(&r, a.junit.as_deref(), "") {
        return fail(e);
    }
    if a.json {
        let v = serde_json::json!({ "exit_code": code, "report": r });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return code;
    }
    print_summary(&r, &format!("in {}", a.file.display()));
    explain(&r, "");
    code
}

fn list(a: ListArgs) -> u8 {
    let entries = match cache::list() {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).unwrap_or_default()
        );
        return 0;
    }
    if entries.is_empty() {
        let dir = cache::dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        eprintln!("no kernels in {dir}; `umlctl kernel build --source DIR` makes one");
        return 0;
    }
    println!(
        "{:<2}{:<28} {:<14} {:>9}  {:<23} SOURCE",
        "", "NAME", "VERSION", "SIZE", "BUILT"
    );
    for e in &entries {
        let (version, built, source) = match &e.meta {
            Some(m) => (
                m.version.clone(),
                utc(i64::try_from(m.built_at).unwrap_or(i64::MAX)),
                m.source.display().to_string(),
            ),
            None => ("?".into(), "-".into(), "(placed by hand)".into()),
        };
        println!(
            "{:<2}{:<28} {:<14} {:>9}  {:<23} {source}",
            if e.is_default { "*" } else { "" },
            e.name,
            version,
            human(e.size),
            built
        );
    }
    0
}

fn set_default(a: NameArg) -> u8 {
    match cache::set_default(&a.name) {
        Ok(()) => {
            println!("{}: now the default kernel", a.name);
            0
        }
        Err(e) => fail(e),
    }
}

fn rm(a: NameArg) -> u8 {
    match cache::remove(&a.name) {
        Ok(r) => {
            println!("{}: removed", r.name);
            if let Some(b) = r.build_dir {
                println!("  and its build directory {}", b.display());
            }
            if r.was_default {
                println!("  it was the default kernel; none is now (`umlctl kernel default NAME`)");
            }
            0
        }
        Err(e) => fail(e),
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
            "libs": located.info.libs,
            "host_xstate": host,
            "needs_xstate_shim": needs_shim,
            "xstate_shim_path": shim_path,
            "symbols": located.info.symbols,
            "debug_info": located.info.debug_info,
            "gdb_helpers": umlctl_kernel::gdb::helpers_for(&located.info.path),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    print_info(&located, host, needs_shim);
    0
}

/// What a kernel offers beyond what umlctl requires, in one line.
fn supports(i: &umlctl_kernel::inspect::KernelInfo) -> String {
    let mut net = vec!["vector"];
    if i.has("legacy-net") {
        net.push("legacy tuntap/daemon");
    }
    format!(
        "userspace {}; {}; net {}; virtio {}",
        if i.has("seccomp-mode") {
            "ptrace or seccomp"
        } else {
            "ptrace only"
        },
        if i.has("smp") { "SMP" } else { "1 CPU" },
        net.join(", "),
        if i.has("virtio") { "yes" } else { "no" }
    )
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
        Linkage::Dynamic { interpreter } => println!(
            "linkage:   dynamic ({interpreter}; its jail holds {} libraries)",
            i.libs.len()
        ),
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
    let modes = if i.has("seccomp-mode") {
        "ptrace (default), seccomp (faster; guest processes can reach the guest kernel's memory)"
    } else {
        "ptrace"
    };
    println!("userspace: {modes}");
    println!(
        "cpus:      {}",
        if i.has("smp") {
            "several (SMP kernel)"
        } else {
            "1 (no SMP)"
        }
    );
    let helpers = umlctl_kernel::gdb::helpers_for(&i.path);
    println!(
        "debugging: {}",
        match (i.debug_info, i.symbols, &helpers) {
            (true, _, Some(h)) => format!("debug info, gdb helpers ({})", h.display()),
            (true, _, None) => "debug info (no gdb helpers beside it)".to_string(),
            (false, true, _) => {
                "symbols only (`kernel build --debug` adds source lines and the gdb helpers)"
                    .to_string()
            }
            (false, false, _) => {
                "stripped: gdb sees addresses only (`kernel build --debug` makes a kernel to debug)"
                    .to_string()
            }
        }
    );
    println!("features:");
    for f in &i.features {
        println!(
            "  {:<15} {:<4} {:<27} {}",
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
                "{} ({}, {}) via {}; {}",
                l.info.path.display(),
                l.info.version,
                match l.info.linkage {
                    Linkage::Static => "static",
                    Linkage::Dynamic { .. } => "dynamic",
                },
                l.origin,
                supports(&l.info)
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
