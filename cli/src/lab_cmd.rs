//! `umlctl lab`: Kathará/Netkit lab directories (the plan and its picture;
//! starting labs builds on these).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{Args, Subcommand};
use umlctl_lab::{runtime, Lab};

use crate::exit;

/// `umlctl lab …`
#[derive(Subcommand)]
pub enum LabCmd {
    /// Check a lab and show its plan: devices, interfaces and MACs, collision domains, start order.
    Info(InfoArgs),
    /// Draw the lab's topology with Graphviz (DOT, SVG or PNG, by the output's extension).
    Graph(GraphArgs),
    /// Start every device of the lab (detached UML guests on the lab's own segments) and run
    /// their startup scripts in lab.dep order; returns when all have finished.
    Start(StartArgs),
    /// Run the devices' shutdown scripts, stop them, and remove everything the lab made.
    Stop(StopArgs),
    /// The running lab's devices: state, interfaces, startup status.
    Ps(PsArgs),
    /// Run a command in a device of the running lab (as `umlctl exec`).
    Exec(LabExecArgs),
    /// Attach to a device's console (detach with Ctrl-]).
    Console(LabConsoleArgs),
    /// Open a shell in a device (as Kathará's `connect`): lab.conf's DEVICE[shell], else bash,
    /// else sh, on a terminal.
    Connect(LabConnectArgs),
    /// Debug a device's kernel with gdb (as `umlctl debug`): the device stops while gdb holds it
    /// and runs on after.
    Debug(LabDebugArgs),
    /// Stop one device and start it again, fresh, on the same segments (startup scripts run).
    Restart(RestartArgs),
    /// Check the running lab against saved signatures: every device's addresses and routes,
    /// and the output of _test/shared.test and _test/DEVICE.test run in it.
    Test(TestArgs),
    /// Give the host back the memory the devices hold but do not use (`lab start` does this once
    /// every startup script has finished): their page cache and free pages, as `umlctl reclaim`.
    Reclaim(LabReclaimArgs),
}

/// `lab reclaim`
#[derive(Args)]
pub struct LabReclaimArgs {
    #[command(flatten)]
    lab: LabDir,
    /// The devices (default: all).
    devices: Vec<String>,
    /// Keep the devices' page cache (return only memory they already freed).
    #[arg(long)]
    keep_cache: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `lab restart`
#[derive(Args)]
pub struct RestartArgs {
    #[command(flatten)]
    lab: LabDir,
    /// The device.
    device: String,
    /// Seconds it may take to run its shutdown scripts, and then to shut down.
    #[arg(long, value_name = "SECS", default_value = "10")]
    timeout: u64,
    /// Leave the device's memory as its startup left it (by default its page cache and free
    /// memory go back to the host, as after `lab start`).
    #[arg(long)]
    no_reclaim: bool,
}

/// `lab test`
#[derive(Args)]
#[command(
    after_help = "Signatures live in DIR/_test/signature/DEVICE: save them from a reference run of \
the lab with --save, then any run of it (a student's, a CI job's) is compared line by line. Exit \
status: 0 every device matches (or --save wrote them all), 1 some device differs or has no signature, \
125 the lab is not running or a test could not run."
)]
pub struct TestArgs {
    #[command(flatten)]
    lab: LabDir,
    /// Write each device's output as its signature instead of comparing.
    #[arg(long)]
    save: bool,
}

