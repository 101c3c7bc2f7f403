//! Guest-side interface configuration, done by the guest init (PID 1)
//! before the command runs: loopback up, each leased interface's address,
//! netmask, MTU and link, the default route, and the resolver's name
//! servers. Plain `SIOCSIF*` and `SIOCADDRT` ioctls on an `AF_INET`
//! socket: no netlink stack in PID 1.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::protocol::NicSpec;

fn inet_socket() -> Result<OwnedFd, String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket for interface setup: {e}"))
}

/// IFF_UP | IFF_RUNNING as ifreq's short flags (libc has them as ints).
#[allow(clippy::cast_possible_truncation)]
const IFF_UP_RUNNING: libc::c_short = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(format!("interface name {name:?} is too long"));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    Ok(req)
}

// libc declares AF_INET as an int; sockaddr_in keeps it in a u16.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // it as the sockaddr_in its family says it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    s: &OwnedFd,
    req: libc::c_ulong,
    arg: *mut libc::c_void,
    what: &str,
) -> Result<(), String> {
    // SAFETY: every caller passes a request whose argument is the pointed-to
    // structure (ifreq or rtentry), valid and writable for the call.
    if unsafe { libc::ioctl(s.as_raw_fd(), req, arg) } != 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Bring interface `name` up.
pub fn up(name: &str) -> Result<(), String> {
    let s = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl(
        &s,
        libc::SIOCGIFFLAGS,
        &mut req as *mut _ as *mut _,
        &format!("SIOCGIFFLAGS {name}"),
    )?;
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS filled.
    unsafe {
        req.ifr_ifru.ifru_flags |= IFF_UP_RUNNING;
    }
    ioctl(
        &s,
        libc::SIOCSIFFLAGS,
        &mut req as *mut _ as *mut _,
        &format!("SIOCSIFFLAGS {name}"),
    )
}

/// Rename interface `from` to `to` (it must be down).
pub fn rename(from: &str, to: &str) -> Result<(), String> {
    let s = inet_socket()?;
    let mut req = ifreq(from)?;
    let new = ifreq(to)?;
    req.ifr_ifru.ifru_newname = new.ifr_name;
    ioctl(
        &s,
        libc::SIOCSIFNAME,
        &mut req as *mut _ as *mut _,
        &format!("rename interface {from} to {to}"),
    )
}

/// Give `nic.device` its address, netmask and MTU, and bring it up.
pub fn configure(nic: &NicSpec) -> Result<(), String> {
    let s = inet_socket()?;
    let name = nic.device.as_str();
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(nic.address);
    ioctl(
        &s,
        libc::SIOCSIFADDR,
        &mut req as *mut _ as *mut _,
        &format!("set address of {name}"),
    )?;
    let mask = if nic.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(nic.prefix.min(32)))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    ioctl(
        &s,
        libc::SIOCSIFNETMASK,
        &mut req as *mut _ as *mut _,
        &format!("set netmask of {name}"),
    )?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = libc::c_int::try_from(nic.mtu)
        .map_err(|_| format!("MTU {} of {name} is out of range", nic.mtu))?;
    ioctl(
        &s,
        libc::SIOCSIFMTU,
        &mut req as *mut _ as *mut _,
        &format!("set MTU of {name}"),
    )?;
    up(name)
}

/// Add the default route through `gw`.
pub fn default_route(gw: Ipv4Addr) -> Result<(), String> {
    let s = inet_socket()?;
    // SAFETY: rtentry is plain old data; zeroed is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gw);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(
        &s,
        libc::SIOCADDRT,
        &mut rt as *mut _ as *mut _,
        &format!("add default route via {gw}"),
    )
}

/// Loopback, every interface, then the default route via the first one.
/// Name servers are pointed at last; a failure there is returned as a
/// warning (`Ok(Some(..))`): the network itself works.
pub fn setup(nics: &[NicSpec]) -> Result<Option<String>, String> {
    up("lo")?;
    for n in nics {
        configure(n)?;
    }
    if let Some(first) = nics.first() {
        default_route(first.gateway)?;
    }
    let mut servers = Vec::new();
    for a in nics.iter().flat_map(|n| &n.dns) {
        if !servers.contains(a) {
            servers.push(*a);
        }
    }
    if servers.is_empty() {
        return Ok(None);
    }
    Ok(point_resolver(Path::new(RESOLV_CONF), Path::new(OURS), &servers).err())
}

/// The resolver's configuration file.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where the init writes its own (on the guest's /run tmpfs).
const OURS: &str = "/run/umlctl-resolv.conf";

/// The `resolv.conf` text for `servers`.
pub fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut s =
        String::from("# written by umlctl's guest init: the name servers of the guest's network\n");
    for a in servers {
        s.push_str(&format!("nameserver {a}\n"));
    }
    s
}

