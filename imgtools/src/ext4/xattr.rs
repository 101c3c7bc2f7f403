//! Extended attributes in ext4's on-disk form: name prefixes, entry
//! encoding (in the inode and in an attribute block), entry hashes, and
//! the POSIX ACL conversion between the VFS form (what `getxattr` and tar
//! carry) and ext4's compact disk form.
use crate::num::{fit16, fit32, fit8};

/// ext4 name indexes by prefix (`fs/ext4/xattr.h`). The two ACL names are
/// matched whole and stored with an empty suffix.
const PREFIXES: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
    (b"system.", 7),
];

/// Split a full attribute name into ext4's (name index, stored suffix).
/// `None` for a namespace ext4 cannot store.
pub fn split_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for (prefix, index) in PREFIXES {
        if *index == 2 || *index == 3 {
            if name == *prefix {
                return Some((*index, b""));
            }
        } else if let Some(rest) = name.strip_prefix(*prefix) {
            if rest.is_empty() || rest.len() > 255 {
                return None;
            }
            return Some((*index, rest));
        }
    }
    None
}

/// The full name for an on-disk (index, suffix); `None` for unknown indexes.
pub fn join_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let prefix: &[u8] = match index {
        0 => b"",
        1 => b"user.",
        2 => return Some(b"system.posix_acl_access".to_vec()),
        3 => return Some(b"system.posix_acl_default".to_vec()),
        4 => b"trusted.",
        6 => b"security.",
        7 => b"system.",
        _ => return None,
    };
    let mut n = prefix.to_vec();
    n.extend_from_slice(suffix);
    Some(n)
}

const ACL_VFS_VERSION: u32 = 2;
const ACL_DISK_VERSION: u32 = 1;
const ACL_UNDEFINED_ID: u32 = u32::MAX;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

fn has_id(tag: u16) -> bool {
    tag == ACL_USER || tag == ACL_GROUP
}

/// Check a VFS-form ACL and make it canonical: the id of entries without
/// one (owner, group owner, mask, other) becomes ACL_UNDEFINED_ID, as the
/// kernel reports it.
pub fn canonical_acl(vfs: &[u8]) -> Result<Vec<u8>, String> {
    if vfs.len() < 4 || (vfs.len() - 4) % 8 != 0 {
        return Err(format!(
            "{} bytes is not a POSIX ACL (4-byte header plus 8-byte entries)",
            vfs.len()
        ));
    }
    let version = u32::from_le_bytes([vfs[0], vfs[1], vfs[2], vfs[3]]);
    if version != ACL_VFS_VERSION {
        return Err(format!(
            "POSIX ACL version {version}, expected {ACL_VFS_VERSION}"
        ));
    }
    let mut out = vfs.to_vec();
    for e in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        if !matches!(tag, 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20) {
            return Err(format!("POSIX ACL entry with unknown tag {tag:#x}"));
        }
        if !has_id(tag) {
            e[4..8].copy_from_slice(&ACL_UNDEFINED_ID.to_le_bytes());
        }
    }
    Ok(out)
}

/// VFS form (checked by [`canonical_acl`]) to ext4's disk form.
pub fn acl_to_disk(vfs: &[u8]) -> Vec<u8> {
    let mut out = ACL_DISK_VERSION.to_le_bytes().to_vec();
    for e in vfs[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[0..4]);
        if has_id(tag) {
            out.extend_from_slice(&e[4..8]);
        }
    }
    out
}

/// ext4's disk form back to the canonical VFS form.
pub fn acl_from_disk(disk: &[u8]) -> Result<Vec<u8>, String> {
    if disk.len() < 4
        || u32::from_le_bytes([disk[0], disk[1], disk[2], disk[3]]) != ACL_DISK_VERSION
    {
        return Err("ACL attribute without the ext4 ACL header".into());
    }
    let mut out = ACL_VFS_VERSION.to_le_bytes().to_vec();
    let mut p = 4;
    while p < disk.len() {
        if p + 4 > disk.len() {
            return Err("ACL attribute ends inside an entry".into());
        }
        let tag = u16::from_le_bytes([disk[p], disk[p + 1]]);
        out.extend_from_slice(&disk[p..p + 4]);
        if has_id(tag) {
            if p + 8 > disk.len() {
                return Err("ACL attribute ends inside an entry".into());
            }
            out.extend_from_slice(&disk[p + 4..p + 8]);
            p += 8;
        } else {
            out.extend_from_slice(&ACL_UNDEFINED_ID.to_le_bytes());
            p += 4;
        }
    }
    Ok(out)
}

