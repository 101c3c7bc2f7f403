//! The daemon: on start it adopts the taps a previous run left that a guest
//! still holds and removes the others (its state file), creates or adopts
//! its bridges, and listens on its socket. Each connection is its own task,
//! so a slow, malformed or oversized client only ever stalls itself. A tap
//! lives as long as the connection that asked for it; when the connection
//! closes, for any reason, the tap is removed and its lease freed. When
//! netd stops, the taps of its open connections stay with their guests, so
//! a restarted (upgraded) netd adopts them: an adopted tap lives as long as
//! a process holds it. Every decision is written to stderr (the audit log),
//! refusals included.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore};

use crate::config::{Config, ConfigError};
use crate::lease;
use crate::link::{self, LinkError};
use crate::nat::{Dnat, IsolatedBridge, Nat, NatBridge, NatError};
use crate::policy::{self, Peer, Refusal};
use crate::protocol::{
    self, BridgeInfo, DecodeError, ErrorCode, Lease, Proto, Publish, Reply, Request, TapMode,
};
use crate::tap::{self, TapError};

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections are served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 4096;
/// How many connections one user (other than root) may hold at once, so
/// that no user can take every slot from the others.
pub const MAX_CONNECTIONS_PER_UID: usize = 64;
/// A connection that holds no tap and sends nothing for this long is
/// closed (one holding a tap is a guest's lifeline and stays).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After an oversized message: how much more of it netd reads (so the
/// client's write completes and it sees the error) and for how long.
const DRAIN_BYTES: u64 = 8 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another netd is already listening on {}; stop it first, or give this one another --socket", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("another netd holds {}; it manages this state (one netd per state file and network namespace)", .0.display())]
    StateInUse(PathBuf),
    #[error("another netd runs in this network namespace (it holds the abstract socket @{NAMESPACE_LOCK}): one netd manages a namespace's bridges, rules and NAT; add bridges to its config instead")]
    NamespaceInUse,
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    #[error(transparent)]
    Nat(#[from] NatError),
    #[error("bridge {bridge}: {problem}")]
    Uplink { bridge: String, problem: String },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DaemonError + 'a {
    move |source| DaemonError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

struct Tap {
    lease: Lease,
    conn: u64,
    /// Fd mode: netd's own descriptor, which keeps the tap alive.
    _fd: Option<OwnedFd>,
}

/// The nftables table and its inputs.
struct NatSet {
    nat: Nat,
    bridges: Vec<NatBridge>,
    isolated: Vec<IsolatedBridge>,
}

struct Shared {
    config: Config,
    nl: rtnetlink::Handle,
    bridges: BTreeMap<String, u32>,
    /// NAT bridges and their uplinks.
    uplinks: BTreeMap<String, String>,
    /// Uplinks whose forwarding netd turned on, with the value to restore.
    restore: BTreeMap<String, bool>,
    /// The name servers each bridge's guests get.
    dns: BTreeMap<String, Vec<std::net::Ipv4Addr>>,
    taps: Mutex<BTreeMap<String, Tap>>,
    /// netd's nftables table and what it was made from, rebuilt when the
    /// published ports change (`None`: no NAT or isolated bridges).
    nat: std::sync::Mutex<Option<NatSet>>,
    /// Addresses kept for named guests (see [`Reservation`]), oldest first.
    reserved: std::sync::Mutex<Vec<Reservation>>,
    /// Open connections per uid.
    conns: std::sync::Mutex<BTreeMap<u32, usize>>,
    /// [`IDLE_TIMEOUT`], or `$UMLCTL_NETD_IDLE_TIMEOUT` seconds (a testing knob).
    idle: Duration,
}

/// One open connection counted against its uid while it lives.
struct ConnSlot<'a> {
    sh: &'a Shared,
    uid: u32,
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.sh.conns.lock() {
            if let Some(n) = m.get_mut(&self.uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.uid);
                }
            }
        }
    }
}

/// Count a new connection of `uid`; `None` when the uid is at its limit.
fn take_slot(sh: &Shared, uid: u32) -> Option<ConnSlot<'_>> {
    let mut m = sh.conns.lock().ok()?;
    let n = m.entry(uid).or_default();
    if uid != 0 && *n >= MAX_CONNECTIONS_PER_UID {
        return None;
    }
    *n += 1;
    Some(ConnSlot { sh, uid })
}

