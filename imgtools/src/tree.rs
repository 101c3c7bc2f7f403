//! The file tree an image is built from: every path with its type, owner,
//! mode, times, extended attributes and content, after layering sources.
//!
//! Paths are byte strings relative to the image root (no leading `/`; the
//! root itself is the empty path). Names need not be UTF-8. Several paths
//! may share one inode (hard links). A later entry for an existing path
//! replaces it, as `tar -x` does; OCI whiteouts remove paths of lower layers.

use std::collections::BTreeMap;

/// Longest name one directory entry can hold.
pub const NAME_MAX: usize = 255;

/// Timestamps are clamped to what every reader handles: 1970-01-01 to
/// 2038-01-19 (ext4-view rejects anything outside; ext4 itself goes further).
pub const TIME_MAX: i64 = i32::MAX as i64;

/// A point in time, seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    /// Clamp into `0..=min(TIME_MAX, epoch)`; a clamped time loses its
    /// nanoseconds.
    pub fn clamp(self, epoch: Option<i64>) -> Time {
        let max = epoch.map_or(TIME_MAX, |e| e.clamp(0, TIME_MAX));
        if self.sec < 0 {
            Time { sec: 0, nsec: 0 }
        } else if self.sec > max || (self.sec == max && self.nsec > 0 && epoch.is_some()) {
            Time { sec: max, nsec: 0 }
        } else {
            Time {
                sec: self.sec,
                nsec: self.nsec.min(999_999_999),
            }
        }
    }
}

/// Owner, permissions and modification time of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
}

/// A run of non-zero 4 KiB blocks of a file: logical block `lblk`, `len`
/// blocks, stored at byte `src` of the build's spool (see `source::Spool`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub lblk: u64,
    pub len: u64,
    pub src: u64,
}

/// A regular file's content: its size, digest and where its non-zero
/// blocks are (all-zero blocks become holes in the image).
#[derive(Clone, Debug)]
pub struct FileData {
    pub size: u64,
    pub sha256: [u8; 32],
    pub runs: Vec<Run>,
}