/// `lab start`
#[derive(Args)]
#[command(
    after_help = "Rootless: the lab's bridges and taps live in a user and network namespace of its own \
(/dev/net/tun must be 0666, as on stock Debian, Ubuntu and Fedora). A lab.ext file (`DOMAIN IFACE`, \
`DOMAIN IFACE.VLAN`, `DOMAIN BRIDGE`) puts collision domains on the host's interfaces: as root, or, \
without root, on bridges netd lets you use. Exit status: 0 all startup \
scripts succeeded, 1 some failed (named, with the tail of their output; the lab keeps running), \
125 the lab could not be started (nothing is left running).\n\n\
Example:\n  umlctl lab start -d ospf-lab --image debian-frr.ext4\n  \
umlctl lab start --image base.ext4 --image-for kathara/frr=frr.ext4"
)]
pub struct StartArgs {
    #[command(flatten)]
    lab: LabDir,
    /// The image (ext4) of every device whose lab.conf `image` is not given by --image-for.
    #[arg(long, value_name = "IMG")]
    image: Option<PathBuf>,
    /// The image file for devices with DEVICE[image]="NAME" in lab.conf. Repeatable.
    #[arg(long = "image-for", value_name = "NAME=IMG")]
    image_for: Vec<String>,
    /// UML kernel binary (default: umlctl's default kernel).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Memory of devices without DEVICE[mem] (default 256M).
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Apply an option to every device, as lab.conf's DEVICE[OPTION]: mem=SIZE, cpus=N or
    /// image=NAME. Repeatable.
    #[arg(short = 'o', long = "option", value_name = "OPTION=VALUE")]
    options: Vec<String>,
    /// Seconds a device's kernel may take to start its init.
    #[arg(long, value_name = "SECS", default_value = "120")]
    boot_timeout: u64,
    /// Seconds the startup scripts of one lab.dep step may take.
    #[arg(long, value_name = "SECS", default_value = "600")]
    startup_timeout: u64,
    /// Check the lab and the images and print what would start, without starting anything.
    #[arg(long)]
    dry_run: bool,
    /// Leave the devices' memory as the startup scripts left it (by default the page cache and
    /// free memory the devices hold go back to the host once all startup scripts have finished;
    /// see `umlctl reclaim`).
    #[arg(long)]
    no_reclaim: bool,
    /// netd's socket, for lab.ext lines naming netd's bridges when not root (default:
    /// $UMLCTL_NETD_SOCKET, else netd's own)
    #[arg(long, value_name = "PATH")]
    netd_socket: Option<PathBuf>,
    #[command(flatten)]
    jail: crate::run_cmd::JailArgs,
}

/// `lab stop`
#[derive(Args)]
pub struct StopArgs {
    #[command(flatten)]
    lab: LabDir,
    /// Seconds each device may take to run its shutdown scripts, and then to shut down (on
    /// Ctrl-Alt-Del) before it is halted.
    #[arg(long, value_name = "SECS", default_value = "10")]
    timeout: u64,
}

/// `lab ps`
#[derive(Args)]
pub struct PsArgs {
    #[command(flatten)]
    lab: LabDir,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `lab exec`
#[derive(Args)]
pub struct LabExecArgs {
    #[command(flatten)]
    lab: LabDir,
    #[command(flatten)]
    exec: crate::guest_cmd::ExecArgs,
}

/// `lab console`
#[derive(Args)]
pub struct LabConsoleArgs {
    #[command(flatten)]
    lab: LabDir,
    /// The device.
    device: String,
}

/// `lab connect`
#[derive(Args)]
pub struct LabConnectArgs {
    #[command(flatten)]
    lab: LabDir,
    /// The device.
    device: String,
    /// The shell and its arguments (default: lab.conf's DEVICE[shell], else bash if the device
    /// has it, else sh).
    #[arg(long, value_name = "SHELL")]
    shell: Option<String>,
}

/// `lab debug`
#[derive(Args)]
pub struct LabDebugArgs {
    #[command(flatten)]
    lab: LabDir,
    /// The device.
    device: String,
    #[command(flatten)]
    gdb: crate::run_cmd::GdbArgs,
}

/// The lab directory, as every `lab` subcommand takes it.
#[derive(Args)]
pub struct LabDir {
    /// The lab directory (default: the current directory).
    #[arg(
        short = 'd',
        long = "directory",
        value_name = "DIR",
        default_value = "."
    )]
    dir: PathBuf,
}