/// Make `conf` (normally /etc/resolv.conf) say `servers`, without writing
/// the guest's root: the text goes to `ours`, which is bind-mounted over
/// `conf` (or over the file a symlink `conf` leads to). A symlink into a
/// directory the guest sees empty (systemd-resolved's `/run/systemd/...`)
/// gets its target created there; a missing `conf` is created when the
/// root is writable (an image; a throwaway overlay unless `--overlay`).
pub fn point_resolver(conf: &Path, ours: &Path, servers: &[Ipv4Addr]) -> Result<(), String> {
    let text = resolv_conf(servers);
    std::fs::write(ours, &text).map_err(|e| format!("write {}: {e}", ours.display()))?;
    // Follow the symlink chain by hand (a dangling one ends at its target).
    let mut target = conf.to_path_buf();
    for _ in 0..16 {
        match std::fs::read_link(&target) {
            Ok(next) => {
                target = match target.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                }
            }
            Err(_) => break,
        }
    }
    if target.is_file() {
        return nix::mount::mount(
            Some(ours),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind-mount the name servers over {}: {e}", target.display()));
    }
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("create {} for the name servers: {e}", dir.display()))?;
    }
    std::fs::write(&target, &text).map_err(|e| {
        format!(
            "write the name servers to {} ({} does not lead to a file): {e}",
            target.display(),
            conf.display()
        )
    })
}

/// Whether a `/proc/net/tcp{,6}` table still holds data on its way out:
/// a socket with bytes in its send queue, or whose FIN is not yet
/// acknowledged (FIN_WAIT1, CLOSING, LAST_ACK).
pub fn tcp_sending(table: &str) -> bool {
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(st), Some(queues)) = (f.get(3), f.get(4)) else {
            return false;
        };
        let tx = queues
            .split(':')
            .next()
            .and_then(|t| u64::from_str_radix(t, 16).ok())
            .unwrap_or(0);
        tx > 0 || matches!(*st, "04" | "0B" | "09")
    })
}

/// After the command: give what it sent over the network up to `limit`
/// to leave the guest (a sender that closes its socket and exits, like
/// `nc` or `curl -T` without waiting for a reply, has handed the kernel
/// data that powering off would lose), checking every few milliseconds.
pub fn wait_tcp_sent(limit: std::time::Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < limit
        && ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .any(|p| std::fs::read_to_string(p).is_ok_and(|s| tcp_sending(&s)))
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<Ipv4Addr> {
        vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(192, 0, 2, 54)]
    }

    #[test]
    fn resolv_conf_names_each_server() {
        let t = resolv_conf(&servers());
        assert!(t.starts_with("# written by umlctl"));
        assert!(t.ends_with("nameserver 192.0.2.53\nnameserver 192.0.2.54\n"));
    }

    /// Without mount privileges only the paths that write files can be
    /// checked here; the bind mount is checked by the end-to-end tests.
    #[test]
    fn dangling_symlinks_get_their_target_and_missing_files_are_created() {
        let d = tempfile::tempdir().unwrap();
        let ours = d.path().join("ours.conf");
        // /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf, dangling.
        std::fs::create_dir(d.path().join("etc")).unwrap();
        let conf = d.path().join("etc/resolv.conf");
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &conf).unwrap();
        point_resolver(&conf, &ours, &servers()).unwrap();
        let got = std::fs::read_to_string(&conf).unwrap();
        assert!(got.contains("nameserver 192.0.2.54"), "{got}");
        assert!(d
            .path()
            .join("run/systemd/resolve/stub-resolv.conf")
            .is_file());
        // No resolv.conf at all: created.
        let conf2 = d.path().join("etc/resolv2.conf");
        point_resolver(&conf2, &ours, &servers()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&conf2).unwrap(),
            resolv_conf(&servers())
        );
        // Nowhere to write: an error naming the path.
        let e = point_resolver(
            Path::new("/proc/nonexistent/resolv.conf"),
            &ours,
            &servers(),
        )
        .unwrap_err();
        assert!(e.contains("/proc/nonexistent"), "{e}");
    }

    #[test]
    fn unsent_data_and_unacknowledged_fins_are_seen() {
        let head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";
        let listen = "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n";
        let idle = "   1: 0F02000A:9696 0100D20A:1389 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n";
        let queued = "   2: 0F02000A:9697 0100D20A:1389 01 0001A000:00000000 01:00000014 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1\n";
        let fin_wait1 = "   3: 0F02000A:9698 0100D20A:1389 04 00000000:00000000 01:00000014 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1\n";
        let time_wait = "   4: 0F02000A:9699 0100D20A:1389 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000\n";
        assert!(!tcp_sending(head));
        assert!(!tcp_sending(&format!("{head}{listen}{idle}{time_wait}")));
        assert!(tcp_sending(&format!("{head}{listen}{queued}")));
        assert!(tcp_sending(&format!("{head}{fin_wait1}")));
        assert!(!tcp_sending("garbage\nmore garbage"));
    }
}
