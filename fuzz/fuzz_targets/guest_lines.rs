//! Fuzz the status and control lines (what a guest, possibly hostile, writes
//! on its status line and what the init reads on its control line): no input
//! may panic, and a record that parses encodes to one line that parses back
//! to itself.
//!
//!     cargo fuzz run guest_lines fuzz/corpus/guest_lines fuzz/seeds/guest_lines
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_kernel::protocol::{Control, Status};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Some(s) = Status::parse(&line) {
        let enc = s.encode();
        assert!(enc.ends_with('\n') && enc.matches('\n').count() == 1, "{enc:?}");
        let back = Status::parse(&enc).expect("an encoded status parses");
        // Free text keeps its words; everything else is exact.
        match (&s, &back) {
            (Status::NotFound(a), Status::NotFound(b))
            | (Status::NotExecutable(a), Status::NotExecutable(b))
            | (Status::Error(a), Status::Error(b)) => {
                assert_eq!(a.replace(['\n', '\r'], " "), *b)
            }
            _ => assert_eq!(s, back),
        }
    }
    if let Some(c) = Control::parse(&line) {
        assert_eq!(Control::parse(&c.encode()), Some(c));
    }
});