/// `lab info`
#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    lab: LabDir,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// `lab graph`
#[derive(Args)]
pub struct GraphArgs {
    #[command(flatten)]
    lab: LabDir,
    /// Write here: FILE.dot (DOT), FILE.svg, FILE.png or FILE.pdf (drawn by Graphviz's `dot`);
    /// default: DOT on stdout. A FILE that is not a regular file (/dev/null, a FIFO) is written in place.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// The format, when FILE's extension does not say it: dot, svg, png or pdf.
    #[arg(long, value_name = "FORMAT", value_parser = ["dot", "svg", "png", "pdf"])]
    format: Option<String>,
}

/// Run a `lab` subcommand.
pub fn main(cmd: LabCmd) -> u8 {
    let r = match cmd {
        LabCmd::Info(a) => info(&a),
        LabCmd::Graph(a) => graph(&a),
        LabCmd::Start(a) => return start(&a),
        LabCmd::Stop(a) => stop(&a),
        LabCmd::Ps(a) => ps(&a),
        LabCmd::Exec(mut a) => {
            return match runtime::device_guest(&a.lab.dir, &a.exec.name) {
                Ok(g) => {
                    a.exec.name = g;
                    crate::guest_cmd::exec(a.exec)
                }
                Err(e) => {
                    eprintln!("umlctl: {e}");
                    exit::FAILURE
                }
            }
        }
        LabCmd::Test(a) => return test(&a),
        LabCmd::Reclaim(a) => reclaim(&a),
        LabCmd::Restart(a) => {
            return match runtime::restart(
                &a.lab.dir,
                &a.device,
                std::time::Duration::from_secs(a.timeout.max(1)),
            ) {
                Ok(failed) => {
                    if !a.no_reclaim {
                        reclaim_after_start(&a.lab.dir, &a.device);
                    }
                    match failed {
                        None => {
                            println!("{}: restarted", a.device);
                            0
                        }
                        Some(f) => {
                            eprintln!("umlctl: device {}: {}:\n{}", f.device, f.why, f.tail);
                            exit::CHECK_FAILED
                        }
                    }
                }
                Err(e) => {
                    eprintln!("umlctl: lab restart: {e}");
                    exit::FAILURE
                }
            }
        }
        LabCmd::Debug(a) => {
            return match runtime::device_guest(&a.lab.dir, &a.device) {
                Ok(g) => crate::guest_cmd::debug_named(g, &a.gdb),
                Err(e) => {
                    eprintln!("umlctl: {e}");
                    exit::FAILURE
                }
            }
        }
        LabCmd::Connect(a) => return connect(&a),
        LabCmd::Console(a) => {
            return match runtime::device_guest(&a.lab.dir, &a.device) {
                Ok(g) => crate::guest_cmd::console_named(g),
                Err(e) => {
                    eprintln!("umlctl: {e}");
                    exit::FAILURE
                }
            }
        }
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umlctl: {e}");
            exit::FAILURE
        }
    }
}

/// The argv of a device's shell: `--shell`, else lab.conf's
/// `DEVICE[shell]`, else bash where the device has it, else sh.
fn shell_argv(given: Option<&str>, conf: Option<&str>) -> Vec<String> {
    match given.or(conf).map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => s.split_whitespace().map(String::from).collect(),
        None => vec![
            "/bin/sh".into(),
            "-c".into(),
            "if command -v bash >/dev/null 2>&1; then exec bash; fi; exec sh".into(),
        ],
    }
}

fn connect(a: &LabConnectArgs) -> u8 {
    let guest = match runtime::device_guest(&a.lab.dir, &a.device) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("umlctl: {e}");
            return exit::FAILURE;
        }
    };
    // The lab as its directory says now (warnings were shown at start).
    let conf = Lab::load(&a.lab.dir).ok().and_then(|l| {
        l.devices
            .into_iter()
            .find(|d| d.name == a.device)
            .and_then(|d| d.options.shell)
    });
    let spec = umlctl_kernel::execproto::ExecSpec {
        argv: shell_argv(a.shell.as_deref(), conf.as_deref()),
        tty: true,
        stdin: true,
        term: std::env::var("TERM").ok(),
        ..Default::default()
    };
    match umlctl_kernel::exec::exec(&guest, &spec) {
        Ok(code) => u8::try_from(code.clamp(0, 255)).unwrap_or(u8::MAX),
        Err(e) => {
            eprintln!("umlctl: {e}");
            exit::FAILURE
        }
    }
}

