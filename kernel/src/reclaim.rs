//! Give the host back memory a running guest's kernel holds but does not
//! use.
//!
//! A UML guest's RAM is a shared memory file on the host; a page the guest
//! touched once stays in that file after the guest frees it (UML has no
//! free-page reporting), and a guest's page cache grows until its RAM is
//! full. So an idle guest costs the host everything it ever touched. UML's
//! mconsole has a memory device that works as a balloon: `config mem=-N`
//! takes N of the guest's free pages and punches them out of the memory
//! file (`MADV_REMOVE`), `config mem=+N` gives them back to the guest, and
//! a page given back is only backed again when the guest writes it. One
//! inflate-and-deflate therefore returns every free page the balloon
//! reached to the host, and the guest keeps its whole RAM. Before it, the
//! guest's clean page cache is dropped (`/proc/sys/vm/drop_caches`, through
//! the exec agent), so that what the guest cached at boot is free to take.
//!
//! While the balloon is inflated the guest has only the headroom left
//! free: [`HEADROOM_MIN`] or an eighth of its RAM, whichever is more; the
//! two requests follow each other directly.

use std::fs::{self, File};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use crate::detached;
use crate::error::{Error, Result};
use crate::execproto::ExecSpec;
use crate::instance::Guest;

/// Free memory the balloon always leaves the guest, in KiB (or a
/// thirty-second of its RAM, whichever is more).
pub const HEADROOM_MIN_KIB: u64 = 8 * 1024;

/// How long the guest may take to write back and drop its page cache.
const DROP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The most one reclaim lends (KiB): UML releases a page per host system
/// call (about 300,000 a second here: a 3 GiB guest that had touched and
/// freed 2 GiB gave it back in 2.4 s), and its mconsole answers only then.
pub const BALLOON_MAX_KIB: u64 = 4 * 1024 * 1024;

/// Below this, inflating is not worth a round trip (KiB).
const SMALLEST_KIB: u64 = 4 * 1024;

/// What [`reclaim`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reclaimed {
    /// The guest's name.
    pub guest: String,
    /// Whether the guest dropped its clean page cache first (not when its
    /// image has no `/bin/sh`, or with `keep_cache`).
    pub dropped_cache: bool,
    /// How much the balloon asked for and gave back (KiB).
    pub balloon_kib: u64,
    /// Host memory backing the guest's RAM before and after (bytes), when
    /// the guest's memory file can be seen from here.
    pub host_before: Option<u64>,
    /// See `host_before`.
    pub host_after: Option<u64>,
    /// Why the page cache was kept, when it was not dropped.
    pub note: Option<String>,
}

impl Reclaimed {
    /// Bytes returned to the host, when both sides were measured.
    pub fn returned(&self) -> Option<u64> {
        Some(self.host_before?.saturating_sub(self.host_after?))
    }
}

/// Options of [`reclaim`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Leave the guest's page cache alone (return only memory it already
    /// freed).
    pub keep_cache: bool,
}

/// `MemTotal` and `MemFree` (KiB) from a guest's `/proc/meminfo`. The text
/// comes from the guest, which may lie; values are only used to size a
/// request the guest's own kernel bounds.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let mut w = rest.split_whitespace();
            let n = w.next()?.parse::<u64>().ok()?;
            (w.next() == Some("kB") && w.next().is_none()).then_some(n)
        })
    };
    let (total, free) = (field("MemTotal")?, field("MemFree")?);
    (free <= total).then_some((total, free))
}

/// How much to inflate the balloon by (KiB), leaving the headroom free:
/// [`HEADROOM_MIN_KIB`] or a thirty-second of the RAM, whichever is more,
/// for each of the guest's CPUs up to four (on an SMP guest the other CPUs
/// run its processes while the balloon fills), but not more than a quarter
/// of the RAM (or the minimum).
pub fn balloon_size(total_kib: u64, free_kib: u64, cpus: u64) -> u64 {
    let headroom = HEADROOM_MIN_KIB
        .max(total_kib / 32)
        .saturating_mul(cpus.clamp(1, 4))
        .min(HEADROOM_MIN_KIB.max(total_kib / 4));
    let n = free_kib.saturating_sub(headroom).min(BALLOON_MAX_KIB);
    if n < SMALLEST_KIB {
        0
    } else {
        n
    }
}