#[derive(Serialize, Deserialize, Default)]
struct State {
    /// Taps this netd created and has not removed.
    taps: Vec<String>,
    /// `net.ipv4.conf.IF.forwarding` values netd changed, as they were.
    #[serde(default)]
    forwarding: BTreeMap<String, bool>,
    /// The bridges this netd was configured with (a restart with a config
    /// that drops one retires it).
    #[serde(default)]
    bridges: Vec<String>,
    /// Addresses kept for named guests, so a guest that stops and starts
    /// again gets the same one (as long as the state file lives).
    #[serde(default)]
    reserved: Vec<Reservation>,
    /// The leases of `taps`, for a restarted netd to adopt the ones a guest
    /// still holds.
    #[serde(default)]
    leases: Vec<Lease>,
}

/// The connection id of adopted taps (no connection: they live as long as
/// a process holds them).
const ADOPTED: u64 = 0;

/// An address kept for a guest: its owner, its name (the tap's tag) and
/// its bridge.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Reservation {
    uid: u32,
    tag: String,
    bridge: String,
    address: std::net::Ipv4Addr,
}

/// At most this many reservations are kept; the oldest go first.
const MAX_RESERVATIONS: usize = 4096;

fn audit(peer: &Peer, what: impl std::fmt::Display) {
    eprintln!("netd: uid {} pid {}: {what}", peer.uid, peer.pid);
}

/// Run the daemon until SIGTERM or SIGINT (then every tap it made is
/// removed). Builds its own single-threaded runtime.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| io("start runtime for", &config.socket)(e))?;
    rt.block_on(serve(config))
}

async fn save_state(sh: &Shared, restore: &BTreeMap<String, bool>, taps: &BTreeMap<String, Tap>) {
    let config = &sh.config;
    let state = State {
        taps: taps.keys().cloned().collect(),
        forwarding: restore.clone(),
        bridges: config.bridges.iter().map(|b| b.name.clone()).collect(),
        reserved: sh.reserved.lock().map(|r| r.clone()).unwrap_or_default(),
        leases: taps.values().map(|t| t.lease.clone()).collect(),
    };
    let tmp = config.state.with_extension("tmp");
    let data = serde_json::to_vec(&state).unwrap_or_default();
    let res = std::fs::write(&tmp, data).and_then(|_| std::fs::rename(&tmp, &config.state));
    if let Err(e) = res {
        eprintln!("netd: write state {}: {e}", config.state.display());
    }
}

fn make_parent(p: &Path) -> Result<(), DaemonError> {
    if let Some(d) = p.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(d)
            .map_err(io("create directory", d))?;
    }
    Ok(())
}

