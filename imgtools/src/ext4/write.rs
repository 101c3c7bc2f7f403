//! Lay out and write an ext4 image from a [`Tree`].
//!
//! Layout, all of it a pure function of the tree and the options:
//! block 0 holds the superblock, the group descriptors follow; with
//! `flex_bg` every group's bitmaps and inode table are packed right after
//! them; then the journal (with `--journal`), then each inode's blocks in
//! inode-number order (directory blocks, file data, extent-tree blocks, an
//! attribute block, a slow symlink's block). Inode numbers follow a walk of
//! the tree with names in byte order (a directory's entries get consecutive
//! numbers). Backup superblocks sit at the start of groups 1 and powers of
//! 3, 5 and 7 (sparse_super); allocation steps around them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::dir::{self, Entry};
use super::hash::{crc, inode_seed};
use super::xattr::{self, DiskAttr};
use super::{BLOCK, BLOCKS_PER_GROUP, INODE_SIZE};
use crate::num::{fit16, fit32, hi16, lo16, lo32, off_t, time32, us};
use crate::progress::Progress;
use crate::source::SpoolKind;
use crate::tree::{show, Kind, Time, Tree};

/// How much free space an automatically sized image gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Headroom {
    /// A percentage of the space the content and metadata use.
    Percent(u64),
    /// A fixed number of bytes.
    Bytes(u64),
}

/// Image parameters.
#[derive(Clone, Debug)]
pub struct Options {
    /// Image size in bytes (rounded down to 4 KiB); `None` sizes it to the
    /// content plus `headroom`.
    pub size: Option<u64>,
    pub headroom: Headroom,
    /// Number of inodes; default: what the content needs plus headroom, or
    /// one per 16 KiB with an explicit size (as mke2fs).
    pub inodes: Option<u64>,
    /// Volume label (at most 16 bytes).
    pub label: Vec<u8>,
    /// Include an empty journal.
    pub journal: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            size: None,
            headroom: Headroom::Percent(10),
            inodes: None,
            label: Vec::new(),
            journal: false,
        }
    }
}

/// Identity of the image: UUID and htree hash seed (derived from the
/// inputs by the caller so that equal inputs give equal bytes), and the
/// time written into the superblock.
#[derive(Clone, Copy, Debug)]
pub struct Ids {
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    pub time: i64,
}

/// What was written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub size: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u64,
    pub free_inodes: u64,
    pub groups: u64,
    pub journal_blocks: u64,
}

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the image is too small for the sources: they need {need_mib} MiB with metadata but --size gives {have_mib} MiB; use --size {need_mib}M or more, or leave --size out to size the image automatically")]
    TooSmall { need_mib: u64, have_mib: u64 },
    #[error(
        "--inodes {given} is too few: the sources need {need} inodes (reserved ones included)"
    )]
    TooFewInodes { given: u64, need: u64 },
    #[error("the sources need {need} inodes, more than an image of this size can hold ({max}); give a larger --size")]
    InodeLimit { need: u64, max: u64 },
    #[error("the image would be larger than 16 TiB, the limit of this writer")]
    TooLarge,
    #[error("directory {path}: too many entries for a two-level hash index")]
    DirTooLarge { path: String },
    #[error("{path}: its extended attributes take {bytes} bytes, more than the {max} that fit in one ext4 attribute block")]
    XattrTooLarge {
        path: String,
        bytes: usize,
        max: usize,
    },
    #[error("volume label {label:?} is {len} bytes; ext4 labels hold at most 16")]
    LabelTooLong { label: String, len: usize },
    #[error("--journal needs an image of at least 8 MiB")]
    JournalTooSmall,
    #[error(
        "the sources need an image over 256 GiB; give --size explicitly for images that large"
    )]
    NeedsExplicitSize,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

const EXTENTS_FL: u32 = 0x80000;
const INDEX_FL: u32 = 0x1000;
const EXT_MAX_LEN: u64 = 32768;
const EXT_PER_BLOCK: usize = (BLOCK - 12) / 12;
const LPF_INO: u32 = 11;
const JOURNAL_INO: u32 = 8;
const MAX_BLOCKS: u64 = 1 << 32;

/// What one inode of the image holds.
enum Body {
    Dir { blocks: Vec<Vec<u8>> },
    File { tree_inode: usize },
    FastLink(Vec<u8>),
    SlowLink(Vec<u8>),
    Dev { i_block: [u32; 2] },
    Empty,
    Journal { blocks: u64 },
}

struct Planned {
    ino: u32,
    mode: u16,
    uid: u32,
    gid: u32,
    mtime: Time,
    links: u32,
    size: u64,
    flags: u32,
    body: Body,
    attrs: Vec<DiskAttr>,
    attrs_in_inode: bool,
}

fn ftype(k: &Kind) -> u8 {
    match k {
        Kind::File(_) => 1,
        Kind::Dir => 2,
        Kind::CharDev { .. } => 3,
        Kind::BlockDev { .. } => 4,
        Kind::Fifo => 5,
        Kind::Socket => 6,
        Kind::Symlink(_) => 7,
    }
}

fn type_bits(k: &Kind) -> u16 {
    match k {
        Kind::File(_) => 0o100000,
        Kind::Dir => 0o040000,
        Kind::CharDev { .. } => 0o020000,
        Kind::BlockDev { .. } => 0o060000,
        Kind::Fifo => 0o010000,
        Kind::Socket => 0o140000,
        Kind::Symlink(_) => 0o120000,
    }
}

fn dev_block(major: u32, minor: u32) -> [u32; 2] {
    if major < 256 && minor < 256 {
        [(major << 8) | minor, 0]
    } else {
        [0, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)]
    }
}

fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

fn name_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// Groups with a backup superblock (sparse_super): 1 and powers of 3, 5, 7.
/// Groups with a backup superblock under sparse_super.
pub fn is_backup_group(g: u64) -> bool {
    if g == 0 {
        return false;
    }
    if g == 1 {
        return true;
    }
    for base in [3u64, 5, 7] {
        let mut p = base;
        while p < g {
            p *= base;
        }
        if p == g {
            return true;
        }
    }
    false
}

/// Journal size in blocks for an image of `blocks` (e2fsprogs' table).
fn journal_blocks(blocks: u64) -> Option<u64> {
    Some(match blocks {
        b if b < 2048 => return None,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    })
}

