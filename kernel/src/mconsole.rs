//! UML's management console (mconsole): a datagram protocol on the unix
//! socket `<uml_dir>/<umid>/mconsole` (see `reference/uml-spec.md` §3).
//!
//! Requests are `magic 0xCAFEBABE | version 2 | len | data`, replies
//! `err | more | len | data` (len counts the trailing NUL), all host-endian.
//! Long replies arrive in chunks with `more = 1`; the client must bind its
//! own socket, because UML answers with `sendto` to the sender. Anything
//! `uml_mconsole` can do, [`Client`] can: it sends the same packets.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Request magic.
pub const MAGIC: u32 = 0xCAFE_BABE;
/// Protocol version UML speaks.
pub const VERSION: u32 = 2;
/// Longest command (UML rejects `len >= 512`).
pub const MAX_DATA: usize = 512;

/// Errors talking to a guest's mconsole.
#[derive(Debug, thiserror::Error)]
pub enum McError {
    #[error("command is {0} bytes; mconsole takes at most 511")]
    TooLong(usize),
    #[error("cannot reach the guest's mconsole at {}: {source} (is the guest running?)", path.display())]
    Unreachable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the guest's mconsole at {} did not answer within {secs} s", path.display())]
    Timeout { path: PathBuf, secs: u64 },
    #[error("malformed mconsole reply: {0}")]
    BadReply(String),
    #[error("mconsole socket: {0}")]
    Io(#[from] io::Error),
}

/// Encode a request datagram (short form: header plus the command bytes).
pub fn encode_request(command: &str) -> Result<Vec<u8>, McError> {
    let data = command.as_bytes();
    if data.len() >= MAX_DATA {
        return Err(McError::TooLong(data.len()));
    }
    let mut b = Vec::with_capacity(12 + data.len());
    b.extend_from_slice(&MAGIC.to_ne_bytes());
    b.extend_from_slice(&VERSION.to_ne_bytes());
    b.extend_from_slice(&crate::num::small_u32(data.len()).to_ne_bytes());
    b.extend_from_slice(data);
    Ok(b)
}

/// One reply datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPacket {
    /// 0 = success; otherwise 1 or a negative errno (as u32).
    pub err: u32,
    pub more: bool,
    /// The text, without its trailing NUL.
    pub data: Vec<u8>,
}

/// Decode a reply datagram.
pub fn decode_reply(b: &[u8]) -> Result<ReplyPacket, McError> {
    if b.len() < 12 {
        // Version-0 clients get raw text; we never are one, but say what came.
        return Err(McError::BadReply(format!(
            "{} bytes, shorter than a reply header: {:?}",
            b.len(),
            String::from_utf8_lossy(b)
        )));
    }
    let u = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let (err, more, len) = (u(0), u(4), u(8) as usize);
    if len > MAX_DATA || 12 + len > b.len() {
        return Err(McError::BadReply(format!(
            "length field {len} but {} data bytes",
            b.len() - 12
        )));
    }
    if more > 1 {
        return Err(McError::BadReply(format!("`more` field is {more}")));
    }
    let mut data = b[12..12 + len].to_vec();
    if data.last() == Some(&0) {
        data.pop();
    }
    if let Some(nul) = data.iter().position(|&c| c == 0) {
        data.truncate(nul);
    }
    Ok(ReplyPacket {
        err,
        more: more == 1,
        data,
    })
}

/// A whole reply: the chunks concatenated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reply {
    /// 0 on success; 1 or a negative errno from the guest otherwise.
    pub err: i32,
    pub text: String,
}

impl Reply {
    pub fn ok(&self) -> bool {
        self.err == 0
    }
}

/// The most of one reply that is kept: a guest (its kernel possibly taken
/// over) may stream chunks without end; what is past this is dropped.
pub const MAX_REPLY: usize = 1 << 20;

/// How long one reply may stream in all, however lively the guest.
const REPLY_DEADLINE: Duration = Duration::from_secs(60);

/// Collects reply chunks until `more == 0`, keeping at most [`MAX_REPLY`]
/// bytes.
#[derive(Default)]
pub struct Assembler {
    err: Option<u32>,
    text: Vec<u8>,
}

impl Assembler {
    /// Add a packet; returns the complete reply after the last one.
    pub fn push(&mut self, p: ReplyPacket) -> Option<Reply> {
        // `err` is only meaningful on the first chunk.
        self.err.get_or_insert(p.err);
        let room = MAX_REPLY.saturating_sub(self.text.len());
        self.text
            .extend_from_slice(&p.data[..p.data.len().min(room)]);
        (!p.more).then(|| self.finish())
    }

    /// The reply as assembled so far.
    pub fn finish(&self) -> Reply {
        Reply {
            // UML sends the C int's bits (a negative errno) in a u32.
            err: i32::from_ne_bytes(self.err.unwrap_or(0).to_ne_bytes()),
            text: String::from_utf8_lossy(&self.text).into_owned(),
        }
    }
}

