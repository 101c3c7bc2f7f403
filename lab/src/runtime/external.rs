//! `lab.ext` at run time: a collision domain put on host interfaces gets
//! its bridge in the host's network namespace (the one `lab start` runs
//! in), as Kathará's Docker networks do, with the host interface — or an
//! 802.1Q VLAN of it, made for the lab — as a port, and the devices' taps
//! on that domain beside it. Everything else of the lab stays in its own
//! namespace. It changes the host's network: root only, but for netd's
//! bridges.
//!
//! A line naming a bridge of the host's (netd's, libvirt's, …) puts the
//! domain's devices' taps on that bridge instead, and nothing else.
//! Without root, lines may name only bridges netd lets the user use; the
//! taps then come from netd, one connection per device kept by its UML.
//!
//! `lab stop` (and a failed `lab start`) deletes the bridges the lab made,
//! which lets the host interfaces go, and the VLANs it made; the taps go
//! with their devices. After a SIGKILL of everything, the bridge and VLAN stay
//! until the next `lab stop` or `lab start` of that lab.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use super::segment;
use crate::Lab;

/// One `lab.ext` line as made on the host.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExtLink {
    /// The collision domain.
    pub domain: String,
    /// Its bridge in the host's network namespace.
    pub bridge: String,
    /// The host interface on it (`IFACE` or `IFACE.VLAN`).
    pub interface: String,
    /// The lab made that VLAN interface (and deletes it at stop).
    pub made_vlan: bool,
    /// The lab made the bridge (and deletes it at stop); not when lab.ext
    /// names a bridge of the host's, which the devices' taps then join.
    #[serde(default)]
    pub made_bridge: bool,
    /// The devices' taps on it come from netd (a user without root).
    #[serde(default)]
    pub via_netd: bool,
}

impl ExtLink {
    /// Whether the lab made something of it on the host that stop removes.
    pub fn made_anything(&self) -> bool {
        self.made_bridge || self.made_vlan
    }
}

/// The host bridge of the `k`-th external domain of lab `id`.
fn bridge_name(id: &str, k: usize) -> String {
    format!("ux{}{k}", &id[..id.len().min(8)])
}

/// The host tap of device `di`'s interface `ii` on an external domain.
pub fn tap_name(id: &str, di: usize, ii: usize) -> String {
    format!("u{}.{di}.{ii}", &id[..id.len().min(6)])
}

/// What must hold before anything is made: as root, every named host
/// interface (or the parent of every VLAN) present here; as anyone else,
/// every line naming a bridge netd lets this user use (`netd_socket`, else
/// `$UMLCTL_NETD_SOCKET`, else netd's default socket).
pub fn check(lab: &Lab, netd_socket: Option<&Path>) -> Result<(), String> {
    if lab.externals.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        return check_netd(lab, netd_socket);
    }
    let defaults = default_route_interfaces();
    for e in &lab.externals {
        let name = e.host_name();
        if !segment::exists(&name) && !segment::exists(&e.interface) {
            return Err(format!(
                "lab.ext line {}: the host has no interface {} (`ip link` lists them)",
                e.line, e.interface
            ));
        }
        // A bridge port's addresses stop working: a lab directory from
        // elsewhere must not cut this host off its network. (A bridge of the
        // host's only gains the devices' taps as ports: harmless.)
        if defaults.contains(&name) && !segment::driver(&name).is_ok_and(|d| d == "bridge") {
            return Err(format!(
                "lab.ext line {}: {name} carries this host's default route; putting it on the lab's bridge would cut the host off its network. Name a VLAN of it ({name}.VID), or an interface of its own for the lab",
                e.line
            ));
        }
    }
    Ok(())
}

