//! What `umlctl exec` and the guest's exec agent say to each other over one
//! UML serial line per exec slot: binary frames, `[kind: u8][len: u32
//! LE][payload]`, at most [`MAX_PAYLOAD`] bytes of payload. The line is
//! 8-bit clean (raw on both ends). Both sides treat the other's bytes as
//! untrusted: a frame that does not decode ends the session with an error,
//! never a panic or an allocation beyond the limit.

use serde::{Deserialize, Serialize};

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Bytes of a frame header.
pub const HEADER: usize = 5;
/// How many bytes the host may send ahead of what the agent has taken
/// (UML's serial line drops input the guest does not read in time).
pub const WINDOW: u64 = 2048;
/// The agent reports what it has taken at least this often.
pub const CREDIT_STEP: u64 = 512;
/// How many exec slots (serial lines) a guest has: this many `exec`s can
/// run at once.
pub const SLOTS: u32 = 4;
/// The serial line of slot 0 (`ttyS1`; ttyS0 is left to the image, where
/// sysvinit images keep a commented-out getty).
pub const FIRST_LINE: u32 = 1;
/// The host descriptor UML reads slot 0's input from; its output is the next
/// one, slot 1's input the one after, and so on.
pub const FIRST_FD: i32 = 100;

/// How often the agent says it is alive while a command runs.
pub const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the host waits, hearing nothing, before it gives the agent up.
pub const ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What a command runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecSpec {
    /// The command and its arguments (looked up on the guest's PATH).
    pub argv: Vec<String>,
    /// `K=V` additions to the guest's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// User name or numeric uid in the guest (default root).
    pub user: Option<String>,
    /// A pseudo-terminal for the command (`-t`).
    pub tty: bool,
    /// The host terminal's size, for the pseudo-terminal.
    pub rows: u16,
    pub cols: u16,
    /// `TERM` to give a pseudo-terminal.
    pub term: Option<String>,
    /// Whether the host sends stdin (`-i`); without it the command's stdin
    /// is /dev/null.
    pub stdin: bool,
}

/// Frame kinds. Host to guest below 64, guest to host from 64.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const SPEC: u8 = 2;
    pub const STDIN: u8 = 3;
    pub const STDIN_EOF: u8 = 4;
    pub const SIGNAL: u8 = 5;
    pub const WINSIZE: u8 = 6;
    /// The size of one of the guest's consoles (`ttyN`): line, rows,
    /// columns. `umlctl console` sends it so the guest's console follows
    /// the host terminal.
    pub const TTY_SIZE: u8 = 7;
    /// stdin through the slot's ring disk: the next ring slot holds this
    /// many bytes (a u32). Sent only after the agent offered the ring
    /// ([`RING`]).
    pub const STDIN_RING: u8 = 8;
    pub const READY: u8 = 64;
    pub const CREDIT: u8 = 65;
    pub const STDOUT: u8 = 66;
    pub const STDERR: u8 = 67;
    pub const EXIT: u8 = 68;
    pub const ERROR: u8 = 69;
    /// Sent while a command runs, every [`super::ALIVE_EVERY`]: silence
    /// for much longer means the agent is gone.
    pub const ALIVE: u8 = 70;
    /// The agent can take stdin through the slot's ring disk (payload: the
    /// session's nonce). Sent just before READY, so that a host that finds
    /// READY has seen it; hosts that do not know it skip it.
    pub const RING: u8 = 71;
    /// Ring slots of stdin taken so far this session (a u64): their space
    /// may be written again.
    pub const RING_ACK: u8 = 72;
}

/// stdin through a slot's ring disk (see [`kind::STDIN_RING`]): a file of
/// [`ring_len`] bytes in the guest's state directory, a read-only ubd disk
/// for the guest, which reads each slot with `O_DIRECT` — so stdin moves at
/// disk speed instead of the serial line's one byte per host system call.
pub mod ring {
    use crate::protocol::ring as r;
    /// Most bytes in one ring slot.
    pub const SLOT: u64 = r::SLOT;
    /// Slots in flight, unacknowledged.
    pub const SLOTS: u64 = r::SLOTS;
    /// The ring file's size.
    pub const fn ring_len() -> u64 {
        r::offset(r::STDIN, SLOTS - 1) + SLOT
    }
    /// Where the `seq`th slot starts.
    pub const fn offset(seq: u64) -> u64 {
        r::offset(r::STDIN, seq)
    }
    /// The ubd index of slot `i`'s ring: the slots just below umlctl's init
    /// disk, so the guest's own disks (and hot-plugged ones) keep `ubdb`…
    pub const fn ubd_index(i: u32) -> usize {
        crate::cmdline::LAST_UBD - super::SLOTS as usize + i as usize
    }
}

