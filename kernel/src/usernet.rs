//! `--net user`: a guest interface that reaches the outside through passt,
//! a user-mode network stack (Debian's `passt`), with no root, no netd, no
//! tap and no `/dev/net/tun`. The guest's connections become ordinary
//! sockets of the user who ran umlctl, in the network namespace umlctl ran
//! in; published ports are passt's listening sockets there.
//!
//! UML's vector driver has no transport passt speaks, so a small relay
//! sits between them: UML gets one end of a `SOCK_SEQPACKET` pair (the
//! `fd` transport: one Ethernet frame per packet), passt one end of a
//! stream pair (its qemu framing: a 32-bit big-endian length before each
//! frame, `passt --fd`), and the relay (umlctl itself, exec'd with
//! [`RELAY_ENV`]) copies frames between the two. Nothing has to stay
//! behind to clean up: when UML exits its end closes, the relay sees the
//! end of it and exits, and passt, which serves one client, exits with it.
//!
//! The guest's side is fixed, as in qemu's and slirp's user networking:
//! address [`GUEST`]/24, gateway [`GATEWAY`], name server [`DNS`] (passt
//! forwards its queries to the host's resolver). The host's loopback is
//! out of the guest's reach (`--no-map-gw`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// Set (to anything) in the environment of the relay process.
pub const RELAY_ENV: &str = "UMLCTL_USERNET_RELAY";
/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's gateway (passt).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest's name server (passt, forwarding to the host's resolver).
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The prefix length of the guest's network.
pub const PREFIX: u8 = 24;
/// The guest interface's MTU.
pub const MTU: u32 = 1500;
/// The guest interface's MAC address (there is one user-mode interface
/// per guest; passt learns it from the guest's first frame).
pub const MAC: &str = "02:75:6d:6c:00:0f";

/// The guest-side configuration of user-mode interface `vec{index}`.
pub fn spec(index: usize) -> crate::protocol::NicSpec {
    crate::protocol::NicSpec {
        device: format!("vec{index}"),
        address: GUEST,
        prefix: PREFIX,
        gateway: GATEWAY,
        mtu: MTU,
        dns: vec![DNS],
    }
}

/// The largest frame either side may send (passt's own maximum MTU plus
/// an Ethernet header, rounded up).
pub const MAX_FRAME: usize = 65_536;

/// A running passt and relay for one guest interface.
pub struct UserNet {
    /// UML's end: the `fd` transport's descriptor.
    pub uml: OwnedFd,
    /// passt's and the relay's process ids (for the guest's cgroup).
    pub pids: Vec<i32>,
}

/// passt's arguments for a guest interface publishing `ports`, with its
/// end of the stream on descriptor `fd`.
pub fn passt_args(fd: i32, ports: &[umlctl_netd::protocol::Publish]) -> Vec<String> {
    use umlctl_netd::protocol::Proto;
    let mut a: Vec<String> = [
        "--foreground",
        "--quiet",
        "--one-off",
        "--ipv4-only",
        "--no-map-gw",
        "--no-dhcp",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    a.extend([
        "--fd".into(),
        fd.to_string(),
        "--address".into(),
        GUEST.to_string(),
        "--netmask".into(),
        PREFIX.to_string(),
        "--gateway".into(),
        GATEWAY.to_string(),
        "--dns-forward".into(),
        DNS.to_string(),
        "--dns".into(),
        DNS.to_string(),
        "--mtu".into(),
        MTU.to_string(),
        // Nothing to syslog (there may be none) or to a closed stderr.
        "--log-file".into(),
        "/dev/null".into(),
    ]);
    if let Some(p) = std::env::var_os("UMLCTL_PASST_PCAP") {
        a.push("--pcap".into());
        a.push(p.to_string_lossy().into_owned());
    }
    for p in ports {
        let spec = match p.host_ip {
            Some(ip) => format!("{ip}/{}:{}", p.host_port, p.guest_port),
            None => format!("{}:{}", p.host_port, p.guest_port),
        };
        a.push(
            match p.proto {
                Proto::Tcp => "--tcp-ports",
                Proto::Udp => "--udp-ports",
            }
            .into(),
        );
        a.push(spec);
    }
    a
}

fn socketpair(ty: nix::sys::socket::SockType) -> Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag};
    socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| Error::sys("socketpair", crate::error::errno(e)))
}

