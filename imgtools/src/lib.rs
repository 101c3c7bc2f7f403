//! umlctl-imgtools: disk images.
//!
//! * [`cow`]: UML's copy-on-write format: read every version the kernel
//!   reads, create version 3 like `uml_mkcow`, merge like `uml_moo` (to a new
//!   sparse image or in place), rebase onto a moved or copied backing file,
//!   and read the merged disk without booting.
//! * [`progress`]: how long operations report progress.
//!
//! A leaf crate: it depends on none of umlctl's other crates. The ext4
//! writer, sources, manifests and verify arrive with the image issue.

pub mod cow;
pub mod progress;
