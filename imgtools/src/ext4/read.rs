//! Reading ext4 images ourselves: superblock, group descriptors, inodes,
//! extent trees, directories and extended attributes, each checked against
//! its metadata_csum checksum. `ext4-view` reads files for `image cat/ls/
//! extract`; this reader adds what it does not expose (inode numbers, link
//! counts, device numbers, xattrs) and streams file content in large reads
//! for manifests and verify.

use crate::num::{fit32, lo16, lo32, us};
use std::collections::BTreeMap;

use super::hash::{crc, inode_seed};
use super::xattr;
use crate::tree::Time;

/// Positioned reads from an image (a file, or a COW overlay over one).
pub trait ReadAt: Sync {
    /// Fill `buf` from byte `off` (zeros past the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
}

/// An image held in memory (tests, fuzzing).
impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        buf.fill(0);
        if let Ok(off) = usize::try_from(off) {
            if off < self.len() {
                let n = buf.len().min(self.len() - off);
                buf[..n].copy_from_slice(&self[off..off + n]);
            }
        }
        Ok(())
    }
}

impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            let n = FileExt::read_at(self, &mut buf[done..], off + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }
}

/// A problem reading or checking an image.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an ext4 image: {0}")]
    NotExt4(String),
    #[error("unsupported ext4 feature: {0}")]
    Unsupported(String),
    #[error("corrupt: {0}")]
    Corrupt(String),
}

fn corrupt(s: String) -> ReadError {
    ReadError::Corrupt(s)
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The superblock fields we use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Super {
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u32,
    pub free_inodes: u32,
    pub block_size: u32,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub inode_size: u16,
    pub first_ino: u32,
    pub first_data_block: u32,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub uuid: [u8; 16],
    pub label: String,
    pub desc_size: u16,
    pub journal_inum: u32,
    pub mkfs_time: u32,
    pub write_time: u32,
    pub state: u16,
    pub hash_seed: [u32; 4],
    pub log_groups_per_flex: u8,
}

impl Super {
    pub fn has_csum(&self) -> bool {
        self.ro_compat & 0x400 != 0
    }
    pub fn groups(&self) -> u64 {
        (self.blocks - u64::from(self.first_data_block)).div_ceil(u64::from(self.blocks_per_group))
    }
    /// Feature names, in the order `dumpe2fs` prints them.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (bit, name) in [
            (0x4, "has_journal"),
            (0x8, "ext_attr"),
            (0x10, "resize_inode"),
            (0x20, "dir_index"),
            (0x1000, "orphan_file"),
        ] {
            if self.compat & bit != 0 {
                v.push(name);
            }
        }
        for (bit, name) in [
            (0x2, "filetype"),
            (0x4, "needs_recovery"),
            (0x40, "extent"),
            (0x80, "64bit"),
            (0x200, "flex_bg"),
            (0x2000, "metadata_csum_seed"),
            (0x8000, "inline_data"),
        ] {
            if self.incompat & bit != 0 {
                v.push(name);
            }
        }
        for (bit, name) in [
            (0x1, "sparse_super"),
            (0x2, "large_file"),
            (0x8, "huge_file"),
            (0x10, "uninit_bg"),
            (0x20, "dir_nlink"),
            (0x40, "extra_isize"),
            (0x400, "metadata_csum"),
        ] {
            if self.ro_compat & bit != 0 {
                v.push(name);
            }
        }
        v
    }
}

/// One group descriptor.
#[derive(Clone, Debug)]
pub struct Group {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub flags: u16,
    pub itable_unused: u32,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
}

/// An inode as stored.
#[derive(Clone, Debug)]
pub struct RawInode {
    pub ino: u32,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    pub flags: u32,
    pub mtime: Time,
    pub i_block: [u8; 60],
    pub file_acl: u64,
    pub sectors: u64,
    pub generation: u32,
    /// In-inode attribute area (after the fixed fields), if any.
    extra: Vec<u8>,
}

