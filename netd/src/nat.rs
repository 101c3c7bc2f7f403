//! NAT to the host's uplink, through nftables over netlink (never `nft`).
//!
//! netd owns one table, `ip umlctl-netd`, made in one atomic batch and
//! flagged as *owned* (NFT_TABLE_F_OWNER, Linux ≥ 5.12): the kernel removes
//! it the moment netd's netlink socket closes, so a netd killed with
//! SIGKILL leaves no NAT behind. For each NAT bridge B with subnet S and
//! uplink U it holds what `nft` would print as
//!
//! ```text
//! chain postrouting { type nat hook postrouting priority srcnat; policy accept;
//!     oifname "U" ip saddr S masquerade }
//! chain forward { type filter hook forward priority filter; policy accept;
//!     iifname "U" oifname "B" ct state established,related accept
//!     iifname "U" oifname "B" drop }
//! ```
//!
//! so guests reach the outside under the uplink's address, and the outside
//! reaches guests only with replies to connections they opened — and at the
//! ports published to them (`start --publish`), each a rule
//!
//! ```text
//! chain prerouting { type nat hook prerouting priority dstnat; policy accept;
//!     iifname "U" meta l4proto tcp th dport 8080 fib daddr type local
//!         [ip daddr HOST_IP] dnat to GUEST:80 }
//! ```
//!
//! with `iifname "U" oifname "B" ct status dnat accept` before the drop. Return
//! traffic is forwarded only if the uplink forwards
//! (`net.ipv4.conf.U.forwarding`); the daemon sets that and restores it.
//!
//! The messages are built with `netlink-packet-netfilter` ([`batch`], pure,
//! unit-tested); [`Nat::apply`] sends them and reads the kernel's answer.

use std::net::Ipv4Addr;
use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, NetlinkMessage, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, Immediate,
    InetHookNumber, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register, RuleAttribute,
    RuleMessage, TableAttribute, TableFlags, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use crate::config::mask;

/// The nftables table netd owns (family `ip`).
pub const TABLE: &str = "umlctl-netd";

/// One bridge to masquerade: its name, subnet, and the uplink its guests'
/// traffic leaves by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatBridge {
    pub bridge: String,
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub uplink: String,
}

/// An isolated bridge: its guests reach the host only at `address`, the
/// bridge's own (their gateway and name server), not at the host's other
/// addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolatedBridge {
    pub bridge: String,
    pub address: Ipv4Addr,
}

/// A host port published to a guest on a NAT bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    pub bridge: String,
    pub uplink: String,
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
}

/// Setting up or removing the NAT table failed.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("nftables table ip {TABLE}: {op}: {source}")]
    Socket {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nftables table ip {TABLE}: {step}: {message}{hint}")]
    Kernel {
        step: String,
        errno: i32,
        message: String,
        hint: &'static str,
    },
    #[error("nftables table ip {TABLE}: the kernel did not answer within 5 s")]
    Silent,
}

/// NFT_PAYLOAD_NETWORK_HEADER: offsets count from the IP header.
const NETWORK_HEADER: u32 = 1;
/// Offsets of the IPv4 source and destination addresses.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;
/// nf_tables' hook priorities: NF_IP_PRI_NAT_SRC and NF_IP_PRI_FILTER.
const PRIORITY_SRCNAT: u32 = 100;
const PRIORITY_FILTER: u32 = 0;
/// NF_IP_PRI_NAT_DST.
/// NF_IP_PRI_NAT_DST: -100, as the kernel reads the 32-bit priority.
const PRIORITY_DSTNAT: u32 = u32::MAX - 99;
/// NFT_PAYLOAD_TRANSPORT_HEADER and the destination port's offset in TCP
/// and UDP headers.
const TRANSPORT_HEADER: u32 = 2;
const DPORT: u32 = 2;
/// `ct status` (NFT_CT_STATUS) and IPS_DST_NAT.
const NFT_CT_STATUS: u32 = 2;
const IPS_DST_NAT: u32 = 1 << 5;
/// `nat` expression attributes (enum nft_nat_attributes), NFT_NAT_DNAT,
/// NFPROTO_IPV4.
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFT_NAT_DNAT: u32 = 1;
const NFPROTO_IPV4: u32 = 2;
/// `fib` expression: NFTA_FIB_DREG, NFTA_FIB_RESULT, NFTA_FIB_FLAGS,
/// NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_DADDR, RTN_LOCAL.
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const RTN_LOCAL: u32 = 2;
/// NF_ACCEPT and NF_DROP as verdict codes (and chain policies).
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// `ct` expression: NFTA_CT_DREG, NFTA_CT_KEY, NFT_CT_STATE.
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;
/// Conntrack state bits (NF_CT_STATE_BIT): established, related.
const CT_ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);
/// NLMSG_ERROR and the extended-ack message attribute.
const NLMSG_ERROR: u16 = 2;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

