//! Fuzz the mconsole reply and notification decoders (datagrams a guest's
//! kernel — possibly taken over — sends to umlctl): no input may panic, a
//! decoded reply never claims more data than the datagram held, and
//! assembling any sequence of decoded chunks terminates.
//!
//!     cargo fuzz run mconsole_reply fuzz/corpus/mconsole_reply fuzz/seeds/mconsole_reply
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_kernel::mconsole::{decode_notify, decode_reply, Assembler};

fuzz_target!(|data: &[u8]| {
    let mut asm = Assembler::default();
    // The input as a run of datagrams, each prefixed by a one-byte length.
    let mut rest = data;
    while let Some((&n, tail)) = rest.split_first() {
        let n = (n as usize).min(tail.len());
        let (dgram, next) = tail.split_at(n);
        rest = next;
        if let Ok(p) = decode_reply(dgram) {
            assert!(p.data.len() + 12 <= dgram.len());
            assert!(!p.data.contains(&0));
            if asm.push(p).is_some() {
                asm = Assembler::default();
            }
        }
    }
    let _ = decode_reply(data);
    let _ = decode_notify(data);
    let _ = asm.finish();
});