/// Spawn `exe` with `args` and descriptors `fds` placed at 3, 4, … (all
/// others close on exec), in a session of its own (a Ctrl-C meant for the
/// guest's command must not cut its network before the guest is done).
fn spawn_with(
    mut cmd: Command,
    fds: &[&OwnedFd],
    what: &'static str,
) -> Result<std::process::Child> {
    // (source, target) pairs, made before the fork: the child allocates
    // nothing.
    let place: Vec<(i32, i32)> = fds
        .iter()
        .zip(3..)
        .map(|(f, n)| (f.as_raw_fd(), n))
        .collect();
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls: the jail's descriptor placement (fcntl,
    // dup2, close_range) and setsid.
    unsafe {
        cmd.pre_exec(move || {
            crate::jail::place_fds_raw(&place).map_err(std::io::Error::from_raw_os_error)?;
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound if what == "passt" => Error::Usage(
            "--net user needs passt, which is not installed: apt-get install passt (Debian, Ubuntu), dnf install passt (Fedora)"
                .into(),
        ),
        _ => Error::sys(what, e),
    })
}

/// Whether this process could listen on `p`'s host port now: a taken or
/// privileged port is refused here, by name, rather than by a passt that
/// exits and leaves the guest without a network.
fn check_port(p: &umlctl_netd::protocol::Publish) -> Result<()> {
    use umlctl_netd::protocol::Proto;
    let ip = p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let r = match p.proto {
        Proto::Tcp => std::net::TcpListener::bind((ip, p.host_port)).map(drop),
        Proto::Udp => std::net::UdpSocket::bind((ip, p.host_port)).map(drop),
    };
    r.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "the host port is in use".to_string(),
            std::io::ErrorKind::PermissionDenied => format!(
                "ports below {} need root (sysctl net.ipv4.ip_unprivileged_port_start)",
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "1024".into())
            ),
            std::io::ErrorKind::AddrNotAvailable => format!("{ip} is not an address of this host"),
            _ => e.to_string(),
        };
        Error::Usage(format!("--publish {p}: {why}"))
    })
}

/// Whether a `/proc/net/route` table has an IPv4 default route.
pub fn has_default_route(table: &str) -> bool {
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000")
    })
}

/// Start passt and the relay for one guest interface publishing `ports`.
pub fn spawn(ports: &[umlctl_netd::protocol::Publish]) -> Result<UserNet> {
    use nix::sys::socket::SockType;
    // passt takes its way out from the default route, and without one it
    // exits at once, which would leave the guest a dead interface.
    let routes = std::fs::read_to_string("/proc/net/route")
        .map_err(|e| Error::io("read", "/proc/net/route", e))?;
    if !has_default_route(&routes) {
        return Err(Error::Usage(
            "--net user: this network namespace has no IPv4 default route (`ip route show default` is empty), and passt needs one to reach the outside; run umlctl where the outside is routed, or use --net BRIDGE through netd"
                .into(),
        ));
    }
    for p in ports {
        check_port(p)?;
    }
    let (uml, relay_uml) = socketpair(SockType::SeqPacket)?;
    let (passt_end, relay_passt) = socketpair(SockType::Stream)?;
    let mut passt = Command::new("passt");
    // What passt says before its log is set up (a port it cannot bind, a
    // bad option) lands here, not on a pipe it could die writing to.
    let mut err = tempfile::tempfile().map_err(|e| Error::sys("create a temporary file", e))?;
    let err_w = err
        .try_clone()
        .map_err(|e| Error::sys("duplicate a descriptor", e))?;
    passt.args(passt_args(3, ports)).stderr(err_w);
    let mut passt = spawn_with(passt, &[&passt_end], "passt")?;
    drop(passt_end);
    // A failing passt exits within milliseconds; a good one stays quiet.
    // What fails is binding the published ports (checked above, but a port
    // can be taken in between), so only then is it worth the wait.
    let wait = if ports.is_empty() { 0 } else { 50 };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(wait);
    loop {
        match passt.try_wait() {
            Ok(Some(st)) => {
                use std::io::Seek;
                let mut text = String::new();
                let _ = err.seek(std::io::SeekFrom::Start(0));
                let _ = (&mut err).take(64 * 1024).read_to_string(&mut text);
                let said: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        !l.starts_with("Failed to send") && !l.starts_with("Don't run as root")
                    })
                    .collect();
                return Err(Error::Usage(format!(
                    "--net user: passt exited ({st}) before the guest started: {}",
                    said.join("; ")
                )));
            }
            Ok(None) if std::time::Instant::now() >= deadline => break,
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(2)),
            Err(e) => return Err(Error::sys("wait for passt", e)),
        }
    }
    let passt_pid = i32::try_from(passt.id()).unwrap_or(0);
    // passt runs on without us (reparented when this process exits).
    drop(passt);
    let exe = crate::initroot::current_exe()?;
    let mut relay = Command::new(&exe);
    relay
        .env_clear()
        .env(RELAY_ENV, "1")
        .stderr(Stdio::null())
        .current_dir("/");
    let relay = spawn_with(relay, &[&relay_uml, &relay_passt], "the umlctl relay")?;
    let relay_pid = i32::try_from(relay.id()).unwrap_or(0);
    drop(relay);
    Ok(UserNet {
        uml,
        pids: vec![passt_pid, relay_pid],
    })
}