fn load(dir: &Path) -> Result<Lab, String> {
    let lab = Lab::load(dir).map_err(|e| format!("lab {}: {e}", dir.display()))?;
    for w in &lab.warnings {
        eprintln!("umlctl: warning: {w}");
    }
    Ok(lab)
}

fn info(a: &InfoArgs) -> Result<(), String> {
    let lab = load(&a.lab.dir)?;
    if a.json {
        let text = serde_json::to_string_pretty(&lab).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    let m = &lab.meta;
    println!(
        "lab {}{}",
        m.name.as_deref().unwrap_or("(no LAB_NAME)"),
        m.description
            .as_deref()
            .map(|d| format!(" — {d}"))
            .unwrap_or_default()
    );
    for (k, v) in [
        ("version", &m.version),
        ("author", &m.author),
        ("email", &m.email),
        ("web", &m.web),
    ] {
        if let Some(v) = v {
            println!("  {k}: {v}");
        }
    }
    println!("devices:");
    for d in &lab.devices {
        let mut extra = Vec::new();
        if let Some(i) = &d.options.image {
            extra.push(format!("image {i}"));
        }
        if d.options.bridged {
            extra.push("bridged".into());
        }
        if d.startup {
            extra.push("startup".into());
        }
        if d.tree {
            extra.push(format!("{}/ tree", d.name));
        }
        if !d.after.is_empty() {
            extra.push(format!("after {}", d.after.join(" ")));
        }
        println!(
            "  {}{}",
            d.name,
            if extra.is_empty() {
                String::new()
            } else {
                format!(" ({})", extra.join(", "))
            }
        );
        for i in &d.interfaces {
            println!("    {} {} on {}", i.name, i.mac, i.domain);
        }
    }
    println!("collision domains:");
    for c in &lab.domains {
        let members: Vec<String> = c.members.iter().map(|(d, i)| format!("{d}.{i}")).collect();
        println!("  {}: {}", c.name, members.join(" "));
    }
    println!("start order:");
    for (n, w) in lab.waves.iter().enumerate() {
        println!("  {}. {}", n + 1, w.join(" "));
    }
    if lab.shared {
        println!("shared/ is mounted at /shared in every device");
    }
    if !lab.externals.is_empty() {
        println!("on host interfaces (lab.ext, root only):");
        for e in &lab.externals {
            println!("  {}: {}", e.domain, e.host_name());
        }
    }
    Ok(())
}

fn graph(a: &GraphArgs) -> Result<(), String> {
    let lab = load(&a.lab.dir)?;
    // A running lab's addresses go beside its interfaces.
    let addrs = match runtime::load_state(&a.lab.dir) {
        Ok(Some(s)) => runtime::addresses(&s),
        _ => BTreeMap::new(),
    };
    let dot = lab.dot(&addrs);
    let Some(out) = &a.output else {
        return match a.format.as_deref() {
            None | Some("dot") => {
                print!("{dot}");
                Ok(())
            }
            Some(f) => std::io::stdout()
                .write_all(&render(&dot, f)?)
                .map_err(|e| format!("write stdout: {e}")),
        };
    };
    let ext = out.extension().and_then(|e| e.to_str());
    let format = match (a.format.as_deref(), ext) {
        (Some("dot"), _) | (None, Some("dot" | "gv")) => None,
        (Some(f), _) => Some(f),
        (None, Some(f @ ("svg" | "png" | "pdf"))) => Some(f),
        (None, _) => {
            return Err(format!(
                "{}: name the output FILE.dot, FILE.svg, FILE.png or FILE.pdf, or give --format",
                out.display()
            ))
        }
    };
    let bytes = match format {
        None => dot.into_bytes(),
        Some(f) => render(&dot, f)?,
    };
    crate::image_cmd::write_atomic(out, &bytes)
}

/// Graphviz's `dot -T FORMAT`, fed the graph on stdin.
fn render(dot: &str, format: &str) -> Result<Vec<u8>, String> {
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "run Graphviz's dot: {e} (install it: apt-get install graphviz; or write FILE.dot)"
            )
        })?;
    let mut stdin = child.stdin.take().ok_or("dot: no stdin")?;
    let text = dot.to_string();
    let w = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().map_err(|e| format!("dot: {e}"))?;
    let _ = w.join();
    if !out.status.success() {
        return Err(format!(
            "Graphviz's dot failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

fn start_options(a: &StartArgs, lab: &mut Lab) -> Result<runtime::StartOptions, String> {
    let mut o = runtime::StartOptions {
        image: a.image.clone(),
        kernel: a.kernel.clone(),
        jail: a.jail.opts(),
        boot_timeout: Some(std::time::Duration::from_secs(a.boot_timeout.max(1))),
        startup_timeout: Some(std::time::Duration::from_secs(a.startup_timeout.max(1))),
        reclaim: !a.no_reclaim,
        netd_socket: a.netd_socket.clone(),
        ..Default::default()
    };
    for kv in &a.image_for {
        let (name, file) = kv
            .split_once('=')
            .filter(|(n, f)| !n.is_empty() && !f.is_empty())
            .ok_or_else(|| format!("--image-for {kv:?}: expected NAME=IMG (NAME as lab.conf's DEVICE[image] says it)"))?;
        o.image_for.insert(name.to_string(), PathBuf::from(file));
    }
    if let Some(m) = &a.mem {
        o.mem_bytes =
            Some(umlctl_kernel::cmdline::parse_size(m).map_err(|e| format!("--mem {m:?}: {e}"))?);
    }
    for kv in &a.options {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("-o {kv:?}: expected OPTION=VALUE"))?;
        for d in &mut lab.devices {
            match k {
                "mem" => {
                    d.options.mem = Some(
                        umlctl_kernel::cmdline::parse_size(v)
                            .map_err(|e| format!("-o mem={v}: {e}"))?,
                    )
                }
                "cpus" => {
                    d.options.cpus = Some(
                        v.parse()
                            .ok()
                            .filter(|n| *n >= 1)
                            .ok_or_else(|| format!("-o cpus={v}: expected a number of CPUs, 1 or more"))?,
                    )
                }
                "image" => d.options.image = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "-o {k}: lab start applies mem, cpus and image to every device; set other options in lab.conf"
                    ))
                }
            }
        }
    }
    Ok(o)
}