/// An interface name as `meta iifname/oifname` compares it: NUL-padded to
/// IFNAMSIZ, so the match is exact.
fn ifname_data(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(16, 0);
    v
}

fn meta_is(key: MetaKey, name: &str) -> [Expressions; 2] {
    [
        Expressions::Meta(vec![
            Meta::Key(key),
            Meta::DestinationRegister(Register::Reg1),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(ifname_data(name))),
        ]),
    ]
}

fn saddr_in(network: Ipv4Addr, prefix: u8) -> [Expressions; 3] {
    [
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(NETWORK_HEADER),
            Payload::Offset(IPV4_SADDR),
            Payload::Len(4),
        ]),
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(mask(prefix).to_be_bytes().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(network.octets().to_vec())),
        ]),
    ]
}

fn daddr_is_not(a: Ipv4Addr) -> [Expressions; 2] {
    [
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(NETWORK_HEADER),
            Payload::Offset(IPV4_DADDR),
            Payload::Len(4),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::NotEqual),
            Cmp::Data(DataAttribute::Value(a.octets().to_vec())),
        ]),
    ]
}

fn ct_established_or_related() -> [Expressions; 3] {
    [
        Expressions::Other {
            expression_type: "ct".into(),
            attributes: vec![
                DefaultNla::new(NFTA_CT_KEY, NFT_CT_STATE.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_CT_DREG, 1u32.to_be_bytes().to_vec()),
            ],
        },
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            // The state is a host-endian register value.
            Bitwise::Mask(DataAttribute::Value(
                CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
            )),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::NotEqual),
            Cmp::Data(DataAttribute::Value(vec![0; 4])),
        ]),
    ]
}

/// `meta l4proto P th dport PORT fib daddr type local [ip daddr A]`.
fn to_local_port(proto: u8, port: u16, addr: Option<Ipv4Addr>) -> Vec<Expressions> {
    let mut v = vec![
        Expressions::Meta(vec![
            Meta::Key(MetaKey::L4Proto),
            Meta::DestinationRegister(Register::Reg1),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(vec![proto])),
        ]),
        Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(TRANSPORT_HEADER),
            Payload::Offset(DPORT),
            Payload::Len(2),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(port.to_be_bytes().to_vec())),
        ]),
        Expressions::Other {
            expression_type: "fib".into(),
            attributes: vec![
                DefaultNla::new(NFTA_FIB_DREG, 1u32.to_be_bytes().to_vec()),
                DefaultNla::new(
                    NFTA_FIB_RESULT,
                    NFT_FIB_RESULT_ADDRTYPE.to_be_bytes().to_vec(),
                ),
                DefaultNla::new(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR.to_be_bytes().to_vec()),
            ],
        },
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            // The address type is a host-endian register value.
            Cmp::Data(DataAttribute::Value(RTN_LOCAL.to_ne_bytes().to_vec())),
        ]),
    ];
    if let Some(a) = addr {
        v.push(Expressions::Payload(vec![
            Payload::DestinationRegister(Register::Reg1),
            Payload::Base(NETWORK_HEADER),
            Payload::Offset(IPV4_DADDR),
            Payload::Len(4),
        ]));
        v.push(Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(a.octets().to_vec())),
        ]));
    }
    v
}