async fn serve(config: Config) -> Result<(), DaemonError> {
    // A netd that is already running is left alone: nothing below (its
    // taps, rules, NAT, the uplinks' forwarding) is touched.
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        return Err(DaemonError::AlreadyRunning(config.socket.clone()));
    }
    let _ns_lock = lock_namespace()?;
    make_parent(&config.state)?;
    let _lock = lock_state(&config.state)?;
    let nl = link::connect().map_err(DaemonError::Netlink)?;

    // Whatever a previous run created is gone with its connections; the
    // addresses it kept for named guests stay kept.
    let mut reserved = Vec::new();
    let mut adopt: Vec<Lease> = Vec::new();
    if let Ok(data) = std::fs::read(&config.state) {
        let old: State = serde_json::from_slice(&data).unwrap_or_default();
        reserved = old.reserved.clone();
        // A tap a guest still holds (on a bridge still configured) is
        // adopted: a netd restart does not cut running guests off.
        adopt = old
            .leases
            .into_iter()
            .filter(|l| {
                l.ifname.starts_with(lease::TAP_PREFIX)
                    && old.taps.contains(&l.ifname)
                    && config.bridge(&l.bridge).is_some()
                    && link::attached(&l.ifname)
            })
            .collect();
        for name in old.taps {
            if adopt.iter().any(|l| l.ifname == name) {
                continue;
            }
            if name.starts_with(lease::TAP_PREFIX) {
                match link::remove(&nl, &name).await {
                    Ok(()) => eprintln!("netd: removed {name}, left by a previous run"),
                    Err(e) => eprintln!("netd: {e}"),
                }
            }
        }
        restore_forwarding(&old.forwarding, "as before a previous run");
        // A bridge the config no longer has keeps no forwarding (nor NAT,
        // which went with the previous run): removed when nothing is
        // attached to it, else its forwarding turned off.
        for name in &old.bridges {
            if config.bridges.iter().any(|b| &b.name == name) {
                continue;
            }
            match link::retire_bridge(&nl, name).await {
                Ok(Some(true)) => eprintln!(
                    "netd: removed bridge {name}: no longer in the config"
                ),
                Ok(Some(false)) => eprintln!(
                    "netd: bridge {name} is no longer in the config but has ports; forwarding on it turned off"
                ),
                Ok(None) => {}
                Err(e) => eprintln!("netd: retire bridge {name}: {e}"),
            }
        }
    }

    // NAT uplinks are found before anything is changed.
    let uplinks = resolve_uplinks(&nl, &config).await?;

    let mut bridges = BTreeMap::new();
    for b in &config.bridges {
        let index = link::ensure_bridge(&nl, b).await?;
        eprintln!(
            "netd: bridge {} ready (forwarding {})",
            link::describe(b),
            if b.forward { "on" } else { "off" }
        );
        bridges.insert(b.name.clone(), index);
    }
    // Isolated bridges: unreachable from other networks (a previous run's
    // rules go first).
    link::remove_rules(&nl).await?;
    let rules = match link::isolate(&nl, &config.bridges).await {
        Ok(n) => n,
        Err(e) => {
            // No half of the isolation stays behind.
            let _ = link::remove_rules(&nl).await;
            return Err(e.into());
        }
    };
    if rules > 0 {
        eprintln!("netd: {rules} rules keep other networks out of the isolated bridges");
    }
    let (nat, restore) = match start_nat(&config, &uplinks) {
        Ok(v) => v,
        Err(e) => {
            let _ = link::remove_rules(&nl).await;
            return Err(e);
        }
    };

    let listener = match bind(&config) {
        Ok(l) => l,
        Err(e) => {
            let _ = link::remove_rules(&nl).await;
            stop_nat(nat.map(|s| s.nat), &restore);
            return Err(e);
        }
    };
    let dns = guest_dns(&config);
    let shared = Arc::new(Shared {
        config,
        nl,
        bridges,
        uplinks,
        restore,
        dns,
        taps: Mutex::new(BTreeMap::new()),
        nat: std::sync::Mutex::new(nat),
        reserved: std::sync::Mutex::new(reserved),
        conns: std::sync::Mutex::new(BTreeMap::new()),
        idle: std::env::var("UMLCTL_NETD_IDLE_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&v| v > 0)
            .map(Duration::from_secs)
            .unwrap_or(IDLE_TIMEOUT),
    });
    {
        let mut taps = shared.taps.lock().await;
        for l in adopt {
            eprintln!(
                "netd: adopted {} on {} ({}/{}, uid {}): a guest still holds it",
                l.ifname, l.bridge, l.address, l.prefix, l.uid
            );
            taps.insert(
                l.ifname.clone(),
                Tap {
                    lease: l,
                    conn: ADOPTED,
                    _fd: None,
                },
            );
        }
        if taps.values().any(|t| !t.lease.publish.is_empty()) {
            if let Err(e) = publish_ports(&shared, &taps) {
                eprintln!("netd: {e}");
            }
        }
        save_state(&shared, &shared.restore, &taps).await;
    }
    // Adopted taps go when their guest lets go of them.
    {
        let sh = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let mut taps = sh.taps.lock().await;
                let gone: Vec<String> = taps
                    .iter()
                    .filter(|(n, t)| t.conn == ADOPTED && !link::attached(n))
                    .map(|(n, _)| n.clone())
                    .collect();
                if gone.is_empty() {
                    continue;
                }
                // The published ports go before the links.
                let mut published = false;
                for n in &gone {
                    published |= taps.remove(n).is_some_and(|t| !t.lease.publish.is_empty());
                }
                if published {
                    if let Err(e) = publish_ports(&sh, &taps) {
                        eprintln!("netd: {e}");
                    }
                }
                for n in &gone {
                    if let Err(e) = link::remove(&sh.nl, n).await {
                        eprintln!("netd: {e}");
                    }
                    eprintln!("netd: removed adopted {n}: its guest let go of it");
                }
                save_state(&sh, &sh.restore, &taps).await;
            }
        });
    }
    eprintln!("netd: listening on {}", shared.config.socket.display());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("handle SIGTERM for", &shared.config.socket))?;
    // SIGHUP (a closed terminal, a reload habit) would otherwise end netd
    // without cleaning up (taps, rules, the uplink's forwarding).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(io("handle SIGHUP for", &shared.config.socket))?;
    let hup_note = || {
        eprintln!("netd: SIGHUP ignored: netd reads its config only at start; restart it (guests' taps go with it) to change the config")
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let ids = AtomicU64::new(1);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = hup.recv() => { hup_note(); continue }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = hup.recv() => { hup_note(); continue }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let sh = shared.clone();
                tokio::spawn(async move {
                    connection(sh, stream, id).await;
                    drop(permit);
                });
            }
            Err(e) => {
                eprintln!("netd: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    eprintln!("netd: stopping");
    let mut taps = shared.taps.lock().await;
    // A tap a guest holds stays with it (a restarted netd adopts it); the
    // others go. netd's own descriptors of fd-mode taps are let go first,
    // so that only a guest's hold counts.
    for t in taps.values_mut() {
        t._fd = None;
    }
    let names: Vec<String> = taps.keys().cloned().collect();
    for name in names {
        if link::attached(&name) {
            eprintln!("netd: left {name} to its guest (a restarted netd adopts it)");
            continue;
        }
        if let Err(e) = link::remove(&shared.nl, &name).await {
            eprintln!("netd: {e}");
        }
        taps.remove(&name);
    }
    save_state(&shared, &shared.restore, &taps).await;
    if let Err(e) = link::remove_rules(&shared.nl).await {
        eprintln!("netd: {e}");
    }
    let nat = shared.nat.lock().ok().and_then(|mut n| n.take());
    stop_nat(nat.map(|s| s.nat), &shared.restore);
    save_state(&shared, &BTreeMap::new(), &taps).await;
    let _ = std::fs::remove_file(&shared.config.socket);
    Ok(())
}

/// Each bridge's name servers: its `dns`, else the host's for a NAT bridge
/// (read once, at start), else none.
fn guest_dns(config: &Config) -> BTreeMap<String, Vec<std::net::Ipv4Addr>> {
    let mut out = BTreeMap::new();
    for b in &config.bridges {
        let list = match &b.dns {
            Some(l) => l.clone(),
            None if b.nat => {
                let l = crate::config::host_nameservers();
                if l.is_empty() {
                    eprintln!(
                        "netd: bridge {}: the host names no name server its guests can reach (only loopback ones); give them one with dns = [\"ADDRESS\"]",
                        b.name
                    );
                }
                l
            }
            None => Vec::new(),
        };
        if !list.is_empty() {
            let names: Vec<String> = list.iter().map(|a| a.to_string()).collect();
            eprintln!(
                "netd: guests on {} get name servers {}",
                b.name,
                names.join(", ")
            );
        }
        out.insert(b.name.clone(), list);
    }
    out
}

/// The abstract unix socket that marks "a netd runs here": abstract names
/// belong to the network namespace and vanish with the process, so the
/// kernel itself keeps it to one netd per namespace (bridges, rules and
/// the NAT table are per namespace).
pub const NAMESPACE_LOCK: &str = "umlctl-netd";

fn lock_namespace() -> Result<std::os::unix::net::UnixListener, DaemonError> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(NAMESPACE_LOCK)
        .map_err(io("name the abstract socket", Path::new(NAMESPACE_LOCK)))?;
    std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            DaemonError::NamespaceInUse
        } else {
            io("bind the abstract socket", Path::new(NAMESPACE_LOCK))(e)
        }
    })
}

