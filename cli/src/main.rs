//! The `umlctl` binary: argument parsing, human and `--json` output, and
//! exit codes. Everything else lives in the library crates.

// Unit tests build fixtures with plain casts; the cast lints guard the
// code that handles real input.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_possible_wrap
    )
)]

mod cow_cmd;
mod docs;
mod exit;
mod fmt;
mod guest_cmd;
mod image_cmd;
mod kernel_cmd;
mod lab_cmd;
mod net_cmd;
mod progress;
mod run_cmd;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Run commands and guests in User-mode Linux.
#[derive(Parser)]
#[command(name = "umlctl", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a guest, run CMD in it, and exit with CMD's status.
    Run(run_cmd::RunArgs),
    /// Find and inspect UML kernels.
    #[command(subcommand)]
    Kernel(kernel_cmd::KernelCmd),
    /// Check that this host can run UML guests.
    Doctor(kernel_cmd::DoctorArgs),
    /// Boot an image's own init as a detached guest; prints its name.
    Start(guest_cmd::StartArgs),
    /// List detached guests.
    Ps(guest_cmd::PsArgs),
    /// Stop a detached guest (its own shutdown first, then halt, then kill) and clean it up.
    Stop(guest_cmd::StopArgs),
    /// Attach the terminal to a guest's console.
    Console(guest_cmd::ConsoleArgs),
    /// Run a command in a running guest (stdout, stderr and exit status passed through; -t for a terminal).
    Exec(guest_cmd::ExecArgs),
    /// Debug a running guest's kernel with gdb: attach (the guest stops), set --break breakpoints, then the gdb prompt or a --gdb-batch script; detaching lets it run on.
    Debug(guest_cmd::DebugArgs),
    /// Print a guest's console log.
    Logs(guest_cmd::LogsArgs),
    /// Send a command to a guest's management console (mconsole).
    Ctl(guest_cmd::CtlArgs),
    /// Give the host back the memory running guests hold but do not use (their page cache and free pages).
    Reclaim(guest_cmd::ReclaimArgs),
    /// Remove what stopped and dead guests left behind.
    Gc,
    /// Build, verify and read ext4 root filesystem images.
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Create, inspect, merge and rebase UML copy-on-write overlays.
    #[command(subcommand)]
    Cow(cow_cmd::CowCmd),
    /// Kathará/Netkit network labs, rootless, one UML kernel per device: start, stop, restart, exec, console, test; check a lab directory, show its plan, draw its topology.
    #[command(subcommand)]
    Lab(lab_cmd::LabCmd),
    /// The privileged network helper daemon (run as root): taps on host bridges under a policy.
    Netd(net_cmd::NetdArgs),
    /// Networking as netd offers it to me.
    #[command(subcommand)]
    Net(net_cmd::NetCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write man pages (umlctl.1 and one per subcommand) into DIR.
    Manpages(docs::ManpagesArgs),
}

fn main() -> ExitCode {
    // In the guest, the kernel starts us as init with arguments of its own
    // choosing; being PID 1 is what tells us apart.
    if std::process::id() == 1 {
        umlctl_kernel::init::main();
    }
    // `doctor`'s jail probe: starting at all is the answer.
    if std::env::var_os(umlctl_kernel::jail::PROBE_ENV).is_some() {
        return ExitCode::SUCCESS;
    }
    // `--net user`'s frame relay between UML and passt.
    if std::env::var_os(umlctl_kernel::usernet::RELAY_ENV).is_some() {
        umlctl_kernel::usernet::relay_main();
    }
    // A killed `run`'s reaper execs us to remove its run directory.
    if std::env::var_os(umlctl_kernel::reaper::CLEAN_ENV).is_some() {
        umlctl_kernel::reaper::clean();
    }
    // The guest side of `run` is not a subcommand (so completions and man
    // pages do not offer it); outside a guest it only explains itself.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "guest-init")
    {
        eprintln!(
            "umlctl: guest-init only runs as PID 1 inside a UML guest started by `umlctl run`"
        );
        return ExitCode::from(exit::USAGE);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let code = match cli.command {
        Cmd::Run(a) => run_cmd::main(a),
        Cmd::Kernel(k) => kernel_cmd::kernel_main(k),
        Cmd::Doctor(a) => kernel_cmd::doctor_main(a),
        Cmd::Cow(c) => cow_cmd::main(c),
        Cmd::Image(c) => image_cmd::main(c),
        Cmd::Start(a) => guest_cmd::start(a),
        Cmd::Ps(a) => guest_cmd::ps(a),
        Cmd::Stop(a) => guest_cmd::stop(a),
        Cmd::Console(a) => guest_cmd::console(a),
        Cmd::Exec(a) => guest_cmd::exec(a),
        Cmd::Logs(a) => guest_cmd::logs(a),
        Cmd::Debug(a) => guest_cmd::debug(a),
        Cmd::Ctl(a) => guest_cmd::ctl(a),
        Cmd::Reclaim(a) => guest_cmd::reclaim(a),
        Cmd::Gc => guest_cmd::gc(),
        Cmd::Lab(c) => lab_cmd::main(c),
        Cmd::Netd(a) => net_cmd::netd(a),
        Cmd::Net(c) => net_cmd::main(c),
        Cmd::Completions(a) => docs::completions(a, Cli::command()),
        Cmd::Manpages(a) => docs::manpages(a, Cli::command()),
    };
    ExitCode::from(code)
}