/// A client for one guest's mconsole socket.
pub struct Client {
    path: PathBuf,
    sock: UnixDatagram,
    timeout: Duration,
    /// The client's socket file, removed on drop (`None`: abstract).
    bound: Option<PathBuf>,
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(p) = self.bound.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Client {
    /// Bind a client socket for the mconsole at `path`: a socket file
    /// beside it (so that a UML in another network namespace — a lab's —
    /// can send its replies: abstract names exist per network namespace),
    /// or, where that directory is not ours to write, an abstract name.
    /// Either is unique to this process.
    pub fn new(path: &Path) -> Result<Client, McError> {
        let name = format!(
            "umlctl-mc-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // The directory's real path: a jailed UML sees it at that path
        // only (not through ~/.uml's symlinks).
        if let Some(dir) = path.parent().and_then(|d| std::fs::canonicalize(d).ok()) {
            let file = dir.join(format!(".{name}"));
            // sun_path holds 107 bytes and a NUL.
            if file.as_os_str().len() < 108 {
                let _ = std::fs::remove_file(&file);
                if let Ok(sock) = UnixDatagram::bind(&file) {
                    // UML may run as another uid (a root umlctl's jail):
                    // sending to a socket file needs write permission. The
                    // instance directory keeps everyone else out.
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666));
                    return Ok(Client {
                        path: path.to_path_buf(),
                        sock,
                        timeout: Duration::from_secs(10),
                        bound: Some(file),
                    });
                }
            }
        }
        let addr = <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )?;
        let sock = UnixDatagram::bind_addr(&addr)?;
        Ok(Client {
            path: path.to_path_buf(),
            sock,
            timeout: Duration::from_secs(10),
            bound: None,
        })
    }

    /// How long to wait for each reply packet.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Send `command` and assemble its reply.
    pub fn request(&self, command: &str) -> Result<Reply, McError> {
        let pkt = encode_request(command)?;
        // Drain anything stale (e.g. a late packet of an earlier request).
        self.sock.set_nonblocking(true)?;
        let mut buf = [0u8; 12 + MAX_DATA];
        while self.sock.recv(&mut buf).is_ok() {}
        self.sock.set_nonblocking(false)?;
        self.sock
            .send_to(&pkt, &self.path)
            .map_err(|source| McError::Unreachable {
                path: self.path.clone(),
                source,
            })?;
        // UML sends console-streaming replies (sysrq, stack) without
        // blocking, and a unix datagram socket queues only
        // net.unix.max_dgram_qlen (10) packets: read in a tight loop, and if
        // the closing packet of a long reply was dropped, return what came
        // once the stream has been quiet for a while.
        let mut asm = Assembler::default();
        let mut got_any = false;
        let deadline = Instant::now() + self.timeout;
        // A reply that never ends (a hostile guest's) ends here.
        let last = Instant::now() + self.timeout.max(REPLY_DEADLINE);
        self.sock.set_read_timeout(Some(self.timeout))?;
        loop {
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if got_any {
                        return Ok(asm.finish());
                    }
                    if Instant::now() >= deadline {
                        return Err(McError::Timeout {
                            path: self.path.clone(),
                            secs: self.timeout.as_secs(),
                        });
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(r) = asm.push(decode_reply(&buf[..n])?) {
                return Ok(r);
            }
            if Instant::now() >= last {
                return Ok(asm.finish());
            }
            if !got_any {
                got_any = true;
                self.sock.set_read_timeout(Some(STREAM_QUIET))?;
            }
        }
    }
}

/// How long a multi-part reply may pause before it is taken as complete.
const STREAM_QUIET: Duration = Duration::from_secs(2);

/// Notification types UML sends to `mconsole=notify:<socket>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notify {
    /// The mconsole is up; its socket path.
    Socket(String),
    /// The guest panicked; the message.
    Panic(String),
    Hang,
    /// Bytes a guest process wrote to /proc/mconsole.
    User(Vec<u8>),
}

