//! Progress bars: drawn on stderr when it is a terminal, nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use umlctl_imgtools::progress::Progress;

/// Make a bar for `label` if stderr is a terminal.
pub fn bar(label: &'static str) -> TermBar {
    TermBar {
        bar: std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::hidden();
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(label);
            b
        }),
    }
}

/// A progress bar on the terminal (or nothing when stderr is not one).
pub struct TermBar {
    bar: Option<ProgressBar>,
}

impl Progress for TermBar {
    fn start(&self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(0);
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A kernel build's progress: a bar of compile steps on a terminal, one line
/// per phase on stderr otherwise.
pub struct BuildBar {
    bar: Option<ProgressBar>,
}

impl BuildBar {
    pub fn new() -> Self {
        BuildBar {
            bar: std::io::stderr().is_terminal().then(|| {
                let b = ProgressBar::new(0);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:<12} [{bar:30}] {pos}/~{len} steps {elapsed}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            }),
        }
    }

    /// Remove the bar.
    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl umlctl_kernel::build::Observer for BuildBar {
    fn phase(&self, what: &str) {
        match &self.bar {
            Some(b) => b.set_message(what.to_string()),
            None => eprintln!("umlctl: {what}"),
        }
    }
    fn step(&self, done: u64, estimate: u64) {
        if let Some(b) = &self.bar {
            b.set_length(estimate);
            b.set_position(done);
        }
    }
}
