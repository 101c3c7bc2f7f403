//! Reading a whole image back: its manifest, and a structural check
//! (every checksum, every used inode reachable and every reachable inode
//! marked used, link counts, block ownership against the bitmaps, free
//! counts) — the part of `e2fsck -fn` that matters for a built image.

use crate::num::us;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::ext4::read::{Image, RawInode, ReadAt, ReadError};
use crate::manifest::{escape, hex, show_path, Entry, Manifest};

/// Every path of an image with its inode.
pub struct Walk {
    /// (path relative to the root, inode), in path byte order.
    pub entries: Vec<(Vec<u8>, RawInode)>,
    /// Names pointing at each inode.
    pub names: HashMap<u32, u32>,
    /// Subdirectories of each directory.
    pub subdirs: HashMap<u32, u32>,
    /// Problems found on the way (bad `.`/`..`, type mismatches, loops).
    pub problems: Vec<String>,
}

/// Walk the tree from the root.
pub fn walk<R: ReadAt>(img: &Image<R>) -> Result<Walk, ReadError> {
    let mut entries = Vec::new();
    let mut names: HashMap<u32, u32> = HashMap::new();
    let mut subdirs: HashMap<u32, u32> = HashMap::new();
    let mut problems = Vec::new();
    let mut seen_dirs = std::collections::HashSet::new();
    let root = img.inode(2)?;
    if !root.is_dir() {
        return Err(ReadError::Corrupt(
            "the root inode is not a directory".into(),
        ));
    }
    let mut stack = vec![(Vec::new(), root.clone(), 2u32)];
    entries.push((Vec::new(), root));
    seen_dirs.insert(2u32);
    while let Some((path, dir, parent)) = stack.pop() {
        let list = img.read_dir(&dir)?;
        let mut has_dot = false;
        let mut has_dotdot = false;
        let mut seen_names = std::collections::HashSet::new();
        for (name, ino, ftype) in list {
            if !seen_names.insert(name.clone()) {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&name);
                problems.push(format!(
                    "{}: the name appears more than once in its directory",
                    show_path(&p)
                ));
                continue;
            }
            if name == b"." {
                has_dot = ino == dir.ino;
                continue;
            }
            if name == b".." {
                has_dotdot = ino == parent;
                continue;
            }
            let mut p = path.clone();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&name);
            let node = img.inode(ino)?;
            let want_ftype = match node.kind_name() {
                "file" => 1,
                "dir" => 2,
                "char" => 3,
                "block" => 4,
                "fifo" => 5,
                "socket" => 6,
                "symlink" => 7,
                _ => 0,
            };
            if want_ftype == 0 || (ftype != 0 && ftype != want_ftype) {
                problems.push(format!(
                    "{}: directory entry type {ftype} does not match inode {ino} ({})",
                    show_path(&p),
                    node.kind_name()
                ));
            }
            *names.entry(ino).or_default() += 1;
            if node.is_dir() {
                *subdirs.entry(dir.ino).or_default() += 1;
                if !seen_dirs.insert(ino) {
                    problems.push(format!(
                        "{}: directory inode {ino} is reachable twice",
                        show_path(&p)
                    ));
                    continue;
                }
                stack.push((p.clone(), node.clone(), dir.ino));
            }
            entries.push((p, node));
        }
        if !has_dot || !has_dotdot {
            problems.push(format!(
                "{}: missing or wrong `.` or `..` entry",
                show_path(&path)
            ));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Walk {
        entries,
        names,
        subdirs,
        problems,
    })
}

/// Hash every regular file of `walk`, on all cores.
fn hash_files<R: ReadAt>(img: &Image<R>, walk: &Walk) -> Result<Vec<Option<String>>, ReadError> {
    let n = walk.entries.len();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let results: Vec<Result<Vec<(usize, String)>, ReadError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(out);
                        }
                        let ino = &walk.entries[i].1;
                        if !ino.is_reg() {
                            continue;
                        }
                        let mut h = Sha256::new();
                        img.read_file(ino, &mut |c| h.update(c))?;
                        out.push((i, hex(&h.finalize())));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ReadError::Corrupt("a hashing thread panicked".into())))
            })
            .collect()
    });
    let mut hashes = vec![None; n];
    for r in results {
        for (i, h) in r? {
            hashes[i] = Some(h);
        }
    }
    Ok(hashes)
}