/// One attribute ready for disk: index, stored suffix, stored value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DiskAttr {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Convert full-name attributes to disk attributes in ext4's sort order
/// (index, name length, name).
pub fn to_disk(xattrs: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<DiskAttr> {
    let mut v: Vec<DiskAttr> = xattrs
        .iter()
        .filter_map(|(n, val)| {
            let (index, suffix) = split_name(n)?;
            let value = if index == 2 || index == 3 {
                acl_to_disk(val)
            } else {
                val.clone()
            };
            Some(DiskAttr {
                index,
                name: suffix.to_vec(),
                value,
            })
        })
        .collect();
    v.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    v
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Entry hash (`ext4_xattr_hash_entry`).
pub fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut h: u32 = 0;
    for &c in name {
        h = (h << 5) ^ (h >> 27) ^ u32::from(c);
    }
    let mut padded = value.to_vec();
    padded.resize(pad4(value.len()), 0);
    for w in padded.chunks_exact(4) {
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    h
}

/// Bytes of entry descriptors plus values for `attrs` (terminator excluded).
pub fn space(attrs: &[DiskAttr]) -> usize {
    attrs
        .iter()
        .map(|a| pad4(16 + a.name.len()) + pad4(a.value.len()))
        .sum()
}

pub const MAGIC: u32 = 0xEA02_0000;
/// Room for attributes in a 256-byte inode after the 160 fixed bytes and
/// the 4-byte magic.
pub const IN_INODE_ROOM: usize = 256 - 160 - 4;
/// Room in an attribute block after the 32-byte header.
pub const BLOCK_ROOM: usize = 4096 - 32;

/// Lay `attrs` out in `area`: entries from the start, values packed at the
/// end, offsets relative to `base` (the start of the entries for in-inode
/// attributes, the block start for a block). Returns the hashes.
pub fn encode(attrs: &[DiskAttr], area: &mut [u8], entries_at: usize, base: usize) -> Vec<u32> {
    let mut e = entries_at;
    let mut vend = area.len();
    let mut hashes = Vec::with_capacity(attrs.len());
    for a in attrs {
        let vsize = pad4(a.value.len());
        vend -= vsize;
        area[vend..vend + a.value.len()].copy_from_slice(&a.value);
        let hash = entry_hash(&a.name, &a.value);
        area[e] = fit8(a.name.len());
        area[e + 1] = a.index;
        let offs = if a.value.is_empty() { 0 } else { vend - base };
        area[e + 2..e + 4].copy_from_slice(&fit16(offs).to_le_bytes());
        area[e + 4..e + 8].copy_from_slice(&0u32.to_le_bytes());
        area[e + 8..e + 12].copy_from_slice(&fit32(a.value.len()).to_le_bytes());
        area[e + 12..e + 16].copy_from_slice(&hash.to_le_bytes());
        area[e + 16..e + 16 + a.name.len()].copy_from_slice(&a.name);
        e += pad4(16 + a.name.len());
        hashes.push(hash);
    }
    hashes
}

/// Block hash over entry hashes (`ext4_xattr_rehash`).
pub fn block_hash(hashes: &[u32]) -> u32 {
    let mut h: u32 = 0;
    for &eh in hashes {
        if eh == 0 {
            return 0;
        }
        h = (h << 16) ^ (h >> 16) ^ eh;
    }
    h
}

/// Decode the entries in `area` starting at `entries_at`, with value
/// offsets relative to `base`. Errors name what is wrong.
pub fn decode(area: &[u8], entries_at: usize, base: usize) -> Result<Vec<DiskAttr>, String> {
    let mut out = Vec::new();
    let mut e = entries_at;
    loop {
        if e + 4 > area.len() {
            return Err("attribute list runs past its area".into());
        }
        if area[e..e + 4] == [0, 0, 0, 0] {
            return Ok(out);
        }
        if e + 16 > area.len() {
            return Err("attribute entry runs past its area".into());
        }
        let name_len = area[e] as usize;
        let index = area[e + 1];
        let offs = u16::from_le_bytes([area[e + 2], area[e + 3]]) as usize;
        let inum = u32::from_le_bytes([area[e + 4], area[e + 5], area[e + 6], area[e + 7]]);
        let size =
            u32::from_le_bytes([area[e + 8], area[e + 9], area[e + 10], area[e + 11]]) as usize;
        if inum != 0 {
            return Err("attribute value stored in an inode (ea_inode) is not supported".into());
        }
        let name = area
            .get(e + 16..e + 16 + name_len)
            .ok_or("attribute name runs past its area")?;
        let value = if size == 0 {
            &[][..]
        } else {
            area.get(base + offs..base + offs + size)
                .ok_or("attribute value lies outside its area")?
        };
        out.push(DiskAttr {
            index,
            name: name.to_vec(),
            value: value.to_vec(),
        });
        e += pad4(16 + name_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_round_trip() {
        // user::rw- user:1000:r-- group::r-- mask::r-- other::---
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, 0u32),
            (2, 4, 1000),
            (4, 4, 7),
            (0x10, 4, 0),
            (0x20, 0, 0),
        ] {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        let canon = canonical_acl(&vfs).unwrap();
        let disk = acl_to_disk(&canon);
        assert_eq!(disk.len(), 4 + 4 * 4 + 8);
        assert_eq!(acl_from_disk(&disk).unwrap(), canon);
        assert!(canonical_acl(&[1, 0, 0, 0]).is_err());
        assert!(canonical_acl(&vfs[..9]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(split_name(b"user.foo"), Some((1, &b"foo"[..])));
        assert_eq!(
            split_name(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(split_name(b"system.posix_acl_access"), Some((2, &b""[..])));
        assert_eq!(split_name(b"weird.x"), None);
        assert_eq!(split_name(b"user."), None);
        assert_eq!(join_name(6, b"capability").unwrap(), b"security.capability");
    }

    #[test]
    fn encode_decode() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(b"user.b".to_vec(), b"xyz".to_vec());
        m.insert(b"user.a".to_vec(), vec![]);
        m.insert(b"security.capability".to_vec(), vec![1; 20]);
        let attrs = to_disk(&m);
        let mut block = vec![0u8; 4096];
        encode(&attrs, &mut block, 32, 0);
        assert_eq!(decode(&block, 32, 0).unwrap(), attrs);
    }
}