/// `dnat to A:PORT`.
fn dnat_to(a: Ipv4Addr, port: u16) -> Vec<Expressions> {
    vec![
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Reg1),
            Immediate::Data(DataAttribute::Value(a.octets().to_vec())),
        ]),
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Reg2),
            Immediate::Data(DataAttribute::Value(port.to_be_bytes().to_vec())),
        ]),
        Expressions::Other {
            expression_type: "nat".into(),
            attributes: vec![
                DefaultNla::new(NFTA_NAT_TYPE, NFT_NAT_DNAT.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_NAT_FAMILY, NFPROTO_IPV4.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_NAT_REG_ADDR_MIN, 1u32.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_NAT_REG_PROTO_MIN, 2u32.to_be_bytes().to_vec()),
            ],
        },
    ]
}

/// `ct status dnat`.
fn ct_dnat() -> [Expressions; 3] {
    [
        Expressions::Other {
            expression_type: "ct".into(),
            attributes: vec![
                DefaultNla::new(NFTA_CT_KEY, NFT_CT_STATUS.to_be_bytes().to_vec()),
                DefaultNla::new(NFTA_CT_DREG, 1u32.to_be_bytes().to_vec()),
            ],
        },
        Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(IPS_DST_NAT.to_ne_bytes().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
        ]),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::NotEqual),
            Cmp::Data(DataAttribute::Value(vec![0; 4])),
        ]),
    ]
}

fn verdict(code: u32) -> Expressions {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
            Verdict::Other(code),
        )])),
    ])
}

fn masquerade() -> Expressions {
    Expressions::Other {
        expression_type: "masq".into(),
        attributes: vec![],
    }
}

/// One step of the batch, with what it does (for error messages).
pub struct Step {
    pub what: String,
    pub message: NetlinkMessage<NetfilterMessage>,
}

fn nft(what: String, m: NfTablesMessage, flags: u16) -> Step {
    let mut message = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
        m,
    ));
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    Step { what, message }
}

/// nf_tables' netfilter subsystem number (libc has it as an i32).
const NFNL_SUBSYS_NFTABLES: u16 = 10;

fn control(m: ControlMessage) -> NetlinkMessage<NetfilterMessage> {
    let mut message = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        m,
    ));
    message.header.flags = NLM_F_REQUEST;
    message
}

fn base_chain(name: &str, kind: &str, hook: InetHookNumber, priority: u32) -> Step {
    nft(
        format!("create chain {name}"),
        NfTablesMessage::NewChain(ChainMessage {
            attributes: vec![
                ChainAttribute::Table(TABLE.into()),
                ChainAttribute::Name(name.into()),
                ChainAttribute::Hook(vec![Hook::Number(hook.into()), Hook::Priority(priority)]),
                ChainAttribute::Policy(NF_ACCEPT),
                ChainAttribute::Type(kind.into()),
            ],
        }),
        NLM_F_CREATE,
    )
}

fn rule(chain: &str, what: String, exprs: Vec<Expressions>) -> Step {
    nft(
        what,
        NfTablesMessage::NewRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(TABLE.into()),
                RuleAttribute::Chain(chain.into()),
                RuleAttribute::Expressions(exprs.into_iter().map(Into::into).collect()),
            ],
        }),
        NLM_F_CREATE | NLM_F_APPEND,
    )
}

