//! Directory blocks: linear for small directories, hash-indexed (htree)
//! once a directory needs more than one block, so lookups stay fast.
//! With metadata_csum every leaf ends in a checksum tail and every index
//! block in a dx_tail.

use super::hash::{crc, dirhash};
use super::BLOCK;
use crate::num::{fit16, fit32, fit8};

/// One name in a directory.
pub struct Entry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    /// Directory entry file type (1 reg, 2 dir, 3 chr, 4 blk, 5 fifo, 6 sock, 7 lnk).
    pub ftype: u8,
}

/// A directory's blocks in logical order.
pub struct DirBlocks {
    pub blocks: Vec<Vec<u8>>,
    /// The directory is hash-indexed (set INDEX_FL on its inode).
    pub htree: bool,
}

/// The directory is too large for a two-level htree (needs large_dir).
#[derive(Debug)]
pub struct TooLarge;

const TAIL: usize = 12;
const USABLE: usize = BLOCK - TAIL;
const ROOT_LIMIT: usize = (BLOCK - 0x20 - 8) / 8;
const NODE_LIMIT: usize = (BLOCK - 0x08 - 8) / 8;

fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

fn put_dirent(b: &mut [u8], at: usize, ino: u32, rec: usize, name: &[u8], ftype: u8) {
    b[at..at + 4].copy_from_slice(&ino.to_le_bytes());
    b[at + 4..at + 6].copy_from_slice(&fit16(rec).to_le_bytes());
    b[at + 6] = fit8(name.len());
    b[at + 7] = ftype;
    b[at + 8..at + 8 + name.len()].copy_from_slice(name);
}

/// Fills leaf blocks with entries, one after another.
struct Leaves {
    seed: u32,
    blocks: Vec<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    last: Option<usize>,
}

impl Leaves {
    fn new(seed: u32) -> Leaves {
        Leaves {
            seed,
            blocks: Vec::new(),
            cur: vec![0; BLOCK],
            pos: 0,
            last: None,
        }
    }

    fn fits(&self, name_len: usize) -> bool {
        self.pos + rec_len(name_len) <= USABLE
    }

    fn add(&mut self, ino: u32, name: &[u8], ftype: u8) {
        if !self.fits(name.len()) {
            self.close();
        }
        let r = rec_len(name.len());
        put_dirent(&mut self.cur, self.pos, ino, r, name, ftype);
        self.last = Some(self.pos);
        self.pos += r;
    }

    /// Finish the current block: stretch its last entry, add the tail.
    fn close(&mut self) {
        let mut b = std::mem::replace(&mut self.cur, vec![0; BLOCK]);
        match self.last {
            Some(l) => b[l + 4..l + 6].copy_from_slice(&fit16(USABLE - l).to_le_bytes()),
            None => put_dirent(&mut b, 0, 0, USABLE, b"", 0),
        }
        put_dirent(&mut b, USABLE, 0, TAIL, b"", 0xDE);
        let c = crc(self.seed, &b[..USABLE]);
        b[BLOCK - 4..].copy_from_slice(&c.to_le_bytes());
        self.blocks.push(b);
        self.pos = 0;
        self.last = None;
    }

    fn finish(mut self) -> Vec<Vec<u8>> {
        if self.last.is_some() || self.blocks.is_empty() {
            self.close();
        }
        self.blocks
    }
}

/// Blocks a linear directory with these names needs.
fn linear_blocks(entries: &[Entry]) -> usize {
    let mut blocks = 1;
    let mut pos = 12 + 12;
    for e in entries {
        let r = rec_len(e.name.len());
        if pos + r > USABLE {
            blocks += 1;
            pos = 0;
        }
        pos += r;
    }
    blocks
}

fn dx_csum(b: &mut [u8], seed: u32, count_offset: usize, limit: usize) {
    let count = u16::from_le_bytes([b[count_offset + 2], b[count_offset + 3]]) as usize;
    let tail = count_offset + limit * 8;
    let mut c = crc(seed, &b[..count_offset + count * 8]);
    c = crc(c, &b[tail..tail + 4]);
    c = crc(c, &[0; 4]);
    b[tail + 4..tail + 8].copy_from_slice(&c.to_le_bytes());
}

/// Write dx entries (first = count/limit header + block) at `at`.
fn put_dx(b: &mut [u8], at: usize, limit: usize, entries: &[(u32, u32)]) {
    b[at..at + 2].copy_from_slice(&fit16(limit).to_le_bytes());
    b[at + 2..at + 4].copy_from_slice(&fit16(entries.len()).to_le_bytes());
    b[at + 4..at + 8].copy_from_slice(&entries[0].1.to_le_bytes());
    for (i, (h, blk)) in entries.iter().enumerate().skip(1) {
        let p = at + i * 8;
        b[p..p + 4].copy_from_slice(&h.to_le_bytes());
        b[p + 4..p + 8].copy_from_slice(&blk.to_le_bytes());
    }
}