/// The number of CPUs in a guest's `/proc/stat` (its `cpuN` lines); 1
/// when there are none (the text comes from the guest).
pub fn parse_cpus(stat: &str) -> u64 {
    let n = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .and_then(|r| r.split(char::is_whitespace).next())
                .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        })
        .count();
    u64::try_from(n).unwrap_or(u64::MAX).max(1)
}

/// Bytes of host memory behind the UML process `pid`'s RAM of `mem_bytes`:
/// the deleted regular file of that size it holds open (UML's memory file
/// is unlinked as soon as it is made). `None` when its descriptors cannot
/// be read.
pub fn memory_file_bytes(pid: i32, mem_bytes: u64) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    dir.flatten()
        .filter(|e| {
            fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().ends_with(" (deleted)"))
        })
        .filter_map(|e| fs::metadata(e.path()).ok())
        .find(|m| m.is_file() && m.size() == mem_bytes)
        .map(|m| m.blocks() * 512)
}

/// Drop guest `g`'s clean page cache (unless `o.keep_cache`), then inflate
/// and deflate UML's memory balloon so that the guest's free pages leave
/// the host. One reclaim at a time per guest.
pub fn reclaim(g: &Guest, o: &Options) -> Result<Reclaimed> {
    let name = g.record.name.clone();
    let c = detached::client(g)?.with_timeout(std::time::Duration::from_secs(30));
    let _lock = lock(&g.layout.state.join("reclaim.lock"))?;
    let mut r = Reclaimed {
        guest: name.clone(),
        host_before: memory_file_bytes(g.record.pid, g.record.mem_bytes),
        ..Default::default()
    };
    if o.keep_cache {
        r.note = Some("page cache kept (--keep-cache)".into());
    } else {
        let spec = ExecSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "sync && echo 3 > /proc/sys/vm/drop_caches".into(),
            ],
            ..Default::default()
        };
        // The guest answers when it likes (a hostile one never): wait a
        // while, then go on without dropping; the exec, if it ever ends,
        // ends in a thread nobody waits for.
        let (tx, rx) = std::sync::mpsc::channel();
        let who = name.clone();
        std::thread::spawn(move || {
            let _ = tx.send(crate::exec::output(&who, &spec));
        });
        let dropped = rx.recv_timeout(DROP_TIMEOUT).unwrap_or_else(|_| {
            Err(Error::Usage(format!(
                "dropping it did not finish within {} s",
                DROP_TIMEOUT.as_secs()
            )))
        });
        match dropped {
            Ok((0, _, _)) => r.dropped_cache = true,
            Ok((126 | 127, _, _)) => {
                r.note = Some("page cache kept: the image has no /bin/sh to drop it".into());
            }
            Ok((code, _, err)) => {
                r.note = Some(format!(
                    "page cache kept: dropping it failed ({code}): {}",
                    String::from_utf8_lossy(&err[..err.len().min(200)]).trim()
                ));
            }
            Err(e) => r.note = Some(format!("page cache kept: {e}")),
        }
    }
    let mc = |command: &str| {
        c.request(command).map_err(|source| Error::Mconsole {
            guest: name.clone(),
            source,
        })
    };
    let info = mc("proc meminfo")?;
    let (total, free) = parse_meminfo(&info.text).ok_or_else(|| {
        Error::Usage(format!(
            "guest {name}: its mconsole did not give a readable /proc/meminfo ({:?})",
            info.text.chars().take(80).collect::<String>()
        ))
    })?;
    let cpus = mc("proc stat").map_or(1, |r| parse_cpus(&r.text));
    let n = balloon_size(total, free, cpus);
    if n > 0 {
        let taken = mc(&format!("config mem=-{n}K"));
        if let Ok(t) = &taken {
            if !t.ok() && t.text.contains("Bad configuration option") {
                return Err(no_balloon(&name));
            }
        }
        // Give back everything the balloon holds, whatever happened to the
        // request that filled it (one that timed out is still being
        // served: the guest's mconsole takes requests in turn), and an
        // interrupted reclaim's pages too: the kernel stops at what it has.
        let back = format!("config mem=+{total}K");
        let mut given = mc(&back);
        for _ in 0..3 {
            if given.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            given = mc(&back);
        }
        let given = given?;
        if !given.ok() {
            return Err(Error::Usage(format!(
                "guest {name}: its kernel did not take back the memory it lent ({}); `umlctl ctl {name} config mem=+{total}K` retries",
                given.text.trim()
            )));
        }
        let taken = taken?;
        if !taken.ok() {
            return Err(Error::Usage(format!(
                "guest {name}: its kernel could not lend its free memory: {}",
                taken.text.trim()
            )));
        }
        r.balloon_kib = n;
    }
    r.host_after = memory_file_bytes(g.record.pid, g.record.mem_bytes);
    Ok(r)
}

