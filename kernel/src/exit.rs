//! umlctl's exit statuses, in one place (the README's table; `cli` re-exports
//! them).
//!
//! `run` exits with the command's own status (0–255, 128+N for signal N);
//! the codes umlctl itself uses are chosen like `docker run` and
//! `timeout(1)`, so that a script can tell them apart from common command
//! codes.

/// umlctl itself failed: bad usage, host problem, kernel missing or
/// unusable, guest kernel panic or boot failure. The message says which.
pub const FAILURE: u8 = 125;
/// Usage errors are umlctl failures too.
pub const USAGE: u8 = FAILURE;
/// `run`'s `--timeout`, and `kernel test`'s: the guest was stopped.
pub const TIMEOUT: u8 = 124;
/// `run`: the command was not found in the guest (as a shell has it).
pub const NOT_FOUND: u8 = 127;
/// `run`: the command was found but could not be executed.
pub const NOT_EXECUTABLE: u8 = 126;
/// `run`: the command (or umlctl) was killed by signal N: 128 + N.
pub const SIGNAL_BASE: u8 = 128;
/// `doctor`, `verify`, `diff`, `ctl`…: a check failed or a difference was
/// found.
pub const CHECK_FAILED: u8 = 1;
/// `kernel test`: a test failed (or none ran).
pub const TESTS_FAILED: u8 = 1;
/// `kernel test`: the kernel crashed, or its output stopped before every
/// announced test reported.
pub const KERNEL_CRASHED: u8 = 2;

/// The status for death by signal `n`.
pub fn signaled(n: i32) -> i32 {
    i32::from(SIGNAL_BASE) + n
}
