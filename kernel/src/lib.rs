//! umlctl-kernel: the guest kernel side of umlctl.
//!
//! * [`locate`] and [`inspect`]: which UML kernel to use and what it can do;
//! * [`preflight`] and [`xstate`]: host checks, and the shim that lets
//!   kernels older than 6.13 boot on hosts with large XSAVE areas (AMX);
//! * [`cmdline`]: the UML command line, built in one place;
//! * [`run`]: boot a guest, run one command, pass stdio and status through;
//! * [`jail`] and [`cgroup`]: what a guest's UML process may see, and
//!   how much CPU and memory it may use;
//! * [`gdb`]: the host's gdb on a guest kernel (`run --gdb`, `debug`);
//! * [`reclaim`]: a running guest's unused memory back to the host (its
//!   page cache dropped, its free pages through UML's mconsole balloon);
//! * [`init`]: the guest side of `run` (umlctl as PID 1 in the guest) and
//!   [`protocol`], what the two sides say to each other.

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

pub mod build;
pub mod cache;
pub mod cgroup;
pub mod cmdline;
pub mod detached;
pub mod error;
pub mod exec;
pub mod execproto;
pub mod exit;
pub(crate) mod flow;
pub mod gdb;
pub(crate) mod guestnet;
pub mod init;
pub(crate) mod initroot;
pub mod inspect;
pub mod instance;
pub mod jail;
pub mod ktap;
pub mod kunit;
pub mod locate;
pub mod mconsole;
pub(crate) mod num;
pub(crate) mod overlay;
pub(crate) mod paths;
pub mod preflight;
pub mod protocol;
pub mod reaper;
pub mod reclaim;
pub mod run;
pub(crate) mod terminal;
#[cfg(test)]
mod testutil;
pub mod usernet;
pub mod xstate;

pub use error::{Error, Result};
pub use run::{run, GuestSpec, Reason, RunOutcome, ShimMode, TtyMode};
