//! netd's configuration file (TOML): the socket, the bridges it manages and
//! the policy. Everything is checked when it is loaded, and each problem is
//! reported with the key it is about.
//!
//! ```toml
//! socket = "/run/umlctl/netd.sock"   # default
//! socket_mode = "0660"               # default
//! socket_group = "umlctl"            # default: root's group
//! state = "/run/umlctl/netd.state"   # default
//!
//! [[bridge]]
//! name = "umlbr0"
//! address = "10.77.0.1/24"   # the host's address; guests get the rest
//! forward = false            # may guests reach other networks? (default no)
//! mtu = 1500
//!
//! [[bridge]]
//! name = "natbr0"
//! address = "10.78.0.1/24"
//! nat = true                 # masquerade guests behind the uplink (implies forward)
//! uplink = "eth0"            # default: the IPv4 default route's interface at start
//! dns = ["192.0.2.53"]       # the guests' name servers; NAT bridges default to
//!                            # the host's (non-loopback) ones, others to none
//!
//! [[allow]]
//! users = ["alice", 1001]    # names or uids
//! groups = ["umlctl"]        # names or gids (primary or supplementary)
//! bridges = ["umlbr0"]       # or ["*"]
//! max_taps = 4               # per user, over all bridges (default 4)
//! publish = ["8000-8099"]    # host ports they may publish to guests on NAT
//!                            # bridges (`start --publish`); default none
//! ```

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A loaded and checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// The socket's group (gid); `None`: root's.
    pub socket_group: Option<u32>,
    pub state: PathBuf,
    pub bridges: Vec<Bridge>,
    pub allow: Vec<Allow>,
}

/// A bridge netd manages (creates, or adopts when it exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub forward: bool,
    pub mtu: u32,
    /// Masquerade the guests' traffic behind the host's uplink.
    pub nat: bool,
    /// The uplink NAT'd traffic leaves by; `None`: the interface of the
    /// IPv4 default route when netd starts.
    pub uplink: Option<String>,
    /// Name servers for the guests; `None`: not configured (NAT bridges
    /// then get the host's, see [`host_nameservers`]).
    pub dns: Option<Vec<Ipv4Addr>>,
}

impl Bridge {
    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & mask(self.prefix))
    }
    /// Whether `a` is in the bridge's subnet.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & mask(self.prefix) == u32::from(self.network())
    }
}

/// `/prefix` as a netmask.
pub fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// One allow rule: who may take taps on which bridges, and how many.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub uids: BTreeSet<u32>,
    pub gids: BTreeSet<u32>,
    /// `None`: every bridge.
    pub bridges: Option<BTreeSet<String>>,
    pub max_taps: u32,
    /// Host port ranges (inclusive) these users may publish.
    pub publish: Vec<(u16, u16)>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { message: String, path: PathBuf },
    #[error("{}: {key}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<IdRef>,
    state: Option<PathBuf>,
    #[serde(default)]
    bridge: Vec<RawBridge>,
    #[serde(default)]
    allow: Vec<RawAllow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBridge {
    name: String,
    address: String,
    forward: Option<bool>,
    mtu: Option<u32>,
    #[serde(default)]
    nat: bool,
    uplink: Option<String>,
    dns: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    #[serde(default)]
    users: Vec<IdRef>,
    #[serde(default)]
    groups: Vec<IdRef>,
    bridges: Vec<String>,
    max_taps: Option<u32>,
    #[serde(default)]
    publish: Vec<String>,
}

/// A user or group, by name or number.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum IdRef {
    Id(u32),
    Name(String),
}

pub use crate::protocol::DEFAULT_SOCKET;
/// The default state file.
pub const DEFAULT_STATE: &str = "/run/umlctl/netd.state";
/// Taps per user when a rule does not say.
pub const DEFAULT_MAX_TAPS: u32 = 4;

/// The most name servers a bridge hands out (glibc's MAXNS).
pub const MAX_DNS: usize = 3;

/// The name servers of a `resolv.conf` text that guests can use: IPv4, not
/// loopback (a resolver on the host's loopback, like systemd-resolved's
/// 127.0.0.53, is not reachable from a guest), at most [`MAX_DNS`].
pub fn nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("nameserver") {
            continue;
        }
        if let Some(Ok(a)) = w.next().map(str::parse::<Ipv4Addr>) {
            if !a.is_loopback() && !a.is_unspecified() && !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out.truncate(MAX_DNS);
    out
}

