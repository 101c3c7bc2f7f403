//! Addresses, MACs and interface names for taps: the lowest free address of
//! a bridge's subnet, a stable locally administered MAC, and `umltapN` names.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::config::{mask, Bridge};

/// The lowest host address of `bridge`'s subnet that is not the network,
/// the broadcast, the bridge's own address or in `used`.
pub fn free_address(bridge: &Bridge, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let net = u32::from(bridge.network());
    let hostmask = !mask(bridge.prefix);
    (1..hostmask)
        .map(|h| Ipv4Addr::from(net | h))
        .find(|a| *a != bridge.address && !used.contains(a))
}

/// A MAC for a tap: `02:` (locally administered, unicast) and five bytes of
/// a digest of the bridge, the owner and `tag` (the guest's name, or the
/// address when there is none), so a guest keeps its MAC across runs.
pub fn mac(bridge: &str, uid: u32, tag: &str) -> String {
    let mut h = Sha256::new();
    h.update(bridge.as_bytes());
    h.update([0]);
    h.update(uid.to_le_bytes());
    h.update(tag.as_bytes());
    let d = h.finalize();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        d[0], d[1], d[2], d[3], d[4]
    )
}

/// The prefix of every tap netd creates; it never touches other interfaces.
pub const TAP_PREFIX: &str = "umltap";

/// The lowest `umltapN` not in `used`.
pub fn free_name(used: &BTreeSet<String>) -> String {
    (0u32..)
        .map(|n| format!("{TAP_PREFIX}{n}"))
        .find(|n| !used.contains(n))
        .unwrap_or_else(|| format!("{TAP_PREFIX}x"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(cidr: &str) -> Bridge {
        let (address, prefix) = crate::config::parse_cidr(cidr).unwrap();
        Bridge {
            name: "b".into(),
            address,
            prefix,
            forward: false,
            mtu: 1500,
            nat: false,
            uplink: None,
            dns: None,
        }
    }

    #[test]
    fn addresses() {
        let b = bridge("10.0.0.1/29");
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(a) = free_address(&b, &used) {
            used.insert(a);
            got.push(a.to_string());
        }
        // .0 network, .1 the bridge, .7 broadcast.
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
        );
        used.remove(&"10.0.0.4".parse().unwrap());
        assert_eq!(free_address(&b, &used), Some("10.0.0.4".parse().unwrap()));
        // The bridge's address need not be the first.
        let b = bridge("192.168.5.9/30");
        assert_eq!(
            free_address(&b, &BTreeSet::new()),
            Some("192.168.5.10".parse().unwrap())
        );
    }

    #[test]
    fn macs_are_stable_local_unicast_and_distinct() {
        let m = mac("umlbr0", 1000, "web");
        assert_eq!(m, mac("umlbr0", 1000, "web"));
        assert!(m.starts_with("02:") && m.len() == 17, "{m}");
        assert_ne!(m, mac("umlbr0", 1000, "db"));
        assert_ne!(m, mac("umlbr0", 1001, "web"));
        assert_ne!(m, mac("umlbr1", 1000, "web"));
    }

    #[test]
    fn names() {
        let mut used = BTreeSet::new();
        assert_eq!(free_name(&used), "umltap0");
        used.insert("umltap0".to_string());
        used.insert("umltap2".to_string());
        assert_eq!(free_name(&used), "umltap1");
    }
}
