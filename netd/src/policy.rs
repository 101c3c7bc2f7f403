//! Who may take taps on which bridge, and how many. The peer is who the
//! kernel says it is (`SO_PEERCRED` and the uid's groups), never what it
//! says about itself.

use crate::config::Config;

/// A connected client, as the kernel identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    /// The primary gid and every supplementary group of the uid.
    pub gids: Vec<u32>,
}

/// Why a request is refused (also written to netd's audit log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no such bridge {0:?}")]
    NoSuchBridge(String),
    #[error("uid {uid} may not attach to bridge {bridge:?} (no [[allow]] rule names this user or one of its groups for it)")]
    Denied { uid: u32, bridge: String },
    #[error("uid {uid} already holds {held} tap(s), the most its policy allows")]
    Limit { uid: u32, held: u32 },
    #[error("bridge {0:?} is not a NAT bridge: ports are published only to guests behind NAT (its guests' addresses are reachable as they are)")]
    NotNat(String),
    #[error("uid {uid} may not publish host port {port} (no [[allow]] rule for it and bridge {bridge:?} lists it in publish)")]
    PortDenied { uid: u32, port: u16, bridge: String },
}

/// How many taps `peer` may hold in all when taking one on `bridge`: the
/// largest `max_taps` of the rules that match it, or the refusal.
pub fn allowance(config: &Config, peer: &Peer, bridge: &str) -> Result<u32, Refusal> {
    if config.bridge(bridge).is_none() {
        return Err(Refusal::NoSuchBridge(bridge.to_string()));
    }
    config
        .allow
        .iter()
        .filter(|r| r.uids.contains(&peer.uid) || peer.gids.iter().any(|g| r.gids.contains(g)))
        .filter(|r| r.bridges.as_ref().map_or(true, |b| b.contains(bridge)))
        .map(|r| r.max_taps)
        .max()
        .ok_or_else(|| Refusal::Denied {
            uid: peer.uid,
            bridge: bridge.to_string(),
        })
}

/// Check a new tap for `peer`, who holds `held` taps already.
pub fn check(config: &Config, peer: &Peer, bridge: &str, held: u32) -> Result<(), Refusal> {
    let max = allowance(config, peer, bridge)?;
    if held >= max {
        return Err(Refusal::Limit {
            uid: peer.uid,
            held,
        });
    }
    Ok(())
}

/// Check that `peer` may publish `ports` to a guest on `bridge`: a NAT
/// bridge, every host port within the `publish` ranges of a rule that
/// matches the peer and the bridge.
pub fn check_publish(
    config: &Config,
    peer: &Peer,
    bridge: &str,
    ports: &[crate::protocol::Publish],
) -> Result<(), Refusal> {
    if ports.is_empty() {
        return Ok(());
    }
    if !config.bridge(bridge).is_some_and(|b| b.nat) {
        return Err(Refusal::NotNat(bridge.to_string()));
    }
    let ranges: Vec<(u16, u16)> = config
        .allow
        .iter()
        .filter(|r| r.uids.contains(&peer.uid) || peer.gids.iter().any(|g| r.gids.contains(g)))
        .filter(|r| r.bridges.as_ref().map_or(true, |b| b.contains(bridge)))
        .flat_map(|r| r.publish.iter().copied())
        .collect();
    for p in ports {
        if !ranges
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&p.host_port))
        {
            return Err(Refusal::PortDenied {
                uid: peer.uid,
                port: p.host_port,
                bridge: bridge.to_string(),
            });
        }
    }
    Ok(())
}

/// The bridges `peer` may use, each with the allowance on it.
pub fn visible<'a>(config: &'a Config, peer: &Peer) -> Vec<(&'a crate::config::Bridge, u32)> {
    config
        .bridges
        .iter()
        .filter_map(|b| allowance(config, peer, &b.name).ok().map(|m| (b, m)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        let text = r#"
[[bridge]]
name = "a"
address = "10.1.0.1/24"
[[bridge]]
name = "b"
address = "10.2.0.1/24"
[[allow]]
users = [1000]
bridges = ["a"]
max_taps = 1
[[allow]]
groups = [50]
bridges = ["*"]
max_taps = 3
"#;
        Config::parse(text, Path::new("t.toml"), &|_| None, &|_| None).unwrap()
    }

    fn peer(uid: u32, gids: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gids: gids.to_vec(),
        }
    }

    #[test]
    fn users_groups_bridges_and_limits() {
        let c = config();
        assert_eq!(allowance(&c, &peer(1000, &[1000]), "a"), Ok(1));
        assert!(matches!(
            allowance(&c, &peer(1000, &[1000]), "b"),
            Err(Refusal::Denied { .. })
        ));
        // A group member: every bridge, the larger limit wins.
        assert_eq!(allowance(&c, &peer(1000, &[1000, 50]), "a"), Ok(3));
        assert_eq!(allowance(&c, &peer(7, &[50]), "b"), Ok(3));
        assert!(matches!(
            allowance(&c, &peer(65534, &[65534]), "a"),
            Err(Refusal::Denied { uid: 65534, .. })
        ));
        // Root is not special: the policy is explicit.
        assert!(allowance(&c, &peer(0, &[0]), "a").is_err());
        assert_eq!(
            allowance(&c, &peer(1000, &[]), "zz"),
            Err(Refusal::NoSuchBridge("zz".into()))
        );
        assert_eq!(check(&c, &peer(1000, &[]), "a", 0), Ok(()));
        assert_eq!(
            check(&c, &peer(1000, &[]), "a", 1),
            Err(Refusal::Limit { uid: 1000, held: 1 })
        );
        let v: Vec<&str> = visible(&c, &peer(1000, &[]))
            .iter()
            .map(|(b, _)| b.name.as_str())
            .collect();
        assert_eq!(v, ["a"]);
    }

    #[test]
    fn published_ports_need_a_nat_bridge_and_a_range() {
        let text = r#"
[[bridge]]
name = "n"
address = "10.3.0.1/24"
nat = true
uplink = "eth0"
[[bridge]]
name = "r"
address = "10.4.0.1/24"
forward = true
[[allow]]
users = [1000]
bridges = ["*"]
publish = ["8000-8099", "2222"]
"#;
        let c = Config::parse(text, Path::new("t.toml"), &|_| None, &|_| None).unwrap();
        let p = |s: &str| -> crate::protocol::Publish { s.parse().unwrap() };
        let me = peer(1000, &[]);
        assert_eq!(
            check_publish(&c, &me, "n", &[p("8080:80"), p("2222:22")]),
            Ok(())
        );
        assert!(matches!(
            check_publish(&c, &me, "n", &[p("8100:80")]),
            Err(Refusal::PortDenied { port: 8100, .. })
        ));
        assert_eq!(
            check_publish(&c, &me, "r", &[p("8080:80")]),
            Err(Refusal::NotNat("r".into()))
        );
        assert!(check_publish(&c, &peer(7, &[]), "n", &[p("8080:80")]).is_err());
        assert_eq!(check_publish(&c, &peer(7, &[]), "n", &[]), Ok(()));
        for bad in ["0-10", "90-80", "x", "1-70000"] {
            let t = text.replace("\"2222\"", &format!("{bad:?}"));
            assert!(
                Config::parse(&t, Path::new("t.toml"), &|_| None, &|_| None).is_err(),
                "{bad}"
            );
        }
    }
}
