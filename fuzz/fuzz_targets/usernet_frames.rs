//! Fuzz `--net user`'s relay: the frame decoder for passt's stream and
//! what it does to frames a guest (possibly a hostile guest root) sends —
//! readdressing, and the handshake ACK it answers a SYN-ACK with. No input
//! may panic; no frame is longer than the limit; every ACK is well formed.
//!
//!     cargo fuzz run usernet_frames fuzz/corpus/usernet_frames fuzz/seeds/usernet_frames
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    umlctl_kernel::usernet::exercise(data);
});
