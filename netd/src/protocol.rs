//! netd's wire protocol: one JSON object per line over a unix stream
//! socket, each carrying the protocol version `v`. A client says `hello`
//! first (the versions it speaks; netd answers with the one it chose), then
//! asks for taps. A tap created for a connection lives as long as that
//! connection. Who the client is comes from `SO_PEERCRED`, never from a
//! message.
//!
//! With `mode: "fd"` the reply to `create_tap` carries the open tap file
//! descriptor as `SCM_RIGHTS` ancillary data on the reply's first byte.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Where netd listens unless its config says otherwise (and where clients
/// look unless told).
pub const DEFAULT_SOCKET: &str = "/run/umlctl/netd.sock";

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The largest message either side accepts, newline included.
pub const MAX_MESSAGE: usize = 16 * 1024;

/// How the client will use its tap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TapMode {
    /// A persistent tap owned by the client's uid, which UML opens by name
    /// (`vecN:transport=tap`, with vnet headers and offloads: fast). Needs
    /// `/dev/net/tun` to be openable by the client.
    #[default]
    Owned,
    /// netd opens the tap and passes its descriptor (`transport=fd`): works
    /// when `/dev/net/tun` is not accessible, the client never gets to open
    /// other taps, but no offloads (one frame per system call).
    Fd,
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The versions the client speaks.
    Hello { versions: Vec<u32> },
    /// A tap on `bridge`. `tag` (a guest name) makes the MAC stable across runs.
    /// `publish`: ports of the host that reach the guest (NAT bridges only,
    /// within the policy's `publish` ranges), for as long as the tap lives.
    CreateTap {
        bridge: String,
        #[serde(default)]
        mode: TapMode,
        #[serde(default)]
        tag: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        publish: Vec<Publish>,
    },
    /// The caller's taps (on every connection of its uid). (Empty struct
    /// variants, not unit ones: serde only denies unknown fields on those.)
    List {},
    /// The bridges the caller may use.
    Bridges {},
    /// Give back a tap of this connection.
    Release { ifname: String },
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

/// A port of the host that reaches a port of the guest (DNAT), like
/// `docker run -p`: `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// Only connections to this host address (default: any of the host's
    /// addresses on the bridge's uplink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

impl std::str::FromStr for Publish {
    type Err = String;
    fn from_str(s: &str) -> Result<Publish, String> {
        let bad = || {
            format!(
                "--publish {s:?}: expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp], ports 1-65535"
            )
        };
        let (ports, proto) = match s.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some(_) => return Err(bad()),
            None => (s, Proto::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, hp, gp) = match parts.as_slice() {
            [h, g] => (None, *h, *g),
            [ip, h, g] => (Some(ip.parse::<Ipv4Addr>().map_err(|_| bad())?), *h, *g),
            _ => return Err(bad()),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
        Ok(Publish {
            host_ip,
            host_port: port(hp)?,
            guest_port: port(gp)?,
            proto,
        })
    }
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        let p = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{}:{}/{p}", self.host_port, self.guest_port)
    }
}

impl Publish {
    /// Whether two publications claim the same host port.
    pub fn clashes(&self, other: &Publish) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

/// What a tap lease gives the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ifname: String,
    pub bridge: String,
    pub mode: TapMode,
    /// A locally administered unicast MAC, `02:…`.
    pub mac: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The bridge's host address: the guest's default route.
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// The uid the tap belongs to.
    pub uid: u32,
    /// Name servers for the guest (none: leave its resolver alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Ipv4Addr>,
    /// The host ports that reach this guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<Publish>,
}

/// A bridge as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeInfo {
    pub name: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// Guests may reach other networks through the host.
    pub forward: bool,
    /// The uplink the guests' traffic is masqueraded behind, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
    /// The name servers its guests get.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Ipv4Addr>,
    /// Taps the caller may still take on it (over all bridges).
    pub taps_left: u32,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a request this version understands (or too large).
    BadRequest,
    /// No common protocol version, or `hello` missing.
    Version,
    /// The policy does not allow it.
    Denied,
    /// The caller holds as many taps as the policy allows.
    Limit,
    NoSuchBridge,
    NoSuchTap,
    /// The bridge's subnet has no free address.
    Exhausted,
    /// A host port asked for is published already.
    InUse,
    /// netd itself failed (netlink, tun); the message says what.
    Internal,
}

/// netd's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Hello { version: u32, server: String },
    Tap { lease: Lease },
    Taps { taps: Vec<Lease> },
    Bridges { bridges: Vec<BridgeInfo> },
    Released { ifname: String },
    Error { code: ErrorCode, message: String },
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message over {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("protocol version {0} is not spoken here (this netd speaks {VERSION})")]
    Version(u32),
    #[error("not a valid message: {0}")]
    Invalid(String),
}

