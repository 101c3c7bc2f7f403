//! The crate's error type. Every variant names what was being done and to
//! what, and where there is a known fix, the fix.

use std::io;
use std::path::PathBuf;

/// Errors from finding, checking and running a UML guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A system call that is not about a path failed.
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// No kernel could be found anywhere umlctl looks.
    #[error("no UML kernel found; tried:\n{tried}\nfix: install Debian's user-mode-linux package, build one with `umlctl kernel build`, or pass --kernel PATH / set UMLCTL_KERNEL")]
    KernelNotFound { tried: String },

    /// A kernel was found but cannot be used.
    #[error("{}: {reason}", path.display())]
    KernelUnusable { path: PathBuf, reason: String },

    /// The host cannot run UML as asked.
    #[error("host check `{check}` failed: {detail}\nfix: {fix}")]
    Host {
        check: &'static str,
        detail: String,
        fix: String,
    },

    /// An option or argument is invalid.
    #[error("{0}")]
    Usage(String),

    /// No guest of this name is known (no record under the guest directory).
    #[error("no guest named {name:?} (see `umlctl ps --all`)")]
    NoSuchGuest { name: String },

    /// The operation needs the guest stopped, and it runs.
    #[error("guest {name} is still running; stop it first (`umlctl stop {name}`)")]
    GuestRunning { name: String },

    /// A detached guest did not come up; what was seen and the end of its
    /// console.
    #[error("{why}; last console lines:\n{console_tail}")]
    StartFailed { why: String, console_tail: String },

    /// A running guest's management console refused or failed a request.
    #[error("guest {guest}: {source}")]
    Mconsole {
        guest: String,
        #[source]
        source: crate::mconsole::McError,
    },

    /// A step of a kernel build failed.
    #[error("{step} failed ({status}); the build log is {}\n{tail}", log.display())]
    BuildFailed {
        step: &'static str,
        status: String,
        tail: String,
        log: PathBuf,
    },

    /// Requested kernel options are not in the final configuration.
    #[error("requested kernel options did not land in {}:\n{missing}\nfix: enable what they depend on (fragments and --set are applied after defconfig; `make ARCH=um menuconfig` shows the dependencies), or drop them; the log is {}", config.display(), log.display())]
    ConfigNotApplied {
        config: PathBuf,
        missing: String,
        log: PathBuf,
    },

    /// The network helper is unavailable or refused.
    #[error(transparent)]
    Network(#[from] umlctl_netd::client::ClientError),

    /// A disk image or overlay is unusable.
    #[error(transparent)]
    Disk(#[from] umlctl_imgtools::cow::CowError),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn sys(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Sys {
            op,
            source: source.into(),
        }
    }

    /// A short machine-readable class, used in `--json` output.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } | Error::Sys { .. } | Error::Host { .. } => "host",
            Error::KernelNotFound { .. } | Error::KernelUnusable { .. } => "kernel",
            Error::Usage(_) | Error::NoSuchGuest { .. } | Error::GuestRunning { .. } => "usage",
            Error::StartFailed { .. } => "boot",
            Error::Mconsole { .. } => "guest",
            Error::Disk(_) => "image",
            Error::Network(_) => "network",
            Error::BuildFailed { .. } | Error::ConfigNotApplied { .. } => "build",
        }
    }
}

/// Convert a `nix` errno into an `io::Error`.
pub(crate) fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