/// The steps that create netd's table for the NAT `bridges` and the
/// `isolated` ones (inside one batch).
pub fn batch(bridges: &[NatBridge], isolated: &[IsolatedBridge], dnat: &[Dnat]) -> Vec<Step> {
    let mut steps = vec![nft(
        CREATE_TABLE.into(),
        NfTablesMessage::NewTable(TableMessage {
            attributes: vec![
                TableAttribute::Name(TABLE.into()),
                TableAttribute::Flags(TableFlags::Owner),
            ],
        }),
        NLM_F_CREATE,
    )];
    if !bridges.is_empty() {
        steps.push(base_chain(
            "postrouting",
            "nat",
            InetHookNumber::PostRouting,
            PRIORITY_SRCNAT,
        ));
        steps.push(base_chain(
            "forward",
            "filter",
            InetHookNumber::Forward,
            PRIORITY_FILTER,
        ));
    }
    if !dnat.is_empty() {
        steps.push(base_chain(
            "prerouting",
            "nat",
            InetHookNumber::PreRouting,
            PRIORITY_DSTNAT,
        ));
    }
    for d in dnat {
        let mut v = meta_is(MetaKey::Iifname, &d.uplink).to_vec();
        v.extend(to_local_port(d.proto, d.host_port, d.host_ip));
        v.extend(dnat_to(d.guest, d.guest_port));
        steps.push(rule(
            "prerouting",
            format!(
                "publish port {} of {} to {}:{} on {}",
                d.host_port,
                d.host_ip.map_or("the host".to_string(), |a| a.to_string()),
                d.guest,
                d.guest_port,
                d.bridge
            ),
            v,
        ));
    }
    if !isolated.is_empty() {
        steps.push(base_chain(
            "input",
            "filter",
            InetHookNumber::LocalIn,
            PRIORITY_FILTER,
        ));
    }
    for b in isolated {
        let mut v = meta_is(MetaKey::Iifname, &b.bridge).to_vec();
        v.extend(daddr_is_not(b.address));
        v.push(verdict(NF_DROP));
        steps.push(rule(
            "input",
            format!(
                "keep {}'s guests off the host's addresses but {}",
                b.bridge, b.address
            ),
            v,
        ));
    }
    for b in bridges {
        let mut masq = meta_is(MetaKey::Oifname, &b.uplink).to_vec();
        masq.extend(saddr_in(b.network, b.prefix));
        masq.push(masquerade());
        steps.push(rule(
            "postrouting",
            format!(
                "masquerade {}/{} out of {} (bridge {})",
                b.network, b.prefix, b.uplink, b.bridge
            ),
            masq,
        ));
        let inbound = || {
            let mut v = meta_is(MetaKey::Iifname, &b.uplink).to_vec();
            v.extend(meta_is(MetaKey::Oifname, &b.bridge));
            v
        };
        let mut replies = inbound();
        replies.extend(ct_established_or_related());
        replies.push(verdict(NF_ACCEPT));
        steps.push(rule(
            "forward",
            format!("let replies from {} into {}", b.uplink, b.bridge),
            replies,
        ));
        if dnat.iter().any(|d| d.bridge == b.bridge) {
            let mut published = inbound();
            published.extend(ct_dnat());
            published.push(verdict(NF_ACCEPT));
            steps.push(rule(
                "forward",
                format!("let published ports from {} into {}", b.uplink, b.bridge),
                published,
            ));
        }
        let mut rest = inbound();
        rest.push(verdict(NF_DROP));
        steps.push(rule(
            "forward",
            format!("keep other traffic from {} out of {}", b.uplink, b.bridge),
            rest,
        ));
    }
    steps
}

const CREATE_TABLE: &str = "create the table";
const REMOVE_TABLE: &str = "remove the table";

fn delete_table_step() -> Step {
    nft(
        REMOVE_TABLE.into(),
        NfTablesMessage::DeleteTable(TableMessage {
            attributes: vec![TableAttribute::Name(TABLE.into())],
        }),
        0,
    )
}

/// netd's NAT: the netlink socket that owns the table (dropping it drops
/// the table).
pub struct Nat {
    socket: Socket,
    seq: u32,
}

