//! umlctl's exit codes (documented in the README's table).
//!
//! `run` exits with the command's own status (0–255, 128+N for signal N);
//! these are the codes umlctl itself uses, chosen like `docker run` and
//! `timeout(1)` so a script can tell them apart from common command codes.

/// umlctl itself failed: bad usage, host problem, kernel missing or
/// unusable, guest kernel panic or boot failure. The message says which.
pub const FAILURE: u8 = 125;
/// Usage errors are umlctl failures too.
pub const USAGE: u8 = FAILURE;
/// `doctor`: at least one check failed.
pub const CHECK_FAILED: u8 = 1;
/// `kernel test`: a test failed (or none ran).
pub const TESTS_FAILED: u8 = 1;
/// `kernel test`: the kernel crashed, or its output stopped before every
/// announced test reported.
pub const KERNEL_CRASHED: u8 = 2;
/// `run`'s `--timeout`, and `kernel test`'s: the guest was stopped.
pub const TIMEOUT: u8 = 124;
