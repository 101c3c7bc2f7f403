//! UML copy-on-write overlays end to end: interop with uml-utilities
//! (uml_mkcow, uml_moo) and with a real UML guest writing through them.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::*;

fn umlctl(args: &[&str]) -> Output {
    Command::new(umlctl_bin())
        .args(args)
        .env("UMLCTL_CACHE_DIR", cache_dir())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert_ok(out, "umlctl")
}

fn tool(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is missing ({e}): apt-get install uml-utilities e2fsprogs")
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn create_is_byte_identical_to_uml_mkcow() {
    let dir = scratch();
    let base = dir.path().join("base.img");
    let f = File::create(&base).unwrap();
    f.set_len(10 << 20).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(0x6593_7D25))
        .unwrap();
    let ours = dir.path().join("ours.cow");
    let theirs = dir.path().join("theirs.cow");
    ok(&umlctl(&["cow", "create", "--backing", s(&base), s(&ours)]));
    assert!(tool("uml_mkcow", &[s(&theirs), s(&base)]).status.success());
    assert_eq!(fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
    // Refuses to overwrite.
    let out = umlctl(&["cow", "create", "--backing", s(&base), s(&ours)]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn guest_writes_through_overlays_from_both_tools_and_merges_agree() {
    let dir = scratch();
    let img = busybox_image(dir.path());
    let base_sum = sha256_file(&img);
    let base_mtime = fs::metadata(&img).unwrap().modified().unwrap();
    // One overlay from uml_mkcow, one from umlctl.
    let mk = dir.path().join("mkcow.cow");
    assert!(tool("uml_mkcow", &[s(&mk), s(&img)]).status.success());
    let ours = dir.path().join("ours.cow");
    for (cow, text) in [(&mk, "via uml_mkcow"), (&ours, "via umlctl")] {
        // Two runs: the second sees what the first wrote.
        let (rc, _, err) = run(
            &["--image", s(&img), "--overlay", s(cow)],
            &[
                "sh",
                "-c",
                &format!(
                    "echo '{text}' > /note; mkdir -p /d; head -c 300000 /bin/busybox > /d/blob"
                ),
            ],
        );
        assert_eq!(rc, 0, "{err}");
        let (rc, out, err) = run(
            &["--image", s(&img), "--overlay", s(cow)],
            &["sh", "-c", "cat /note; echo again >> /note"],
        );
        assert_eq!(rc, 0, "{err}");
        assert_eq!(String::from_utf8_lossy(&out), format!("{text}\n"));
        // The base image never changes.
        assert_eq!(sha256_file(&img), base_sum);
        assert_eq!(fs::metadata(&img).unwrap().modified().unwrap(), base_mtime);

        let info: serde_json::Value =
            serde_json::from_str(&ok(&umlctl(&["cow", "info", "--json", s(cow)]))).unwrap();
        assert_eq!(info["header"]["version"], "v3");
        assert_eq!(info["backing_ok"], true);
        assert!(info["allocated_sectors"].as_u64().unwrap() > 600);

        // Merge with umlctl and with uml_moo: the same bytes.
        let m1 = dir.path().join("m-umlctl.img");
        let m2 = dir.path().join("m-moo.img");
        let _ = fs::remove_file(&m1);
        let _ = fs::remove_file(&m2);
        ok(&umlctl(&["cow", "merge", s(cow), "-o", s(&m1)]));
        assert!(tool("uml_moo", &[s(cow), s(&m2)]).status.success());
        assert!(
            fs::read(&m1).unwrap() == fs::read(&m2).unwrap(),
            "umlctl and uml_moo merges differ"
        );
        // Sparse, checked by e2fsck, and holding the guest's writes.
        let md = fs::metadata(&m1).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(md.blocks() * 512 < md.len(), "merged image is not sparse");
        let fsck = tool("e2fsck", &["-fn", s(&m1)]);
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let cat = tool("debugfs", &["-R", "cat /note", s(&m1)]);
        assert_eq!(
            String::from_utf8_lossy(&cat.stdout),
            format!("{text}\nagain\n")
        );
    }
}

#[test]
fn touched_resized_missing_and_corrupt_are_clear_errors() {
    let dir = scratch();
    let base = dir.path().join("base.img");
    fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let cow = dir.path().join("c.cow");
    ok(&umlctl(&["cow", "create", "--backing", s(&base), s(&cow)]));
    assert_eq!(umlctl(&["cow", "info", s(&cow)]).status.code(), Some(0));

    // Touched: info says so (exit 1) and names the fix; run refuses before booting.
    let f = File::options().write(true).open(&base).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    let out = umlctl(&["cow", "info", s(&cow)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("modified or touched") && text.contains("umlctl cow rebase"),
        "{text}"
    );
    let (rc, _, err) = run(&["--image", s(&base), "--overlay", s(&cow)], &["true"]);
    assert_eq!(rc, 125);
    assert!(err.contains("modified or touched"), "{err}");

    // Resized.
    f.set_len(1 << 19).unwrap();
    let out = umlctl(&["cow", "merge", s(&cow), "-o", s(&dir.path().join("x.img"))]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("524288 bytes"));
    assert!(
        !dir.path().join("x.img").exists(),
        "a failed merge left its output"
    );

    // Missing.
    fs::remove_file(&base).unwrap();
    let out = umlctl(&["cow", "info", s(&cow)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot be opened"));

    // Corrupt header: unknown version; truncated file; not a COW at all.
    let bytes = fs::read(&cow).unwrap();
    let bad = dir.path().join("bad.cow");
    let mut b = bytes.clone();
    b[7] = 7;
    fs::write(&bad, &b).unwrap();
    let out = umlctl(&["cow", "info", s(&bad)]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown COW version 7"));
    fs::write(&bad, &bytes[..6000]).unwrap();
    let out = umlctl(&["cow", "info", s(&bad)]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("truncated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(&bad, vec![0u8; 9000]).unwrap();
    let out = umlctl(&["cow", "info", s(&bad)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a UML COW file"));
}

#[test]
fn rebase_onto_a_copy_and_boot_from_it() {
    let dir = scratch();
    let img = busybox_image(dir.path());
    let cow = dir.path().join("c.cow");
    let (rc, _, err) = run(
        &["--image", s(&img), "--overlay", s(&cow)],
        &["sh", "-c", "echo kept > /kept"],
    );
    assert_eq!(rc, 0, "{err}");
    // A plain copy (new mtime) at a new place.
    let moved = dir.path().join("moved");
    fs::create_dir(&moved).unwrap();
    let copy = moved.join("copy.ext4");
    fs::copy(&img, &copy).unwrap();
    let f = File::options().write(true).open(&copy).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(77))
        .unwrap();
    // Not accepted as is...
    let (rc, _, err) = run(&["--image", s(&copy), "--overlay", s(&cow)], &["true"]);
    assert_eq!(rc, 125);
    assert!(err.contains("belongs to"), "{err}");
    // ...but after a verified rebase.
    let out = ok(&umlctl(&["cow", "rebase", s(&cow), "--backing", s(&copy)]));
    assert!(out.contains("same bytes"), "{out}");
    let (rc, out, err) = run(
        &["--image", s(&copy), "--overlay", s(&cow)],
        &["cat", "/kept"],
    );
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, b"kept\n");
    // A different image of the same size is refused.
    let other = dir.path().join("other.ext4");
    let mut data = fs::read(&img).unwrap();
    data[5000] ^= 0xff;
    fs::write(&other, &data).unwrap();
    fs::remove_file(&img).unwrap();
    fs::copy(&copy, &img).unwrap(); // the "original" again, with a new mtime
    let out = umlctl(&["cow", "rebase", s(&cow), "--backing", s(&other)]);
    assert_eq!(out.status.code(), Some(125));
}

/// Write sectors into a V3 overlay by the format's definition (independent
/// of umlctl's own writer): data at data_offset + s*512, bitmap bit s set.
fn poke_sectors(cow: &Path, size: u64, sectors: &[u64], fill: impl Fn(u64) -> u8) {
    let bitmap_off = 8192u64;
    let bitmap_len = size.div_ceil(512).div_ceil(8);
    let data_off = (bitmap_off + bitmap_len).div_ceil(4096) * 4096;
    let f = File::options().write(true).read(true).open(cow).unwrap();
    let mut bitmap = vec![0u8; bitmap_len as usize];
    f.read_exact_at(&mut bitmap, bitmap_off).unwrap();
    for &s in sectors {
        f.write_all_at(&vec![fill(s); 512], data_off + s * 512)
            .unwrap();
        bitmap[(s / 8) as usize] |= 1 << (s % 8);
    }
    f.write_all_at(&bitmap, bitmap_off).unwrap();
}

#[test]
fn killing_an_in_place_merge_never_touches_unchanged_sectors() {
    let dir = scratch();
    let size: u64 = 64 << 20;
    let base = dir.path().join("base.img");
    let orig: Vec<u8> = (0..size)
        .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ 0x5a)
        .collect();
    fs::write(&base, &orig).unwrap();
    let cow = dir.path().join("c.cow");
    ok(&umlctl(&["cow", "create", "--backing", s(&base), s(&cow)]));
    // About 10% of the sectors, scattered.
    let n = size / 512;
    let mut x: u64 = 12345;
    let mut set = std::collections::BTreeSet::new();
    while (set.len() as u64) < n / 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        set.insert(x % n);
    }
    let sectors: Vec<u64> = set.iter().copied().collect();
    let fill = |s: u64| (s as u8) ^ 0xa5 | 1;
    poke_sectors(&cow, size, &sectors, fill);
    let mut expect = orig.clone();
    for &s in &sectors {
        expect[(s * 512) as usize..((s + 1) * 512) as usize].fill(fill(s));
    }

    let check_unchanged = |what: &str| {
        let now = fs::read(&base).unwrap();
        for s in 0..n {
            if !set.contains(&s) {
                let r = (s * 512) as usize..((s + 1) * 512) as usize;
                assert!(
                    now[r.clone()] == orig[r],
                    "{what}: unchanged sector {s} was modified"
                );
            }
        }
    };
    let mut killed = 0;
    for i in 0..12u64 {
        let mut child = Command::new(umlctl_bin())
            .args(["cow", "merge", s(&cow), "--in-place"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(3000 + i * 7919 % 60_000));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        check_unchanged(&format!("after kill {i}"));
        if !cow_merge_pending(&cow) {
            break;
        }
    }
    // Finish (or confirm) the merge.
    if cow_merge_pending(&cow) {
        ok(&umlctl(&["cow", "merge", s(&cow), "--in-place"]));
    }
    assert!(
        fs::read(&base).unwrap() == expect,
        "the finished merge is not the merged disk"
    );
    let info: serde_json::Value =
        serde_json::from_str(&ok(&umlctl(&["cow", "info", "--json", s(&cow)]))).unwrap();
    assert_eq!(info["allocated_sectors"], 0);
    assert_eq!(info["backing_ok"], true);
    assert_eq!(info["merge_in_progress"], false);
    eprintln!("killed {killed} merges mid-way");
}

fn cow_merge_pending(cow: &Path) -> bool {
    let mut m = cow.as_os_str().to_os_string();
    m.push(".merging");
    Path::new(&m).exists() || {
        // Not started yet: the overlay still holds sectors.
        let out = umlctl(&["cow", "info", "--json", s(cow)]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["allocated_sectors"].as_u64().unwrap_or(1) > 0
    }
}

/// On a filesystem with shared extents (XFS with reflink, loop-mounted
/// here), `cow merge -o` clones the backing file and writes only the
/// overlay's sectors: the output equals uml_moo's byte for byte, and
/// filefrag (e2fsprogs) shows its unchanged data shared with the backing file.
#[test]
fn merge_to_a_new_file_clones_where_the_filesystem_shares_extents() {
    assert!(
        Path::new("/usr/sbin/mkfs.xfs").exists(),
        "mkfs.xfs is missing: apt-get install xfsprogs (scripts/test.sh does)"
    );
    let dir = scratch();
    let fsimg = dir.path().join("xfs.img");
    File::create(&fsimg).unwrap().set_len(512 << 20).unwrap();
    assert!(tool("mkfs.xfs", &["-q", "-m", "reflink=1", s(&fsimg)])
        .status
        .success());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = tool("mount", &["-o", "loop", s(&fsimg), s(&mnt)]);
    assert!(
        m.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&m.stderr)
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());

    let size = 64u64 << 20;
    let base = mnt.join("base.img");
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    fs::write(&base, &data).unwrap();
    let cow = mnt.join("c.cow");
    assert!(tool("uml_mkcow", &[s(&cow), s(&base)]).status.success());
    let sectors: Vec<u64> = (0..size / 512).step_by(97).collect();
    poke_sectors(&cow, size, &sectors, |s| (s % 200) as u8 + 7);

    let ours = mnt.join("ours.img");
    ok(&umlctl(&["cow", "merge", s(&cow), "-o", s(&ours)]));
    let theirs = mnt.join("theirs.img");
    assert!(tool("uml_moo", &[s(&cow), s(&theirs)]).status.success());
    assert_eq!(
        sha256_file(&ours),
        sha256_file(&theirs),
        "umlctl and uml_moo differ"
    );
    // The base is untouched, and most of the output shares its extents.
    assert_eq!(sha256(&fs::read(&base).unwrap()), sha256(&data));
    let frag = tool("filefrag", &["-v", s(&ours)]);
    let text = String::from_utf8_lossy(&frag.stdout);
    assert!(
        text.contains("shared"),
        "no shared extents in the merged image:\n{text}"
    );
    let frag = tool("filefrag", &["-v", s(&theirs)]);
    assert!(
        !String::from_utf8_lossy(&frag.stdout).contains("shared"),
        "uml_moo's copy shares extents?"
    );
}
