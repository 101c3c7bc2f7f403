//! Fuzz the exec line's frame decoder and payload parsers (bytes a guest's
//! exec agent — possibly a hostile guest root — sends to `umlctl exec`, and
//! what the agent takes from the host): no input may panic, no frame is
//! longer than the limit, what parses round-trips.
//!
//!     cargo fuzz run exec_frames fuzz/corpus/exec_frames fuzz/seeds/exec_frames
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    umlctl_kernel::execproto::exercise(data);
});
