//! Fuzz `reclaim`'s reading of a guest's /proc/meminfo and /proc/stat (text a guest's
//! kernel — possibly taken over — sends through its mconsole): no input may
//! panic, what is read is consistent (free within total), and the balloon
//! it sizes never asks for more than the guest said was free.
//!
//!     cargo fuzz run guest_meminfo fuzz/corpus/guest_meminfo fuzz/seeds/guest_meminfo
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_kernel::reclaim::{balloon_size, parse_cpus, parse_meminfo};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let cpus = parse_cpus(&text);
    assert!(cpus >= 1);
    if let Some((total, free)) = parse_meminfo(&text) {
        assert!(free <= total);
        assert!(balloon_size(total, free, cpus) <= free);
    }
});