fn start(a: &StartArgs) -> u8 {
    let mut lab = match load(&a.lab.dir) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("umlctl: {e}");
            return exit::FAILURE;
        }
    };
    let o = match start_options(a, &mut lab) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("umlctl: {e}");
            return exit::FAILURE;
        }
    };
    if a.dry_run {
        if let Err(e) = runtime::check_external(&lab, o.netd_socket.as_deref()) {
            eprintln!("umlctl: {e}");
            return exit::FAILURE;
        }
        for d in &lab.devices {
            let img = d
                .options
                .image
                .as_ref()
                .and_then(|n| o.image_for.get(n))
                .or(o.image.as_ref());
            let ifs: Vec<String> = d
                .interfaces
                .iter()
                .map(|i| format!("{}@{}", i.name, i.domain))
                .collect();
            println!(
                "{} image {} {}",
                d.name,
                img.map_or("(none: give --image)".into(), |p| p.display().to_string()),
                ifs.join(" ")
            );
        }
        for (n, w) in lab.waves.iter().enumerate() {
            println!("step {}: {}", n + 1, w.join(" "));
        }
        for e in &lab.externals {
            println!(
                "collision domain {} on host interface {}{}",
                e.domain,
                e.host_name(),
                if e.vlan.is_some() {
                    " (VLAN, made if missing)"
                } else {
                    ""
                }
            );
        }
        return 0;
    }
    match runtime::start(&lab, &o) {
        Err(e) => {
            eprintln!("umlctl: lab start: {e}");
            exit::FAILURE
        }
        Ok(s) => {
            println!(
                "lab {} started: {} device(s) in {:.1} s",
                s.state.dir.display(),
                s.state.devices.len(),
                s.elapsed.as_secs_f64()
            );
            if !s.reclaimed.is_empty() {
                let returned: u64 = s
                    .reclaimed
                    .iter()
                    .filter_map(|(_, r)| r.as_ref().ok().and_then(|r| r.returned()))
                    .sum();
                #[allow(clippy::cast_precision_loss)]
                let m = returned as f64 / (1024.0 * 1024.0);
                println!("gave the host back {m:.1} MiB the devices held but did not use");
                // Not a failure of the lab: the devices run as they are.
                for (d, r) in &s.reclaimed {
                    if let Err(e) = r {
                        eprintln!("umlctl: warning: device {d}: memory not reclaimed: {e}");
                    }
                }
            }
            if s.failed.is_empty() {
                return 0;
            }
            for f in &s.failed {
                eprintln!("umlctl: device {}: {}:\n{}", f.device, f.why, f.tail);
            }
            eprintln!(
                "umlctl: {} device(s) failed their startup; the lab keeps running (`umlctl lab stop` stops it)",
                s.failed.len()
            );
            exit::CHECK_FAILED
        }
    }
}

