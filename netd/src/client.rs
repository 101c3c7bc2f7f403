//! A blocking client for netd. A tap obtained through a [`Client`] lives as
//! long as the client (its connection): keep it for the guest's lifetime.

use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{self, BridgeInfo, ErrorCode, Lease, Reply, Request, TapMode};

/// The socket path to use: `explicit`, else `$UMLCTL_NETD_SOCKET`, else
/// the default.
pub fn socket_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os("UMLCTL_NETD_SOCKET")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(crate::protocol::DEFAULT_SOCKET))
}

/// What went wrong talking to netd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("netd is not running (nothing listens on {}): start it with `umlctl netd` (as root), or point --netd-socket / UMLCTL_NETD_SOCKET at the socket it uses", path.display())]
    NotRunning { path: PathBuf },
    #[error("cannot connect to netd at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to netd at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netd at {} sent something this umlctl does not understand: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// netd refused or failed; `code` says which.
    #[error("netd: {message}")]
    Refused { code: ErrorCode, message: String },
}

/// A connection to netd (after `hello`).
pub struct Client {
    path: PathBuf,
    sock: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Client {
    /// The connection itself, for a process that must keep the taps alive
    /// after this one is gone (a detached guest's UML inherits it).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.sock)
    }

    /// Connect and say hello.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let sock = UnixStream::connect(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning { path: path.into() }
            }
            _ => ClientError::Connect {
                path: path.into(),
                source: e,
            },
        })?;
        let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
        let mut c = Client {
            path: path.into(),
            sock,
            buf: Vec::new(),
            fds: Vec::new(),
        };
        match c.call(&Request::Hello {
            versions: vec![protocol::VERSION],
        })? {
            Reply::Hello { .. } => Ok(c),
            other => Err(c.unexpected(&other)),
        }
    }

    fn unexpected(&self, r: &Reply) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            detail: format!("unexpected reply {r:?}"),
        }
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Read until a full line, collecting passed descriptors.
    fn read_line(&mut self) -> Result<Vec<u8>, ClientError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
            if self.buf.len() > protocol::MAX_MESSAGE {
                return Err(ClientError::Protocol {
                    path: self.path.clone(),
                    detail: "reply over the size limit".into(),
                });
            }
            let mut chunk = [0u8; 4096];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut chunk)];
            // A socket with a receive timeout is never restarted after a
            // signal handler ran (signal(7)), even with SA_RESTART: a
            // SIGWINCH or SIGCHLD in the caller must not fail the request.
            let msg = match nix::sys::socket::recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => r.map_err(|e| self.io(std::io::Error::from_raw_os_error(e as i32)))?,
            };
            let n = msg.bytes;
            for c in msg.cmsgs().into_iter().flatten() {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
                        self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            if n == 0 {
                return Err(self.io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "netd closed the connection",
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.sock
            .write_all(&protocol::encode(req))
            .map_err(|e| self.io(e))?;
        let line = self.read_line()?;
        let reply: Reply = protocol::decode(&line).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        match reply {
            Reply::Error { code, message } => Err(ClientError::Refused { code, message }),
            r => Ok(r),
        }
    }

    /// A tap on `bridge`; with [`TapMode::Fd`] also its descriptor.
    pub fn create_tap(
        &mut self,
        bridge: &str,
        mode: TapMode,
        tag: Option<&str>,
    ) -> Result<(Lease, Option<OwnedFd>), ClientError> {
        self.create_tap_publishing(bridge, mode, tag, &[])
    }

    /// As [`Client::create_tap`], with host ports published to the guest
    /// (a NAT bridge; within the policy's `publish` ranges) for as long as
    /// the tap lives.
    pub fn create_tap_publishing(
        &mut self,
        bridge: &str,
        mode: TapMode,
        tag: Option<&str>,
        publish: &[crate::protocol::Publish],
    ) -> Result<(Lease, Option<OwnedFd>), ClientError> {
        self.fds.clear();
        match self.call(&Request::CreateTap {
            bridge: bridge.into(),
            mode,
            tag: tag.map(str::to_string),
            publish: publish.to_vec(),
        })? {
            Reply::Tap { lease } => {
                let fd = self.fds.pop();
                if mode == TapMode::Fd && fd.is_none() {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        detail: "no descriptor came with the fd-mode tap".into(),
                    });
                }
                Ok((lease, fd))
            }
            other => Err(self.unexpected(&other)),
        }
    }

    /// My taps (every connection of my uid).
    pub fn list(&mut self) -> Result<Vec<Lease>, ClientError> {
        match self.call(&Request::List {})? {
            Reply::Taps { taps } => Ok(taps),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The bridges I may use.
    pub fn bridges(&mut self) -> Result<Vec<BridgeInfo>, ClientError> {
        match self.call(&Request::Bridges {})? {
            Reply::Bridges { bridges } => Ok(bridges),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Give back one of this connection's taps.
    pub fn release(&mut self, ifname: &str) -> Result<(), ClientError> {
        match self.call(&Request::Release {
            ifname: ifname.into(),
        })? {
            Reply::Released { .. } => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }
}

/// Whether this process may open `/dev/net/tun` (then an owned tap, which
/// UML opens itself with offloads, can be used; otherwise fd mode).
pub fn can_open_tun() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    extern "C" fn nothing(_: libc::c_int) {}

    /// A signal that lands while the client waits for netd's answer (here
    /// SIGUSR2 with a handler, as umlctl has for SIGWINCH) does not fail
    /// the request: the read has a timeout, so the kernel never restarts it.
    #[test]
    fn a_signal_while_waiting_does_not_fail_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            std::thread::sleep(Duration::from_millis(400));
            let reply = protocol::encode(&Reply::Hello {
                version: protocol::VERSION,
                server: "test".into(),
            });
            (&s).write_all(&reply).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        let handler = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(nothing),
            nix::sys::signal::SaFlags::SA_RESTART,
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler does nothing, which is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(nix::sys::signal::SIGUSR2, &handler) }.unwrap();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let pinger = std::thread::spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(60));
                // SAFETY: the target thread is alive until the client
                // call below returns, after this thread is joined.
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGUSR2) };
            }
        });
        let c = Client::connect(&path);
        pinger.join().unwrap();
        server.join().unwrap();
        assert!(c.is_ok(), "{:?}", c.err());
    }
}