struct Geometry {
    blocks: u64,
    groups: u64,
    ipg: u64,
    itb: u64,
    gdt: u64,
    journal: u64,
}

impl Geometry {
    fn new(blocks: u64, inodes: u64, journal: bool) -> Geometry {
        let groups = blocks.div_ceil(BLOCKS_PER_GROUP).max(1);
        let ipg = inodes.div_ceil(groups).div_ceil(16).max(1) * 16;
        let ipg = ipg.min(BLOCKS_PER_GROUP);
        let itb = ipg * INODE_SIZE as u64 / BLOCK as u64;
        let gdt = (groups * 32).div_ceil(BLOCK as u64);
        let journal = if journal {
            journal_blocks(blocks).unwrap_or(0)
        } else {
            0
        };
        Geometry {
            blocks,
            groups,
            ipg,
            itb,
            gdt,
            journal,
        }
    }

    fn backups(&self) -> u64 {
        (1..self.groups).filter(|&g| is_backup_group(g)).count() as u64
    }

    /// Blocks taken by superblocks, descriptors, bitmaps and inode tables.
    fn overhead(&self) -> u64 {
        (1 + self.gdt) * (1 + self.backups()) + self.groups * (2 + self.itb)
    }
}

/// Sequential block allocator that steps around the superblock copies.
struct Alloc {
    total: u64,
    next: u64,
    reserved: Vec<(u64, u64)>,
    used: Vec<u64>,
}

impl Alloc {
    fn new(g: &Geometry) -> Alloc {
        let mut reserved = vec![(0, 1 + g.gdt)];
        for grp in 1..g.groups {
            if is_backup_group(grp) {
                reserved.push((grp * BLOCKS_PER_GROUP, 1 + g.gdt));
            }
        }
        let mut a = Alloc {
            total: g.blocks,
            next: 0,
            reserved: reserved.clone(),
            used: vec![0; us(g.blocks).div_ceil(64)],
        };
        for (s, n) in reserved {
            a.mark(s, n.min(g.blocks - s));
        }
        a
    }

