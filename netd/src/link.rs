//! Link work through rtnetlink: create or adopt bridges, give them their
//! address, attach taps, remove taps. Never through `ip`.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::Handle;

use crate::config::Bridge;

/// A netlink operation that failed, with the interface and the operation.
#[derive(Debug, thiserror::Error)]
#[error("{op} {name}: {detail}")]
pub struct LinkError {
    pub op: &'static str,
    pub name: String,
    pub detail: String,
}

fn fail<'a>(op: &'static str, name: &'a str) -> impl FnOnce(rtnetlink::Error) -> LinkError + 'a {
    move |e| LinkError {
        op,
        name: name.to_string(),
        detail: e.to_string(),
    }
}

/// A netlink connection (its task runs on the current tokio runtime).
pub fn connect() -> std::io::Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The link called `name`, if there is one.
pub async fn get(h: &Handle, name: &str) -> Result<Option<LinkMessage>, LinkError> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(m) => Ok(m),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(fail("look up", name)(e)),
    }
}

fn is_bridge(m: &LinkMessage) -> bool {
    m.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

/// Create bridge `b` (or adopt the existing one), give it its address if it
/// lacks it, set its MTU and bring it up. A link of that name that is not a
/// bridge is an error: netd does not take over other interfaces.
pub async fn ensure_bridge(h: &Handle, b: &Bridge) -> Result<u32, LinkError> {
    let existing = get(h, &b.name).await?;
    let index = match existing {
        Some(m) if is_bridge(&m) => m.header.index,
        Some(_) => return Err(LinkError {
            op: "adopt",
            name: b.name.clone(),
            detail:
                "exists and is not a bridge; name another bridge in the config or remove that link"
                    .into(),
        }),
        None => {
            h.link()
                .add()
                .bridge(b.name.clone())
                .execute()
                .await
                .map_err(fail("create bridge", &b.name))?;
            get(h, &b.name)
                .await?
                .ok_or_else(|| LinkError {
                    op: "create bridge",
                    name: b.name.clone(),
                    detail: "created but not found".into(),
                })?
                .header
                .index
        }
    };
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    let mut has = false;
    while let Some(a) = addrs
        .try_next()
        .await
        .map_err(fail("list addresses of", &b.name))?
    {
        let mine = a.header.prefix_len == b.prefix
            && a.attributes.iter().any(|x| matches!(x, AddressAttribute::Local(IpAddr::V4(v)) | AddressAttribute::Address(IpAddr::V4(v)) if *v == b.address));
        has |= mine;
    }
    if !has {
        h.address()
            .add(index, IpAddr::V4(b.address), b.prefix)
            .execute()
            .await
            .map_err(fail("add address to", &b.name))?;
    }
    h.link()
        .set(index)
        .mtu(b.mtu)
        .up()
        .execute()
        .await
        .map_err(fail("bring up", &b.name))?;
    set_forwarding(&b.name, b.forward).map_err(|e| LinkError {
        op: "set forwarding on",
        name: b.name.clone(),
        detail: e.to_string(),
    })?;
    Ok(index)
}

/// Whether packets arriving on `name` are routed to other interfaces
/// (`net.ipv4.conf.NAME.forwarding`; the host-wide setting is not touched).
pub fn set_forwarding(name: &str, on: bool) -> std::io::Result<()> {
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{name}/forwarding"),
        if on { "1\n" } else { "0\n" },
    )
}

/// Put tap `tap` on bridge index `bridge` with `mtu` and bring it up.
pub async fn attach(h: &Handle, tap: &str, bridge: u32, mtu: u32) -> Result<(), LinkError> {
    let index = get(h, tap)
        .await?
        .ok_or_else(|| LinkError {
            op: "attach",
            name: tap.to_string(),
            detail: "no such link".into(),
        })?
        .header
        .index;
    h.link()
        .set(index)
        .controller(bridge)
        .mtu(mtu)
        .up()
        .execute()
        .await
        .map_err(fail("attach to bridge", tap))
}

/// Remove link `name`; a link that is already gone is fine.
/// Whether a tap has a process attached (its carrier is on): a guest's
/// UML holds it. Read from sysfs, which `ip netns exec` and systemd's
/// namespaces mount for the namespace netd runs in.
pub fn attached(ifname: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/carrier"))
        .is_ok_and(|c| c.trim() == "1")
}

pub async fn remove(h: &Handle, name: &str) -> Result<(), LinkError> {
    let Some(m) = get(h, name).await? else {
        return Ok(());
    };
    match h.link().del(m.header.index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        Err(e) => Err(fail("remove", name)(e)),
    }
}

/// Retire a bridge netd no longer manages: removed if nothing is attached
/// to it (`Some(true)`), else its forwarding turned off (`Some(false)`);
/// `None` if it is gone already or is not a bridge.
pub async fn retire_bridge(h: &Handle, name: &str) -> Result<Option<bool>, LinkError> {
    let Some(m) = get(h, name).await? else {
        return Ok(None);
    };
    if !is_bridge(&m) {
        return Ok(None);
    }
    let index = m.header.index;
    let mut ports = 0;
    let mut s = h.link().get().execute();
    while let Some(l) = s.try_next().await.map_err(fail("list links", name))? {
        if l.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == index))
        {
            ports += 1;
        }
    }
    if ports == 0 {
        remove(h, name).await?;
        return Ok(Some(true));
    }
    set_forwarding(name, false).map_err(|e| LinkError {
        op: "turn off forwarding on",
        name: name.into(),
        detail: e.to_string(),
    })?;
    Ok(Some(false))
}