/// `lab restart`'s reclaim of the device it started: a warning if it
/// cannot (the device runs as it is).
fn reclaim_after_start(dir: &Path, device: &str) {
    let out = runtime::reclaim(dir, &[device.to_string()], false);
    match out.as_deref() {
        Ok([(_, Err(e))]) | Err(e) => {
            eprintln!("umlctl: warning: device {device}: memory not reclaimed: {e}");
        }
        _ => {}
    }
}

fn reclaim(a: &LabReclaimArgs) -> Result<(), String> {
    let out = runtime::reclaim(&a.lab.dir, &a.devices, a.keep_cache)?;
    if a.json {
        let v: Vec<_> = out
            .iter()
            .map(|(d, r)| {
                let mut j = match r {
                    Ok(r) => crate::guest_cmd::reclaimed_json(r),
                    Err(e) => serde_json::json!({ "ok": false, "error": e }),
                };
                j["device"] = serde_json::json!(d);
                j
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    }
    let mut failed = 0;
    for (d, r) in &out {
        match r {
            Ok(r) if !a.json => println!("{d}: {}", crate::guest_cmd::describe_reclaimed(r)),
            Ok(_) => {}
            Err(e) => {
                failed += 1;
                if !a.json {
                    eprintln!("umlctl: device {d}: {e}");
                }
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} device(s) could not give memory back"));
    }
    Ok(())
}

fn stop(a: &StopArgs) -> Result<(), String> {
    let out = runtime::stop(&a.lab.dir, std::time::Duration::from_secs(a.timeout.max(1)))?;
    for s in &out {
        println!("{}: {}", s.device, s.how);
    }
    if out.iter().any(|s| s.how.starts_with("failed")) {
        return Err("some devices could not be stopped".into());
    }
    Ok(())
}

fn ps(a: &PsArgs) -> Result<(), String> {
    let s = runtime::load_state(&a.lab.dir)?
        .ok_or_else(|| format!("no lab was started in {}", a.lab.dir.display()))?;
    let rows: Vec<(
        &runtime::DeviceState,
        Option<umlctl_kernel::instance::Guest>,
    )> = s.devices.iter().map(|d| (d, runtime::guest(d))).collect();
    let addrs = runtime::addresses(&s);
    let addr = |d: &str, i: &str| addrs.get(&(d.to_string(), i.to_string())).cloned();
    let on_host = |g: &Option<umlctl_kernel::instance::Guest>| {
        g.as_ref()
            .filter(|g| g.state() == umlctl_kernel::instance::State::Running)
            .and_then(|g| {
                umlctl_kernel::reclaim::memory_file_bytes(g.record.pid, g.record.mem_bytes)
            })
    };
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(d, g)| {
                serde_json::json!({
                    "device": d.name,
                    "guest": d.guest,
                    "state": g.as_ref().map(|g| g.state().to_string()).unwrap_or_else(|| "missing".into()),
                    "pid": g.as_ref().map(|g| g.record.pid),
                    "host_ram_bytes": on_host(g),
                    "interfaces": d.interfaces.iter().map(|(n, dom, mac)| serde_json::json!({"name": n, "domain": dom, "mac": mac, "addresses": addr(&d.name, n)})).collect::<Vec<_>>(),
                    "startup_status": d.startup_status,
                })
            })
            .collect();
        let ext: Vec<_> = s
            .external
            .iter()
            .map(|l| serde_json::json!({"domain": l.domain, "host_interface": l.interface, "bridge": l.bridge, "via_netd": l.via_netd}))
            .collect();
        let doc = serde_json::json!({"lab": s.dir, "id": s.id, "devices": v, "external": ext});
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!("lab {} ({})", s.dir.display(), s.id);
    println!(
        "{:<16} {:<8} {:>8} {:>7} {:<8} INTERFACES",
        "DEVICE", "STATE", "PID", "ONHOST", "STARTUP"
    );
    for (d, g) in &rows {
        let state = g.as_ref().map(|g| g.state());
        let ifs: Vec<String> = d
            .interfaces
            .iter()
            .map(|(n, dom, _)| match addr(&d.name, n) {
                Some(a) => format!("{n}@{dom}={a}"),
                None => format!("{n}@{dom}"),
            })
            .collect();
        println!(
            "{:<16} {:<8} {:>8} {:>7} {:<8} {}",
            d.name,
            state.map_or("missing".into(), |s| s.to_string()),
            match (g, state) {
                (Some(g), Some(umlctl_kernel::instance::State::Running)) =>
                    g.record.pid.to_string(),
                _ => "-".into(),
            },
            on_host(g).map_or("-".into(), |b| format!("{}M", b >> 20)),
            d.startup_status.map_or("-".into(), |c| if c == 0 {
                "ok".into()
            } else {
                format!("exit {c}")
            }),
            ifs.join(" ")
        );
    }
    for l in &s.external {
        println!(
            "collision domain {} is on the host's {}{}",
            l.domain,
            l.interface,
            if l.via_netd {
                " (netd's bridge)".to_string()
            } else if l.interface != l.bridge {
                format!(" (through bridge {})", l.bridge)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn test(a: &TestArgs) -> u8 {
    let results = match runtime::test(&a.lab.dir, a.save) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("umlctl: lab test: {e}");
            return exit::FAILURE;
        }
    };
    let (mut differ, mut broken) = (0, 0);
    for r in &results {
        match &r.outcome {
            runtime::TestOutcome::Pass => println!("{}: ok", r.device),
            runtime::TestOutcome::Saved => println!("{}: signature saved", r.device),
            runtime::TestOutcome::Differs(d) => {
                differ += 1;
                println!("{}: DIFFERS from its signature\n{d}", r.device);
            }
            runtime::TestOutcome::NoSignature(p) => {
                differ += 1;
                println!(
                    "{}: no signature at {} (save them from a reference run: umlctl lab test --save)",
                    r.device,
                    p.display()
                );
            }
            runtime::TestOutcome::Failed(e) => {
                broken += 1;
                println!("{}: the test could not run: {e}", r.device);
            }
        }
    }
    if broken > 0 {
        exit::FAILURE
    } else if differ > 0 {
        exit::CHECK_FAILED
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::shell_argv;

    #[test]
    fn a_devices_shell_is_the_flag_then_lab_conf_then_bash_or_sh() {
        assert_eq!(
            shell_argv(Some("/bin/zsh -l"), Some("/bin/bash")),
            ["/bin/zsh", "-l"]
        );
        assert_eq!(shell_argv(None, Some("/bin/bash")), ["/bin/bash"]);
        assert_eq!(shell_argv(None, Some("  ")).len(), 3);
        let d = shell_argv(None, None);
        assert_eq!(d[0], "/bin/sh");
        assert!(d[2].contains("exec bash") && d[2].ends_with("exec sh"));
    }
}