/// The host's name servers guests can use: those of `/etc/resolv.conf`,
/// else (a host that only names a local stub) systemd-resolved's upstream
/// list in `/run/systemd/resolve/resolv.conf`.
pub fn host_nameservers() -> Vec<Ipv4Addr> {
    for f in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        let found = nameservers(&std::fs::read_to_string(f).unwrap_or_default());
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// Whether `name` is a usable Linux interface name: 1 to 15 bytes, no `/`,
/// `:`, whitespace or control characters, not `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':' && b != b'%')
}

/// Parse `10.0.0.1/24`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let a: Ipv4Addr = a.parse().ok()?;
    let p: u8 = p.parse().ok()?;
    (p <= 32).then_some((a, p))
}

impl Config {
    /// Load and check `path`. `lookup_user` and `lookup_group` turn names
    /// into ids (the daemon passes the system's databases).
    pub fn load(
        path: &Path,
        lookup_user: &dyn Fn(&str) -> Option<u32>,
        lookup_group: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path, lookup_user, lookup_group)
    }

    /// Parse and check configuration text (`path` names it in errors).
    pub fn parse(
        text: &str,
        path: &Path,
        lookup_user: &dyn Fn(&str) -> Option<u32>,
        lookup_group: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            message: e.to_string(),
            path: path.into(),
        })?;
        let bad = |key: String, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem,
        };
        let socket = raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.into());
        if !socket.is_absolute() {
            return Err(bad("socket".into(), "must be an absolute path".into()));
        }
        let state = raw.state.unwrap_or_else(|| DEFAULT_STATE.into());
        if !state.is_absolute() {
            return Err(bad("state".into(), "must be an absolute path".into()));
        }
        let socket_mode = match raw.socket_mode {
            None => 0o660,
            Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                Ok(v) if v <= 0o777 => v,
                _ => {
                    return Err(bad(
                        "socket_mode".into(),
                        format!("{m:?} is not an octal mode like \"0660\""),
                    ))
                }
            },
        };
        let socket_group = match raw.socket_group {
            None => None,
            Some(IdRef::Id(g)) => Some(g),
            Some(IdRef::Name(n)) => Some(
                lookup_group(&n)
                    .ok_or_else(|| bad("socket_group".into(), format!("no group named {n:?}")))?,
            ),
        };

        let mut bridges: Vec<Bridge> = Vec::new();
        for (i, b) in raw.bridge.iter().enumerate() {
            let key = format!("bridge[{i}]");
            if !valid_ifname(&b.name) {
                return Err(bad(
                    format!("{key}.name"),
                    format!(
                        "{:?} is not an interface name (1-15 characters, no '/', ':' or spaces)",
                        b.name
                    ),
                ));
            }
            if bridges.iter().any(|o| o.name == b.name) {
                return Err(bad(
                    format!("{key}.name"),
                    format!("{:?} is listed twice", b.name),
                ));
            }
            let (address, prefix) = parse_cidr(&b.address).ok_or_else(|| {
                bad(
                    format!("{key}.address"),
                    format!(
                        "{:?} is not an IPv4 address with a prefix, like \"10.77.0.1/24\"",
                        b.address
                    ),
                )
            })?;
            if !(8..=30).contains(&prefix) {
                return Err(bad(
                    format!("{key}.address"),
                    format!("prefix /{prefix}: use /8 to /30 (guests need addresses)"),
                ));
            }
            if b.nat && b.forward == Some(false) {
                return Err(bad(
                    format!("{key}.forward"),
                    "nat = true needs forwarding (guests reach the uplink through the host); remove forward = false".into(),
                ));
            }
            if let Some(u) = &b.uplink {
                if !b.nat {
                    return Err(bad(
                        format!("{key}.uplink"),
                        "only means something with nat = true".into(),
                    ));
                }
                if !valid_ifname(u) || *u == b.name {
                    return Err(bad(
                        format!("{key}.uplink"),
                        format!("{u:?} is not an interface name other than the bridge's own"),
                    ));
                }
            }
            let dns = match &b.dns {
                None => None,
                Some(list) => {
                    let mut out = Vec::new();
                    for d in list {
                        let a: Ipv4Addr = d.parse().map_err(|_| {
                            bad(
                                format!("{key}.dns"),
                                format!("{d:?} is not an IPv4 address"),
                            )
                        })?;
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                    if out.len() > MAX_DNS {
                        return Err(bad(
                            format!("{key}.dns"),
                            format!(
                                "{} servers; a guest's resolver uses at most {MAX_DNS}",
                                out.len()
                            ),
                        ));
                    }
                    Some(out)
                }
            };
            let br = Bridge {
                name: b.name.clone(),
                address,
                prefix,
                forward: b.forward.unwrap_or(b.nat),
                mtu: b.mtu.unwrap_or(1500),
                nat: b.nat,
                uplink: b.uplink.clone(),
                dns,
            };
            let host = u32::from(address) & !mask(prefix);
            if host == 0 || host == !mask(prefix) {
                return Err(bad(format!("{key}.address"), format!("{address} is the subnet's network or broadcast address; give the host an address inside it")));
            }
            if let Some(o) = bridges
                .iter()
                .find(|o| o.contains(br.network()) || br.contains(o.network()))
            {
                return Err(bad(
                    format!("{key}.address"),
                    format!("overlaps bridge {:?}'s subnet", o.name),
                ));
            }
            if !(576..=65535).contains(&br.mtu) {
                return Err(bad(
                    format!("{key}.mtu"),
                    format!("{} is out of range (576-65535)", br.mtu),
                ));
            }
            bridges.push(br);
        }
        for (i, b) in bridges.iter().enumerate() {
            if let Some(u) = b
                .uplink
                .as_ref()
                .filter(|u| bridges.iter().any(|o| &o.name == *u))
            {
                return Err(bad(
                    format!("bridge[{i}].uplink"),
                    format!("{u:?} is one of netd's own bridges, not an uplink"),
                ));
            }
        }

        let mut allow = Vec::new();
        for (i, a) in raw.allow.iter().enumerate() {
            let key = format!("allow[{i}]");
            let mut uids = BTreeSet::new();
            for u in &a.users {
                uids.insert(match u {
                    IdRef::Id(id) => *id,
                    IdRef::Name(n) => lookup_user(n).ok_or_else(|| {
                        bad(format!("{key}.users"), format!("no user named {n:?}"))
                    })?,
                });
            }
            let mut gids = BTreeSet::new();
            for g in &a.groups {
                gids.insert(match g {
                    IdRef::Id(id) => *id,
                    IdRef::Name(n) => lookup_group(n).ok_or_else(|| {
                        bad(format!("{key}.groups"), format!("no group named {n:?}"))
                    })?,
                });
            }
            if uids.is_empty() && gids.is_empty() {
                return Err(bad(key, "names no users and no groups".into()));
            }
            let brs = if a.bridges.iter().any(|b| b == "*") {
                None
            } else {
                let mut set = BTreeSet::new();
                for b in &a.bridges {
                    if !bridges.iter().any(|o| &o.name == b) {
                        return Err(bad(
                            format!("{key}.bridges"),
                            format!("{b:?} is not a [[bridge]] of this file"),
                        ));
                    }
                    set.insert(b.clone());
                }
                Some(set)
            };
            let mut publish = Vec::new();
            for r in &a.publish {
                let range = match r.split_once('-') {
                    Some((lo, hi)) => (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()),
                    None => (r.trim().parse::<u16>(), r.trim().parse::<u16>()),
                };
                match range {
                    (Ok(lo), Ok(hi)) if lo >= 1 && lo <= hi => publish.push((lo, hi)),
                    _ => {
                        return Err(bad(
                            format!("{key}.publish"),
                            format!("{r:?} is not a port or a range LOW-HIGH of ports 1-65535"),
                        ))
                    }
                }
            }
            allow.push(Allow {
                uids,
                gids,
                bridges: brs,
                max_taps: a.max_taps.unwrap_or(DEFAULT_MAX_TAPS),
                publish,
            });
        }
        Ok(Config {
            socket,
            socket_mode,
            socket_group,
            state,
            bridges,
            allow,
        })
    }

    pub fn bridge(&self, name: &str) -> Option<&Bridge> {
        self.bridges.iter().find(|b| b.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(n: &str) -> Option<u32> {
        match n {
            "alice" => Some(1001),
            "nobody" => Some(65534),
            _ => None,
        }
    }
    fn groups(n: &str) -> Option<u32> {
        (n == "umlctl").then_some(990)
    }
    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("netd.toml"), &users, &groups)
    }

    const GOOD: &str = r#"