/// Decode a notification datagram.
pub fn decode_notify(b: &[u8]) -> Result<Notify, McError> {
    if b.len() < 16 {
        return Err(McError::BadReply(format!(
            "notification of {} bytes",
            b.len()
        )));
    }
    let u = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    if u(0) != MAGIC {
        return Err(McError::BadReply(format!("notification magic {:#x}", u(0))));
    }
    let len = (u(12) as usize).min(b.len() - 16);
    let data = &b[16..16 + len];
    let text =
        || String::from_utf8_lossy(data.split(|&c| c == 0).next().unwrap_or_default()).into_owned();
    Ok(match u(8) {
        0 => Notify::Socket(text()),
        1 => Notify::Panic(text()),
        2 => Notify::Hang,
        3 => Notify::User(data.to_vec()),
        t => return Err(McError::BadReply(format!("notification type {t}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(err: u32, more: u32, text: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&err.to_ne_bytes());
        b.extend_from_slice(&more.to_ne_bytes());
        b.extend_from_slice(&(text.len() as u32 + 1).to_ne_bytes());
        b.extend_from_slice(text.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn request_layout() {
        let b = encode_request("version").unwrap();
        assert_eq!(&b[..4], &0xCAFE_BABEu32.to_ne_bytes());
        assert_eq!(&b[4..8], &2u32.to_ne_bytes());
        assert_eq!(&b[8..12], &7u32.to_ne_bytes());
        assert_eq!(&b[12..], b"version");
        assert!(matches!(
            encode_request(&"x".repeat(512)),
            Err(McError::TooLong(512))
        ));
        assert!(encode_request(&"x".repeat(511)).is_ok());
    }

    #[test]
    fn multi_part_replies_are_assembled_and_err_comes_from_the_first() {
        let mut a = Assembler::default();
        assert_eq!(a.push(decode_reply(&reply(0, 1, "abc")).unwrap()), None);
        assert_eq!(a.push(decode_reply(&reply(0, 1, "def")).unwrap()), None);
        let r = a.push(decode_reply(&reply(0, 0, "")).unwrap()).unwrap();
        assert_eq!(
            r,
            Reply {
                err: 0,
                text: "abcdef".into()
            }
        );
        let mut a = Assembler::default();
        let r = a
            .push(decode_reply(&reply(0xFFFF_FFED, 0, "Device doesn't exist")).unwrap())
            .unwrap();
        assert_eq!(r.err, -19);
        assert!(!r.ok());
    }

    #[test]
    fn an_endless_reply_is_kept_to_its_limit() {
        let mut asm = Assembler::default();
        let chunk = reply(0, 1, &"x".repeat(400));
        for _ in 0..(MAX_REPLY / 400 + 100) {
            assert!(asm.push(decode_reply(&chunk).unwrap()).is_none());
        }
        let r = asm
            .push(decode_reply(&reply(0, 0, "end")).unwrap())
            .unwrap();
        assert_eq!(r.text.len(), MAX_REPLY);
    }

    #[test]
    fn bad_replies_are_errors() {
        assert!(decode_reply(b"ERR Version 0 mconsole clients are not supported").is_err());
        let mut b = reply(0, 0, "x");
        b[8..12].copy_from_slice(&600u32.to_ne_bytes());
        assert!(decode_reply(&b).is_err());
        let mut b = reply(0, 0, "x");
        b[4..8].copy_from_slice(&7u32.to_ne_bytes());
        assert!(decode_reply(&b).is_err());
        assert!(decode_reply(&[0u8; 5]).is_err());
    }

    #[test]
    fn notifications() {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_ne_bytes());
        b.extend_from_slice(&2u32.to_ne_bytes());
        b.extend_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(&24u32.to_ne_bytes());
        b.extend_from_slice(b"sysrq triggered crash\0\0\0");
        assert_eq!(
            decode_notify(&b).unwrap(),
            Notify::Panic("sysrq triggered crash".into())
        );
        b[0] = 0;
        assert!(decode_notify(&b).is_err());
    }

    #[test]
    fn a_dead_socket_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mconsole");
        let c = Client::new(&path).unwrap();
        let e = c.request("version").unwrap_err().to_string();
        assert!(
            e.contains("cannot reach") && e.contains("is the guest running"),
            "{e}"
        );
        // A socket that never answers times out.
        let _mute = UnixDatagram::bind(&path).unwrap();
        let c = Client::new(&path)
            .unwrap()
            .with_timeout(Duration::from_millis(200));
        assert!(matches!(c.request("version"), Err(McError::Timeout { .. })));
    }

    /// A deterministic short version of fuzz/fuzz_targets/mconsole_reply.rs:
    /// mutated replies and notifications never panic, and a decoded reply
    /// never holds more than the datagram did.
    #[test]
    fn mutated_datagrams_never_panic() {
        let mut x = 0xD1B54A32D192ED03u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = [reply(0, 0, "ok"), reply(1, 1, "part"), reply(0, 0, "")];
        for _ in 0..20_000 {
            let mut b = good[(next() % 3) as usize].clone();
            for _ in 0..next() % 4 {
                let r = next();
                let at = (r >> 8) as usize % (b.len() + 1);
                match r % 3 {
                    0 => b.insert(at, (r >> 32) as u8),
                    1 if at < b.len() => b[at] = (r >> 40) as u8,
                    _ => b.truncate(at),
                }
            }
            if let Ok(p) = decode_reply(&b) {
                assert!(p.data.len() + 12 <= b.len());
                let mut a = Assembler::default();
                let _ = a.push(p);
            }
            let _ = decode_notify(&b);
        }
    }
}
