//! Manifests: every path of an image with its type, mode, owner, size,
//! mtime, link count, link target, device numbers, extended attributes and
//! content digest, plus a digest of the whole list. Built from the sources
//! (`image build --manifest`) or read back from an image, and compared.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::tree::{Kind, Tree};

/// Format version of the manifest JSON.
pub const VERSION: u32 = 1;

/// One path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Absolute path in the image; bytes that are not UTF-8 appear as
    /// `\xNN` and a backslash as `\\`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Permission bits in octal (setuid, setgid and sticky included).
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    /// Content size for files, target length for symlinks, else 0.
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<[u32; 2]>,
    /// Extended attributes: name to base64 value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A whole manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// `sha256:` over the JSON of `entries`.
    pub digest: String,
    pub entries: Vec<Entry>,
}

/// Render bytes losslessly as a string (`\xNN` for bytes that are not
/// UTF-8, `\\` for a backslash).
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Path as shown in manifests: `/` for the root, `/a/b` otherwise.
pub fn show_path(rel: &[u8]) -> String {
    format!("/{}", escape(rel))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    /// Wrap entries (sorted by the caller in path byte order) with their digest.
    pub fn new(entries: Vec<Entry>) -> Manifest {
        let json = serde_json::to_vec(&entries).unwrap_or_default();
        Manifest {
            version: VERSION,
            digest: format!("sha256:{}", hex(&Sha256::digest(&json))),
            entries,
        }
    }

    /// Check the stored digest against the entries.
    pub fn digest_ok(&self) -> bool {
        Manifest::new(self.entries.clone()).digest == self.digest
    }

    /// The manifest of what an image built from `tree` holds.
    pub fn from_tree(tree: &Tree) -> Manifest {
        let names = tree.name_counts();
        // Subdirectory counts for directory link counts.
        let mut subdirs: BTreeMap<&[u8], u32> = BTreeMap::new();
        for (path, ti) in tree.entries() {
            if !path.is_empty() && matches!(tree.inode(ti).kind, Kind::Dir) {
                let parent = match path.iter().rposition(|&b| b == b'/') {
                    Some(i) => &path[..i],
                    None => b"",
                };
                *subdirs.entry(parent).or_default() += 1;
            }
        }
        let entries = tree
            .entries()
            .map(|(path, ti)| {
                let node = tree.inode(ti);
                let (size, target, rdev, sha, nlink) = match &node.kind {
                    Kind::Dir => {
                        let n = 2 + subdirs.get(path).copied().unwrap_or(0);
                        (0, None, None, None, if n > 64999 { 1 } else { n })
                    }
                    Kind::File(fd) => (fd.size, None, None, Some(hex(&fd.sha256)), names[ti]),
                    Kind::Symlink(t) => (t.len() as u64, Some(escape(t)), None, None, names[ti]),
                    Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                        (0, None, Some([*major, *minor]), None, names[ti])
                    }
                    Kind::Fifo | Kind::Socket => (0, None, None, None, names[ti]),
                };
                Entry {
                    path: show_path(path),
                    kind: node.kind.name().into(),
                    mode: format!("{:04o}", node.meta.mode),
                    uid: node.meta.uid,
                    gid: node.meta.gid,
                    size,
                    mtime: node.meta.mtime.sec,
                    mtime_nsec: node.meta.mtime.nsec,
                    nlink,
                    target,
                    rdev,
                    xattrs: node
                        .xattrs
                        .iter()
                        .map(|(k, v)| {
                            (
                                escape(k),
                                base64::engine::general_purpose::STANDARD.encode(v),
                            )
                        })
                        .collect(),
                    sha256: sha,
                }
            })
            .collect();
        Manifest::new(entries)
    }
}

/// One difference between two manifests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub path: String,
    /// `missing` (only in the first), `extra` (only in the second), or
    /// the name of the field that differs.
    pub what: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<String>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.what.as_str() {
            "missing" => write!(f, "{}: missing", self.path),
            "extra" => write!(f, "{}: not expected", self.path),
            w => write!(
                f,
                "{}: {} is {} but {} was expected",
                self.path,
                w,
                self.actual.as_deref().unwrap_or("(none)"),
                self.expected.as_deref().unwrap_or("(none)")
            ),
        }
    }
}

fn fields(e: &Entry) -> Vec<(&'static str, Option<String>)> {
    vec![
        ("type", Some(e.kind.clone())),
        ("mode", Some(e.mode.clone())),
        ("uid", Some(e.uid.to_string())),
        ("gid", Some(e.gid.to_string())),
        ("size", Some(e.size.to_string())),
        ("mtime", Some(format!("{}.{:09}", e.mtime, e.mtime_nsec))),
        ("nlink", Some(e.nlink.to_string())),
        ("target", e.target.clone()),
        ("rdev", e.rdev.map(|[a, b]| format!("{a}:{b}"))),
        ("sha256", e.sha256.clone()),
    ]
}

/// Every difference between `expected` and `actual`, in path order.
pub fn compare(expected: &Manifest, actual: &Manifest) -> Vec<Difference> {
    let a: BTreeMap<&str, &Entry> = expected
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
    let b: BTreeMap<&str, &Entry> = actual
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e))
        .collect();
    let mut out = Vec::new();
    let diff = |path: &str, what: &str, x: Option<String>, y: Option<String>| Difference {
        path: path.into(),
        what: what.into(),
        expected: x,
        actual: y,
    };
    let mut paths: Vec<&str> = a.keys().chain(b.keys()).copied().collect();
    paths.sort_unstable();
    paths.dedup();
    for p in paths {
        match (a.get(p), b.get(p)) {
            (Some(_), None) => out.push(diff(p, "missing", None, None)),
            (None, Some(_)) => out.push(diff(p, "extra", None, None)),
            (Some(x), Some(y)) => {
                for ((name, fx), (_, fy)) in fields(x).into_iter().zip(fields(y)) {
                    if fx != fy {
                        out.push(diff(p, name, fx, fy));
                    }
                }
                let keys: std::collections::BTreeSet<&String> =
                    x.xattrs.keys().chain(y.xattrs.keys()).collect();
                for k in keys {
                    let (vx, vy) = (x.xattrs.get(k), y.xattrs.get(k));
                    if vx != vy {
                        out.push(diff(p, &format!("xattr {k}"), vx.cloned(), vy.cloned()));
                    }
                }
            }
            (None, None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_losslessly() {
        assert_eq!(escape(b"a/b"), "a/b");
        assert_eq!(escape(b"caf\xc3\xa9"), "café");
        assert_eq!(escape(b"\xff\\"), "\\xff\\\\");
    }

    #[test]
    fn compares_fields() {
        let e = Entry {
            path: "/a".into(),
            kind: "file".into(),
            mode: "0644".into(),
            uid: 0,
            gid: 0,
            size: 1,
            mtime: 1,
            mtime_nsec: 0,
            nlink: 1,
            target: None,
            rdev: None,
            xattrs: BTreeMap::new(),
            sha256: Some("00".into()),
        };
        let mut f = e.clone();
        f.mode = "0600".into();
        f.sha256 = Some("01".into());
        let d = compare(&Manifest::new(vec![e.clone()]), &Manifest::new(vec![f]));
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].to_string(), "/a: mode is 0600 but 0644 was expected");
        let d = compare(&Manifest::new(vec![e]), &Manifest::new(vec![]));
        assert_eq!(d[0].what, "missing");
    }
}