socket = "/run/test/netd.sock"
socket_mode = "0666"
socket_group = "umlctl"

[[bridge]]
name = "umlbr0"
address = "10.77.0.1/24"
forward = true

[[bridge]]
name = "iso0"
address = "10.78.0.1/28"

[[bridge]]
name = "nat0"
address = "10.79.0.1/24"
nat = true
uplink = "eth0"

[[allow]]
users = ["alice", 2000]
bridges = ["umlbr0"]
max_taps = 2

[[allow]]
groups = ["umlctl"]
bridges = ["*"]
"#;

    #[test]
    fn a_good_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/test/netd.sock"));
        assert_eq!((c.socket_mode, c.socket_group), (0o666, Some(990)));
        assert_eq!(c.state, PathBuf::from(DEFAULT_STATE));
        assert_eq!(c.bridges.len(), 3);
        let b = c.bridge("iso0").unwrap();
        assert_eq!((b.prefix, b.forward, b.mtu), (28, false, 1500));
        assert_eq!((b.nat, b.uplink.as_deref()), (false, None));
        let n = c.bridge("nat0").unwrap();
        assert_eq!(
            (n.nat, n.forward, n.uplink.as_deref()),
            (true, true, Some("eth0"))
        );
        assert_eq!(b.network(), Ipv4Addr::new(10, 78, 0, 0));
        assert_eq!(c.allow[0].uids, BTreeSet::from([1001, 2000]));
        assert_eq!(c.allow[0].max_taps, 2);
        assert_eq!(c.allow[1].bridges, None);
        assert_eq!(c.allow[1].max_taps, DEFAULT_MAX_TAPS);
    }

    #[test]
    fn problems_name_their_key() {
        let cases = [
            ("socket = \"rel\"", "socket"),
            ("socket_mode = \"999\"", "socket_mode"),
            ("socket_group = \"nogroup\"", "socket_group"),
            ("[[bridge]]\nname = \"a/b\"\naddress = \"10.0.0.1/24\"", "bridge[0].name"),
            ("[[bridge]]\nname = \"waytoolongname16\"\naddress = \"10.0.0.1/24\"", "bridge[0].name"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1\"", "bridge[0].address"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/31\"", "bridge[0].address"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.0/24\"", "bridge[0].address"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\n[[bridge]]\nname = \"c\"\naddress = \"10.0.0.129/25\"", "bridge[1].address"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\n[[bridge]]\nname = \"b\"\naddress = \"10.1.0.1/24\"", "bridge[1].name"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\nmtu = 100", "bridge[0].mtu"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\nnat = true\nforward = false", "bridge[0].forward"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\nuplink = \"eth0\"", "bridge[0].uplink"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\nnat = true\nuplink = \"b\"", "bridge[0].uplink"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\nnat = true\nuplink = \"a b\"", "bridge[0].uplink"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\nnat = true\nuplink = \"c\"\n[[bridge]]\nname = \"c\"\naddress = \"10.1.0.1/24\"", "bridge[0].uplink"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\ndns = [\"dns.example\"]", "bridge[0].dns"),
            ("[[bridge]]\nname = \"b\"\naddress = \"10.0.0.1/24\"\ndns = [\"1.1.1.1\", \"1.1.1.2\", \"1.1.1.3\", \"1.1.1.4\"]", "bridge[0].dns"),
            ("[[allow]]\nusers = [\"mallory\"]\nbridges = [\"*\"]", "allow[0].users"),
            ("[[allow]]\nbridges = [\"*\"]", "allow[0]"),
            ("[[allow]]\nusers = [1]\nbridges = [\"nope\"]", "allow[0].bridges"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(&format!("{key}: ")), "{text:?} → {e}");
            assert!(e.starts_with("netd.toml: "), "{e}");
        }
        let e = parse("bridges = []").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn nameservers_guests_can_reach() {
        let text = "# comment\nsearch example.com\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n\
                    nameserver ::1\nnameserver   10.0.0.3  # trailing\nnameserver 10.0.0.2\n\
                    nameserver 0.0.0.0\nnameserver 10.0.0.4\nnameserver 10.0.0.5\n";
        let a = |x: u8| Ipv4Addr::new(10, 0, 0, x);
        assert_eq!(nameservers(text), vec![a(2), a(3), a(4)]);
        assert!(nameservers("nameserver 127.0.0.1\n").is_empty());
        assert!(nameservers("").is_empty());
    }

    #[test]
    fn ifnames() {
        for ok in ["umlbr0", "a", "br-lan.10", "x234567890abcde"] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "a:1",
            "x234567890abcdef",
            "é",
            "a\n",
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }
}