/// A STDIN_RING payload: the slot's length, at most [`ring::SLOT`].
pub fn ring_len(p: &[u8]) -> Result<usize, FrameError> {
    let n = u32::from_le_bytes(fixed("stdin ring", p)?);
    if u64::from(n) > ring::SLOT || n == 0 {
        return Err(FrameError::Malformed {
            what: "stdin ring",
            why: format!("{n} bytes in a slot of {}", ring::SLOT),
        });
    }
    Ok(crate::num::usize_of(u64::from(n)))
}

/// A RING_ACK payload.
pub fn ring_ack(p: &[u8]) -> Result<u64, FrameError> {
    Ok(u64::from_le_bytes(fixed("ring ack", p)?))
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Signaled(i32),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

/// A frame that cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLong(u64),
    #[error("a {what} frame of {len} bytes")]
    BadLength { what: &'static str, len: usize },
    #[error("a malformed {what} frame: {why}")]
    Malformed { what: &'static str, why: String },
}

/// Encode one frame.
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.push(kind);
    let len = u32::try_from(payload.len().min(MAX_PAYLOAD)).unwrap_or(u32::MAX);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&payload[..payload.len().min(MAX_PAYLOAD)]);
    v
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&self.buf[1..HEADER]);
        let len = u32::from_le_bytes(len);
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        if n > MAX_PAYLOAD {
            return Err(FrameError::TooLong(u64::from(len)));
        }
        if self.buf.len() < HEADER + n {
            return Ok(None);
        }
        let kind = self.buf[0];
        let payload = self.buf[HEADER..HEADER + n].to_vec();
        self.buf.drain(..HEADER + n);
        Ok(Some(Frame { kind, payload }))
    }

    /// Whether `marker` is among the bytes received and not yet taken.
    pub fn contains(&self, marker: &[u8]) -> bool {
        self.buf.windows(marker.len()).any(|w| w == marker)
    }

    /// Bytes received but not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Drop everything before the first occurrence of `marker` (kept), for
    /// finding the start of a session in a line that may hold the end of an
    /// earlier one; `false` (keeping only a possible prefix) if it is not
    /// there yet.
    pub fn seek(&mut self, marker: &[u8]) -> bool {
        if let Some(at) = self.buf.windows(marker.len()).position(|w| w == marker) {
            self.buf.drain(..at);
            return true;
        }
        let keep = marker.len().saturating_sub(1).min(self.buf.len());
        let cut = self.buf.len() - keep;
        self.buf.drain(..cut);
        false
    }
}

fn fixed<const N: usize>(what: &'static str, p: &[u8]) -> Result<[u8; N], FrameError> {
    p.try_into()
        .map_err(|_| FrameError::BadLength { what, len: p.len() })
}

/// A HELLO or READY payload.
pub fn nonce(p: &[u8]) -> Result<u64, FrameError> {
    Ok(u64::from_le_bytes(fixed("hello/ready", p)?))
}

/// A CREDIT payload.
pub fn credit(p: &[u8]) -> Result<u64, FrameError> {
    Ok(u64::from_le_bytes(fixed("credit", p)?))
}

/// A SIGNAL payload.
pub fn signal(p: &[u8]) -> Result<i32, FrameError> {
    let s = i32::from_le_bytes(fixed("signal", p)?);
    if (1..=64).contains(&s) {
        Ok(s)
    } else {
        Err(FrameError::Malformed {
            what: "signal",
            why: format!("signal {s}"),
        })
    }
}

/// A WINSIZE payload: rows, columns.
pub fn winsize(p: &[u8]) -> Result<(u16, u16), FrameError> {
    let b: [u8; 4] = fixed("winsize", p)?;
    Ok((
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    ))
}

/// A TTY_SIZE payload: console line, rows, columns.
pub fn tty_size(p: &[u8]) -> Result<(u8, u16, u16), FrameError> {
    let b: [u8; 5] = fixed("tty size", p)?;
    if b[0] > 63 {
        return Err(FrameError::Malformed {
            what: "tty size",
            why: format!("line {}", b[0]),
        });
    }
    Ok((
        b[0],
        u16::from_le_bytes([b[1], b[2]]),
        u16::from_le_bytes([b[3], b[4]]),
    ))
}

