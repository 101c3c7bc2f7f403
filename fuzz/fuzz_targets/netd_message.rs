//! Fuzz netd's message parser (what the daemon runs on every line a client
//! sends, before any policy): no input may panic; a request that decodes
//! encodes and decodes back to itself; names that pass validation are names
//! the kernel would accept. Replies are fuzzed too (the client parses them).
//!
//!     cargo fuzz run netd_message fuzz/corpus/netd_message fuzz/seeds/netd_message
//!     (from the repository root; new inputs go to fuzz/corpus, not the seeds)
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_netd::config::valid_ifname;
use umlctl_netd::protocol::{decode, encode, negotiate, Reply, Request, MAX_MESSAGE};

fuzz_target!(|data: &[u8]| {
    match decode::<Request>(data) {
        Ok(req) => {
            assert!(data.len() <= MAX_MESSAGE, "an oversized message decoded");
            let line = encode(&req);
            assert_eq!(decode::<Request>(&line).as_ref(), Ok(&req));
            match &req {
                Request::Hello { versions } => {
                    if let Some(v) = negotiate(versions) {
                        assert!(versions.contains(&v));
                    }
                }
                Request::CreateTap { bridge, .. } => check_name(bridge),
                Request::Release { ifname } => check_name(ifname),
                Request::List {} | Request::Bridges {} => {}
            }
        }
        Err(_) => {}
    }
    if let Ok(reply) = decode::<Reply>(data) {
        assert_eq!(decode::<Reply>(&encode(&reply)).as_ref(), Ok(&reply));
    }
});

fn check_name(name: &str) {
    if valid_ifname(name) {
        assert!(!name.is_empty() && name.len() < 16);
        assert!(name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':'));
        assert!(name != "." && name != "..");
    }
}