impl RawInode {
    pub fn file_type(&self) -> u16 {
        self.mode & 0o170000
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == 0o040000
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == 0o100000
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == 0o120000
    }
    /// Device numbers of a character or block device.
    pub fn rdev(&self) -> (u32, u32) {
        let w0 = le32(&self.i_block, 0);
        if w0 != 0 {
            ((w0 >> 8) & 0xff, w0 & 0xff)
        } else {
            let w1 = le32(&self.i_block, 4);
            ((w1 & 0xfff00) >> 8, (w1 & 0xff) | ((w1 >> 12) & 0xfff00))
        }
    }
    /// Type name as in manifests.
    pub fn kind_name(&self) -> &'static str {
        match self.file_type() {
            0o100000 => "file",
            0o040000 => "dir",
            0o120000 => "symlink",
            0o020000 => "char",
            0o060000 => "block",
            0o010000 => "fifo",
            0o140000 => "socket",
            _ => "unknown",
        }
    }
}

/// An extent: logical block, length, physical block.
/// A piece of a file's content, in order.
#[derive(Debug)]
pub enum Piece<'a> {
    /// Bytes the image holds.
    Data(&'a [u8]),
    /// This many zero bytes that the image does not store.
    Hole(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub lblk: u64,
    pub len: u64,
    pub pblk: u64,
    /// Allocated but never written (`fallocate`, journald's preallocation):
    /// reads as zeros, whatever the blocks hold.
    pub unwritten: bool,
}

/// An opened image.
pub struct Image<R: ReadAt> {
    r: R,
    pub sb: Super,
    pub groups: Vec<Group>,
    fs_seed: u32,
}

fn decode_time(raw: &[u8], at: usize, extra: usize, extra_ok: bool) -> Time {
    let lo = i64::from(i32::from_ne_bytes(le32(raw, at).to_ne_bytes()));
    if !extra_ok {
        return Time { sec: lo, nsec: 0 };
    }
    let x = le32(raw, extra);
    Time {
        sec: lo + (i64::from(x & 3) << 32),
        nsec: x >> 2,
    }
}

impl<R: ReadAt> Image<R> {
    /// Open and check the superblock and group descriptors.
    pub fn open(r: R) -> Result<Image<R>, ReadError> {
        let mut b = vec![0u8; 1024];
        r.read_at(&mut b, 1024)?;
        if le16(&b, 0x38) != 0xEF53 {
            return Err(ReadError::NotExt4(
                "no ext2/3/4 superblock magic at byte 1024".into(),
            ));
        }
        let log = le32(&b, 0x18);
        if log > 6 {
            return Err(ReadError::NotExt4(format!(
                "block size 2^{} is impossible",
                10 + u64::from(log)
            )));
        }
        let mut label = b[0x78..0x88].to_vec();
        while label.last() == Some(&0) {
            label.pop();
        }
        let incompat = le32(&b, 0x60);
        let mut hash_seed = [0u32; 4];
        for (i, w) in hash_seed.iter_mut().enumerate() {
            *w = le32(&b, 0xEC + 4 * i);
        }
        let bit64 = incompat & 0x80 != 0;
        let sb = Super {
            blocks: u64::from(le32(&b, 0x04))
                | if bit64 {
                    u64::from(le32(&b, 0x150)) << 32
                } else {
                    0
                },
            free_blocks: u64::from(le32(&b, 0x0C))
                | if bit64 {
                    u64::from(le32(&b, 0x158)) << 32
                } else {
                    0
                },
            inodes: le32(&b, 0x00),
            free_inodes: le32(&b, 0x10),
            block_size: 1024 << log,
            blocks_per_group: le32(&b, 0x20),
            inodes_per_group: le32(&b, 0x28),
            inode_size: if le32(&b, 0x4C) == 0 {
                128
            } else {
                le16(&b, 0x58)
            },
            first_ino: if le32(&b, 0x4C) == 0 {
                11
            } else {
                le32(&b, 0x54)
            },
            first_data_block: le32(&b, 0x14),
            compat: le32(&b, 0x5C),
            incompat,
            ro_compat: le32(&b, 0x64),
            uuid: b[0x68..0x78].try_into().unwrap_or([0; 16]),
            label: String::from_utf8_lossy(&label).into_owned(),
            desc_size: if bit64 { le16(&b, 0xFE) } else { 32 },
            journal_inum: le32(&b, 0xE0),
            mkfs_time: le32(&b, 0x108),
            write_time: le32(&b, 0x30),
            state: le16(&b, 0x3A),
            hash_seed,
            log_groups_per_flex: b[0x174],
        };
        let bs = sb.block_size;
        let sane = sb.blocks > u64::from(sb.first_data_block)
            && (1..=8 * bs).contains(&sb.blocks_per_group)
            && (1..=8 * bs).contains(&sb.inodes_per_group)
            && sb.inode_size.is_power_of_two()
            && (128..=bs).contains(&u32::from(sb.inode_size))
            && sb.desc_size.is_power_of_two()
            && (32..=1024).contains(&sb.desc_size)
            // As the kernel insists (ext4_fill_super): every group holds
            // inodes_per_group inodes, so the count is exactly that.
            && u64::from(sb.inodes) == u64::from(sb.inodes_per_group) * sb.groups()
            && sb.groups() <= 1 << 24;
        if !sane {
            return Err(corrupt(
                "superblock geometry is impossible (block, group or inode counts and sizes)".into(),
            ));
        }
        if sb.has_csum() {
            let want = le32(&b, 0x3FC);
            let got = crc(!0, &b[..0x3FC]);
            if want != got {
                return Err(corrupt(format!(
                    "superblock checksum {want:#010x} does not match its content ({got:#010x})"
                )));
            }
        }
        let bad = incompat & !(0x2 | 0x4 | 0x40 | 0x80 | 0x200 | 0x2000);
        if bad != 0 {
            return Err(ReadError::Unsupported(format!(
                "incompat feature bits {bad:#x} (e.g. inline_data, meta_bg, casefold)"
            )));
        }
        if incompat & 0x4 != 0 {
            return Err(ReadError::Unsupported(
                "the journal needs recovery; mount and unmount the image or run e2fsck first"
                    .into(),
            ));
        }
        let fs_seed = if incompat & 0x2000 != 0 {
            le32(&b, 0x270)
        } else {
            crc(!0, &sb.uuid)
        };
        let bs = u64::from(sb.block_size);
        let ngroups = sb.groups();
        let gdt_start = (u64::from(sb.first_data_block) + 1) * bs;
        let mut gdt = vec![0u8; us(ngroups * u64::from(sb.desc_size))];
        r.read_at(&mut gdt, gdt_start)?;
        let mut groups = Vec::with_capacity(us(ngroups));
        for g in 0..us(ngroups) {
            let d = &gdt[g * sb.desc_size as usize..(g + 1) * sb.desc_size as usize];
            let hi = |lo_off: usize, hi_off: usize, wide: bool| -> u64 {
                let lo = if wide {
                    u64::from(le32(d, lo_off))
                } else {
                    u64::from(le16(d, lo_off))
                };
                let h = if sb.desc_size >= 64 {
                    if wide {
                        u64::from(le32(d, hi_off))
                    } else {
                        u64::from(le16(d, hi_off))
                    }
                } else {
                    0
                };
                lo | (h << if wide { 32 } else { 16 })
            };
            if sb.has_csum() {
                let mut c = crc(fs_seed, &fit32(g).to_le_bytes());
                c = crc(c, &d[..0x1E]);
                c = crc(c, &[0, 0]);
                if sb.desc_size as usize > 0x20 {
                    c = crc(c, &d[0x20..]);
                }
                if le16(d, 0x1E) != lo16(c) {
                    return Err(corrupt(format!("group descriptor {g} has a bad checksum")));
                }
            }
            groups.push(Group {
                block_bitmap: hi(0x0, 0x20, true),
                inode_bitmap: hi(0x4, 0x24, true),
                inode_table: hi(0x8, 0x28, true),
                free_blocks: lo32(hi(0xC, 0x2C, false)),
                free_inodes: lo32(hi(0xE, 0x2E, false)),
                used_dirs: lo32(hi(0x10, 0x30, false)),
                flags: le16(d, 0x12),
                itable_unused: lo32(hi(0x1C, 0x32, false)),
                block_bitmap_csum: lo32(hi(0x18, 0x38, false)),
                inode_bitmap_csum: lo32(hi(0x1A, 0x3A, false)),
            });
        }
        Ok(Image {
            r,
            sb,
            groups,
            fs_seed,
        })
    }

    /// The underlying reader.
    pub fn reader(&self) -> &R {
        &self.r
    }

    fn block(&self, n: u64) -> Result<Vec<u8>, ReadError> {
        if n >= self.sb.blocks {
            return Err(corrupt(format!(
                "block {n} is past the end of the filesystem ({} blocks)",
                self.sb.blocks
            )));
        }
        let mut b = vec![0u8; self.sb.block_size as usize];
        self.r.read_at(&mut b, n * u64::from(self.sb.block_size))?;
        Ok(b)
    }

    /// Read inode `ino`, checking its checksum.
    pub fn inode(&self, ino: u32) -> Result<RawInode, ReadError> {
        if ino == 0 || ino > self.sb.inodes {
            return Err(corrupt(format!("inode number {ino} is out of range")));
        }
        let ipg = self.sb.inodes_per_group;
        let g = ((ino - 1) / ipg) as usize;
        let idx = u64::from((ino - 1) % ipg);
        let isz = self.sb.inode_size as usize;
        let mut raw = vec![0u8; isz];
        self.r.read_at(
            &mut raw,
            self.groups[g].inode_table * u64::from(self.sb.block_size) + idx * isz as u64,
        )?;
        let extra_isize = if isz > 128 {
            le16(&raw, 0x80) as usize
        } else {
            0
        };
        if self.sb.has_csum() && raw.iter().any(|&b| b != 0) {
            let generation = le32(&raw, 0x64);
            let mut z = raw.clone();
            z[0x7C] = 0;
            z[0x7D] = 0;
            let has_hi = isz > 128 && extra_isize >= 4;
            if has_hi {
                z[0x82] = 0;
                z[0x83] = 0;
            }
            let c = crc(inode_seed(self.fs_seed, ino, generation), &z);
            let stored = u32::from(le16(&raw, 0x7C))
                | if has_hi {
                    u32::from(le16(&raw, 0x82)) << 16
                } else {
                    0
                };
            let want = if has_hi { c } else { c & 0xFFFF };
            if stored != want {
                return Err(corrupt(format!("inode {ino} has a bad checksum")));
            }
        }
        let extra_ok = extra_isize >= 24;
        let extra = if isz > 128 + extra_isize + 4 && le32(&raw, 128 + extra_isize) == xattr::MAGIC
        {
            raw[128 + extra_isize + 4..].to_vec()
        } else {
            Vec::new()
        };
        Ok(RawInode {
            ino,
            mode: le16(&raw, 0),
            uid: u32::from(le16(&raw, 2)) | u32::from(le16(&raw, 0x78)) << 16,
            gid: u32::from(le16(&raw, 0x18)) | u32::from(le16(&raw, 0x7A)) << 16,
            size: u64::from(le32(&raw, 4)) | u64::from(le32(&raw, 0x6C)) << 32,
            links: le16(&raw, 0x1A),
            flags: le32(&raw, 0x20),
            mtime: decode_time(&raw, 0x10, 0x88, extra_ok),
            i_block: raw[0x28..0x64].try_into().unwrap_or([0; 60]),
            file_acl: u64::from(le32(&raw, 0x68)) | u64::from(le16(&raw, 0x76)) << 32,
            sectors: u64::from(le32(&raw, 0x1C)) | u64::from(le16(&raw, 0x74)) << 32,
            generation: le32(&raw, 0x64),
            extra,
        })
    }

    /// The extents of an inode, plus the extent-tree blocks it uses.
    pub fn extents(&self, ino: &RawInode) -> Result<(Vec<Extent>, Vec<u64>), ReadError> {
        if ino.flags & 0x80000 == 0 {
            if ino.is_reg() || ino.is_dir() || (ino.is_symlink() && ino.size >= 60) {
                if ino.size == 0 && ino.sectors == 0 {
                    return Ok((Vec::new(), Vec::new()));
                }
                return Err(ReadError::Unsupported(format!(
                    "inode {} uses block maps, not extents",
                    ino.ino
                )));
            }
            return Ok((Vec::new(), Vec::new()));
        }
        if ino.flags & 0x10000000 != 0 {
            return Err(ReadError::Unsupported(format!(
                "inode {} has inline data",
                ino.ino
            )));
        }
        let mut out = Vec::new();
        let mut tree = Vec::new();
        self.walk_extents(ino, &ino.i_block, 4, 0, &mut out, &mut tree)?;
        Ok((out, tree))
    }

    fn walk_extents(
        &self,
        ino: &RawInode,
        node: &[u8],
        max: usize,
        level: u32,
        out: &mut Vec<Extent>,
        tree: &mut Vec<u64>,
    ) -> Result<(), ReadError> {
        if level > 5 || le16(node, 0) != 0xF30A {
            return Err(corrupt(format!("inode {}: bad extent header", ino.ino)));
        }
        let n = le16(node, 2) as usize;
        let depth = le16(node, 6);
        if n > max || n > le16(node, 4) as usize {
            return Err(corrupt(format!(
                "inode {}: extent node holds {n} entries, more than it has room for",
                ino.ino
            )));
        }
        for i in 0..n {
            let e = &node[12 + 12 * i..24 + 12 * i];
            if depth == 0 {
                // A length over 32768 marks an unwritten extent of
                // (length - 32768) blocks.
                let raw_len = u64::from(le16(e, 4));
                let (len, unwritten) = if raw_len > 32768 {
                    (raw_len - 32768, true)
                } else {
                    (raw_len, false)
                };
                let pblk = u64::from(le32(e, 8)) | u64::from(le16(e, 6)) << 32;
                if pblk + len > self.sb.blocks {
                    return Err(corrupt(format!(
                        "inode {}: extent points past the end of the filesystem",
                        ino.ino
                    )));
                }
                out.push(Extent {
                    lblk: u64::from(le32(e, 0)),
                    len,
                    pblk,
                    unwritten,
                });
            } else {
                let child = u64::from(le32(e, 4)) | u64::from(le16(e, 8)) << 32;
                let b = self.block(child)?;
                let cap = (self.sb.block_size as usize - 12) / 12;
                if self.sb.has_csum() {
                    let end = 12 + 12 * le16(&b, 4) as usize;
                    if end + 4 > b.len() {
                        return Err(corrupt(format!(
                            "inode {}: extent block {child} has a bad header",
                            ino.ino
                        )));
                    }
                    let c = crc(inode_seed(self.fs_seed, ino.ino, ino.generation), &b[..end]);
                    if le32(&b, end) != c {
                        return Err(corrupt(format!(
                            "inode {}: extent block {child} has a bad checksum",
                            ino.ino
                        )));
                    }
                }
                tree.push(child);
                self.walk_extents(ino, &b, cap, level + 1, out, tree)?;
            }
        }
        Ok(())
    }

    /// The entries of directory `dir` (`.` and `..` included), checking
    /// each block's checksum.
    pub fn read_dir(&self, dir: &RawInode) -> Result<Vec<(Vec<u8>, u32, u8)>, ReadError> {
        let (exts, _) = self.extents(dir)?;
        if exts.iter().any(|e| e.unwritten) {
            return Err(corrupt(format!(
                "directory inode {} has an unwritten extent",
                dir.ino
            )));
        }
        let bs = self.sb.block_size as usize;
        let seed = inode_seed(self.fs_seed, dir.ino, dir.generation);
        let mut out = Vec::new();
        for e in exts {
            for k in 0..e.len {
                let b = self.block(e.pblk + k)?;
                let lblk = e.lblk + k;
                // Index blocks: the root (lblk 0 of an indexed dir) and
                // interior nodes (a fake entry spanning the block).
                let is_root = lblk == 0 && dir.flags & 0x1000 != 0;
                let is_node =
                    dir.flags & 0x1000 != 0 && le32(&b, 0) == 0 && le16(&b, 4) as usize == bs;
                if is_root || is_node {
                    let count_off = if is_root { 0x20 } else { 0x08 };
                    if self.sb.has_csum() {
                        let limit = le16(&b, count_off) as usize;
                        let count = le16(&b, count_off + 2) as usize;
                        let tail = count_off + limit * 8;
                        if tail + 8 > bs || count > limit {
                            return Err(corrupt(format!(
                                "directory inode {}: bad htree block {lblk}",
                                dir.ino
                            )));
                        }
                        let mut c = crc(seed, &b[..count_off + count * 8]);
                        c = crc(c, &b[tail..tail + 4]);
                        c = crc(c, &[0; 4]);
                        if le32(&b, tail + 4) != c {
                            return Err(corrupt(format!(
                                "directory inode {}: htree block {lblk} has a bad checksum",
                                dir.ino
                            )));
                        }
                    }
                    if is_root {
                        out.push((b".".to_vec(), le32(&b, 0), 2));
                        out.push((b"..".to_vec(), le32(&b, 12), 2));
                    }
                    continue;
                }
                let limit = if self.sb.has_csum() {
                    let c = crc(seed, &b[..bs - 12]);
                    if le32(&b, bs - 4) != c || le16(&b, bs - 8) != 12 {
                        return Err(corrupt(format!(
                            "directory inode {}: block {lblk} has a bad checksum",
                            dir.ino
                        )));
                    }
                    bs - 12
                } else {
                    bs
                };
                let mut p = 0;
                while p < limit {
                    if p + 8 > limit {
                        return Err(corrupt(format!(
                            "directory inode {}: entry runs past block {lblk}",
                            dir.ino
                        )));
                    }
                    let ino = le32(&b, p);
                    let rec = le16(&b, p + 4) as usize;
                    let nl = b[p + 6] as usize;
                    if rec < 8 || p + rec > limit || 8 + nl > rec {
                        return Err(corrupt(format!(
                            "directory inode {}: bad entry at block {lblk} offset {p}",
                            dir.ino
                        )));
                    }
                    if ino != 0 {
                        let name = &b[p + 8..p + 8 + nl];
                        // A name Linux could never have written: empty, or
                        // with '/' or NUL. Handing it on would let a path
                        // built from it leave its directory.
                        if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                            return Err(corrupt(format!(
                                "directory inode {}: impossible entry name {:?} at block {lblk} offset {p}",
                                dir.ino,
                                String::from_utf8_lossy(name)
                            )));
                        }
                        out.push((name.to_vec(), ino, b[p + 7]));
                    }
                    p += rec;
                }
            }
        }
        Ok(out)
    }

    /// Find `path` (relative to the root, `/`-separated; symlinks are not
    /// followed). `None` when a component does not exist.
    pub fn lookup(&self, path: &[u8]) -> Result<Option<RawInode>, ReadError> {
        let mut cur = self.inode(2)?;
        for comp in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            if !cur.is_dir() {
                return Ok(None);
            }
            let Some((_, ino, _)) = self.read_dir(&cur)?.into_iter().find(|(n, _, _)| n == comp)
            else {
                return Ok(None);
            };
            cur = self.inode(ino)?;
        }
        Ok(Some(cur))
    }

    /// Find `path` as `open(2)` would inside the image: symlinks are
    /// followed (absolute ones from the image's root, never the host's;
    /// at most 40), `..` never climbs above the root. `None` when a
    /// component does not exist.
    pub fn resolve(&self, path: &[u8]) -> Result<Option<RawInode>, ReadError> {
        const MAX_LINKS: u32 = 40;
        let comps = |p: &[u8]| -> Vec<Vec<u8>> {
            p.split(|&b| b == b'/')
                .filter(|c| !c.is_empty() && *c != b".")
                .rev()
                .map(<[u8]>::to_vec)
                .collect()
        };
        let mut rest = comps(path);
        let mut dirs = vec![self.inode(2)?];
        let mut links = 0;
        while let Some(c) = rest.pop() {
            if c == b".." {
                if dirs.len() > 1 {
                    dirs.pop();
                }
                continue;
            }
            let Some(cur) = dirs.last() else {
                return Ok(None);
            };
            if !cur.is_dir() {
                return Ok(None);
            }
            let Some((_, ino, _)) = self.read_dir(cur)?.into_iter().find(|(n, _, _)| *n == c)
            else {
                return Ok(None);
            };
            let node = self.inode(ino)?;
            if node.is_symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return Err(ReadError::Unsupported(format!(
                        "{}: more than {MAX_LINKS} symbolic links on the way",
                        String::from_utf8_lossy(path)
                    )));
                }
                let target = self.symlink_target(&node)?;
                if target.first() == Some(&b'/') {
                    dirs.truncate(1);
                }
                rest.extend(comps(&target));
                continue;
            }
            dirs.push(node);
        }
        Ok(dirs.pop())
    }

    /// The inode's extended attributes by full name (ACLs in VFS form).
    pub fn xattrs(&self, ino: &RawInode) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, ReadError> {
        let mut all = Vec::new();
        if !ino.extra.is_empty() {
            all.extend(
                xattr::decode(&ino.extra, 0, 0)
                    .map_err(|e| corrupt(format!("inode {}: {e}", ino.ino)))?,
            );
        }
        if ino.file_acl != 0 {
            let b = self.block(ino.file_acl)?;
            if le32(&b, 0) != xattr::MAGIC {
                return Err(corrupt(format!(
                    "inode {}: attribute block {} has no magic",
                    ino.ino, ino.file_acl
                )));
            }
            if self.sb.has_csum() {
                let mut z = b.clone();
                z[0x10..0x14].fill(0);
                let c = crc(crc(self.fs_seed, &ino.file_acl.to_le_bytes()), &z);
                if le32(&b, 0x10) != c {
                    return Err(corrupt(format!(
                        "inode {}: attribute block {} has a bad checksum",
                        ino.ino, ino.file_acl
                    )));
                }
            }
            all.extend(
                xattr::decode(&b, 32, 0).map_err(|e| corrupt(format!("inode {}: {e}", ino.ino)))?,
            );
        }
        let mut out = BTreeMap::new();
        for a in all {
            let name = xattr::join_name(a.index, &a.name).ok_or_else(|| {
                ReadError::Unsupported(format!(
                    "inode {}: attribute name index {}",
                    ino.ino, a.index
                ))
            })?;
            let value = if a.index == 2 || a.index == 3 {
                xattr::acl_from_disk(&a.value)
                    .map_err(|e| corrupt(format!("inode {}: {e}", ino.ino)))?
            } else {
                a.value
            };
            out.insert(name, value);
        }
        Ok(out)
    }

    /// A symlink's target.
    pub fn symlink_target(&self, ino: &RawInode) -> Result<Vec<u8>, ReadError> {
        if ino.size < 60 && ino.flags & 0x80000 == 0 {
            return Ok(ino.i_block[..us(ino.size)].to_vec());
        }
        let mut out = Vec::new();
        self.read_file(ino, &mut |c| out.extend_from_slice(c))?;
        Ok(out)
    }

    /// Stream a file's content (holes as zeros) to `sink` in large pieces.
    pub fn read_file(&self, ino: &RawInode, sink: &mut dyn FnMut(&[u8])) -> Result<(), ReadError> {
        let mut zeros: Vec<u8> = Vec::new();
        self.read_pieces(ino, &mut |p| match p {
            Piece::Data(d) => sink(d),
            Piece::Hole(mut n) => {
                if zeros.is_empty() {
                    zeros.resize(1 << 16, 0);
                }
                while n > 0 {
                    let k = us(n.min(zeros.len() as u64));
                    sink(&zeros[..k]);
                    n -= k as u64;
                }
            }
        })
    }

    /// Stream a file's content to `sink` as data and holes, in order: what
    /// the image really holds is read (in pieces of at most 1 MiB), a hole
    /// is only its length, however large the file claims to be.
    pub fn read_pieces(
        &self,
        ino: &RawInode,
        sink: &mut dyn FnMut(Piece<'_>),
    ) -> Result<(), ReadError> {
        let (mut exts, _) = self.extents(ino)?;
        exts.sort_by_key(|e| e.lblk);
        let bs = u64::from(self.sb.block_size);
        let mut pos = 0u64;
        let size = ino.size;
        // Buffers sized to the data: most files are small, and zeroing a
        // large buffer per file would cost more than reading them.
        let data: u64 = exts.iter().map(|e| e.len.saturating_mul(bs)).sum();
        let chunk = (size.min(data).min(1 << 20) as usize).max(1);
        let mut buf = vec![0u8; chunk];
        for e in exts {
            let start = e.lblk.saturating_mul(bs);
            if start >= size {
                break;
            }
            if start < pos {
                return Err(corrupt(format!("inode {}: overlapping extents", ino.ino)));
            }
            if start > pos {
                sink(Piece::Hole(start - pos));
            }
            pos = start;
            let end = (e.lblk.saturating_add(e.len).saturating_mul(bs)).min(size);
            if e.unwritten {
                // Zeros, not what the blocks happen to hold.
                sink(Piece::Hole(end - pos));
                pos = end;
                continue;
            }
            let mut off = e.pblk.saturating_mul(bs);
            while pos < end {
                let k = us((end - pos).min(buf.len() as u64));
                self.r.read_at(&mut buf[..k], off)?;
                sink(Piece::Data(&buf[..k]));
                pos += k as u64;
                off += k as u64;
            }
        }
        if pos < size {
            sink(Piece::Hole(size - pos));
        }
        Ok(())
    }

    /// The block bitmap of group `g` (checked against its checksum).
    pub fn block_bitmap(&self, g: usize) -> Result<Vec<u8>, ReadError> {
        let gd = &self.groups[g];
        self.bitmap(
            g,
            "block",
            gd.block_bitmap,
            self.sb.blocks_per_group,
            gd.block_bitmap_csum,
        )
    }

    /// The inode bitmap of group `g` (checked against its checksum).
    pub fn inode_bitmap(&self, g: usize) -> Result<Vec<u8>, ReadError> {
        let gd = &self.groups[g];
        self.bitmap(
            g,
            "inode",
            gd.inode_bitmap,
            self.sb.inodes_per_group,
            gd.inode_bitmap_csum,
        )
    }

    fn bitmap(
        &self,
        g: usize,
        what: &str,
        at: u64,
        bits: u32,
        stored: u32,
    ) -> Result<Vec<u8>, ReadError> {
        let b = self.block(at)?;
        if self.sb.has_csum() {
            let c = crc(self.fs_seed, &b[..(bits / 8) as usize]);
            let want = if self.sb.desc_size >= 64 {
                c
            } else {
                c & 0xFFFF
            };
            if stored != want {
                return Err(corrupt(format!(
                    "group {g}: {what} bitmap checksum mismatch"
                )));
            }
        }
        Ok(b)
    }
}