/// Encode a TTY_SIZE payload.
pub fn tty_size_payload(line: u8, rows: u16, cols: u16) -> Vec<u8> {
    let mut v = vec![line];
    v.extend_from_slice(&winsize_payload(rows, cols));
    v
}

/// Encode a WINSIZE payload.
pub fn winsize_payload(rows: u16, cols: u16) -> Vec<u8> {
    let mut v = rows.to_le_bytes().to_vec();
    v.extend_from_slice(&cols.to_le_bytes());
    v
}

/// An EXIT payload: 0 and the code, or 1 and the signal.
pub fn ended(p: &[u8]) -> Result<Ended, FrameError> {
    let b: [u8; 5] = fixed("exit", p)?;
    let v = i32::from_le_bytes([b[1], b[2], b[3], b[4]]);
    match b[0] {
        0 if (0..=255).contains(&v) => Ok(Ended::Exited(v)),
        1 if (1..=64).contains(&v) => Ok(Ended::Signaled(v)),
        _ => Err(FrameError::Malformed {
            what: "exit",
            why: format!("{} {v}", b[0]),
        }),
    }
}

/// Encode an EXIT payload.
pub fn ended_payload(e: Ended) -> Vec<u8> {
    let (k, v) = match e {
        Ended::Exited(c) => (0u8, c),
        Ended::Signaled(s) => (1u8, s),
    };
    let mut p = vec![k];
    p.extend_from_slice(&v.to_le_bytes());
    p
}

/// An ERROR payload: the exit code the host should use, and the message.
pub fn error(p: &[u8]) -> Result<(u8, String), FrameError> {
    let (&code, msg) = p.split_first().ok_or(FrameError::BadLength {
        what: "error",
        len: 0,
    })?;
    Ok((code, String::from_utf8_lossy(msg).into_owned()))
}

/// Encode an ERROR payload.
pub fn error_payload(code: u8, msg: &str) -> Vec<u8> {
    let mut p = vec![code];
    p.extend_from_slice(msg.as_bytes());
    p
}

/// A SPEC payload.
pub fn spec(p: &[u8]) -> Result<ExecSpec, FrameError> {
    let s: ExecSpec = serde_json::from_slice(p).map_err(|e| FrameError::Malformed {
        what: "spec",
        why: e.to_string(),
    })?;
    if s.argv.is_empty() || s.argv.iter().any(|a| a.contains('\0')) {
        return Err(FrameError::Malformed {
            what: "spec",
            why: "an empty command or a NUL byte in it".into(),
        });
    }
    Ok(s)
}