impl Nat {
    /// A netfilter netlink socket.
    pub fn open() -> Result<Nat, NatError> {
        let sock = |op| move |source| NatError::Socket { op, source };
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(sock("open netlink socket"))?;
        socket.bind_auto().map_err(sock("bind netlink socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(sock("connect netlink socket"))?;
        // Error replies carry the kernel's own message, not our request.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        let tv = nix::sys::time::TimeVal::new(
            ANSWER_TIMEOUT.as_secs().try_into().unwrap_or(i64::MAX),
            0,
        );
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(|e| NatError::Socket {
                op: "set a receive timeout on the netlink socket",
                source: e.into(),
            })?;
        Ok(Nat { socket, seq: 1 })
    }

    /// Create the table for `bridges`, all or nothing. A table of that name
    /// left by someone else is replaced; one another live netd owns is an
    /// error.
    pub fn apply(
        &mut self,
        bridges: &[NatBridge],
        isolated: &[IsolatedBridge],
    ) -> Result<(), NatError> {
        match self.send(vec![delete_table_step()]) {
            Ok(()) => {}
            Err(NatError::Kernel { errno, .. }) if errno == libc::ENOENT => {}
            // Refused for this table (not for the whole transaction): it
            // belongs to another process's socket.
            Err(NatError::Kernel {
                errno,
                message,
                step,
                ..
            }) if errno == libc::EPERM && step == REMOVE_TABLE => {
                return Err(NatError::Kernel {
                    step: "replace a table of the same name".into(),
                    errno,
                    message,
                    hint: " — another netd in this network namespace owns it; stop that one first",
                })
            }
            Err(e) => return Err(e),
        }
        self.send(batch(bridges, isolated, &[]))
    }

    /// Replace netd's own table with one for `bridges`, `isolated` and the
    /// published ports `dnat`, in one transaction (no moment without the
    /// filter; connections already translated keep their mappings).
    pub fn replace(
        &mut self,
        bridges: &[NatBridge],
        isolated: &[IsolatedBridge],
        dnat: &[Dnat],
    ) -> Result<(), NatError> {
        let mut steps = vec![delete_table_step()];
        steps.extend(batch(bridges, isolated, dnat));
        self.send(steps)
    }

    /// Remove the table (gone already is fine).
    pub fn remove(&mut self) -> Result<(), NatError> {
        match self.send(vec![delete_table_step()]) {
            Err(NatError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(()),
            r => r,
        }
    }

    /// Send `steps` as one nftables transaction and wait for every answer.
    fn send(&mut self, mut steps: Vec<Step>) -> Result<(), NatError> {
        let mut msgs = Vec::with_capacity(steps.len() + 2);
        msgs.push(control(ControlMessage::BatchBegin));
        msgs.extend(steps.iter().map(|s| s.message.clone()));
        msgs.push(control(ControlMessage::BatchEnd));
        let first = self.seq;
        let mut buf = Vec::new();
        for mut m in msgs {
            m.header.sequence_number = self.seq;
            self.seq = self.seq.wrapping_add(1);
            m.finalize();
            let start = buf.len();
            buf.resize(start + m.buffer_len(), 0);
            m.serialize(&mut buf[start..]);
        }
        self.socket
            .send(&buf, 0)
            .map_err(|source| NatError::Socket {
                op: "send to netlink",
                source,
            })?;
        // The batch start is `first`, the steps first+1 ..= first+len;
        // every step is answered.
        let mut waiting = steps.len();
        while waiting > 0 {
            let (data, _) = match self.socket.recv_from_full() {
                Ok(v) => v,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err(NatError::Silent)
                }
                Err(source) => {
                    return Err(NatError::Socket {
                        op: "read from netlink",
                        source,
                    })
                }
            };
            for (seq, errno, text) in acks(&data) {
                // 0: the batch's start (answered only when refused as a
                // whole, e.g. without CAP_NET_ADMIN); 1..: the steps.
                let Some(i) = seq.checked_sub(first).map(|i| i as usize) else {
                    continue;
                };
                if i > steps.len() || (i == 0 && errno == 0) {
                    continue;
                }
                waiting = waiting.saturating_sub(1);
                if errno != 0 {
                    let step = match i {
                        0 => "start a transaction".to_string(),
                        _ => std::mem::take(&mut steps[i - 1].what),
                    };
                    let mut message = std::io::Error::from_raw_os_error(errno).to_string();
                    if let Some(t) = text {
                        message = format!("{message} ({t})");
                    }
                    let hint = match errno {
                        libc::ENOENT | libc::EOPNOTSUPP if step.starts_with("masquerade") || step.starts_with("create chain") => {
                            " — does the kernel have nf_tables NAT and masquerade (CONFIG_NFT_NAT, CONFIG_NFT_MASQ, CONFIG_NF_NAT)?"
                        }
                        libc::EOPNOTSUPP | libc::EINVAL if step == CREATE_TABLE => {
                            " — owned tables (NFT_TABLE_F_OWNER) need Linux 5.12 or later"
                        }
                        libc::EPERM => " — netd needs CAP_NET_ADMIN",
                        _ => "",
                    };
                    return Err(NatError::Kernel {
                        step,
                        errno,
                        message,
                        hint,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The acknowledgements in a datagram: (sequence, errno, the kernel's text).
fn acks(mut data: &[u8]) -> Vec<(u32, i32, Option<String>)> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            break;
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let flags = u16::from_ne_bytes([data[6], data[7]]);
        let seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
        let body = &data[16..len];
        if kind == NLMSG_ERROR && body.len() >= 4 {
            let errno = -i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            let mut text = None;
            if flags & NLM_F_ACK_TLVS != 0 && body.len() >= 20 {
                // Capped: the error, our header, then TLVs.
                let orig_len = u32::from_ne_bytes([body[4], body[5], body[6], body[7]]) as usize;
                let skip = if flags & 0x100 != 0 { 20 } else { 4 + orig_len };
                text = tlv_string(body.get(skip..).unwrap_or(&[]), NLMSGERR_ATTR_MSG);
            }
            out.push((seq, errno, text));
        }
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or(&[]);
    }
    out
}

/// The string attribute `kind` in a run of netlink attributes.
fn tlv_string(mut tlvs: &[u8], kind: u16) -> Option<String> {
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let t = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if t == kind {
            let s = &tlvs[4..len];
            let s = s.split(|b| *b == 0).next().unwrap_or(s);
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        tlvs = tlvs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

/// How long a kernel may take to answer (also the socket's timeout).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn br() -> NatBridge {
        NatBridge {
            bridge: "br0".into(),
            network: Ipv4Addr::new(10, 77, 0, 0),
            prefix: 24,
            uplink: "eth0".into(),
        }
    }

    fn bytes(m: &NetlinkMessage<NetfilterMessage>) -> Vec<u8> {
        let mut m = m.clone();
        m.finalize();
        let mut b = vec![0; m.buffer_len()];
        m.serialize(&mut b);
        b
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn one_table_two_chains_three_rules_per_bridge() {
        let steps = batch(&[br()], &[], &[]);
        assert_eq!(steps.len(), 3 + 3);
        let whats: Vec<&str> = steps.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(whats[0], CREATE_TABLE);
        assert_eq!(whats[3], "masquerade 10.77.0.0/24 out of eth0 (bridge br0)");
        let two = batch(
            &[
                br(),
                NatBridge {
                    bridge: "br1".into(),
                    ..br()
                },
            ],
            &[],
            &[],
        );
        assert_eq!(two.len(), 3 + 6);
        // Isolated bridges only: the table and an input chain, one rule each.
        let iso = batch(
            &[],
            &[IsolatedBridge {
                bridge: "iso0".into(),
                address: Ipv4Addr::new(10, 98, 0, 1),
            }],
            &[],
        );
        let whats: Vec<&str> = iso.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                CREATE_TABLE,
                "create chain input",
                "keep iso0's guests off the host's addresses but 10.98.0.1"
            ]
        );
        let r = bytes(&iso[2].message);
        assert!(contains(&r, b"iso0\0"));
        assert!(contains(&r, &[10, 98, 0, 1]));
        // The table is owned (dies with netd's socket).
        let t = bytes(&steps[0].message);
        assert!(contains(&t, b"umlctl-netd\0"));
        assert!(
            contains(&t, &[8, 0, 2, 0, 0, 0, 0, 2]),
            "NFTA_TABLE_FLAGS = OWNER"
        );
    }

    #[test]
    fn a_published_port_is_a_dnat_rule_and_a_forward_accept() {
        let d = Dnat {
            bridge: "br0".into(),
            uplink: "eth0".into(),
            host_ip: Some(Ipv4Addr::new(192, 0, 2, 1)),
            host_port: 8080,
            guest: Ipv4Addr::new(10, 77, 0, 5),
            guest_port: 80,
            proto: 6,
        };
        let steps = batch(&[br()], &[], std::slice::from_ref(&d));
        let whats: Vec<&str> = steps.iter().map(|s| s.what.as_str()).collect();
        assert!(whats.contains(&"create chain prerouting"), "{whats:?}");
        let rule = steps
            .iter()
            .find(|s| s.what.starts_with("publish port 8080"))
            .unwrap();
        let m = bytes(&rule.message);
        assert!(contains(&m, &8080u16.to_be_bytes()));
        assert!(contains(&m, &80u16.to_be_bytes()));
        assert!(contains(&m, &[10, 77, 0, 5]));
        assert!(contains(&m, &[192, 0, 2, 1]));
        assert!(contains(&m, b"nat\0") && contains(&m, b"fib\0"));
        // The accept comes before the bridge's drop.
        let acc = whats
            .iter()
            .position(|w| w.starts_with("let published ports"))
            .unwrap();
        let drop = whats
            .iter()
            .position(|w| w.starts_with("keep other traffic"))
            .unwrap();
        assert!(acc < drop);
        // No published ports: no prerouting chain.
        assert!(!batch(&[br()], &[], &[])
            .iter()
            .any(|s| s.what.contains("prerouting")));
    }

    #[test]
    fn the_masquerade_rule_matches_uplink_and_subnet_exactly() {
        let steps = batch(
            &[NatBridge {
                prefix: 20,
                network: Ipv4Addr::new(10, 77, 16, 0),
                ..br()
            }],
            &[],
            &[],
        );
        let m = bytes(&steps[3].message);
        // NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE; family ip.
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), (10 << 8) | 6);
        assert_eq!(m[16], libc::NFPROTO_IPV4 as u8);
        let mut eth0 = b"eth0".to_vec();
        eth0.resize(16, 0);
        assert!(contains(&m, &eth0), "oifname padded to IFNAMSIZ");
        assert!(contains(&m, &[255, 255, 240, 0]), "/20 mask");
        assert!(contains(&m, &[10, 77, 16, 0]), "network");
        assert!(contains(&m, b"masq\0"));
        assert!(contains(&m, b"payload\0"));
    }

    #[test]
    fn acks_and_errors_are_read_with_the_kernel_text() {
        // An ack (error 0) for seq 7, then ENOENT for seq 8 with a
        // capped-ack TLV message.
        let mut d = Vec::new();
        let mut push = |seq: u32, err: i32, flags: u16, tlv: Option<&str>| {
            let mut body = (-err).to_ne_bytes().to_vec();
            body.extend(36u32.to_ne_bytes()); // the original header
            body.extend([0u8; 12]);
            if let Some(t) = tlv {
                let mut v = t.as_bytes().to_vec();
                v.push(0);
                body.extend(((4 + v.len()) as u16).to_ne_bytes());
                body.extend(NLMSGERR_ATTR_MSG.to_ne_bytes());
                body.extend(&v);
                while body.len() % 4 != 0 {
                    body.push(0);
                }
            }
            let len = 16 + body.len();
            d.extend((len as u32).to_ne_bytes());
            d.extend(NLMSG_ERROR.to_ne_bytes());
            d.extend(flags.to_ne_bytes());
            d.extend(seq.to_ne_bytes());
            d.extend(0u32.to_ne_bytes());
            d.extend(body);
        };
        push(7, 0, 0x100, None);
        push(
            8,
            libc::ENOENT,
            0x100 | NLM_F_ACK_TLVS,
            Some("no such table"),
        );
        let a = acks(&d);
        assert_eq!(
            a,
            vec![
                (7, 0, None),
                (8, libc::ENOENT, Some("no such table".to_string()))
            ]
        );
        assert!(acks(&d[..20]).is_empty(), "a cut datagram is ignored");
    }
}