/// Hold `STATE.lock` for netd's lifetime: one netd per state file.
fn lock_state(state: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, DaemonError> {
    let path = state.with_extension("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            DaemonError::StateInUse(path.clone())
        } else {
            io("lock", &path)(e.into())
        }
    })
}

/// Each NAT bridge's uplink: the configured one, or the default route's
/// interface; it must exist.
async fn resolve_uplinks(
    nl: &rtnetlink::Handle,
    config: &Config,
) -> Result<BTreeMap<String, String>, DaemonError> {
    let mut out = BTreeMap::new();
    for b in config.bridges.iter().filter(|b| b.nat) {
        let bad = |problem: String| DaemonError::Uplink {
            bridge: b.name.clone(),
            problem,
        };
        let uplink = match &b.uplink {
            Some(u) => u.clone(),
            None => link::default_route_interface(nl).await?.ok_or_else(|| {
                bad("nat = true, but this host has no IPv4 default route to find the uplink by; name it with uplink = \"IFNAME\"".into())
            })?,
        };
        if link::get(nl, &uplink).await?.is_none() {
            return Err(bad(format!(
                "uplink {uplink} does not exist; name an existing interface with uplink = \"IFNAME\""
            )));
        }
        if config.bridge(&uplink).is_some() {
            return Err(bad(format!(
                "the default route leaves by {uplink}, one of netd's own bridges; name the uplink with uplink = \"IFNAME\""
            )));
        }
        out.insert(b.name.clone(), uplink);
    }
    Ok(out)
}

