//! umlctl-imgtools: disk images.
//!
//! * [`tree`]: the file tree an image is built from (layering, whiteouts,
//!   hard links, path rules).
//! * [`source`]: reading tar, tar.gz, tar.zst and directory sources into a
//!   tree, with file content spooled and hashed once.
//! * [`ext4`]: our deterministic ext4 writer and a reader/checker.
//! * [`cow`]: UML's copy-on-write format: read every version the kernel
//!   reads, create version 3 like `uml_mkcow`, merge like `uml_moo` (to a new
//!   sparse image or in place), rebase onto a moved or copied backing file,
//!   and read the merged disk without booting.
//! * [`extract`]: extracting from an image onto the host, safely for a
//!   hostile image.
//! * [`progress`]: how long operations report progress.
//!
//! A leaf crate: it depends on none of umlctl's other crates.

// Unit tests build fixtures with plain casts; the cast lints guard the
// code that handles real input.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_possible_wrap
    )
)]

pub mod build;
pub mod cow;
pub mod disk;
pub mod ext4;
pub mod extract;
pub mod manifest;
pub(crate) mod num;
pub mod progress;
pub(crate) mod seek;
pub mod source;
pub mod tree;
pub mod verify;