    fn mark(&mut self, start: u64, n: u64) {
        for b in start..start + n {
            self.used[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    fn is_used(&self, b: u64) -> bool {
        self.used[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Move `next` past any reserved range it is in; return the end of the
    /// free stretch starting there.
    fn stretch(&mut self) -> u64 {
        loop {
            let mut moved = false;
            for &(s, n) in &self.reserved {
                if self.next >= s && self.next < s + n {
                    self.next = s + n;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        self.reserved
            .iter()
            .map(|&(s, _)| s)
            .filter(|&s| s > self.next)
            .min()
            .unwrap_or(self.total)
            .min(self.total)
    }

    /// Up to `want` contiguous blocks.
    fn take(&mut self, want: u64) -> Option<(u64, u64)> {
        let end = self.stretch();
        if self.next >= end {
            return None;
        }
        let n = want.min(end - self.next);
        let s = self.next;
        self.next += n;
        self.mark(s, n);
        Some((s, n))
    }

    /// Exactly `n` contiguous blocks (skipping a stretch that is too short).
    fn take_contig(&mut self, n: u64) -> Option<u64> {
        loop {
            let end = self.stretch();
            if self.next >= self.total {
                return None;
            }
            if end - self.next >= n {
                let s = self.next;
                self.next += n;
                self.mark(s, n);
                return Some(s);
            }
            self.next = end;
        }
    }
}

/// One extent: logical block, length, physical block.
#[derive(Clone, Copy)]
struct Ext {
    lblk: u64,
    len: u64,
    pblk: u64,
}

/// The written form of an inode's block map.
struct BlockMap {
    i_block: [u8; 60],
    /// Extent tree blocks (physical block, content before the checksum).
    tree: Vec<(u64, Vec<u8>)>,
}

fn ext_header(b: &mut [u8], entries: usize, max: usize, depth: u16) {
    b[0..2].copy_from_slice(&0xF30Au16.to_le_bytes());
    b[2..4].copy_from_slice(&fit16(entries).to_le_bytes());
    b[4..6].copy_from_slice(&fit16(max).to_le_bytes());
    b[6..8].copy_from_slice(&depth.to_le_bytes());
}

fn put_leaf(b: &mut [u8], at: usize, e: &Ext) {
    b[at..at + 4].copy_from_slice(&lo32(e.lblk).to_le_bytes());
    b[at + 4..at + 6].copy_from_slice(&fit16(e.len).to_le_bytes());
    b[at + 6..at + 8].copy_from_slice(&hi16(e.pblk).to_le_bytes());
    b[at + 8..at + 12].copy_from_slice(&lo32(e.pblk).to_le_bytes());
}

fn put_index(b: &mut [u8], at: usize, lblk: u64, pblk: u64) {
    b[at..at + 4].copy_from_slice(&lo32(lblk).to_le_bytes());
    b[at + 4..at + 8].copy_from_slice(&lo32(pblk).to_le_bytes());
    b[at + 8..at + 10].copy_from_slice(&hi16(pblk).to_le_bytes());
}

/// Tree blocks an extent list of `n` entries needs.
fn tree_blocks_for(n: usize) -> u64 {
    let mut total = 0u64;
    let mut level = n;
    while level > 4 {
        level = level.div_ceil(EXT_PER_BLOCK);
        total += level as u64;
    }
    total
}

fn build_map(exts: &[Ext], alloc: &mut Alloc) -> Option<BlockMap> {
    let mut i_block = [0u8; 60];
    if exts.len() <= 4 {
        ext_header(&mut i_block, exts.len(), 4, 0);
        for (i, e) in exts.iter().enumerate() {
            put_leaf(&mut i_block, 12 + 12 * i, e);
        }
        return Some(BlockMap {
            i_block,
            tree: Vec::new(),
        });
    }
    let mut tree = Vec::new();
    // Level 0: leaves.
    let mut level: Vec<(u64, u64)> = Vec::new(); // (first lblk, pblk)
    let mut depth = 0u16;
    for chunk in exts.chunks(EXT_PER_BLOCK) {
        let (p, _) = alloc.take(1)?;
        let mut b = vec![0u8; BLOCK];
        ext_header(&mut b, chunk.len(), EXT_PER_BLOCK, 0);
        for (i, e) in chunk.iter().enumerate() {
            put_leaf(&mut b, 12 + 12 * i, e);
        }
        level.push((chunk[0].lblk, p));
        tree.push((p, b));
    }
    while level.len() > 4 {
        depth += 1;
        let mut up = Vec::new();
        for chunk in level.chunks(EXT_PER_BLOCK) {
            let (p, _) = alloc.take(1)?;
            let mut b = vec![0u8; BLOCK];
            ext_header(&mut b, chunk.len(), EXT_PER_BLOCK, depth);
            for (i, &(l, pb)) in chunk.iter().enumerate() {
                put_index(&mut b, 12 + 12 * i, l, pb);
            }
            up.push((chunk[0].0, p));
            tree.push((p, b));
        }
        level = up;
    }
    ext_header(&mut i_block, level.len(), 4, depth + 1);
    for (i, &(l, p)) in level.iter().enumerate() {
        put_index(&mut i_block, 12 + 12 * i, l, p);
    }
    Some(BlockMap { i_block, tree })
}

/// Add `n` blocks at logical `lblk` / physical `pblk` to an extent list,
/// merging with the last extent and splitting at the extent length limit.
fn push_extents(exts: &mut Vec<Ext>, mut lblk: u64, mut pblk: u64, mut n: u64) {
    while n > 0 {
        match exts.last_mut() {
            Some(e) if e.lblk + e.len == lblk && e.pblk + e.len == pblk && e.len < EXT_MAX_LEN => {
                let k = n.min(EXT_MAX_LEN - e.len);
                e.len += k;
                lblk += k;
                pblk += k;
                n -= k;
            }
            _ => {
                let k = n.min(EXT_MAX_LEN);
                exts.push(Ext { lblk, len: k, pblk });
                lblk += k;
                pblk += k;
                n -= k;
            }
        }
    }
}

/// Allocate `n` blocks at logical `lblk` onwards, as extents of at most
/// 32768 blocks; also returns the physical runs with their source offsets.
fn alloc_extents(
    alloc: &mut Alloc,
    mut lblk: u64,
    mut n: u64,
    exts: &mut Vec<Ext>,
) -> Option<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    while n > 0 {
        let (p, got) = alloc.take(n.min(EXT_MAX_LEN))?;
        push_extents(exts, lblk, p, got);
        runs.push((p, got));
        lblk += got;
        n -= got;
    }
    Some(runs)
}

/// Copy `len` bytes from `src` at `src_off` to `out` at `dst_off`, in the
/// kernel when it can (copy_file_range), else through a buffer. Stops early
/// at the source's end.
fn copy_range(
    src: &File,
    mut src_off: u64,
    out: &File,
    mut dst_off: u64,
    mut len: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    while len > 0 {
        let mut off_in = off_t(src_off)?;
        let mut off_out = off_t(dst_off)?;
        use nix::errno::Errno;
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), out, Some(&mut off_out), us(len))
        {
            Ok(0) => return Ok(()),
            Ok(r) => {
                src_off += r as u64;
                dst_off += r as u64;
                len -= r as u64;
            }
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => break,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if buf.is_empty() {
        buf.resize(1 << 20, 0);
    }
    while len > 0 {
        let n = us(len).min(buf.len());
        let got = src.read_at(&mut buf[..n], src_off)?;
        if got == 0 {
            return Ok(());
        }
        out.write_all_at(&buf[..got], dst_off)?;
        src_off += got as u64;
        dst_off += got as u64;
        len -= got as u64;
    }
    Ok(())
}

fn put_time(ino: &mut [u8], at: usize, extra: usize, t: Time) {
    ino[at..at + 4].copy_from_slice(&time32(t.sec).to_le_bytes());
    // The epoch bits extend the signed 32-bit seconds: (sec - (i32)sec) >> 32.
    let epoch_bits =
        time32((t.sec - i64::from(i32::from_ne_bytes(time32(t.sec).to_ne_bytes()))) >> 32) & 3;
    ino[extra..extra + 4].copy_from_slice(&((t.nsec << 2) | epoch_bits).to_le_bytes());
}

/// Plan every inode: numbers, directory contents, attributes.
fn plan(tree: &Tree, hash_seed: &[u32; 4], fs_seed: u32) -> Result<Vec<Planned>, WriteError> {
    // Children of every directory, in name order (the tree's path order
    // keeps a directory's direct children in name order).
    let mut dir_index: HashMap<&[u8], usize> = HashMap::new();
    // (path, tree inode, children as (name, tree inode))
    type DirList<'a> = Vec<(&'a [u8], usize, Vec<(&'a [u8], usize)>)>;
    let mut dirs: DirList = Vec::new();
    for (path, ti) in tree.entries() {
        if !path.is_empty() {
            let parent = parent_of(path);
            let di = dir_index[parent];
            dirs[di].2.push((name_of(path), ti));
        }
        if matches!(tree.inode(ti).kind, Kind::Dir) {
            dir_index.insert(path, dirs.len());
            dirs.push((path, ti, Vec::new()));
        }
    }
    let names = tree.name_counts();
    // Inode numbers: root 2, lost+found 11, the rest from 12 (11 when there
    // is no lost+found directory), a directory's entries consecutively.
    let lpf_is_dir = matches!(tree.get(b"lost+found").map(|i| &i.kind), Some(Kind::Dir));
    let mut ino_of: Vec<u32> = vec![0; names.len()];
    let mut next: u32 = if lpf_is_dir { 12 } else { 11 };
    let mut order: Vec<(u32, usize, Vec<u8>)> = Vec::new();
    ino_of[dirs[0].1] = 2;
    order.push((2, dirs[0].1, Vec::new()));
    let mut queue = std::collections::VecDeque::new();
    queue.push_back(0usize);
    while let Some(di) = queue.pop_front() {
        let (dpath, _, children) = &dirs[di];
        let mut subdirs = Vec::new();
        for &(name, ti) in children {
            if ino_of[ti] == 0 {
                let ino = if dpath.is_empty() && name == b"lost+found" && lpf_is_dir {
                    LPF_INO
                } else {
                    next += 1;
                    next - 1
                };
                ino_of[ti] = ino;
                let mut p = dpath.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                order.push((ino, ti, p));
            }
            if matches!(tree.inode(ti).kind, Kind::Dir) {
                let mut p = dpath.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                subdirs.push(p);
            }
        }
        for p in subdirs {
            queue.push_back(dir_index[p.as_slice()]);
        }
    }
    order.sort_by_key(|o| o.0);
    // Paths for messages, and directory contents.
    let mut dir_of_inode: HashMap<usize, usize> = HashMap::new();
    for (i, d) in dirs.iter().enumerate() {
        dir_of_inode.insert(d.1, i);
    }
    let mut parent_ino: HashMap<usize, u32> = HashMap::new();
    for (_, ti, children) in &dirs {
        for &(_, c) in children {
            if matches!(tree.inode(c).kind, Kind::Dir) {
                parent_ino.insert(c, ino_of[*ti]);
            }
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for (ino, ti, path) in order {
        let node = tree.inode(ti);
        let attrs = xattr::to_disk(&node.xattrs);
        let room = xattr::space(&attrs) + 4;
        let attrs_in_inode = room <= xattr::IN_INODE_ROOM;
        let mut flags = 0;
        let (body, size, links) = match &node.kind {
            Kind::Dir => {
                let di = dir_of_inode[&ti];
                let (dpath, _, children) = &dirs[di];
                let entries: Vec<Entry> = children
                    .iter()
                    .map(|&(name, c)| Entry {
                        name,
                        ino: ino_of[c],
                        ftype: ftype(&tree.inode(c).kind),
                    })
                    .collect();
                let subdirs = children
                    .iter()
                    .filter(|(_, c)| matches!(tree.inode(*c).kind, Kind::Dir))
                    .count();
                let subdirs = fit32(subdirs);
                let parent = parent_ino.get(&ti).copied().unwrap_or(2);
                let db = dir::build(
                    ino,
                    parent,
                    &entries,
                    hash_seed,
                    inode_seed(fs_seed, ino, 0),
                    if ino == LPF_INO { 4 } else { 1 },
                )
                .map_err(|_| WriteError::DirTooLarge { path: show(dpath) })?;
                flags |= EXTENTS_FL;
                if db.htree {
                    flags |= INDEX_FL;
                }
                let links = if 2 + subdirs > 64999 { 1 } else { 2 + subdirs };
                let size = (db.blocks.len() * BLOCK) as u64;
                (Body::Dir { blocks: db.blocks }, size, links)
            }
            Kind::File(fd) => {
                flags |= EXTENTS_FL;
                (Body::File { tree_inode: ti }, fd.size, names[ti])
            }
            Kind::Symlink(t) if t.len() < 60 => {
                (Body::FastLink(t.clone()), t.len() as u64, names[ti])
            }
            Kind::Symlink(t) => {
                flags |= EXTENTS_FL;
                (Body::SlowLink(t.clone()), t.len() as u64, names[ti])
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => (
                Body::Dev {
                    i_block: dev_block(*major, *minor),
                },
                0,
                names[ti],
            ),
            Kind::Fifo | Kind::Socket => (Body::Empty, 0, names[ti]),
        };
        if !attrs_in_inode && room > xattr::BLOCK_ROOM {
            return Err(WriteError::XattrTooLarge {
                path: show(&path),
                bytes: room,
                max: xattr::BLOCK_ROOM,
            });
        }
        out.push(Planned {
            ino,
            mode: type_bits(&node.kind) | (node.meta.mode & 0o7777),
            uid: node.meta.uid,
            gid: node.meta.gid,
            mtime: node.meta.mtime,
            links,
            size,
            flags,
            body,
            attrs,
            attrs_in_inode,
        });
    }
    Ok(out)
}

/// Blocks an inode needs besides its extent tree.
fn body_blocks(p: &Planned, tree: &Tree) -> u64 {
    let data = match &p.body {
        Body::Dir { blocks } => blocks.len() as u64,
        Body::File { tree_inode } => match &tree.inode(*tree_inode).kind {
            Kind::File(fd) => fd.blocks(),
            _ => 0,
        },
        Body::SlowLink(_) => 1,
        _ => 0,
    };
    data + u64::from(!p.attrs_in_inode)
}

/// The inode's own fields (the xattr fields are set by the caller), with
/// its checksum last.
fn encode_inode(raw: &mut [u8], p: &Planned, nblocks: u64, i_block: &[u8; 60], seed: u32) {
    raw[0..2].copy_from_slice(&p.mode.to_le_bytes());
    raw[2..4].copy_from_slice(&lo16(p.uid).to_le_bytes());
    raw[0x78..0x7A].copy_from_slice(&((p.uid >> 16) as u16).to_le_bytes());
    raw[0x18..0x1A].copy_from_slice(&lo16(p.gid).to_le_bytes());
    raw[0x7A..0x7C].copy_from_slice(&((p.gid >> 16) as u16).to_le_bytes());
    raw[4..8].copy_from_slice(&lo32(p.size).to_le_bytes());
    raw[0x6C..0x70].copy_from_slice(&lo32(p.size >> 32).to_le_bytes());
    put_time(raw, 0x08, 0x8C, p.mtime);
    put_time(raw, 0x0C, 0x84, p.mtime);
    put_time(raw, 0x10, 0x88, p.mtime);
    put_time(raw, 0x90, 0x94, p.mtime);
    raw[0x1A..0x1C].copy_from_slice(&fit16(p.links).to_le_bytes());
    let sectors = nblocks * (BLOCK as u64 / 512);
    raw[0x1C..0x20].copy_from_slice(&lo32(sectors).to_le_bytes());
    raw[0x74..0x76].copy_from_slice(&hi16(sectors).to_le_bytes());
    raw[0x20..0x24].copy_from_slice(&p.flags.to_le_bytes());
    raw[0x28..0x64].copy_from_slice(i_block);
    raw[0x80..0x82].copy_from_slice(&32u16.to_le_bytes());
    let c = crc(seed, raw);
    raw[0x7C..0x7E].copy_from_slice(&lo16(c).to_le_bytes());
    raw[0x82..0x84].copy_from_slice(&((c >> 16) as u16).to_le_bytes());
}

/// What the group tables are made from.
struct Tables<'a> {
    geo: &'a Geometry,
    alloc: &'a Alloc,
    itable: &'a [u8],
    max_ino: u64,
    /// Block bitmap, inode bitmap and inode table block of each group.
    bb: &'a [u64],
    ib: &'a [u64],
    it: &'a [u64],
    used_dirs: &'a [u64],
    fs_seed: u32,
}

impl Tables<'_> {
    /// Write every group's inode table and bitmaps; the group descriptor
    /// table (to be written with each superblock copy) and the free block
    /// and inode totals.
    fn write(&self, out: &File, out_path: &Path) -> Result<(Vec<u8>, u64, u64), WriteError> {
        let Tables {
            geo,
            alloc,
            itable,
            max_ino,
            bb,
            ib,
            it,
            used_dirs,
            fs_seed,
        } = *self;
        let mut gdt = vec![0u8; us(geo.gdt) * BLOCK];
        let mut free_blocks_total = 0u64;
        let mut free_inodes_total = 0u64;
        for g in 0..geo.groups {
            let first_ino = g * geo.ipg + 1;
            let last_ino = ((g + 1) * geo.ipg).min(max_ino);
            let mut highest = 0u64;
            let mut inode_bitmap = vec![0u8; BLOCK];
            let mut used_inodes = 0u64;
            if first_ino <= max_ino {
                let slice = &itable[(us(first_ino) - 1) * INODE_SIZE..us(last_ino) * INODE_SIZE];
                out.write_all_at(slice, it[us(g)] * BLOCK as u64)
                    .map_err(io("write", out_path))?;
                for ino in first_ino..=last_ino {
                    let idx = ino - first_ino;
                    let raw = &itable[(us(ino) - 1) * INODE_SIZE..us(ino) * INODE_SIZE];
                    if ino < 11 || raw[0..2] != [0, 0] {
                        inode_bitmap[(idx / 8) as usize] |= 1 << (idx % 8);
                        used_inodes += 1;
                        highest = idx + 1;
                    }
                }
            }
            for bit in geo.ipg..(BLOCK as u64 * 8) {
                inode_bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
            }
            let mut block_bitmap = vec![0u8; BLOCK];
            let start = g * BLOCKS_PER_GROUP;
            let mut used_blocks = 0u64;
            for i in 0..BLOCKS_PER_GROUP {
                let b = start + i;
                if b >= geo.blocks || alloc.is_used(b) {
                    block_bitmap[(i / 8) as usize] |= 1 << (i % 8);
                    if b < geo.blocks {
                        used_blocks += 1;
                    }
                }
            }
            let in_group = BLOCKS_PER_GROUP.min(geo.blocks - start);
            let free_b = in_group - used_blocks;
            let free_i = geo.ipg - used_inodes;
            free_blocks_total += free_b;
            free_inodes_total += free_i;
            out.write_all_at(&block_bitmap, bb[us(g)] * BLOCK as u64)
                .map_err(io("write", out_path))?;
            out.write_all_at(&inode_bitmap, ib[us(g)] * BLOCK as u64)
                .map_err(io("write", out_path))?;
            let d = &mut gdt[us(g) * 32..us(g) * 32 + 32];
            d[0..4].copy_from_slice(&fit32(bb[us(g)]).to_le_bytes());
            d[4..8].copy_from_slice(&fit32(ib[us(g)]).to_le_bytes());
            d[8..12].copy_from_slice(&fit32(it[us(g)]).to_le_bytes());
            d[0xC..0xE].copy_from_slice(&fit16(free_b).to_le_bytes());
            d[0xE..0x10].copy_from_slice(&fit16(free_i).to_le_bytes());
            d[0x10..0x12].copy_from_slice(&fit16(used_dirs[us(g)]).to_le_bytes());
            d[0x12..0x14].copy_from_slice(&4u16.to_le_bytes()); // ITABLE_ZEROED
            let bcs = crc(fs_seed, &block_bitmap);
            let ics = crc(fs_seed, &inode_bitmap[..(geo.ipg / 8) as usize]);
            d[0x18..0x1A].copy_from_slice(&lo16(bcs).to_le_bytes());
            d[0x1A..0x1C].copy_from_slice(&lo16(ics).to_le_bytes());
            d[0x1C..0x1E].copy_from_slice(&fit16(geo.ipg - highest).to_le_bytes());
            let mut c = crc(fs_seed, &fit32(g).to_le_bytes());
            c = crc(c, &d[..0x1E]);
            c = crc(c, &[0, 0]);
            d[0x1E..0x20].copy_from_slice(&lo16(c).to_le_bytes());
        }
        Ok((gdt, free_blocks_total, free_inodes_total))
    }
}

/// The primary superblock before its group number and checksum (set per
/// copy).
fn superblock(
    geo: &Geometry,
    ids: &Ids,
    opts: &Options,
    ninodes: u64,
    (free_blocks_total, free_inodes_total): (u64, u64),
    journal_iblock: &[u8; 60],
) -> Vec<u8> {
    let mut sb = vec![0u8; 1024];
    let w32 =
        |sb: &mut [u8], off: usize, v: u32| sb[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let w16 =
        |sb: &mut [u8], off: usize, v: u16| sb[off..off + 2].copy_from_slice(&v.to_le_bytes());
    w32(&mut sb, 0x00, fit32(ninodes));
    w32(&mut sb, 0x04, fit32(geo.blocks));
    w32(&mut sb, 0x0C, fit32(free_blocks_total));
    w32(&mut sb, 0x10, fit32(free_inodes_total));
    w32(&mut sb, 0x18, 2);
    w32(&mut sb, 0x1C, 2);
    w32(&mut sb, 0x20, fit32(BLOCKS_PER_GROUP));
    w32(&mut sb, 0x24, fit32(BLOCKS_PER_GROUP));
    w32(&mut sb, 0x28, fit32(geo.ipg));
    w32(&mut sb, 0x30, time32(ids.time));
    w16(&mut sb, 0x36, 0xFFFF);
    w16(&mut sb, 0x38, 0xEF53);
    w16(&mut sb, 0x3A, 1);
    w16(&mut sb, 0x3C, 1);
    w32(&mut sb, 0x40, time32(ids.time));
    w32(&mut sb, 0x4C, 1);
    w32(&mut sb, 0x54, 11);
    w16(&mut sb, 0x58, fit16(INODE_SIZE));
    let compat = 0x8 | 0x20 | if geo.journal > 0 { 0x4 } else { 0 };
    w32(&mut sb, 0x5C, compat);
    w32(&mut sb, 0x60, 0x2 | 0x40 | 0x200);
    w32(&mut sb, 0x64, 0x1 | 0x2 | 0x8 | 0x20 | 0x40 | 0x400);
    sb[0x68..0x78].copy_from_slice(&ids.uuid);
    sb[0x78..0x78 + opts.label.len()].copy_from_slice(&opts.label);
    if geo.journal > 0 {
        w32(&mut sb, 0xE0, JOURNAL_INO);
        sb[0xFD] = 1;
        sb[0x10C..0x10C + 60].copy_from_slice(journal_iblock);
        w32(&mut sb, 0x10C + 60 + 4, fit32(geo.journal * BLOCK as u64));
    }
    sb[0xEC..0xFC].copy_from_slice(&ids.hash_seed);
    sb[0xFC] = 1;
    w32(&mut sb, 0x100, 0x0C);
    w32(&mut sb, 0x108, time32(ids.time));
    w16(&mut sb, 0x15C, 32);
    w16(&mut sb, 0x15E, 32);
    w32(&mut sb, 0x160, 1);
    sb[0x174] = 4;
    sb[0x175] = 1;
    sb
}

/// What an image must hold, for choosing (or checking) its geometry.
struct Sizing {
    max_ino: u64,
    /// Blocks below which an in-image spool already holds file data.
    spool_end: u64,
    /// Content blocks still to allocate.
    content: u64,
    /// Extent-tree blocks (estimate, with slack).
    tree_est: u64,
    nplanned: u64,
}

impl Sizing {
    /// Inodes for an image of `blocks` blocks.
    fn inodes_for(&self, opts: &Options, blocks: u64) -> u64 {
        match opts.inodes {
            Some(n) => n,
            None => match (opts.size, opts.headroom) {
                (Some(s), _) => (self.max_ino + 64).max(s / 16384),
                (None, Headroom::Percent(p)) => self.max_ino + self.max_ino * p / 100 + 256,
                (None, Headroom::Bytes(b)) => self.max_ino + b / 16384 + 256,
            }
            .max(blocks.min(1) * 16),
        }
    }

    /// Blocks the image needs with geometry `g`.
    fn need_for(&self, g: &Geometry) -> u64 {
        self.spool_end
            + g.overhead()
            + g.journal
            + self.content
            + self.tree_est
            + self.nplanned / 64
            + g.groups
    }

    /// The geometry: the one asked for, checked, or the smallest that holds
    /// everything with the headroom asked for.
    fn geometry(&self, opts: &Options) -> Result<Geometry, WriteError> {
        Ok(match opts.size {
            Some(size) => {
                let mut blocks = size / BLOCK as u64;
                if blocks >= MAX_BLOCKS {
                    return Err(WriteError::TooLarge);
                }
                // A tail group too small for its own superblock copy is dropped (as mke2fs).
                let tail = blocks % BLOCKS_PER_GROUP;
                if blocks > BLOCKS_PER_GROUP && tail > 0 && tail < 256 {
                    blocks -= tail;
                }
                let g = Geometry::new(blocks, self.inodes_for(opts, blocks), opts.journal);
                if opts.journal && g.journal == 0 {
                    return Err(WriteError::JournalTooSmall);
                }
                let need = self.need_for(&g);
                if need > blocks {
                    return Err(WriteError::TooSmall {
                        need_mib: (need * 4).div_ceil(1024),
                        have_mib: blocks * 4 / 1024,
                    });
                }
                g
            }
            None => {
                let mut blocks = 256u64;
                loop {
                    let g = Geometry::new(blocks, self.inodes_for(opts, blocks), opts.journal);
                    let need = self.need_for(&g);
                    let free = match opts.headroom {
                        Headroom::Percent(p) => need * p / 100,
                        Headroom::Bytes(b) => b / BLOCK as u64,
                    };
                    let mut want = (need + free.max(256)).div_ceil(256) * 256;
                    if opts.journal && want < 2048 {
                        want = 2048;
                    }
                    // A group holds at most BLOCKS_PER_GROUP inodes (one bitmap
                    // block), so many small files need more groups than their
                    // bytes do.
                    let groups = self.inodes_for(opts, want).div_ceil(BLOCKS_PER_GROUP);
                    if groups > 1 {
                        want = want.max((groups - 1) * BLOCKS_PER_GROUP + 256);
                    }
                    let tail = want % BLOCKS_PER_GROUP;
                    if want > BLOCKS_PER_GROUP && tail > 0 && tail < 256 {
                        want += 256 - tail;
                    }
                    if want <= blocks {
                        break g;
                    }
                    if want >= MAX_BLOCKS {
                        return Err(WriteError::TooLarge);
                    }
                    blocks = want;
                }
            }
        })
    }
}

/// Write the image for `tree` to `out` (a new, empty file).
pub fn write_image(
    tree: &Tree,
    spool: &SpoolKind,
    opts: &Options,
    ids: &Ids,
    out: &File,
    out_path: &Path,
    progress: &dyn Progress,
) -> Result<Report, WriteError> {
    if opts.label.len() > 16 {
        return Err(WriteError::LabelTooLong {
            label: String::from_utf8_lossy(&opts.label).into(),
            len: opts.label.len(),
        });
    }
    let fs_seed = crc(!0, &ids.uuid);
    let mut hash_seed = [0u32; 4];
    for (i, w) in hash_seed.iter_mut().enumerate() {
        *w = u32::from_le_bytes(ids.hash_seed[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
    }
    let mut planned = plan(tree, &hash_seed, fs_seed)?;
    let max_ino = u64::from(planned.iter().map(|p| p.ino).max().unwrap_or(11));
    let in_image = match spool {
        SpoolKind::InImage { end, reserve, .. } => Some((*end, *reserve)),
        SpoolKind::File(_) => None,
    };
    let spooled: u64 = if in_image.is_some() {
        planned
            .iter()
            .map(|p| match &p.body {
                Body::File { tree_inode } => match &tree.inode(*tree_inode).kind {
                    Kind::File(fd) => fd.blocks(),
                    _ => 0,
                },
                _ => 0,
            })
            .sum()
    } else {
        0
    };
    // With an in-image spool, file data already sits below `spool_end`.
    let spool_end = in_image.map_or(0, |(e, _)| e);
    let content: u64 = planned.iter().map(|p| body_blocks(p, tree)).sum::<u64>() - spooled;
    // Extent-tree blocks: exact for the runs, plus slack for runs split at
    // superblock copies (one extra extent per copy at most).
    let tree_est: u64 = planned
        .iter()
        .map(|p| match &p.body {
            Body::File { tree_inode } => match &tree.inode(*tree_inode).kind {
                Kind::File(fd) => {
                    let n: u64 = fd.runs.iter().map(|r| r.len.div_ceil(EXT_MAX_LEN)).sum();
                    if n > 4 {
                        tree_blocks_for(us(n) + 2) + 1
                    } else {
                        0
                    }
                }
                _ => 0,
            },
            _ => 0,
        })
        .sum();

    if let Some(n) = opts.inodes {
        if n < max_ino {
            return Err(WriteError::TooFewInodes {
                given: n,
                need: max_ino,
            });
        }
    }
    let sizing = Sizing {
        max_ino,
        spool_end,
        content,
        tree_est,
        nplanned: planned.len() as u64,
    };
    let geo = sizing.geometry(opts)?;
    let ninodes = geo.ipg * geo.groups;
    if ninodes < max_ino {
        return Err(WriteError::InodeLimit {
            need: max_ino,
            max: ninodes,
        });
    }
    let too_small = || WriteError::TooSmall {
        need_mib: (sizing.need_for(&geo) * 4).div_ceil(1024) + 1,
        have_mib: geo.blocks * 4 / 1024,
    };
    if let Some((_, reserve)) = in_image {
        if 1 + geo.gdt > reserve {
            return Err(WriteError::NeedsExplicitSize);
        }
    }

    // Allocate: metadata, journal, then each inode's blocks.
    let mut alloc = Alloc::new(&geo);
    alloc.next = spool_end;
    let mut bb = Vec::new();
    let mut ib = Vec::new();
    let mut it = Vec::new();
    for _ in 0..geo.groups {
        bb.push(alloc.take_contig(1).ok_or_else(too_small)?);
    }
    for _ in 0..geo.groups {
        ib.push(alloc.take_contig(1).ok_or_else(too_small)?);
    }
    for _ in 0..geo.groups {
        it.push(alloc.take_contig(geo.itb).ok_or_else(too_small)?);
    }
    if geo.journal > 0 {
        planned.push(Planned {
            ino: JOURNAL_INO,
            mode: 0o100600,
            uid: 0,
            gid: 0,
            mtime: Time {
                sec: ids.time,
                nsec: 0,
            },
            links: 1,
            size: geo.journal * BLOCK as u64,
            flags: EXTENTS_FL,
            body: Body::Journal {
                blocks: geo.journal,
            },
            attrs: Vec::new(),
            attrs_in_inode: true,
        });
        planned.sort_by_key(|p| p.ino);
    }

    let mut itable = vec![0u8; us(max_ino) * INODE_SIZE];
    let mut meta_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
    // Per file: tree inode and its (physical block, blocks, source offset) runs.
    type Copies = Vec<(usize, Vec<(u64, u64, u64)>)>;
    let mut copies: Copies = Vec::new();
    let mut used_dirs = vec![0u64; us(geo.groups)];
    let mut journal_iblock = [0u8; 60];
    let mut data_bytes = 0u64;
    for p in &planned {
        let seed = inode_seed(fs_seed, p.ino, 0);
        let mut exts: Vec<Ext> = Vec::new();
        let mut i_block = [0u8; 60];
        let mut nblocks = 0u64;
        match &p.body {
            Body::Dir { blocks } => {
                let runs = alloc_extents(&mut alloc, 0, blocks.len() as u64, &mut exts)
                    .ok_or_else(too_small)?;
                let mut i = 0;
                for (pb, n) in runs {
                    for k in 0..n {
                        meta_blocks.push((pb + k, blocks[i].clone()));
                        i += 1;
                    }
                }
                nblocks += blocks.len() as u64;
                used_dirs[us((u64::from(p.ino) - 1) / geo.ipg)] += 1;
            }
            Body::File { tree_inode } => {
                if let (Kind::File(fd), Some(_)) = (&tree.inode(*tree_inode).kind, in_image) {
                    // Already in place: map the runs, mark their blocks.
                    for r in &fd.runs {
                        let pb = r.src / BLOCK as u64;
                        if pb + r.len > geo.blocks {
                            return Err(too_small());
                        }
                        alloc.mark(pb, r.len);
                        push_extents(&mut exts, r.lblk, pb, r.len);
                        nblocks += r.len;
                    }
                } else if let Kind::File(fd) = &tree.inode(*tree_inode).kind {
                    let mut list = Vec::new();
                    for r in &fd.runs {
                        let runs = alloc_extents(&mut alloc, r.lblk, r.len, &mut exts)
                            .ok_or_else(too_small)?;
                        let mut src = r.src;
                        for (pb, n) in runs {
                            list.push((pb, n, src));
                            src += n * BLOCK as u64;
                        }
                        nblocks += r.len;
                    }
                    data_bytes += fd.size;
                    copies.push((*tree_inode, list));
                }
            }
            Body::SlowLink(t) => {
                alloc_extents(&mut alloc, 0, 1, &mut exts).ok_or_else(too_small)?;
                let mut b = vec![0u8; BLOCK];
                b[..t.len()].copy_from_slice(t);
                meta_blocks.push((exts[0].pblk, b));
                nblocks += 1;
            }
            Body::FastLink(t) => i_block[..t.len()].copy_from_slice(t),
            Body::Dev { i_block: w } => {
                i_block[0..4].copy_from_slice(&w[0].to_le_bytes());
                i_block[4..8].copy_from_slice(&w[1].to_le_bytes());
            }
            Body::Empty => {}
            Body::Journal { blocks } => {
                let runs =
                    alloc_extents(&mut alloc, 0, *blocks, &mut exts).ok_or_else(too_small)?;
                let mut jsb = vec![0u8; BLOCK];
                jsb[0..4].copy_from_slice(&0xC03B_3998u32.to_be_bytes());
                jsb[4..8].copy_from_slice(&4u32.to_be_bytes());
                jsb[0xC..0x10].copy_from_slice(&fit32(BLOCK).to_be_bytes());
                jsb[0x10..0x14].copy_from_slice(&fit32(*blocks).to_be_bytes());
                jsb[0x14..0x18].copy_from_slice(&1u32.to_be_bytes());
                jsb[0x18..0x1C].copy_from_slice(&1u32.to_be_bytes());
                jsb[0x30..0x40].copy_from_slice(&ids.uuid);
                jsb[0x40..0x44].copy_from_slice(&1u32.to_be_bytes());
                meta_blocks.push((runs[0].0, jsb));
                nblocks += blocks;
            }
        }
        if p.flags & EXTENTS_FL != 0 {
            let map = build_map(&exts, &mut alloc).ok_or_else(too_small)?;
            nblocks += map.tree.len() as u64;
            for (pb, mut b) in map.tree {
                let c = crc(seed, &b[..12 + 12 * EXT_PER_BLOCK]);
                b[BLOCK - 4..].copy_from_slice(&c.to_le_bytes());
                meta_blocks.push((pb, b));
            }
            i_block = map.i_block;
        }
        if p.ino == JOURNAL_INO {
            journal_iblock = i_block;
        }
        let raw = &mut itable[(p.ino as usize - 1) * INODE_SIZE..p.ino as usize * INODE_SIZE];
        raw[0xA0..0xA4].copy_from_slice(&0u32.to_le_bytes());
        if !p.attrs.is_empty() {
            if p.attrs_in_inode {
                raw[0xA0..0xA4].copy_from_slice(&xattr::MAGIC.to_le_bytes());
                xattr::encode(&p.attrs, &mut raw[0xA4..INODE_SIZE], 0, 0);
            } else {
                let (pb, _) = alloc.take(1).ok_or_else(too_small)?;
                let mut b = vec![0u8; BLOCK];
                b[0..4].copy_from_slice(&xattr::MAGIC.to_le_bytes());
                b[4..8].copy_from_slice(&1u32.to_le_bytes());
                b[8..12].copy_from_slice(&1u32.to_le_bytes());
                let hashes = xattr::encode(&p.attrs, &mut b, 32, 0);
                b[0xC..0x10].copy_from_slice(&xattr::block_hash(&hashes).to_le_bytes());
                let mut c = crc(fs_seed, &pb.to_le_bytes());
                c = crc(c, &b);
                b[0x10..0x14].copy_from_slice(&c.to_le_bytes());
                meta_blocks.push((pb, b));
                raw[0x68..0x6C].copy_from_slice(&lo32(pb).to_le_bytes());
                raw[0x76..0x78].copy_from_slice(&hi16(pb).to_le_bytes());
                nblocks += 1;
            }
        }
        encode_inode(raw, p, nblocks, &i_block, seed);
    }

    // Write: size first (the file is sparse; unwritten blocks read as zeros).
    let total_bytes = geo.blocks * BLOCK as u64;
    out.set_len(total_bytes).map_err(io("resize", out_path))?;
    progress.start(data_bytes);
    let mut buf = Vec::new();
    let spool_path = PathBuf::from("(spool)");
    for (ti, list) in &copies {
        let Kind::File(fd) = &tree.inode(*ti).kind else {
            continue;
        };
        let SpoolKind::File(src) = spool else {
            continue;
        };
        let src_path = &spool_path;
        for &(pb, n, s) in list {
            copy_range(src, s, out, pb * BLOCK as u64, n * BLOCK as u64, &mut buf)
                .map_err(io("copy file data from", src_path))?;
        }
        progress.advance(fd.size);
    }
    for (pb, b) in &meta_blocks {
        out.write_all_at(b, pb * BLOCK as u64)
            .map_err(io("write", out_path))?;
    }

    // Inode tables and bitmaps, group by group.
    let tables = Tables {
        geo: &geo,
        alloc: &alloc,
        itable: &itable,
        max_ino,
        bb: &bb,
        ib: &ib,
        it: &it,
        used_dirs: &used_dirs,
        fs_seed,
    };
    let (gdt, free_blocks_total, free_inodes_total) = tables.write(out, out_path)?;

    // Superblock, then the copies in backup groups.
    let sb = superblock(
        &geo,
        ids,
        opts,
        ninodes,
        (free_blocks_total, free_inodes_total),
        &journal_iblock,
    );
    let w16 =
        |sb: &mut [u8], off: usize, v: u16| sb[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let write_sb = |group: u64| -> Result<(), WriteError> {
        let mut s = sb.clone();
        w16(&mut s, 0x5A, lo16(group));
        let c = crc(!0, &s[..0x3FC]);
        s[0x3FC..].copy_from_slice(&c.to_le_bytes());
        let at = group * BLOCKS_PER_GROUP * BLOCK as u64 + if group == 0 { 1024 } else { 0 };
        out.write_all_at(&s, at).map_err(io("write", out_path))?;
        out.write_all_at(&gdt, (group * BLOCKS_PER_GROUP + 1) * BLOCK as u64)
            .map_err(io("write", out_path))
    };
    write_sb(0)?;
    for g in 1..geo.groups {
        if is_backup_group(g) {
            write_sb(g)?;
        }
    }
    progress.finish();
    Ok(Report {
        size: total_bytes,
        blocks: geo.blocks,
        free_blocks: free_blocks_total,
        inodes: ninodes,
        free_inodes: free_inodes_total,
        groups: geo.groups,
        journal_blocks: geo.journal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_groups() {
        let b: Vec<u64> = (0..100).filter(|&g| is_backup_group(g)).collect();
        assert_eq!(b, vec![1, 3, 5, 7, 9, 25, 27, 49, 81]);
    }

    #[test]
    fn device_numbers() {
        assert_eq!(dev_block(1, 3), [0x103, 0]);
        assert_eq!(dev_block(259, 1), [0, 1 | (259 << 8)]);
        assert_eq!(
            dev_block(8, 300),
            [0, (300 & 0xff) | (8 << 8) | ((300 & !0xff) << 12)]
        );
    }

    #[test]
    fn extent_tree_sizes() {
        assert_eq!(tree_blocks_for(4), 0);
        assert_eq!(tree_blocks_for(5), 1);
        assert_eq!(tree_blocks_for(340 * 4), 4);
        assert_eq!(tree_blocks_for(340 * 4 + 1), 5 + 1);
    }
}