/// The error for a kernel whose mconsole has no memory device.
fn no_balloon(name: &str) -> Error {
    Error::Usage(format!(
        "guest {name}: its kernel cannot return memory to the host (its mconsole has no memory device): UML registers its mconsole memory device only when the host supports MADV_REMOVE on its memory file (TMPDIR on tmpfs or a filesystem with hole punching)"
    ))
}

fn lock(path: &Path) -> Result<Flock<File>> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io("lock", path, crate::error::errno(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_and_lies_are_refused() {
        let t = "MemTotal:         154528 kB\nMemFree:           80432 kB\nMemAvailable:     102428 kB\n";
        assert_eq!(parse_meminfo(t), Some((154_528, 80_432)));
        assert_eq!(parse_meminfo("MemFree: 10 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 10 kB\nMemFree: 11 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 10 kB\nMemFree: -1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 10 MB\nMemFree: 1 kB\n"), None);
        assert_eq!(
            parse_meminfo("MemTotal: 99999999999999999999999 kB\nMemFree: 1 kB\n"),
            None
        );
        assert_eq!(
            parse_meminfo("MemTotalX: 10 kB\nMemTotal: 10 kB\nMemFree: 1 kB\n"),
            Some((10, 1))
        );
        crate::testutil::byte_flips(&[t.as_bytes().to_vec()], 7, 2000, |b| {
            if let Some((total, free)) = parse_meminfo(&String::from_utf8_lossy(b)) {
                assert!(free <= total);
                let cpus = parse_cpus(&String::from_utf8_lossy(b));
                assert!(balloon_size(total, free, cpus) <= free);
            }
        });
    }

    #[test]
    fn the_balloon_leaves_headroom() {
        // 160 MiB guest: a thirty-second (5 MiB) is less than the 8 MiB floor.
        assert_eq!(balloon_size(154_528, 97_428, 1), 97_428 - 8 * 1024);
        // 1 GiB guest: a thirty-second.
        assert_eq!(balloon_size(1 << 20, 600 << 10, 1), (600 << 10) - (1 << 15));
        assert_eq!(balloon_size(154_528, 8 * 1024, 1), 0);
        assert_eq!(balloon_size(154_528, 11 * 1024, 1), 0);
        assert_eq!(balloon_size(154_528, 13 * 1024, 1), 5 * 1024);
        // Two CPUs: twice the headroom; eight: four times, at most a
        // quarter of the RAM.
        assert_eq!(balloon_size(1 << 20, 600 << 10, 2), (600 << 10) - (1 << 16));
        assert_eq!(balloon_size(1 << 20, 600 << 10, 8), (600 << 10) - (1 << 17));
        assert_eq!(balloon_size(154_528, 97_428, 4), 97_428 - 4 * 8 * 1024);
        assert_eq!(balloon_size(u64::MAX, u64::MAX, 4), 4 << 20);
        assert_eq!(balloon_size(154_528, 97_428, 0), 97_428 - 8 * 1024);
        // 64 GiB guest, nearly all free: at most 4 GiB at a time.
        assert_eq!(balloon_size(64 << 20, 63 << 20, 1), 4 << 20);
    }

    #[test]
    fn cpus_are_counted_from_proc_stat() {
        let stat = "cpu  10 0 5 100 0 0 0 0 0 0\ncpu0 5 0 2 50 0 0 0 0 0 0\ncpu1 5 0 3 50 0 0 0 0 0 0\nintr 1 2\nctxt 9\n";
        assert_eq!(parse_cpus(stat), 2);
        assert_eq!(parse_cpus("cpu  1 2 3\n"), 1);
        assert_eq!(parse_cpus(""), 1);
        assert_eq!(parse_cpus("cpux 1\ncpu1x 2\ncpu 3\n"), 1);
    }
}