/// Build the blocks of directory `ino` (parent `parent`) holding `entries`
/// (sorted by name by the caller, `.` and `..` excluded). `csum_seed` is
/// the directory inode's checksum seed; `hash_seed` the superblock's.
pub fn build(
    ino: u32,
    parent: u32,
    entries: &[Entry],
    hash_seed: &[u32; 4],
    csum_seed: u32,
    min_blocks: usize,
) -> Result<DirBlocks, TooLarge> {
    if linear_blocks(entries) <= 1 {
        let mut l = Leaves::new(csum_seed);
        l.add(ino, b".", 2);
        l.add(parent, b"..", 2);
        for e in entries {
            l.add(e.ino, e.name, e.ftype);
        }
        let mut blocks = l.finish();
        while blocks.len() < min_blocks {
            let mut empty = Leaves::new(csum_seed);
            empty.close();
            blocks.extend(empty.blocks);
        }
        return Ok(DirBlocks {
            blocks,
            htree: false,
        });
    }
    // Hash-indexed: leaves hold names in hash order.
    let mut hashed: Vec<(u32, u32, &Entry)> = entries
        .iter()
        .map(|e| {
            let (h, m) = dirhash(e.name, hash_seed);
            (h, m, e)
        })
        .collect();
    hashed.sort_by(|a, b| (a.0, a.1, a.2.name).cmp(&(b.0, b.1, b.2.name)));
    let mut leaves = Leaves::new(csum_seed);
    let mut starts: Vec<u32> = Vec::new();
    let mut prev_hash = None;
    for (h, _, e) in &hashed {
        if starts.is_empty() || !leaves.fits(e.name.len()) {
            if !starts.is_empty() {
                leaves.close();
            }
            // A leaf that starts inside a run of equal hashes is marked as
            // a continuation (low bit set).
            starts.push(if prev_hash == Some(*h) { h | 1 } else { *h });
        }
        leaves.add(e.ino, e.name, e.ftype);
        prev_hash = Some(*h);
    }
    let leaf_blocks = leaves.finish();
    let n = leaf_blocks.len();
    let (levels, nodes) = if n <= ROOT_LIMIT {
        (0u8, 0usize)
    } else {
        let nodes = n.div_ceil(NODE_LIMIT);
        if nodes > ROOT_LIMIT {
            return Err(TooLarge);
        }
        (1, nodes)
    };
    let first_leaf = 1 + fit32(nodes);
    let mut root = vec![0u8; BLOCK];
    put_dirent(&mut root, 0, ino, 12, b".", 2);
    put_dirent(&mut root, 12, parent, BLOCK - 12, b"..", 2);
    root[0x1C] = 1; // half_md4
    root[0x1D] = 8; // info length
    root[0x1E] = levels;
    let leaf_entries: Vec<(u32, u32)> = starts
        .iter()
        .enumerate()
        .map(|(i, &h)| (h, first_leaf + fit32(i)))
        .collect();
    let mut blocks = Vec::with_capacity(1 + nodes + n);
    if levels == 0 {
        put_dx(&mut root, 0x20, ROOT_LIMIT, &leaf_entries);
        dx_csum(&mut root, csum_seed, 0x20, ROOT_LIMIT);
        blocks.push(root);
    } else {
        let chunks: Vec<&[(u32, u32)]> = leaf_entries.chunks(NODE_LIMIT).collect();
        let root_entries: Vec<(u32, u32)> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c[0].0, 1 + fit32(i)))
            .collect();
        put_dx(&mut root, 0x20, ROOT_LIMIT, &root_entries);
        dx_csum(&mut root, csum_seed, 0x20, ROOT_LIMIT);
        blocks.push(root);
        for c in chunks {
            let mut node = vec![0u8; BLOCK];
            put_dirent(&mut node, 0, 0, BLOCK, b"", 0);
            // A fake empty entry spanning the block hides the index from
            // readers that walk it linearly.
            put_dx(&mut node, 0x08, NODE_LIMIT, c);
            dx_csum(&mut node, csum_seed, 0x08, NODE_LIMIT);
            blocks.push(node);
        }
    }
    blocks.extend(leaf_blocks);
    Ok(DirBlocks {
        blocks,
        htree: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_dir_is_linear_and_big_is_hashed() {
        let names: Vec<Vec<u8>> = (0..50).map(|i| format!("file{i}").into_bytes()).collect();
        let e: Vec<Entry> = names
            .iter()
            .map(|n| Entry {
                name: n,
                ino: 20,
                ftype: 1,
            })
            .collect();
        let d = build(12, 2, &e, &[0; 4], 0, 1).unwrap();
        assert!(!d.htree);
        assert_eq!(d.blocks.len(), 1);
        let names: Vec<Vec<u8>> = (0..5000).map(|i| format!("file{i}").into_bytes()).collect();
        let e: Vec<Entry> = names
            .iter()
            .map(|n| Entry {
                name: n,
                ino: 20,
                ftype: 1,
            })
            .collect();
        let d = build(12, 2, &e, &[1, 2, 3, 4], 0, 1).unwrap();
        assert!(d.htree);
        assert!(d.blocks.len() > 20);
    }
}