/// Frames out of passt's stream: a 32-bit big-endian length, then that
/// many bytes.
#[derive(Default)]
pub struct Deframer {
    buf: Vec<u8>,
    start: usize,
}

impl Deframer {
    /// Add bytes read from the stream.
    pub fn push(&mut self, b: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(b);
    }

    /// The next whole frame, if there is one; an error for a length no
    /// Ethernet frame has (the stream cannot be trusted past it).
    pub fn next_frame(&mut self) -> std::result::Result<Option<&mut [u8]>, String> {
        let rest = &self.buf[self.start..];
        let Some(head) = rest.get(..4) else {
            self.compact();
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(format!("a frame of {len} bytes"));
        }
        if rest.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let s = self.start + 4;
        self.start = s + len;
        Ok(Some(&mut self.buf[s..s + len]))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// passt (Debian 12's) sends IPv4 frames for the guest to the MAC
/// address 00:00:00:00:00:00 until it has learnt the guest's (and, with
/// `--no-dhcp`, it may never learn it), which the guest drops as
/// addressed to another host: connections to published ports would hang.
/// An IPv4 frame to the guest's own IP address but to the null or the
/// broadcast MAC address is readdressed to the guest's MAC.
pub fn readdress(frame: &mut [u8], mac: [u8; 6]) {
    if frame.len() >= 34
        && (frame[..6] == [0; 6] || frame[..6] == [0xff; 6])
        && frame[12..14] == [0x08, 0x00]
        && frame[30..34] == GUEST.octets()
    {
        frame[..6].copy_from_slice(&mac);
    }
}

/// The one's-complement sum of `b` (16-bit big-endian words), folded.
fn csum_add(mut sum: u32, b: &[u8]) -> u32 {
    let mut it = b.chunks_exact(2);
    for w in &mut it {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = it.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

fn csum_finish(sum: u32) -> [u8; 2] {
    (!(u16::try_from(sum & 0xffff).unwrap_or(0))).to_be_bytes()
}

/// Debian 12's passt (2023-03) never completes the handshake of a
/// connection to a published port: on the guest's SYN-ACK it moves its
/// acknowledgement point and then sends an ACK only "if needed", which it
/// no longer is (fixed upstream later). The guest's connection stays
/// half-open until the client sends something, so a server that speaks
/// first (sshd, SMTP) never does. For a SYN-ACK from the guest, this is
/// the ACK passt should have sent: from passt's MAC and the client's
/// address, acknowledging the guest's SYN, at passt's next sequence
/// number, with a small window that passt's next segment corrects. A
/// second ACK from a passt without the bug is a harmless duplicate.
pub fn handshake_ack(f: &[u8]) -> Option<Vec<u8>> {
    if f.len() < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 6 || ip.len() < ihl + 20 {
        return None;
    }
    // Not a fragment.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let tcp = &ip[ihl..];
    let flags = tcp[13];
    // SYN and ACK; no RST, no FIN.
    if flags & 0x17 != 0x12 {
        return None;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let mut out = vec![0u8; 14 + 20 + 20];
    out[..6].copy_from_slice(&f[6..12]);
    out[6..12].copy_from_slice(&f[..6]);
    out[12..14].copy_from_slice(&[0x08, 0x00]);
    {
        let h = &mut out[14..34];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&40u16.to_be_bytes());
        h[6] = 0x40; // don't fragment
        h[8] = 64;
        h[9] = 6;
        h[12..16].copy_from_slice(&ip[16..20]);
        h[16..20].copy_from_slice(&ip[12..16]);
        let c = csum_finish(csum_add(0, h));
        h[10..12].copy_from_slice(&c);
    }
    {
        let t = &mut out[34..54];
        t[0..2].copy_from_slice(&tcp[2..4]);
        t[2..4].copy_from_slice(&tcp[0..2]);
        t[4..8].copy_from_slice(&ack.to_be_bytes());
        t[8..12].copy_from_slice(&seq.wrapping_add(1).to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x10;
        t[14..16].copy_from_slice(&4096u16.to_be_bytes());
    }
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&ip[16..20]);
    pseudo[4..8].copy_from_slice(&ip[12..16]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = csum_finish(csum_add(csum_add(0, &pseudo), &out[34..54]));
    out[50..52].copy_from_slice(&c);
    Some(out)
}

fn mac_bytes(m: &str) -> [u8; 6] {
    let mut b = [0u8; 6];
    for (o, p) in b.iter_mut().zip(m.split(':')) {
        *o = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    b
}

/// The relay process: frames between UML (descriptor 3, packets) and
/// passt (descriptor 4, a stream), until either side goes away. As root it
/// first drops to nobody: it needs no privilege at all.
pub fn relay_main() -> ! {
    // SAFETY: descriptors 3 and 4 were placed by `spawn` for this process
    // alone; nothing else in it owns them.
    let (uml, passt): (File, File) = unsafe {
        use std::os::fd::FromRawFd;
        (File::from_raw_fd(3), File::from_raw_fd(4))
    };
    if nix::unistd::geteuid().is_root() {
        let nobody = nix::unistd::Uid::from_raw(65_534);
        let ok = nix::unistd::setgroups(&[]).is_ok()
            && nix::unistd::setgid(nix::unistd::Gid::from_raw(65_534)).is_ok()
            && nix::unistd::setuid(nobody).is_ok();
        if !ok {
            std::process::exit(1);
        }
    }
    let _ = nix::sys::prctl::set_no_new_privs();
    let (Ok(mut uml_w), Ok(mut passt_r), Ok(mut uml_ack)) =
        (uml.try_clone(), passt.try_clone(), uml.try_clone())
    else {
        std::process::exit(1);
    };
    let (mut uml_r, mut passt_w) = (uml, passt);
    // Guest to passt.
    std::thread::spawn(move || {
        let mut frame = vec![0u8; MAX_FRAME + 4];
        loop {
            let n = match uml_r.read(&mut frame[4..]) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(n) => n,
            };
            let len = u32::try_from(n).unwrap_or(0).to_be_bytes();
            frame[..4].copy_from_slice(&len);
            if passt_w.write_all(&frame[..4 + n]).is_err() {
                std::process::exit(0);
            }
            if let Some(a) = handshake_ack(&frame[4..4 + n]) {
                let _ = uml_ack.write(&a);
            }
        }
    });
    // passt to the guest.
    let mut d = Deframer::default();
    let mac = mac_bytes(MAC);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match passt_r.read(&mut buf) {
            Ok(0) | Err(_) => std::process::exit(0),
            Ok(n) => n,
        };
        d.push(&buf[..n]);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    readdress(f, mac);
                    // A frame the guest cannot take (its queue is full and
                    // the send would block, or it is too large) is dropped,
                    // as a wire would; anything else means UML is gone.
                    match uml_w.write(f) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
                        Err(_) => std::process::exit(0),
                    }
                }
                Ok(None) => break,
                Err(_) => std::process::exit(1),
            }
        }
    }
}