impl FileData {
    /// Blocks the content occupies in the image.
    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

/// What an inode is.
#[derive(Clone, Debug)]
pub enum Kind {
    Dir,
    File(FileData),
    Symlink(Vec<u8>),
    CharDev { major: u32, minor: u32 },
    BlockDev { major: u32, minor: u32 },
    Fifo,
    Socket,
}

impl Kind {
    /// Short name used in manifests and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::File(_) => "file",
            Kind::Symlink(_) => "symlink",
            Kind::CharDev { .. } => "char",
            Kind::BlockDev { .. } => "block",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// One inode of the tree.
#[derive(Clone, Debug)]
pub struct Inode {
    pub kind: Kind,
    pub meta: Meta,
    /// Extended attributes by full name (`user.x`, `security.capability`,
    /// `system.posix_acl_access` in the VFS form `getxattr` returns).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Made up for a parent directory no source named; gets the default
    /// time when the tree is finished.
    pub implicit: bool,
}

impl Inode {
    /// A directory no source named (root:root, 0755, the default time).
    pub fn implicit_dir() -> Inode {
        Inode {
            kind: Kind::Dir,
            meta: Meta {
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: Time::default(),
            },
            xattrs: BTreeMap::new(),
            implicit: true,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    inode: usize,
    layer: u32,
}

/// Problems with the entries of a source.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("entry {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("entry {path:?}: its parent {parent:?} is not a directory in the sources so far")]
    ParentNotDir { path: String, parent: String },
    #[error("entry {path:?}: the image root must be a directory")]
    RootNotDir { path: String },
    #[error("hard link {path:?} -> {target:?}: the target is not an earlier entry of the sources")]
    LinkTargetMissing { path: String, target: String },
    #[error("hard link {path:?} -> {target:?}: the target is a directory (hard links to directories are not allowed)")]
    LinkToDir { path: String, target: String },
    #[error("entry {path:?}: extended attribute {name:?}: {why}")]
    BadXattr {
        path: String,
        name: String,
        why: String,
    },
}

/// Render a byte path for messages (lossy; never fails).
pub fn show(path: &[u8]) -> String {
    if path.is_empty() {
        "/".into()
    } else {
        format!("/{}", String::from_utf8_lossy(path))
    }
}

/// Normalize a path as found in an archive: drop `./` and empty components
/// and a trailing slash; refuse absolute paths, `..` and names over 255
/// bytes. The result is relative with `/` separators (empty = the root).
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, TreeError> {
    let bad = |why| TreeError::BadPath {
        path: String::from_utf8_lossy(raw).into_owned(),
        why,
    };
    if raw.first() == Some(&b'/') {
        return Err(bad("absolute paths are not allowed in a source (make the archive with relative paths, e.g. `tar -C DIR .`)"));
    }
    if raw.contains(&0) {
        return Err(bad("the name contains a NUL byte"));
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => {
                return Err(bad(
                    "`..` components are not allowed (they could escape the image root)",
                ))
            }
            c if c.len() > NAME_MAX => {
                return Err(bad("a name is longer than 255 bytes, the ext4 limit"))
            }
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

/// Exclusive upper bound of the keys under `dir/` (`dir` followed by `0`,
/// the byte after `/`).
fn subtree_end(dir: &[u8]) -> Vec<u8> {
    let mut e = dir.to_vec();
    e.push(b'/' + 1);
    e
}

fn subtree_start(dir: &[u8]) -> Vec<u8> {
    let mut s = dir.to_vec();
    s.push(b'/');
    s
}

/// The layered tree of all sources.
pub struct Tree {
    paths: BTreeMap<Vec<u8>, Slot>,
    inodes: Vec<Inode>,
    epoch: Option<i64>,
}

impl Tree {
    /// An empty tree (just the root, owned by root, mode 0755). Every
    /// timestamp inserted later is clamped to `epoch` when given.
    pub fn new(epoch: Option<i64>) -> Tree {
        let mut t = Tree {
            paths: BTreeMap::new(),
            inodes: Vec::new(),
            epoch,
        };
        let root = t.push(Inode::implicit_dir());
        t.paths.insert(
            Vec::new(),
            Slot {
                inode: root,
                layer: 0,
            },
        );
        t
    }

    /// The clamp applied to timestamps.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    fn push(&mut self, inode: Inode) -> usize {
        self.inodes.push(inode);
        self.inodes.len() - 1
    }

    /// Make sure every ancestor of `path` is a directory, creating missing
    /// ones (as `tar -x` does).
    fn ensure_parents(&mut self, path: &[u8], layer: u32) -> Result<(), TreeError> {
        let parent = parent_of(path);
        if parent.is_empty() {
            return Ok(());
        }
        match self.paths.get(parent) {
            Some(s) if matches!(self.inodes[s.inode].kind, Kind::Dir) => Ok(()),
            Some(_) => Err(TreeError::ParentNotDir {
                path: show(path),
                parent: show(parent),
            }),
            None => {
                self.ensure_parents(parent, layer)?;
                let ino = self.push(Inode::implicit_dir());
                self.paths
                    .insert(parent.to_vec(), Slot { inode: ino, layer });
                Ok(())
            }
        }
    }

    fn check_xattrs(path: &[u8], xattrs: &mut BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(), TreeError> {
        for (name, value) in xattrs.iter_mut() {
            let bad = |why: String| TreeError::BadXattr {
                path: show(path),
                name: String::from_utf8_lossy(name).into_owned(),
                why,
            };
            if crate::ext4::xattr::split_name(name).is_none() {
                return Err(bad("unsupported namespace (ext4 stores user., trusted., security. and system. attributes)".into()));
            }
            if name.starts_with(b"system.posix_acl_") {
                *value = crate::ext4::xattr::canonical_acl(value).map_err(bad)?;
            }
        }
        Ok(())
    }

    /// Add (or replace) `path` with `inode`, from source number `layer`.
    /// A directory entry for an existing directory only updates its
    /// metadata; anything else replaces what was there, subtree included.
    pub fn insert(&mut self, path: &[u8], mut inode: Inode, layer: u32) -> Result<(), TreeError> {
        inode.meta.mtime = inode.meta.mtime.clamp(self.epoch);
        Self::check_xattrs(path, &mut inode.xattrs)?;
        if path.is_empty() {
            if !matches!(inode.kind, Kind::Dir) {
                return Err(TreeError::RootNotDir { path: "/".into() });
            }
            let root = self.paths[&Vec::new()].inode;
            self.inodes[root].meta = inode.meta;
            self.inodes[root].xattrs = inode.xattrs;
            self.inodes[root].implicit = false;
            return Ok(());
        }
        self.ensure_parents(path, layer)?;
        if let Some(slot) = self.paths.get(path).copied() {
            let old_dir = matches!(self.inodes[slot.inode].kind, Kind::Dir);
            if old_dir && matches!(inode.kind, Kind::Dir) {
                let old = &mut self.inodes[slot.inode];
                old.meta = inode.meta;
                old.xattrs = inode.xattrs;
                old.implicit = false;
                self.paths.insert(
                    path.to_vec(),
                    Slot {
                        inode: slot.inode,
                        layer,
                    },
                );
                return Ok(());
            }
            if old_dir {
                self.remove_children(path, u32::MAX);
            }
        }
        let ino = self.push(inode);
        self.paths.insert(path.to_vec(), Slot { inode: ino, layer });
        Ok(())
    }

    /// Add a hard link `path` to the earlier entry `target`.
    pub fn link(&mut self, path: &[u8], target: &[u8], layer: u32) -> Result<(), TreeError> {
        let slot = match self.paths.get(target) {
            Some(s) => *s,
            None => {
                return Err(TreeError::LinkTargetMissing {
                    path: show(path),
                    target: show(target),
                })
            }
        };
        if matches!(self.inodes[slot.inode].kind, Kind::Dir) {
            return Err(TreeError::LinkToDir {
                path: show(path),
                target: show(target),
            });
        }
        if path.is_empty() {
            return Err(TreeError::RootNotDir { path: "/".into() });
        }
        if path == target {
            return Ok(());
        }
        self.ensure_parents(path, layer)?;
        if let Some(old) = self.paths.get(path).copied() {
            if matches!(self.inodes[old.inode].kind, Kind::Dir) {
                self.remove_children(path, u32::MAX);
            }
        }
        self.paths.insert(
            path.to_vec(),
            Slot {
                inode: slot.inode,
                layer,
            },
        );
        Ok(())
    }

    /// Remove `path` and everything under it (an OCI `.wh.NAME` whiteout).
    pub fn remove(&mut self, path: &[u8]) {
        if path.is_empty() {
            return;
        }
        self.remove_children(path, u32::MAX);
        self.paths.remove(path);
    }

    /// Remove everything under `dir` that came from a layer below `layer`
    /// (an OCI `.wh..wh..opq` opaque marker; `u32::MAX` removes all).
    pub fn remove_children(&mut self, dir: &[u8], layer: u32) {
        let range: Box<dyn Iterator<Item = (&Vec<u8>, &Slot)>> = if dir.is_empty() {
            Box::new(self.paths.iter())
        } else {
            Box::new(self.paths.range(subtree_start(dir)..subtree_end(dir)))
        };
        let doomed: Vec<Vec<u8>> = range
            .filter(|(k, s)| !k.is_empty() && s.layer < layer)
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.paths.remove(&k);
        }
    }

    /// Give implicit directories (and an untouched root) the time `t`.
    pub fn set_implicit_times(&mut self, t: Time) {
        for ino in &mut self.inodes {
            if ino.implicit {
                ino.meta.mtime = t;
            }
        }
    }

    /// The latest modification time in the tree (the default for times the
    /// sources do not give).
    pub fn max_mtime(&self) -> Time {
        self.paths
            .values()
            .map(|s| &self.inodes[s.inode])
            .filter(|i| !i.implicit)
            .map(|i| i.meta.mtime)
            .max()
            .unwrap_or_default()
    }

    /// All paths in byte order with their inode index.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], usize)> {
        self.paths.iter().map(|(k, s)| (k.as_slice(), s.inode))
    }

    /// The inode with index `i`.
    pub fn inode(&self, i: usize) -> &Inode {
        &self.inodes[i]
    }

    /// Look a path up.
    pub fn get(&self, path: &[u8]) -> Option<&Inode> {
        self.paths.get(path).map(|s| &self.inodes[s.inode])
    }

    /// Number of paths (the root included).
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Never true: the root is always there.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of names each inode has (index by inode index).
    pub fn name_counts(&self) -> Vec<u32> {
        let mut n = vec![0u32; self.inodes.len()];
        for s in self.paths.values() {
            n[s.inode] += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> Inode {
        Inode {
            kind: Kind::Fifo,
            meta: Meta {
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: Time { sec: 5, nsec: 0 },
            },
            xattrs: BTreeMap::new(),
            implicit: false,
        }
    }
    fn dir() -> Inode {
        Inode {
            kind: Kind::Dir,
            ..file()
        }
    }

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize(b"./a//b/./c/").unwrap(), b"a/b/c");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert!(normalize(b"/etc").is_err());
        assert!(normalize(b"a/../b").is_err());
        assert!(normalize(&[b'x'; 256]).is_err());
        assert!(normalize(&[b'x'; 255]).is_ok());
        assert_eq!(normalize(b"\xff\xfe").unwrap(), b"\xff\xfe");
    }

    #[test]
    fn layering_and_whiteouts() {
        let mut t = Tree::new(None);
        t.insert(b"a/b/c", file(), 0).unwrap();
        assert!(t.get(b"a/b").is_some(), "parents are made");
        t.insert(b"a/d", file(), 0).unwrap();
        t.insert(b"a.x", file(), 0).unwrap();
        t.remove(b"a/b");
        assert!(t.get(b"a/b/c").is_none());
        assert!(t.get(b"a/d").is_some());
        t.insert(b"a/e", file(), 1).unwrap();
        t.remove_children(b"a", 1);
        assert!(t.get(b"a/d").is_none(), "opaque removes lower layers");
        assert!(t.get(b"a/e").is_some(), "but not its own layer");
        assert!(
            t.get(b"a.x").is_some(),
            "a sibling with a common prefix stays"
        );
        // A file under a non-directory is an error, not a silent replace.
        let e = t.insert(b"a.x/y", file(), 1).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        // Replacing a directory by a file drops its subtree.
        t.insert(b"a", file(), 2).unwrap();
        assert!(t.get(b"a/e").is_none());
        t.insert(b"d", dir(), 2).unwrap();
        t.insert(b"d/f", file(), 2).unwrap();
        t.insert(b"d", dir(), 3).unwrap();
        assert!(
            t.get(b"d/f").is_some(),
            "a dir over a dir keeps the children"
        );
    }

    #[test]
    fn hard_links() {
        let mut t = Tree::new(None);
        t.insert(b"f", file(), 0).unwrap();
        t.link(b"g", b"f", 0).unwrap();
        assert!(t
            .link(b"h", b"nope", 0)
            .unwrap_err()
            .to_string()
            .contains("not an earlier entry"));
        t.insert(b"d", dir(), 0).unwrap();
        assert!(t.link(b"h", b"d", 0).is_err());
        let counts = t.name_counts();
        let f = t.paths[&b"f".to_vec()].inode;
        assert_eq!(counts[f], 2);
    }

    #[test]
    fn clamps_times() {
        assert_eq!(
            Time { sec: 100, nsec: 5 }.clamp(Some(50)),
            Time { sec: 50, nsec: 0 }
        );
        assert_eq!(
            Time { sec: 10, nsec: 5 }.clamp(Some(50)),
            Time { sec: 10, nsec: 5 }
        );
        assert_eq!(
            Time { sec: -3, nsec: 5 }.clamp(None),
            Time { sec: 0, nsec: 0 }
        );
        assert_eq!(
            Time {
                sec: 1 << 40,
                nsec: 5
            }
            .clamp(None)
            .sec,
            TIME_MAX
        );
    }
}
