//! ext4 images: our own deterministic writer, and a reader for what the
//! `ext4-view` crate does not expose (inode numbers, link counts, device
//! numbers, extended attributes) and for checking an image's structure.
//!
//! The feature set is the one in `reference/ext4.md` §0 that Linux,
//! e2fsck and ext4-view all accept: 4 KiB blocks, 256-byte inodes,
//! `ext_attr dir_index filetype extent flex_bg sparse_super large_file
//! huge_file dir_nlink extra_isize metadata_csum`, plus `has_journal` with
//! `--journal`.

pub mod dir;
pub mod hash;
pub mod read;
mod write;
pub mod xattr;

pub use write::{is_backup_group, write_image, Headroom, Ids, Options, Report, WriteError};

/// Block size of every image we write.
pub const BLOCK: usize = 4096;
/// Inode size of every image we write.
pub const INODE_SIZE: usize = 256;
/// Blocks per group (8 × block size).
pub const BLOCKS_PER_GROUP: u64 = 32768;
