//! Fuzz what a lab device reports as its addresses (`ip -o -4 address
//! show` output, a hostile guest's to choose; `lab ps` and `lab graph`
//! show it): no input may panic, and only plain interface names and
//! dotted addresses come out — nothing a terminal or Graphviz interprets.
//!
//!     cargo fuzz run lab_addresses fuzz/corpus/lab_addresses fuzz/seeds/lab_addresses
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_lab::runtime::parse_addresses;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for (name, addr) in parse_addresses(&text) {
        assert!(!name.is_empty() && name.len() <= 15 && name != "lo");
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        assert!(!addr.is_empty() && addr.len() <= 18);
        assert!(addr
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/'));
    }
});