/// lab.ext for a user without root: bridges netd offers, taps from netd.
fn check_netd(lab: &Lab, netd_socket: Option<&Path>) -> Result<(), String> {
    let why = "lab.ext puts collision domains on host interfaces, which changes the host's network: as a user without root it can only name bridges netd lets you use (`umlctl net bridges`)";
    if let Some(e) = lab.externals.iter().find(|e| e.vlan.is_some()) {
        return Err(format!(
            "lab.ext line {}: {why}, not VLANs such as {}; run `lab start` as root for those",
            e.line,
            e.host_name()
        ));
    }
    let path = umlctl_netd::client::socket_path(netd_socket);
    let offered: Vec<String> = umlctl_netd::client::Client::connect(&path)
        .and_then(|mut c| c.bridges())
        .map_err(|x| format!("{why}, and {x}; or run `lab start` as root"))?
        .into_iter()
        .map(|b| b.name)
        .collect();
    for e in &lab.externals {
        if !offered.contains(&e.interface) {
            return Err(format!(
                "lab.ext line {}: {why}; {} is not one of them ({}); or run `lab start` as root",
                e.line,
                e.interface,
                if offered.is_empty() {
                    "netd offers you none".to_string()
                } else {
                    format!("netd offers {}", offered.join(", "))
                }
            ));
        }
    }
    let mut seen = BTreeMap::new();
    for e in &lab.externals {
        if let Some(l) = seen.insert(e.domain.clone(), e.line) {
            return Err(format!(
                "lab.ext lines {l} and {}: collision domain {} joins netd's bridge {} and can take no other interface",
                e.line, e.domain, e.interface
            ));
        }
    }
    Ok(())
}

/// The links of a lab whose taps come from netd (no root): nothing is made
/// on the host but the taps, which live as long as their devices.
pub fn netd_links(lab: &Lab) -> Vec<ExtLink> {
    lab.externals
        .iter()
        .map(|e| ExtLink {
            domain: e.domain.clone(),
            bridge: e.interface.clone(),
            interface: e.interface.clone(),
            made_vlan: false,
            made_bridge: false,
            via_netd: true,
        })
        .collect()
}

/// One device's connection to netd and its taps (descriptors) on netd's
/// bridges, one per `(interface index, bridge)`. The connection must live
/// as long as the device: the taps go with it.
pub fn netd_taps(
    netd_socket: Option<&Path>,
    tag: &str,
    wanted: &[(usize, String)],
) -> Result<(OwnedFd, Vec<(usize, OwnedFd)>), String> {
    let path = umlctl_netd::client::socket_path(netd_socket);
    let mut c = umlctl_netd::client::Client::connect(&path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (ii, bridge) in wanted {
        let (_, fd) = c
            .create_tap(
                bridge,
                umlctl_netd::protocol::TapMode::Fd,
                Some(&format!("{tag}/eth{ii}")),
            )
            .map_err(|e| format!("a tap on netd's bridge {bridge}: {e}"))?;
        let fd = fd.ok_or_else(|| format!("netd sent no descriptor for the tap on {bridge}"))?;
        out.push((*ii, fd));
    }
    Ok((c.into_fd(), out))
}

/// The interfaces this network namespace's default routes (IPv4 and IPv6)
/// go out of.
fn default_route_interfaces() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(t) = fs::read_to_string("/proc/net/route") {
        out.extend(parse_route_defaults(&t));
    }
    if let Ok(t) = fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(parse_ipv6_route_defaults(&t));
    }
    out
}

/// `/proc/net/route`: lines `IFACE DEST GATEWAY FLAGS … MASK …` in hex; a
/// default route has destination and mask 0.
fn parse_route_defaults(t: &str) -> Vec<String> {
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `DEST PLEN SRC SPLEN NEXTHOP METRIC REF USE FLAGS
/// IFACE`; a default route is ::/0 (not the unreachable `lo` entries).
fn parse_ipv6_route_defaults(t: &str) -> Vec<String> {
    t.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 10 && f[0].bytes().all(|b| b == b'0') && f[1] == "00" && f[9] != "lo")
                .then(|| f[9].to_string())
        })
        .collect()
}

