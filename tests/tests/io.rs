//! The command's stdin, stdout and stderr through the guest: byte-exact at
//! volume (the ring disk), streaming, and with every kind of stdin — each
//! with Debian's `linux.uml` (6.1) and umlctl's 6.12 build.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use sha2::{Digest, Sha256};

fn kernels() -> [PathBuf; 2] {
    [debian_kernel(), kernel_6_12()]
}

/// A reproducible stream of pseudo-random bytes (xorshift64), a block at a
/// time.
struct Noise(u64);

impl Noise {
    fn block(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Write `total` bytes of noise to `to`, returning their sha256.
fn feed(mut to: impl Write, total: u64, seed: u64) -> String {
    let mut noise = Noise(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        noise.block(&mut buf[..n]);
        h.update(&buf[..n]);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        left -= n as u64;
    }
    hex(h.finalize())
}

/// Read `from` to its end: (bytes, sha256).
fn drain(mut from: impl Read) -> (u64, String) {
    let mut buf = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    let mut n = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
        }
    }
    (n, hex(h.finalize()))
}

/// `umlctl run --kernel K ARGS…` with all three streams piped (the run
/// directory's guard comes back too: it must outlive the child).
fn spawn_piped(k: &std::path::Path, args: &[&str]) -> (tempfile::TempDir, std::process::Child) {
    let mut r = Run::with_kernel(k, args);
    r.cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = r.cmd.spawn().unwrap();
    (r.runtime, child)
}

/// 256 MiB through stdin: it used to stall for good after a few MB, and
/// then crawled at ~2 MB/s (a byte per host system call).
#[test]
fn a_quarter_gigabyte_through_stdin_arrives_whole() {
    for k in kernels() {
        let (_rt, mut child) = spawn_piped(&k, &["--timeout", "600", "--", "wc", "-c"]);
        let stdin = child.stdin.take().unwrap();
        let w = std::thread::spawn(move || feed(stdin, 256 << 20, 1));
        let out = child.wait_with_output().unwrap();
        w.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {err}", k.display());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (256u64 << 20).to_string(),
            "{}",
            k.display()
        );
    }
}

/// 1 GiB of random bytes through stdin → `cat` → stdout, and 64 MiB
/// through stderr, compared by hash.
#[test]
fn a_gigabyte_round_trip_and_binary_stderr_are_byte_exact() {
    for k in kernels() {
        let (_rt, mut child) = spawn_piped(&k, &["--timeout", "900", "--", "cat"]);
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let w = std::thread::spawn(move || feed(stdin, 1 << 30, 2));
        let e = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        let (n, got) = drain(stdout);
        let sent = w.join().unwrap();
        let err = e.join().unwrap();
        let st = child.wait().unwrap();
        assert_eq!(
            st.code(),
            Some(0),
            "{}: {}",
            k.display(),
            String::from_utf8_lossy(&err)
        );
        assert_eq!(n, 1 << 30, "{}", k.display());
        assert_eq!(got, sent, "{}: stdout differs from stdin", k.display());

        // stderr: binary, separate from stdout.
        let dir = scratch();
        let f = dir.path().join("noise");
        let want = feed(File::create(&f).unwrap(), 64 << 20, 3);
        let mut r = Run::with_kernel(
            &k,
            [
                "--timeout",
                "600",
                "--workdir",
                dir.path().to_str().unwrap(),
                "--",
                "sh",
                "-c",
                "cat noise >&2",
            ],
        );
        r.cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = r.cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", k.display());
        assert!(out.stdout.is_empty(), "{}", k.display());
        assert_eq!(out.stderr.len(), 64 << 20, "{}", k.display());
        assert_eq!(sha256(&out.stderr), want, "{}", k.display());
    }
}

