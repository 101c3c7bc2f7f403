//! `bridged` devices reach the outside through slirp4netns: a user-mode
//! network stack that runs in the host's network namespace (as the user
//! who started the lab, no privilege) and owns a tap in the lab's. The
//! device's extra interface shares a bridge with that tap and gets
//! slirp's fixed addressing (10.0.2.100/24, gateway 10.0.2.2, name server
//! 10.0.2.3). The host's loopback stays out of reach.
//!
//! slirp4netns lives exactly as long as its device: it exits when the
//! write end of its exit pipe closes, and only the device's UML holds it.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// The guest side of slirp's network.
pub const GUEST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 100);
/// slirp's gateway.
pub const GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 2);
/// slirp's name server (the host's resolver).
pub const DNS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 3);

/// A running slirp4netns.
pub struct Uplink {
    /// Its tap in the lab's namespace.
    pub tap: String,
    /// The write end of its exit pipe: whoever holds it keeps it running.
    pub keep: Arc<OwnedFd>,
}

/// Start slirp4netns for the namespaces of process `ns_pid` (still being
/// set up), its tap called `tap`, listening on `api` for port forwards;
/// returns once the tap exists.
pub fn spawn(ns_pid: i32, tap: &str, api: &std::path::Path) -> Result<Uplink, String> {
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (exit_r, exit_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let mut cmd = Command::new("slirp4netns");
    cmd.args([
        "--exit-fd=3",
        "--ready-fd=4",
        "--disable-host-loopback",
        "--mtu=1500",
    ]);
    let _ = std::fs::remove_file(api);
    cmd.arg(format!("--api-socket={}", api.display()));
    if !nix::unistd::geteuid().is_root() {
        cmd.arg(format!("--userns-path=/proc/{ns_pid}/ns/user"));
    }
    cmd.arg("--netns-type=path")
        .arg(format!("/proc/{ns_pid}/ns/net"))
        .arg(tap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (er, rw) = (exit_r.as_raw_fd(), ready_w.as_raw_fd());
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (dup2, setsid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(er, 3) < 0 || libc::dup2(rw, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Not in the lab starter's session: a Ctrl-C there must not
            // cut a running lab off.
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "start slirp4netns for a bridged device: {e} (install it: apt-get install slirp4netns)"
        )
    })?;
    drop(exit_r);
    drop(ready_w);
    // It writes "1" once the tap is up; EOF means it died. (No thread:
    // the caller must stay single-threaded to enter the lab's namespaces.)
    let ok = {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&ready_r),
            PollFlags::POLLIN,
        )];
        let ms = u16::try_from(Duration::from_secs(20).as_millis()).unwrap_or(u16::MAX);
        let ready = poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) > 0;
        let mut b = [0u8; 1];
        ready && std::fs::File::from(ready_r).read_exact(&mut b).is_ok()
    };
    if !ok {
        let _ = child.kill();
        let out = child
            .wait_with_output()
            .map(|o| o.stderr)
            .unwrap_or_default();
        return Err(format!(
            "slirp4netns did not come up for tap {tap}: {}",
            String::from_utf8_lossy(&out).trim()
        ));
    }
    // It runs on without us (reparented when this process exits).
    drop(child);
    Ok(Uplink {
        tap: tap.to_string(),
        keep: Arc::new(exit_w),
    })
}

/// Forward the host's `port.host` (all addresses, in the namespace
/// slirp4netns runs in) to the device's `port.guest`, through slirp4netns's
/// API socket `api`.
pub fn forward(api: &std::path::Path, port: &crate::Port) -> Result<(), String> {
    use std::io::Write;
    let req = format!(
        "{{\"execute\": \"add_hostfwd\", \"arguments\": {{\"proto\": \"{}\", \"host_addr\": \"0.0.0.0\", \"host_port\": {}, \"guest_addr\": \"{GUEST}\", \"guest_port\": {}}}}}",
        port.proto, port.host, port.guest
    );
    let what = format!("publish port {}:{}/{}", port.host, port.guest, port.proto);
    let mut s = std::os::unix::net::UnixStream::connect(api)
        .map_err(|e| format!("{what}: connect to slirp4netns at {}: {e}", api.display()))?;
    s.write_all(req.as_bytes())
        .and_then(|()| s.shutdown(std::net::Shutdown::Write))
        .map_err(|e| format!("{what}: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("{what}: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|e| format!("{what}: slirp4netns answered {reply:?}: {e}"))?;
    if v.get("return").is_some() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {} (is the host port free?)",
            v.get("error")
                .and_then(|e| e.get("desc"))
                .and_then(|d| d.as_str())
                .unwrap_or(reply.trim())
        ))
    }
}