/// Names of every link starting with `prefix`.
pub async fn names_with_prefix(h: &Handle, prefix: &str) -> Result<Vec<String>, LinkError> {
    let mut out = Vec::new();
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.map_err(fail("list links", prefix))? {
        for a in &m.attributes {
            if let LinkAttribute::IfName(n) = a {
                if n.starts_with(prefix) {
                    out.push(n.clone());
                }
            }
        }
    }
    Ok(out)
}

/// The bridge's address as configured, for messages.
pub fn describe(b: &Bridge) -> String {
    format!("{} ({}/{})", b.name, b.address, b.prefix)
}

/// The priority range of the policy-routing rules netd owns; it removes
/// whatever lies in it at start and at exit.
pub const RULE_PRIORITIES: std::ops::Range<u32> = 10_700..10_800;

/// Make every bridge without `forward` unreachable from the rest of the
/// host's networks (another bridge's guests, uplinks) while its own guests
/// and the host itself still reach it: for each such subnet S, in order,
/// `iif BRIDGE to S → main`, `iif lo to S → main` (the host's own traffic),
/// `to S → prohibit`. Routed traffic is all these see; a bridge's guests
/// talk to each other at layer 2, untouched.
pub async fn isolate(h: &Handle, bridges: &[Bridge]) -> Result<usize, LinkError> {
    use netlink_packet_route::rule::RuleAction;
    let mut prio = RULE_PRIORITIES.start;
    let mut n = 0;
    for b in bridges.iter().filter(|b| !b.forward) {
        if prio + 3 > RULE_PRIORITIES.end {
            return Err(LinkError {
                op: "isolate",
                name: b.name.clone(),
                detail: "too many isolated bridges (at most 33)".into(),
            });
        }
        for iif in [Some(b.name.as_str()), Some("lo"), None] {
            let mut req = h
                .rule()
                .add()
                .v4()
                .destination_prefix(b.network(), b.prefix)
                .priority(prio);
            req = match iif {
                Some(i) => req
                    .input_interface(i.to_string())
                    .action(RuleAction::ToTable),
                None => {
                    let mut r = req.action(RuleAction::Prohibit);
                    r.message_mut().header.table = 0;
                    r
                }
            };
            req.execute()
                .await
                .map_err(fail("add an isolation rule for", &b.name))?;
            prio += 1;
            n += 1;
        }
    }
    Ok(n)
}

/// Remove netd's rules (those in [`RULE_PRIORITIES`]).
pub async fn remove_rules(h: &Handle) -> Result<usize, LinkError> {
    use netlink_packet_route::rule::RuleAttribute;
    let mut mine = Vec::new();
    let mut s = h.rule().get(rtnetlink::IpVersion::V4).execute();
    while let Some(m) = s.try_next().await.map_err(fail("list rules", "(ipv4)"))? {
        let prio = m.attributes.iter().find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        });
        if prio.is_some_and(|p| RULE_PRIORITIES.contains(&p)) {
            mine.push(m);
        }
    }
    let n = mine.len();
    for m in mine {
        h.rule()
            .del(m)
            .execute()
            .await
            .map_err(fail("remove a rule of", "netd"))?;
    }
    Ok(n)
}

/// The interface of the main table's IPv4 default route (the lowest
/// metric when there are several), if there is one.
pub async fn default_route_interface(h: &Handle) -> Result<Option<String>, LinkError> {
    use netlink_packet_route::route::{RouteAttribute, RouteHeader};
    let mut best: Option<(u32, u32)> = None;
    let mut s = h.route().get(rtnetlink::IpVersion::V4).execute();
    while let Some(m) = s.try_next().await.map_err(fail("list routes", "(ipv4)"))? {
        let (mut table, mut oif, mut metric) = (u32::from(m.header.table), None, 0);
        for a in &m.attributes {
            match a {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Priority(p) => metric = *p,
                _ => {}
            }
        }
        let default_main = m.header.destination_prefix_length == 0
            && table == u32::from(RouteHeader::RT_TABLE_MAIN);
        if let (true, Some(oif)) = (default_main, oif) {
            if best.map_or(true, |(m, _)| metric < m) {
                best = Some((metric, oif));
            }
        }
    }
    let Some((_, index)) = best else {
        return Ok(None);
    };
    let mut s = h.link().get().match_index(index).execute();
    let m = s
        .try_next()
        .await
        .map_err(fail("look up the default route's interface", "(ipv4)"))?;
    Ok(m.and_then(|m| {
        m.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        })
    }))
}

/// `net.ipv4.conf.NAME.forwarding` as it is now.
pub fn forwarding(name: &str) -> std::io::Result<bool> {
    let v = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/forwarding"))?;
    Ok(v.trim() != "0")
}