/// Create the NAT table and turn on forwarding on the uplinks (returning
/// what to restore). Nothing stays behind on failure.
fn start_nat(
    config: &Config,
    uplinks: &BTreeMap<String, String>,
) -> Result<(Option<NatSet>, BTreeMap<String, bool>), DaemonError> {
    let isolated: Vec<IsolatedBridge> = config
        .bridges
        .iter()
        .filter(|b| !b.forward)
        .map(|b| IsolatedBridge {
            bridge: b.name.clone(),
            address: b.address,
        })
        .collect();
    if uplinks.is_empty() && isolated.is_empty() {
        return Ok((None, BTreeMap::new()));
    }
    let list: Vec<NatBridge> = config
        .bridges
        .iter()
        .filter_map(|b| {
            Some(NatBridge {
                bridge: b.name.clone(),
                network: b.network(),
                prefix: b.prefix,
                uplink: uplinks.get(&b.name)?.clone(),
            })
        })
        .collect();
    let mut nat = Nat::open()?;
    nat.apply(&list, &isolated)?;
    let mut restore = BTreeMap::new();
    for u in uplinks.values() {
        if restore.contains_key(u) {
            continue;
        }
        let res = link::forwarding(u).and_then(|was| {
            if !was {
                link::set_forwarding(u, true)?;
            }
            Ok(was)
        });
        match res {
            Ok(was) => {
                restore.insert(u.clone(), was);
            }
            Err(e) => {
                stop_nat(Some(nat), &restore);
                return Err(DaemonError::Io {
                    op: "turn on forwarding on the uplink",
                    path: format!("/proc/sys/net/ipv4/conf/{u}/forwarding").into(),
                    source: e,
                });
            }
        }
    }
    for b in &isolated {
        eprintln!(
            "netd: guests on isolated bridge {} reach the host only at {}",
            b.bridge, b.address
        );
    }
    for b in &list {
        eprintln!(
            "netd: NAT for bridge {} ({}/{}) out of {}",
            b.bridge, b.network, b.prefix, b.uplink
        );
    }
    // Only what netd changed is restored.
    restore.retain(|_, was| !*was);
    Ok((
        Some(NatSet {
            nat,
            bridges: list,
            isolated,
        }),
        restore,
    ))
}

/// Remove the NAT table and put the uplinks' forwarding back.
fn stop_nat(nat: Option<Nat>, restore: &BTreeMap<String, bool>) {
    if let Some(mut nat) = nat {
        if let Err(e) = nat.remove() {
            eprintln!("netd: {e}");
        }
    }
    restore_forwarding(restore, "as before netd");
}

fn restore_forwarding(restore: &BTreeMap<String, bool>, why: &str) {
    for (u, was) in restore {
        match link::set_forwarding(u, *was) {
            Ok(()) => eprintln!(
                "netd: forwarding on {u} back {} ({why})",
                if *was { "on" } else { "off" }
            ),
            // The interface went away: nothing left to restore.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("netd: restore forwarding on {u}: {e}"),
        }
    }
}

/// Bind the socket: refuse if another netd answers on it, replace a stale
/// one, then set its mode and group.
fn bind(config: &Config) -> Result<UnixListener, DaemonError> {
    let path = &config.socket;
    make_parent(path)?;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(DaemonError::AlreadyRunning(path.clone()));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove stale socket", path)(e)),
    }
    let l = UnixListener::bind(path).map_err(io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.socket_mode))
        .map_err(io("chmod", path))?;
    if let Some(g) = config.socket_group {
        nix::unistd::chown(path.as_path(), None, Some(nix::unistd::Gid::from_raw(g)))
            .map_err(|e| io("chown", path)(std::io::Error::from_raw_os_error(e as i32)))?;
    }
    Ok(l)
}

