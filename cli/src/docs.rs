//! `umlctl completions SHELL` and `umlctl manpages DIR`: shell completions
//! and man pages generated from the clap definitions, so they never drift
//! from the real options (the Nix package installs both).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Command};
use clap_complete::Shell;

use crate::exit;

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to generate for.
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Args)]
#[command(
    after_help = "DIR is created if missing. Pages are named like umlctl-kernel-build.1; install them \
with e.g. `install -m644 DIR/*.1 /usr/local/share/man/man1/`."
)]
pub struct ManpagesArgs {
    /// Directory to write the pages into.
    dir: PathBuf,
}

pub fn completions(a: CompletionsArgs, mut cmd: Command) -> u8 {
    let mut out = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "umlctl", &mut out);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&out).and_then(|()| stdout.flush()) {
        Ok(()) => 0,
        // `umlctl completions bash | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("umlctl: write completions to stdout: {e}");
            exit::FAILURE
        }
    }
}

pub fn manpages(a: ManpagesArgs, cmd: Command) -> u8 {
    match write_pages(&a.dir, cmd) {
        Ok(n) => {
            eprintln!("umlctl: wrote {n} man pages to {}", a.dir.display());
            0
        }
        Err(e) => {
            eprintln!("umlctl: {e}");
            exit::FAILURE
        }
    }
}

/// Write the page of `cmd` and of every visible subcommand, recursively.
fn write_pages(dir: &Path, cmd: Command) -> Result<usize, String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: create directory: {e}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    let mut n = 0;
    page(dir, &cmd, "umlctl", &mut n)?;
    Ok(n)
}

fn page(dir: &Path, cmd: &Command, name: &str, n: &mut usize) -> Result<(), String> {
    // The page's title is its full name: `umlctl-kernel-build(1)`.
    let titled = cmd
        .clone()
        .name(name.to_string())
        .bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(titled)
        .render(&mut buf)
        .map_err(|e| format!("render the man page of {name}: {e}"))?;
    let path = dir.join(format!("{name}.1"));
    fs::write(&path, &buf).map_err(|e| format!("{}: write: {e}", path.display()))?;
    *n += 1;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        page(dir, sub, &format!("{name}-{}", sub.get_name()), n)?;
    }
    Ok(())
}
