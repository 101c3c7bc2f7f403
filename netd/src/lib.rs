//! umlctl-netd: the small privileged network helper (taps on host bridges
//! under an explicit policy), its wire protocol and its client.
//!
//! A leaf crate: it depends on none of umlctl's other crates. Its contents
//! arrive with the networking issue.