/// One line: the JSON of `body` with the version, and `\n`.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(&Envelope { v: VERSION, body }).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Decode one line (with or without its newline).
pub fn decode<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, DecodeError> {
    if line.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLarge);
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    // The version first, so that a newer client gets a version error
    // rather than a parse error about fields it added.
    #[derive(Deserialize)]
    struct V {
        v: u32,
    }
    let v: V = serde_json::from_slice(line).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if v.v != VERSION {
        return Err(DecodeError::Version(v.v));
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if let Some(o) = value.as_object_mut() {
        o.remove("v");
    }
    serde_json::from_value(value).map_err(|e| DecodeError::Invalid(e.to_string()))
}

/// The version both sides speak, if any.
pub fn negotiate(client: &[u32]) -> Option<u32> {
    client.iter().copied().filter(|&v| v == VERSION).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let reqs = [
            Request::Hello {
                versions: vec![1, 2],
            },
            Request::CreateTap {
                bridge: "umlbr0".into(),
                mode: TapMode::Fd,
                tag: Some("web".into()),
                publish: vec![],
            },
            Request::List {},
            Request::Bridges {},
            Request::Release {
                ifname: "umltap3".into(),
            },
        ];
        for r in reqs {
            let line = encode(&r);
            assert!(line.ends_with(b"\n") && !line[..line.len() - 1].contains(&b'\n'));
            assert_eq!(decode::<Request>(&line).unwrap(), r);
        }
        let lease = Lease {
            ifname: "umltap0".into(),
            bridge: "umlbr0".into(),
            mode: TapMode::Owned,
            mac: "02:00:00:00:00:01".into(),
            address: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            mtu: 1500,
            uid: 1000,
            dns: vec![],
            publish: vec![],
        };
        let r = Reply::Tap {
            lease: lease.clone(),
        };
        assert_eq!(decode::<Reply>(&encode(&r)).unwrap(), r);
        // No name servers: the field is left out (what older clients read).
        assert!(!String::from_utf8(encode(&r)).unwrap().contains("dns"));
        let r = Reply::Tap {
            lease: Lease {
                dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
                ..lease
            },
        };
        let line = encode(&r);
        assert!(String::from_utf8(line.clone())
            .unwrap()
            .contains(r#""dns":["192.0.2.53"]"#));
        assert_eq!(decode::<Reply>(&line).unwrap(), r);
    }

    #[test]
    fn wire_shape_is_stable() {
        let line = encode(&Request::CreateTap {
            bridge: "b".into(),
            mode: TapMode::Owned,
            tag: None,
            publish: vec![],
        });
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"v\":1,\"op\":\"create_tap\",\"bridge\":\"b\",\"mode\":\"owned\",\"tag\":null}\n"
        );
        // Defaults: mode and tag may be left out.
        assert_eq!(
            decode::<Request>(br#"{"v":1,"op":"create_tap","bridge":"b"}"#).unwrap(),
            Request::CreateTap {
                bridge: "b".into(),
                mode: TapMode::Owned,
                tag: None,
                publish: vec![],
            }
        );
    }

    #[test]
    fn published_ports_parse_print_and_clash() {
        let p: Publish = "8080:80".parse().unwrap();
        assert_eq!(p.to_string(), "8080:80/tcp");
        let q: Publish = "192.0.2.1:53:5353/udp".parse().unwrap();
        assert_eq!(q.host_ip, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(q.to_string(), "192.0.2.1:53:5353/udp");
        for bad in [
            "80",
            "0:80",
            "80:0",
            "70000:80",
            "a:80",
            "1.2.3:80:80",
            "80:80/sctp",
            ":80:80",
        ] {
            assert!(bad.parse::<Publish>().is_err(), "{bad}");
        }
        let any: Publish = "8080:81".parse().unwrap();
        let one: Publish = "192.0.2.1:8080:82".parse().unwrap();
        let other: Publish = "192.0.2.2:8080:82".parse().unwrap();
        assert!(p.clashes(&any) && any.clashes(&one) && !one.clashes(&other));
        assert!(!p.clashes(&"8080:80/udp".parse().unwrap()));
        // On the wire, with the request; left out when empty.
        let r = Request::CreateTap {
            bridge: "b".into(),
            mode: TapMode::Owned,
            tag: None,
            publish: vec![p, q],
        };
        assert_eq!(decode::<Request>(&encode(&r)).unwrap(), r);
    }

    #[test]
    fn bad_input() {
        assert_eq!(
            decode::<Request>(br#"{"v":2,"op":"list"}"#),
            Err(DecodeError::Version(2))
        );
        for bad in [
            &b"not json"[..],
            br#"{"op":"list"}"#,
            br#"{"v":1}"#,
            br#"{"v":1,"op":"format_disk"}"#,
            br#"{"v":1,"op":"list","uid":0}"#,
            br#"{"v":1,"op":"create_tap"}"#,
            br#"{"v":1,"op":"create_tap","bridge":7}"#,
            br#"[1,2]"#,
            b"",
        ] {
            assert!(
                matches!(decode::<Request>(bad), Err(DecodeError::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(decode::<Request>(&big), Err(DecodeError::TooLarge));
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate(&[1]), Some(1));
        assert_eq!(negotiate(&[0, 1, 7]), Some(1));
        assert_eq!(negotiate(&[2, 3]), None);
        assert_eq!(negotiate(&[]), None);
    }
}