/// Streaming: a line written to stdin comes back before stdin is closed,
/// and a command's output arrives while it still runs (here: while it waits
/// for more input), stdout and stderr each on their own.
#[test]
fn input_and_output_stream_while_the_command_runs() {
    for k in kernels() {
        let (_rt, mut child) = spawn_piped(
            &k,
            &[
                "--timeout",
                "300",
                "--",
                "sh",
                "-c",
                "echo ready; echo also >&2; while read l; do echo \"got $l\"; done; echo bye",
            ],
        );
        let mut stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n", "{}", k.display());
        line.clear();
        err.read_line(&mut line).unwrap();
        assert_eq!(line, "also\n", "{}", k.display());
        for word in ["one", "two"] {
            stdin.write_all(format!("{word}\n").as_bytes()).unwrap();
            stdin.flush().unwrap();
            line.clear();
            out.read_line(&mut line).unwrap();
            assert_eq!(line, format!("got {word}\n"), "{}", k.display());
        }
        drop(stdin);
        line.clear();
        out.read_to_string(&mut line).unwrap();
        assert_eq!(line, "bye\n", "{}", k.display());
        assert_eq!(child.wait().unwrap().code(), Some(0), "{}", k.display());
    }
}

/// stdin may be a regular file, a pipe, a FIFO, /dev/null or a closed
/// descriptor; the command sees the same bytes, then EOF.
#[test]
fn stdin_from_a_file_a_fifo_dev_null_or_a_closed_descriptor() {
    let dir = scratch();
    let file = dir.path().join("input");
    let want = feed(File::create(&file).unwrap(), 5_000_003, 4);
    let fifo = dir.path().join("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    for k in kernels() {
        let sum = |stdin: Stdio| {
            let mut r = Run::with_kernel(&k, ["--timeout", "300", "--", "sha256sum"]);
            r.cmd
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let out = r.cmd.output().unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}: {}",
                k.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        // A regular file, read from where its offset stands (as cat would).
        let mut f = File::open(&file).unwrap();
        assert_eq!(
            sum(Stdio::from(f.try_clone().unwrap())),
            want,
            "{}",
            k.display()
        );
        let mut skip = [0u8; 3];
        f = File::open(&file).unwrap();
        f.read_exact(&mut skip).unwrap();
        let mut rest = Vec::new();
        File::open(&file).unwrap().read_to_end(&mut rest).unwrap();
        assert_eq!(sum(Stdio::from(f)), sha256(&rest[3..]), "{}", k.display());
        // A FIFO with a writer on the other end.
        let w = {
            let fifo = fifo.clone();
            let file = file.clone();
            std::thread::spawn(move || {
                let mut to = fs::OpenOptions::new().write(true).open(fifo).unwrap();
                to.write_all(&fs::read(file).unwrap()).unwrap();
            })
        };
        let from = File::open(&fifo).unwrap();
        assert_eq!(sum(Stdio::from(from)), want, "{}", k.display());
        w.join().unwrap();
        // /dev/null.
        assert_eq!(sum(Stdio::null()), sha256(b""), "{}", k.display());
        // A closed descriptor 0.
        let rt = scratch();
        let sh = format!(
            "exec 0<&-; UMLCTL_RUNTIME_DIR='{}' UMLCTL_CACHE_DIR='{}' '{}' run --kernel '{}' --timeout 300 -- wc -c",
            rt.path().display(),
            cache_dir().display(),
            umlctl_bin().display(),
            k.display()
        );
        let out = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            k.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }
}

/// The reader of umlctl's stdout goes away mid-stream: the command dies of
/// SIGPIPE (141 from a shell), as it would on the host, and umlctl ends.
#[test]
fn sigpipe_reaches_the_command_when_the_reader_goes_away() {
    for k in kernels() {
        let rt = scratch();
        let sh = format!(
            "UMLCTL_RUNTIME_DIR='{}' UMLCTL_CACHE_DIR='{}' '{}' run --kernel '{}' --timeout 300 -- \
             sh -c 'head -c 100000000 /dev/zero; echo \"still here $?\" >&2' | head -c 3000000 | wc -c",
            rt.path().display(),
            cache_dir().display(),
            umlctl_bin().display(),
            k.display()
        );
        let out = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3000000");
        // head -c in the guest was killed by SIGPIPE (exit status 141).
        assert!(err.contains("still here 141"), "{}: {err}", k.display());
        assert_no_leftovers(rt.path(), &[]);
    }
}