/// Everything a hostile peer's bytes can reach, for the fuzz target and
/// its deterministic short version: the bytes as a stream cut at the
/// places the first byte chooses, every frame through its typed parser.
/// Panics only if an invariant breaks.
#[doc(hidden)]
pub fn exercise(data: &[u8]) {
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let mut d = Decoder::default();
    for chunk in data.chunks(step) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() <= MAX_PAYLOAD);
                    let p = &f.payload;
                    let _ = (
                        nonce(p),
                        credit(p),
                        signal(p),
                        winsize(p),
                        error(p),
                        tty_size(p),
                        ring_ack(p),
                    );
                    if let Ok(n) = ring_len(p) {
                        assert!(n > 0 && n as u64 <= ring::SLOT);
                    }
                    if let Ok(e) = ended(p) {
                        assert_eq!(ended(&ended_payload(e)), Ok(e));
                    }
                    if let Ok(s) = spec(p) {
                        let again = serde_json::to_vec(&s).map(|b| spec(&b));
                        assert!(matches!(again, Ok(Ok(ref t)) if *t == s));
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    d = Decoder::default();
                    break;
                }
            }
        }
        assert!(d.pending() < HEADER + MAX_PAYLOAD + step);
    }
    let mut d = Decoder::default();
    d.push(data);
    let _ = d.contains(&encode(kind::RING, &[1, 2, 3, 4, 5, 6, 7, 8]));
    let _ = d.seek(&encode(kind::READY, &[1, 2, 3, 4, 5, 6, 7, 8]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_frames_are_bounded_and_the_ring_fits_below_the_init_disk() {
        assert_eq!(ring_len(&(1u32 << 20).to_le_bytes()), Ok(1 << 20));
        assert_eq!(ring_len(&5u32.to_le_bytes()), Ok(5));
        assert!(ring_len(&0u32.to_le_bytes()).is_err());
        assert!(ring_len(&((1u32 << 20) + 1).to_le_bytes()).is_err());
        assert!(ring_len(&[1, 2, 3]).is_err());
        assert_eq!(ring_ack(&9u64.to_le_bytes()), Ok(9));
        // Four slots of 1 MiB after the zero area, in slot order, wrapping.
        assert_eq!(ring::offset(0), 1 << 20);
        assert_eq!(ring::offset(3) + ring::SLOT, ring::ring_len());
        assert_eq!(ring::offset(4), ring::offset(0));
        assert_eq!(ring::ubd_index(0), 11);
        assert_eq!(ring::ubd_index(SLOTS - 1) + 1, crate::cmdline::LAST_UBD);
        // The offer is found wherever it lies before READY.
        let mut d = Decoder::default();
        let offer = encode(kind::RING, &7u64.to_le_bytes());
        d.push(b"junk");
        d.push(&offer);
        assert!(d.contains(&offer));
        assert!(!d.contains(&encode(kind::RING, &8u64.to_le_bytes())));
    }

    #[test]
    fn frames_round_trip_across_any_split() {
        let mut stream = encode(kind::HELLO, &7u64.to_le_bytes());
        stream.extend(encode(kind::STDOUT, b"hello"));
        stream.extend(encode(kind::EXIT, &ended_payload(Ended::Signaled(9))));
        for cut in 0..stream.len() {
            let mut d = Decoder::default();
            d.push(&stream[..cut]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&stream[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert_eq!(nonce(&got[0].payload).unwrap(), 7);
            assert_eq!(got[1].payload, b"hello");
            assert_eq!(ended(&got[2].payload).unwrap(), Ended::Signaled(9));
        }
    }

    #[test]
    fn hostile_frames_are_errors_not_allocations_or_panics() {
        let mut d = Decoder::default();
        d.push(&[kind::STDOUT, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLong(_))));
        assert!(nonce(b"short").is_err());
        assert!(signal(&0i32.to_le_bytes()).is_err());
        assert!(signal(&65i32.to_le_bytes()).is_err());
        assert!(ended(&[0, 0, 1, 0, 0]).is_err(), "exit code 256");
        assert!(ended(&[2, 0, 0, 0, 0]).is_err());
        assert!(error(&[]).is_err());
        assert!(spec(b"{\"argv\":[]}").is_err());
        assert!(spec(b"{\"argv\":[\"a\\u0000b\"]}").is_err());
        assert!(spec(b"not json").is_err());
        let s = ExecSpec {
            argv: vec!["true".into()],
            ..Default::default()
        };
        assert_eq!(spec(&serde_json::to_vec(&s).unwrap()).unwrap(), s);
        assert_eq!(winsize(&winsize_payload(24, 80)).unwrap(), (24, 80));
        assert_eq!(error(&error_payload(127, "x: not found")).unwrap().0, 127);
    }

    /// The fuzz target's deterministic short version: seeds and 20,000
    /// mutations of them.
    #[test]
    fn hostile_streams_never_panic() {
        let mut seeds: Vec<Vec<u8>> = vec![
            encode(kind::HELLO, &7u64.to_le_bytes()),
            encode(kind::SPEC, br#"{"argv":["sh","-c","x"],"env":[["A","b"]],"cwd":null,"user":null,"tty":true,"rows":1,"cols":2,"term":null,"stdin":true}"#),
            encode(kind::EXIT, &ended_payload(Ended::Exited(3))),
            encode(kind::ERROR, &error_payload(127, "x")),
            encode(kind::WINSIZE, &winsize_payload(3, 4)),
        ];
        let all: Vec<u8> = seeds.concat();
        seeds.push(all);
        crate::testutil::byte_flips(&seeds, 0x2545_F491_4F6C_DD1D, 20_000, exercise);
    }

    #[test]
    fn a_session_is_found_after_the_end_of_an_earlier_one() {
        let ready = encode(kind::READY, &42u64.to_le_bytes());
        let mut d = Decoder::default();
        // The tail of a frame cut by a killed client, then the new session.
        d.push(&[0xAA; 100]);
        assert!(!d.seek(&ready));
        assert!(d.pending() < ready.len());
        d.push(&ready[..4]);
        assert!(!d.seek(&ready));
        d.push(&ready[4..]);
        d.push(&encode(kind::STDOUT, b"x"));
        assert!(d.seek(&ready));
        assert_eq!(d.next_frame().unwrap().unwrap().kind, kind::READY);
        assert_eq!(d.next_frame().unwrap().unwrap().payload, b"x");
    }
}
