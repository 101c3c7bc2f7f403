//! Fuzz the COW header parser: no input may panic, and whatever parses must
//! encode and parse back to the same header.
//!
//!     cargo fuzz run cow_header        (from the repository root)
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_imgtools::cow::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = Header::parse(data) {
        let _ = (h.bitmap_offset(), h.bitmap_len(), h.data_offset(), h.sectors());
        if let Ok(bytes) = h.encode() {
            assert_eq!(Header::parse(&bytes).ok().flatten().as_ref(), Some(&h));
        }
    }
});