/// What the fuzz target runs (fuzz/fuzz_targets/usernet_frames.rs): the
/// bytes as passt's stream, cut at every length the first byte picks, and
/// each frame and the whole input as a frame from the guest. No input may
/// panic; every frame out of the stream has a possible length; every ACK
/// made is well formed.
pub fn exercise(data: &[u8]) {
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut d = Deframer::default();
    let check_ack = |f: &[u8]| {
        if let Some(a) = handshake_ack(f) {
            assert_eq!(a.len(), 54);
            assert_eq!(csum_add(0, &a[14..34]), 0xffff);
        }
    };
    let mut frames = 0usize;
    for chunk in data.chunks(step) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(!f.is_empty() && f.len() <= MAX_FRAME);
                    readdress(f, mac_bytes(MAC));
                    check_ack(f);
                    frames += 1;
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert!(frames <= data.len() / 5);
    let mut whole = data.to_vec();
    readdress(&mut whole, mac_bytes(MAC));
    check_ack(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deframer_splits_frames_across_reads() {
        let mut d = Deframer::default();
        let mut s = Vec::new();
        for f in [&b"abcdefghijklmn"[..], &[7u8; 60][..], &b"x"[..]] {
            s.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
            s.extend_from_slice(f);
        }
        let mut got = Vec::new();
        for chunk in s.chunks(5) {
            d.push(chunk);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f.to_vec());
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], b"abcdefghijklmn");
        assert_eq!(got[1], vec![7u8; 60]);
        assert_eq!(got[2], b"x");
    }

    #[test]
    fn deframer_refuses_impossible_lengths() {
        let mut d = Deframer::default();
        d.push(&0u32.to_be_bytes());
        assert!(d.next_frame().is_err());
        let mut d = Deframer::default();
        d.push(&u32::MAX.to_be_bytes());
        assert!(d.next_frame().is_err());
    }

    #[test]
    fn a_frame_to_the_guest_s_address_gets_its_mac() {
        let mut f = vec![0u8; 60];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[30..34].copy_from_slice(&GUEST.octets());
        let mac = mac_bytes(MAC);
        let mut g = f.clone();
        readdress(&mut g, mac);
        assert_eq!(g[..6], mac);
        assert_eq!(g[6..], f[6..]);
        f[..6].copy_from_slice(&[0xff; 6]);
        let mut g = f.clone();
        readdress(&mut g, mac);
        assert_eq!(g[..6], mac);
        // An ARP broadcast, or a frame to another address, stays as it is.
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let before = arp.clone();
        readdress(&mut arp, mac);
        assert_eq!(arp, before);
        let mut other = f.clone();
        other[33] = 99;
        let before = other.clone();
        readdress(&mut other, mac);
        assert_eq!(other, before);
        let mut short = vec![0xffu8; 20];
        readdress(&mut short, mac);
        assert_eq!(short, vec![0xffu8; 20]);
    }

    /// A SYN-ACK as a Linux guest sends it (with options), from the
    /// guest's sshd to a client at 10.210.0.1:58894.
    fn synack() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xba, 0x61, 0x09, 0x52, 0x28, 0xd8]);
        f.extend_from_slice(&mac_bytes(MAC));
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 48, 0x00, 0x00, 0x40, 0x00, 64, 6, 0, 0];
        ip.extend_from_slice(&GUEST.octets());
        ip.extend_from_slice(&[10, 210, 0, 1]);
        let c = csum_finish(csum_add(0, &ip));
        ip[10..12].copy_from_slice(&c);
        f.extend_from_slice(&ip);
        let mut t = Vec::new();
        t.extend_from_slice(&22u16.to_be_bytes());
        t.extend_from_slice(&58894u16.to_be_bytes());
        t.extend_from_slice(&0x9959_d0f7u32.to_be_bytes());
        t.extend_from_slice(&0xb76b_5780u32.to_be_bytes());
        t.extend_from_slice(&[0x70, 0x12, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(&[0x02, 0x04, 0x05, 0xb4, 0x01, 0x03, 0x03, 0x07]);
        f.extend_from_slice(&t);
        f
    }

    #[test]
    fn a_guest_syn_ack_gets_the_ack_passt_forgets() {
        let a = handshake_ack(&synack()).expect("an ACK");
        assert_eq!(a.len(), 54);
        assert_eq!(a[..6], mac_bytes(MAC), "to the guest");
        assert_eq!(a[6..12], [0xba, 0x61, 0x09, 0x52, 0x28, 0xd8], "from passt");
        assert_eq!(a[26..30], [10, 210, 0, 1], "from the client");
        assert_eq!(a[30..34], GUEST.octets());
        assert_eq!(a[34..36], 58894u16.to_be_bytes());
        assert_eq!(a[36..38], 22u16.to_be_bytes());
        assert_eq!(
            a[38..42],
            0xb76b_5780u32.to_be_bytes(),
            "seq: the SYN-ACK's ack"
        );
        assert_eq!(a[42..46], 0x9959_d0f8u32.to_be_bytes(), "ack: its seq + 1");
        assert_eq!(a[47], 0x10, "ACK only");
        // Both checksums verify (a correct sum folds to 0xffff).
        assert_eq!(csum_add(0, &a[14..34]), 0xffff);
        let mut pseudo = vec![10, 210, 0, 1];
        pseudo.extend_from_slice(&GUEST.octets());
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        assert_eq!(csum_add(csum_add(0, &pseudo), &a[34..54]), 0xffff);
    }

    #[test]
    fn only_a_syn_ack_gets_an_ack() {
        let f = synack();
        for flags in [0x02u8, 0x10, 0x18, 0x11, 0x14, 0x13, 0x16] {
            let mut g = f.clone();
            g[47] = flags;
            assert!(handshake_ack(&g).is_none(), "flags {flags:#x}");
        }
        let mut udp = f.clone();
        udp[23] = 17;
        assert!(handshake_ack(&udp).is_none());
        let mut frag = f.clone();
        frag[20] = 0x20;
        assert!(handshake_ack(&frag).is_none());
        assert!(handshake_ack(&f[..40]).is_none());
        let mut arp = f;
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(handshake_ack(&arp).is_none());
    }

    /// The fuzz target's deterministic short version: seeds and 20,000
    /// mutations of them.
    #[test]
    fn hostile_frames_never_panic() {
        let mut framed = Vec::new();
        for f in [synack(), vec![1u8; 60]] {
            framed.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
            framed.extend_from_slice(&f);
        }
        crate::testutil::byte_flips(&[synack(), framed], 0x9E37_79B9_7F4A_7C15, 20_000, exercise);
    }

    #[test]
    fn a_default_route_is_recognised() {
        let head =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
        let default = "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        let local = "eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert!(has_default_route(&format!("{head}{local}{default}")));
        assert!(!has_default_route(&format!("{head}{local}")));
        assert!(!has_default_route(head));
        assert!(!has_default_route(""));
    }

    #[test]
    fn passt_gets_the_fixed_addressing_and_the_ports() {
        let ports: Vec<umlctl_netd::protocol::Publish> = vec![
            "8080:80".parse().unwrap(),
            "127.0.0.1:5353:53/udp".parse().unwrap(),
        ];
        let a = passt_args(3, &ports).join(" ");
        assert!(a.contains("--fd 3"), "{a}");
        assert!(
            a.contains("--address 10.0.2.15 --netmask 24 --gateway 10.0.2.2"),
            "{a}"
        );
        assert!(a.contains("--no-map-gw"), "{a}");
        assert!(a.contains("--tcp-ports 8080:80"), "{a}");
        assert!(a.contains("--udp-ports 127.0.0.1/5353:53"), "{a}");
    }
}