/// Make the external domains' bridges and VLANs in this (the host's)
/// network namespace, and put the host interfaces on them. On failure,
/// what was made is taken back.
pub fn make(lab: &Lab, id: &str) -> Result<Vec<ExtLink>, String> {
    let mut links: Vec<ExtLink> = Vec::new();
    let mut bridges: BTreeMap<String, String> = BTreeMap::new();
    let r = (|| {
        for e in &lab.externals {
            let name = e.host_name();
            // A bridge of the host's (netd's, libvirt's, one of yours): the
            // domain's devices join it as they are; it is not the lab's.
            if e.vlan.is_none() && segment::driver(&name).is_ok_and(|d| d == "bridge") {
                if let Some(other) = lab
                    .externals
                    .iter()
                    .find(|o| o.domain == e.domain && o.line != e.line)
                {
                    return Err(format!(
                        "lab.ext lines {} and {}: {name} is a bridge of the host's, so collision domain {} joins it and can take no other interface; put {} on {name} yourself",
                        e.line.min(other.line),
                        e.line.max(other.line),
                        e.domain,
                        other.host_name()
                    ));
                }
                bridges.insert(e.domain.clone(), name.clone());
                links.push(ExtLink {
                    domain: e.domain.clone(),
                    bridge: name.clone(),
                    interface: name,
                    made_vlan: false,
                    made_bridge: false,
                    via_netd: false,
                });
                continue;
            }
            let bridge = match bridges.get(&e.domain) {
                Some(b) => b.clone(),
                None => {
                    let b = bridge_name(id, bridges.len());
                    segment::bridge(&b).map_err(|x| {
                        format!(
                            "lab.ext line {} (collision domain {}): {x}",
                            e.line, e.domain
                        )
                    })?;
                    bridges.insert(e.domain.clone(), b.clone());
                    // Recorded at once, so that a later failure deletes it.
                    links.push(ExtLink {
                        domain: e.domain.clone(),
                        bridge: b.clone(),
                        interface: String::new(),
                        made_vlan: false,
                        made_bridge: true,
                        via_netd: false,
                    });
                    b
                }
            };
            let made_vlan = match e.vlan {
                Some(vid) if !segment::exists(&name) => {
                    segment::add_vlan(&e.interface, vid)
                        .map_err(|x| format!("lab.ext line {}: {x}", e.line))?;
                    true
                }
                _ => false,
            };
            links.push(ExtLink {
                domain: e.domain.clone(),
                bridge: bridge.clone(),
                interface: name.clone(),
                made_vlan,
                made_bridge: true,
                via_netd: false,
            });
            segment::attach(&name, &bridge).map_err(|x| {
                let busy = x.contains("busy");
                format!(
                    "lab.ext line {}: {x}{}",
                    e.line,
                    if busy {
                        format!(" ({name} is already a port of a bridge or bond: `ip link set {name} nomaster` frees it)")
                    } else {
                        String::new()
                    }
                )
            })?;
        }
        Ok(())
    })();
    match r {
        Ok(()) => {
            links.retain(|l| !l.interface.is_empty());
            Ok(links)
        }
        Err(e) => {
            remove(&links);
            Err(e)
        }
    }
}

/// Take back what [`make`] made here: the bridges (their ports go free)
/// and the VLANs the lab made. Returns what could not be removed.
pub fn remove(links: &[ExtLink]) -> Vec<String> {
    let mut failed = Vec::new();
    let mut done = Vec::new();
    for l in links {
        if l.made_bridge && !done.contains(&l.bridge) {
            done.push(l.bridge.clone());
            if segment::exists(&l.bridge) {
                if let Err(e) = segment::delete_bridge(&l.bridge) {
                    failed.push(e);
                }
            }
        }
        if l.made_vlan && segment::exists(&l.interface) {
            if let Err(e) = segment::delete_vlan(&l.interface) {
                failed.push(e);
            }
        }
    }
    failed
}

/// This thread's network namespace, to come back to.
pub fn current() -> Result<fs::File, String> {
    fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))
}

/// Run `f` in network namespace `there`, then come back to this one.
pub fn inside<T>(there: &fs::File, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let back = current()?;
    nix::sched::setns(there.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("enter the host's network namespace: {e}"))?;
    let r = f();
    nix::sched::setns(back.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("return to the lab's network namespace: {e}"))?;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_found_in_procs_tables() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth1\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(parse_route_defaults(v4), vec!["eth0"]);
        let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth1\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     wlan0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        assert_eq!(parse_ipv6_route_defaults(v6), vec!["wlan0"]);
    }
}
