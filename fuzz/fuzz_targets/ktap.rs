//! Fuzz the KTAP parser (a guest kernel's console output, which a test
//! under way — or a crash — can fill with anything): no input may panic
//! or exhaust the stack, the counts add up without overflow, and the
//! report serializes.
//!
//!     cargo fuzz run ktap fuzz/corpus/ktap fuzz/seeds/ktap
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_kernel::ktap::parse;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let r = parse(&text);
    let _ = r.counts.total();
    let _ = r.passed();
    let _ = serde_json::to_string(&r);
});