/// The uid's groups from the system database (its primary gid at least).
fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let mut out = vec![gid];
    if let Ok(Some(u)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        if let Ok(name) = std::ffi::CString::new(u.name) {
            if let Ok(gs) = nix::unistd::getgrouplist(&name, u.gid) {
                out.extend(gs.into_iter().map(|g| g.as_raw()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

enum Line {
    Got(Vec<u8>),
    Eof,
    TooLarge,
}

async fn read_line(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(protocol::MAX_MESSAGE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if !buf.ends_with(b"\n") {
        return Ok(if buf.len() > protocol::MAX_MESSAGE {
            Line::TooLarge
        } else {
            Line::Eof
        });
    }
    Ok(Line::Got(buf))
}

/// Send one reply, with `fd` as SCM_RIGHTS on its first byte.
async fn send(w: &mut OwnedWriteHalf, reply: &Reply, fd: Option<&OwnedFd>) -> std::io::Result<()> {
    let bytes = protocol::encode(reply);
    let Some(fd) = fd else {
        return w.write_all(&bytes).await;
    };
    let raw = [fd.as_raw_fd()];
    let sent = loop {
        w.as_ref().writable().await?;
        let res = w.as_ref().try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(&bytes)];
            let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
            nix::sys::socket::sendmsg::<()>(
                w.as_ref().as_raw_fd(),
                &iov,
                &cmsg,
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        });
        match res {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    w.write_all(&bytes[sent..]).await
}

fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
    Reply::Error {
        code,
        message: message.into(),
    }
}

async fn connection(sh: Arc<Shared>, stream: UnixStream, id: u64) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            pid: c.pid().unwrap_or(0),
            uid: c.uid(),
            gids: groups_of(c.uid(), c.gid()),
        },
        Err(e) => {
            eprintln!("netd: SO_PEERCRED: {e}; closing the connection");
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    let Some(_slot) = take_slot(&sh, peer.uid) else {
        audit(&peer, "refused: too many connections; closing");
        let msg = format!(
            "uid {} already has {MAX_CONNECTIONS_PER_UID} connections to netd open; close some",
            peer.uid
        );
        let _ = send(&mut w, &error(ErrorCode::Limit, msg), None).await;
        return;
    };
    let mut r = BufReader::new(r);
    let mut hello = false;
    loop {
        let holds_taps = hello && sh.taps.lock().await.values().any(|t| t.conn == id);
        let line = if holds_taps {
            read_line(&mut r).await
        } else if hello {
            match tokio::time::timeout(sh.idle, read_line(&mut r)).await {
                Ok(l) => l,
                Err(_) => {
                    audit(&peer, "idle and holding no tap; closing");
                    let msg = format!("idle for {} s without a tap; closed", sh.idle.as_secs());
                    let _ = send(&mut w, &error(ErrorCode::BadRequest, msg), None).await;
                    break;
                }
            }
        } else {
            match tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut r)).await {
                Ok(l) => l,
                Err(_) => {
                    let _ = send(
                        &mut w,
                        &error(ErrorCode::Version, "no hello within 10 s"),
                        None,
                    )
                    .await;
                    break;
                }
            }
        };
        let line = match line {
            Ok(Line::Got(l)) => l,
            Ok(Line::Eof) | Err(_) => break,
            Ok(Line::TooLarge) => {
                audit(&peer, "refused: message over the size limit; closing");
                let msg = format!("message over {} bytes", protocol::MAX_MESSAGE);
                let _ = send(&mut w, &error(ErrorCode::BadRequest, msg), None).await;
                // Read on (bounded in bytes and time) so that the client's
                // write completes and it can read the error, instead of
                // seeing its connection cut under it.
                let mut sink = tokio::io::sink();
                let mut rest = (&mut r).take(DRAIN_BYTES);
                let drain = tokio::io::copy(&mut rest, &mut sink);
                let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
                break;
            }
        };
        let req = match protocol::decode::<Request>(&line) {
            Ok(r) => r,
            Err(e) => {
                let code = match e {
                    DecodeError::Version(_) => ErrorCode::Version,
                    _ => ErrorCode::BadRequest,
                };
                audit(&peer, format_args!("refused: {e}"));
                if send(&mut w, &error(code, e.to_string()), None)
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
        };
        let (reply, fd) = match req {
            Request::Hello { versions } => match protocol::negotiate(&versions) {
                Some(v) => {
                    hello = true;
                    (
                        Reply::Hello {
                            version: v,
                            server: format!("umlctl-netd {}", env!("CARGO_PKG_VERSION")),
                        },
                        None,
                    )
                }
                None => (
                    error(
                        ErrorCode::Version,
                        format!("no common protocol version: you speak {versions:?}, this netd speaks [{}]", protocol::VERSION),
                    ),
                    None,
                ),
            },
            _ if !hello => (error(ErrorCode::Version, "say hello first"), None),
            Request::CreateTap { bridge, mode, tag, publish } => match create(&sh, &peer, id, &bridge, mode, tag, publish).await {
                Ok((lease, fd)) => (Reply::Tap { lease }, fd),
                Err(reply) => (reply, None),
            },
            Request::List {} => {
                let taps = sh.taps.lock().await;
                let mine = taps.values().filter(|t| t.lease.uid == peer.uid).map(|t| t.lease.clone()).collect();
                (Reply::Taps { taps: mine }, None)
            }
            Request::Bridges {} => {
                let taps = sh.taps.lock().await;
                let held = taps.values().filter(|t| t.lease.uid == peer.uid).count();
                let held = u32::try_from(held).unwrap_or(u32::MAX);
                let bridges = policy::visible(&sh.config, &peer)
                    .into_iter()
                    .map(|(b, max)| BridgeInfo {
                        name: b.name.clone(),
                        address: b.address,
                        prefix: b.prefix,
                        forward: b.forward,
                        nat: sh.uplinks.get(&b.name).cloned(),
                        dns: sh.dns.get(&b.name).cloned().unwrap_or_default(),
                        taps_left: max.saturating_sub(held),
                    })
                    .collect();
                (Reply::Bridges { bridges }, None)
            }
            Request::Release { ifname } => (release(&sh, &peer, id, &ifname).await, None),
        };
        let sent = send(&mut w, &reply, fd.as_ref()).await;
        // The client has its own copy now (or is gone); ours is not kept:
        // the tap lives on through netd's registry copy.
        drop(fd);
        if sent.is_err() {
            break;
        }
    }
    // The connection is gone: so are its taps.
    let mut taps = sh.taps.lock().await;
    let mine: Vec<String> = taps
        .iter()
        .filter(|(_, t)| t.conn == id)
        .map(|(n, _)| n.clone())
        .collect();
    for name in &mine {
        // The published ports go before the link.
        if taps
            .remove(name)
            .is_some_and(|t| !t.lease.publish.is_empty())
        {
            if let Err(e) = publish_ports(&sh, &taps) {
                eprintln!("netd: {e}");
            }
        }
        if let Err(e) = link::remove(&sh.nl, name).await {
            eprintln!("netd: {e}");
        }
        audit(&peer, format_args!("connection closed: removed {name}"));
    }
    if !mine.is_empty() {
        save_state(&sh, &sh.restore, &taps).await;
    }
}

async fn create(
    sh: &Shared,
    peer: &Peer,
    conn: u64,
    bridge: &str,
    mode: TapMode,
    tag: Option<String>,
    publish: Vec<Publish>,
) -> Result<(Lease, Option<OwnedFd>), Reply> {
    let mut taps = sh.taps.lock().await;
    let held = taps.values().filter(|t| t.lease.uid == peer.uid).count();
    let held = u32::try_from(held).unwrap_or(u32::MAX);
    if let Err(r) = policy::check(&sh.config, peer, bridge, held)
        .and_then(|()| policy::check_publish(&sh.config, peer, bridge, &publish))
    {
        audit(peer, format_args!("refused: {r}"));
        let code = match r {
            Refusal::NoSuchBridge(_) => ErrorCode::NoSuchBridge,
            Refusal::Denied { .. } | Refusal::NotNat(_) | Refusal::PortDenied { .. } => {
                ErrorCode::Denied
            }
            Refusal::Limit { .. } => ErrorCode::Limit,
        };
        return Err(error(code, r.to_string()));
    }
    if publish.len() > 64 {
        return Err(error(ErrorCode::BadRequest, "more than 64 published ports"));
    }
    for (i, p) in publish.iter().enumerate() {
        let taken = publish[..i].iter().any(|q| q.clashes(p))
            || taps
                .values()
                .flat_map(|t| &t.lease.publish)
                .any(|q| q.clashes(p));
        if taken {
            audit(
                peer,
                format_args!("refused: host port {p} is published already"),
            );
            return Err(error(
                ErrorCode::InUse,
                format!("host port {p} is published already (by another guest, or twice here)"),
            ));
        }
    }
    if tag.as_ref().is_some_and(|t| t.len() > 256) {
        return Err(error(ErrorCode::BadRequest, "tag over 256 bytes"));
    }
    let (Some(b), Some(&index)) = (sh.config.bridge(bridge), sh.bridges.get(bridge)) else {
        return Err(error(
            ErrorCode::NoSuchBridge,
            format!("no such bridge {bridge:?}"),
        ));
    };
    let used: BTreeSet<_> = taps
        .values()
        .filter(|t| t.lease.bridge == bridge)
        .map(|t| t.lease.address)
        .collect();
    // A named guest gets the address kept for it if it is free; anyone
    // else the lowest address neither in use nor kept for another guest,
    // and only when there is none, one kept for another.
    let (kept, others): (Vec<Reservation>, Vec<Reservation>) = sh
        .reserved
        .lock()
        .map(|r| {
            r.iter()
                .filter(|r| r.bridge == bridge)
                .cloned()
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .partition(|r| Some(&r.tag) == tag.as_ref() && r.uid == peer.uid);
    let mine = kept
        .first()
        .map(|r| r.address)
        .filter(|a| !used.contains(a));
    let mut avoid = used.clone();
    avoid.extend(others.iter().map(|r| r.address));
    let address = mine
        .or_else(|| lease::free_address(b, &avoid))
        .or_else(|| lease::free_address(b, &used));
    let Some(address) = address else {
        audit(
            peer,
            format_args!("refused: bridge {bridge} has no free address"),
        );
        return Err(error(
            ErrorCode::Exhausted,
            format!(
                "bridge {bridge:?} has no free address left in {}/{}",
                b.network(),
                b.prefix
            ),
        ));
    };
    let names: BTreeSet<String> = taps.keys().cloned().collect();
    let ifname = lease::free_name(&names);
    let internal = |e: &dyn std::fmt::Display| {
        eprintln!("netd: {e}");
        error(ErrorCode::Internal, e.to_string())
    };
    // A leftover link of that name (not ours any more) is replaced.
    link::remove(&sh.nl, &ifname)
        .await
        .map_err(|e| internal(&e))?;
    let fd = match mode {
        TapMode::Owned => tap::create_owned(&ifname, peer.uid).map(|()| None),
        TapMode::Fd => tap::create_fd(&ifname).map(Some),
    }
    .map_err(|e: TapError| internal(&e))?;
    if let Err(e) = link::attach(&sh.nl, &ifname, index, b.mtu).await {
        let _ = link::remove(&sh.nl, &ifname).await;
        return Err(internal(&e));
    }
    if let Some(t) = &tag {
        if let Ok(mut r) = sh.reserved.lock() {
            r.retain(|x| {
                // This guest's old one, and any other claim on the address.
                x.bridge != bridge || (x.address != address && !(x.uid == peer.uid && &x.tag == t))
            });
            r.push(Reservation {
                uid: peer.uid,
                tag: t.clone(),
                bridge: bridge.to_string(),
                address,
            });
            let over = r.len().saturating_sub(MAX_RESERVATIONS);
            r.drain(..over);
        }
    }
    let lease = Lease {
        mac: lease::mac(
            bridge,
            peer.uid,
            tag.as_deref().unwrap_or(&address.to_string()),
        ),
        ifname: ifname.clone(),
        bridge: bridge.to_string(),
        mode,
        address,
        prefix: b.prefix,
        gateway: b.address,
        mtu: b.mtu,
        uid: peer.uid,
        dns: sh.dns.get(bridge).cloned().unwrap_or_default(),
        publish,
    };
    let client_fd = match &fd {
        Some(f) => Some(f.try_clone().map_err(|e| internal(&e))?),
        None => None,
    };
    taps.insert(
        ifname.clone(),
        Tap {
            lease: lease.clone(),
            conn,
            _fd: fd,
        },
    );
    if !lease.publish.is_empty() {
        if let Err(e) = publish_ports(sh, &taps) {
            taps.remove(&ifname);
            let _ = link::remove(&sh.nl, &ifname).await;
            let _ = publish_ports(sh, &taps);
            return Err(internal(&e));
        }
    }
    save_state(sh, &sh.restore, &taps).await;
    audit(
        peer,
        format_args!(
            "created {ifname} on {bridge} ({address}/{}, {mode:?})",
            b.prefix
        ),
    );
    Ok((lease, client_fd))
}

/// Make netd's table publish exactly the ports of `taps` (one transaction).
fn publish_ports(sh: &Shared, taps: &BTreeMap<String, Tap>) -> Result<(), NatError> {
    let Ok(mut guard) = sh.nat.lock() else {
        return Ok(());
    };
    let Some(set) = guard.as_mut() else {
        return Ok(());
    };
    let dnat: Vec<Dnat> = taps
        .values()
        .flat_map(|t| {
            let uplink = sh.uplinks.get(&t.lease.bridge).cloned();
            t.lease.publish.iter().filter_map(move |p| {
                Some(Dnat {
                    bridge: t.lease.bridge.clone(),
                    uplink: uplink.clone()?,
                    host_ip: p.host_ip,
                    host_port: p.host_port,
                    guest: t.lease.address,
                    guest_port: p.guest_port,
                    proto: match p.proto {
                        Proto::Tcp => 6,
                        Proto::Udp => 17,
                    },
                })
            })
        })
        .collect();
    set.nat.replace(&set.bridges, &set.isolated, &dnat)
}

async fn release(sh: &Shared, peer: &Peer, conn: u64, ifname: &str) -> Reply {
    let mut taps = sh.taps.lock().await;
    match taps.get(ifname) {
        None => error(ErrorCode::NoSuchTap, format!("no tap {ifname:?}")),
        Some(t) if t.lease.uid != peer.uid || t.conn != conn => {
            audit(
                peer,
                format_args!("refused: release of {ifname}, which is not this connection's"),
            );
            error(
                ErrorCode::Denied,
                format!("{ifname} is not one of this connection's taps"),
            )
        }
        Some(_) => {
            if let Err(e) = link::remove(&sh.nl, ifname).await {
                eprintln!("netd: {e}");
                return error(ErrorCode::Internal, e.to_string());
            }
            let had = taps
                .remove(ifname)
                .is_some_and(|t| !t.lease.publish.is_empty());
            if had {
                if let Err(e) = publish_ports(sh, &taps) {
                    eprintln!("netd: {e}");
                }
            }
            save_state(sh, &sh.restore, &taps).await;
            audit(peer, format_args!("released {ifname}"));
            Reply::Released {
                ifname: ifname.to_string(),
            }
        }
    }
}
