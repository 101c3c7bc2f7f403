//! Fuzz `reclaim`'s reading of a guest's /proc/meminfo (text a guest's
//! kernel — possibly taken over — sends through its mconsole): no input may
//! panic, what is read is consistent (free within total), and the balloon
//! it sizes never asks for more than the guest said was free.
//!
//!     cargo fuzz run guest_meminfo fuzz/corpus/guest_meminfo fuzz/seeds/guest_meminfo
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_kernel::reclaim::{balloon_size, parse_meminfo};

fuzz_target!(|data: &[u8]| {
    if let Some((total, free)) = parse_meminfo(&String::from_utf8_lossy(data)) {
        assert!(free <= total);
        assert!(balloon_size(total, free) <= free);
    }
});