/// The manifest of an image (content hashed unless `with_content` is false).
pub fn manifest<R: ReadAt>(
    img: &Image<R>,
    walk: &Walk,
    with_content: bool,
) -> Result<Manifest, ReadError> {
    let hashes = if with_content {
        hash_files(img, walk)?
    } else {
        vec![None; walk.entries.len()]
    };
    let mut entries = Vec::with_capacity(walk.entries.len());
    for ((path, ino), sha) in walk.entries.iter().zip(hashes) {
        let kind = ino.kind_name();
        let (size, target, rdev) = match kind {
            "file" => (ino.size, None, None),
            "symlink" => {
                let t = img.symlink_target(ino)?;
                (t.len() as u64, Some(escape(&t)), None)
            }
            "char" | "block" => {
                let (a, b) = ino.rdev();
                (0, None, Some([a, b]))
            }
            _ => (0, None, None),
        };
        let xattrs = img
            .xattrs(ino)?
            .into_iter()
            .map(|(k, v)| {
                (
                    escape(&k),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect();
        entries.push(Entry {
            path: show_path(path),
            kind: kind.into(),
            mode: format!("{:04o}", ino.mode & 0o7777),
            uid: ino.uid,
            gid: ino.gid,
            size,
            mtime: ino.mtime.sec,
            mtime_nsec: ino.mtime.nsec,
            nlink: u32::from(ino.links),
            target,
            rdev,
            xattrs,
            sha256: sha,
        });
    }
    Ok(Manifest::new(entries))
}

/// Record that `who` owns block `b` (reporting double claims).
fn claim(owner: &mut [u32], b: u64, who: u32, problems: &mut Vec<String>) {
    let Some(o) = owner.get_mut(us(b)) else {
        problems.push(format!("block {b} (owned by inode {who}) is past the end"));
        return;
    };
    if *o != 0 && *o != who && problems.len() < 200 {
        problems.push(format!(
            "block {b} is claimed twice (by {} and {})",
            *o, who
        ));
    }
    *o = who;
}

fn is_backup_group(g: u64) -> bool {
    if g <= 1 {
        return g == 1;
    }
    [3u64, 5, 7].iter().any(|&b| {
        let mut p = b;
        while p < g {
            p *= b;
        }
        p == g
    })
}

/// Check the image's structure; returns the problems found (empty = sound).
pub fn check<R: ReadAt>(img: &Image<R>, walk: &Walk) -> Result<Vec<String>, ReadError> {
    let mut problems = walk.problems.clone();
    let sb = &img.sb;
    let ipg = u64::from(sb.inodes_per_group);
    let bpg = u64::from(sb.blocks_per_group);
    // Link counts.
    for (path, ino) in &walk.entries {
        let want = if ino.is_dir() {
            let n = 2 + walk.subdirs.get(&ino.ino).copied().unwrap_or(0);
            if n > 64999 && ino.links == 1 {
                1
            } else {
                n
            }
        } else {
            walk.names.get(&ino.ino).copied().unwrap_or(0)
        };
        if u32::from(ino.links) != want {
            problems.push(format!(
                "{}: link count {} but {} names point at inode {}",
                show_path(path),
                ino.links,
                want,
                ino.ino
            ));
        }
    }
    // Reachable inodes against the inode bitmaps.
    // Every index below comes from the image: looked up, never trusted
    // (the superblock's inode count and its groups may disagree).
    let mut reachable = vec![false; sb.inodes as usize + 1];
    for (_, ino) in &walk.entries {
        if let Some(r) = reachable.get_mut(ino.ino as usize) {
            *r = true;
        }
    }
    let mut dirs_in_group = vec![0u32; img.groups.len()];
    for (_, ino) in walk.entries.iter().filter(|(_, i)| i.is_dir()) {
        let g = us(u64::from(ino.ino).saturating_sub(1) / ipg.max(1));
        if let Some(d) = dirs_in_group.get_mut(g) {
            *d += 1;
        }
    }
    let mut free_inodes = 0u64;
    for (g, gd) in img.groups.iter().enumerate() {
        if gd.flags & 0x1 != 0 {
            free_inodes += ipg;
            continue;
        }
        let bm = img.inode_bitmap(g)?;
        let mut free = 0;
        for i in 0..ipg {
            let ino = g as u64 * ipg + i + 1;
            let used = bm
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0);
            if !used {
                free += 1;
            }
            if ino < u64::from(sb.first_ino) {
                continue;
            }
            let r = reachable.get(us(ino)).copied().unwrap_or(false);
            if used && !r {
                problems.push(format!(
                    "inode {ino} is marked in use but no directory entry reaches it"
                ));
            } else if r && !used {
                problems.push(format!("inode {ino} is reachable but marked free"));
            }
        }
        if free != gd.free_inodes {
            problems.push(format!(
                "group {g}: {} free inodes recorded, {free} in the bitmap",
                gd.free_inodes
            ));
        }
        if dirs_in_group[g] != gd.used_dirs {
            problems.push(format!(
                "group {g}: {} directories recorded, {} found",
                gd.used_dirs, dirs_in_group[g]
            ));
        }
        free_inodes += u64::from(free);
    }
    if free_inodes != u64::from(sb.free_inodes) {
        problems.push(format!(
            "superblock: {} free inodes recorded, {free_inodes} counted",
            sb.free_inodes
        ));
    }
    // Blocks: metadata plus what inodes own, against the block bitmaps.
    if sb.compat & 0x10 != 0 {
        // resize_inode images keep reserved descriptor blocks owned through
        // an indirect map; block ownership is not checked for them.
        return Ok(problems);
    }
    let mut owner: Vec<u32> = vec![0; us(sb.blocks)];
    const META: u32 = u32::MAX;
    let gdt_blocks =
        (img.groups.len() as u64 * u64::from(sb.desc_size)).div_ceil(u64::from(sb.block_size));
    for g in 0..img.groups.len() as u64 {
        if g == 0 || (sb.ro_compat & 1 == 0) || is_backup_group(g) {
            let start = g * bpg + u64::from(sb.first_data_block);
            for b in start..start + 1 + gdt_blocks {
                claim(&mut owner, b, META, &mut problems);
            }
        }
    }
    if sb.first_data_block == 1 {
        claim(&mut owner, 0, META, &mut problems);
    }
    let itb = (ipg * u64::from(sb.inode_size)).div_ceil(u64::from(sb.block_size));
    for gd in &img.groups {
        claim(&mut owner, gd.block_bitmap, META, &mut problems);
        claim(&mut owner, gd.inode_bitmap, META, &mut problems);
        for b in gd.inode_table..gd.inode_table + itb {
            claim(&mut owner, b, META, &mut problems);
        }
    }
    let mut owners: Vec<&RawInode> = walk.entries.iter().map(|(_, i)| i).collect();
    let journal = if sb.compat & 0x4 != 0 && sb.journal_inum != 0 {
        Some(img.inode(sb.journal_inum)?)
    } else {
        None
    };
    owners.extend(journal.as_ref());
    let mut done = std::collections::HashSet::new();
    for ino in owners {
        if !done.insert(ino.ino) {
            continue;
        }
        let (exts, tree) = img.extents(ino)?;
        let mut count = tree.len() as u64;
        for t in tree {
            claim(&mut owner, t, ino.ino, &mut problems);
        }
        for e in exts {
            count += e.len;
            for b in e.pblk..e.pblk + e.len {
                claim(&mut owner, b, ino.ino, &mut problems);
            }
        }
        if ino.file_acl != 0 {
            count += 1;
            // An xattr block may be shared (it has a reference count), so
            // it is not claimed like a data block; but it must exist.
            match owner.get_mut(us(ino.file_acl)) {
                Some(o) => {
                    if *o == 0 {
                        *o = ino.ino;
                    }
                }
                None => problems.push(format!(
                    "inode {}: its extended-attribute block {} is outside the filesystem ({} blocks)",
                    ino.ino, ino.file_acl, sb.blocks
                )),
            }
        }
        let sectors = count * (u64::from(sb.block_size) / 512);
        if ino.sectors != sectors && ino.flags & 0x40000 == 0 {
            problems.push(format!(
                "inode {}: i_blocks is {} but it owns {} sectors",
                ino.ino, ino.sectors, sectors
            ));
        }
    }
    let mut free_blocks = 0u64;
    for (g, gd) in img.groups.iter().enumerate() {
        let start = g as u64 * bpg + u64::from(sb.first_data_block);
        let end = (start + bpg).min(sb.blocks);
        if gd.flags & 0x2 != 0 {
            free_blocks += u64::from(gd.free_blocks);
            continue;
        }
        let bm = img.block_bitmap(g)?;
        let mut free = 0u32;
        for b in start..end {
            let i = b - start;
            let used = bm
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0);
            let owned = owner[us(b)] != 0;
            if !used {
                free += 1;
            }
            if used != owned && problems.len() < 200 {
                problems.push(if used {
                    format!("block {b} is marked in use but nothing owns it")
                } else {
                    format!("block {b} is owned by {} but marked free", owner[us(b)])
                });
            }
        }
        if free != gd.free_blocks {
            problems.push(format!(
                "group {g}: {} free blocks recorded, {free} in the bitmap",
                gd.free_blocks
            ));
        }
        free_blocks += u64::from(free);
    }
    if free_blocks != sb.free_blocks {
        problems.push(format!(
            "superblock: {} free blocks recorded, {free_blocks} counted",
            sb.free_blocks
        ));
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use crate::build::{build, BuildOptions};
    use crate::ext4::read::Image;
    use crate::progress::NoProgress;

    /// A small image, and its bytes.
    fn image() -> (tempfile::TempDir, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"hi").unwrap();
        let img = d.path().join("i.img");
        let opts = BuildOptions {
            epoch: Some(0),
            ..BuildOptions::default()
        };
        build(&[src], &img, &opts, &NoProgress, &NoProgress).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        (d, bytes)
    }

    /// Set a superblock field and fix the superblock checksum, as a
    /// crafted (checksum-valid) image would.
    fn patch_sb(bytes: &mut [u8], off: usize, v: u32) {
        let sb = &mut bytes[1024..2048];
        sb[off..off + 4].copy_from_slice(&v.to_le_bytes());
        let c = crate::ext4::hash::crc(!0, &sb[..0x3FC]);
        sb[0x3FC..].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn an_inode_count_that_disagrees_with_the_groups_is_refused() {
        // Found by the image_read fuzzer: fewer inodes than the groups hold
        // made the structure check index past its tables (a panic).
        let (_d, mut bytes) = image();
        let inodes = u32::from_le_bytes(bytes[1024..1028].try_into().unwrap());
        patch_sb(&mut bytes, 0, inodes - 1);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &bytes).unwrap();
        let e = Image::open(std::fs::File::open(f.path()).unwrap())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("geometry is impossible"), "{e}");
    }

    /// A deterministic short version of fuzz/fuzz_targets/image_read.rs:
    /// a real image (a file, a symlink, a directory), mutated thousands of
    /// times with its checksums switched off so the mutations reach the
    /// structures behind them; walking, checking, resolving and reading
    /// never panic.
    #[test]
    fn mutated_images_never_panic() {
        use crate::ext4::read::Piece;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("dir")).unwrap();
        std::fs::write(src.join("dir/f"), vec![7u8; 9000]).unwrap();
        std::os::unix::fs::symlink("dir/f", src.join("link")).unwrap();
        let img = d.path().join("i.img");
        let opts = BuildOptions {
            epoch: Some(0),
            ..BuildOptions::default()
        };
        build(&[src], &img, &opts, &NoProgress, &NoProgress).unwrap();
        let good = std::fs::read(&img).unwrap();
        // The interesting part: everything up to the end of the last used
        // metadata block (superblock, descriptors, tables, directories).
        let hot = good.len().min(64 * 4096);
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..3000 {
            let mut b = good.clone();
            b[1024 + 0x65] &= !0x04; // metadata_csum off
            for _ in 0..1 + next() % 8 {
                let r = next();
                let at = (r >> 16) as usize % hot;
                b[at] = match r % 3 {
                    0 => (r >> 40) as u8,
                    1 => 0xff,
                    _ => 0,
                };
            }
            let Ok(img) = Image::open(b) else {
                continue;
            };
            if img.sb.blocks > 1 << 20 || img.sb.inodes > 1 << 20 {
                continue;
            }
            let Ok(w) = super::walk(&img) else {
                continue;
            };
            let _ = super::check(&img, &w);
            let _ = super::manifest(&img, &w, false);
            for (path, ino) in w.entries.iter().take(16) {
                let _ = img.resolve(path);
                if ino.is_reg() {
                    let mut data = 0u64;
                    let _ = img.read_pieces(ino, &mut |p| {
                        if let Piece::Data(d) = p {
                            data += d.len() as u64;
                        }
                    });
                    assert!(data <= 1 << 32, "round {round}");
                }
            }
        }
    }
}
