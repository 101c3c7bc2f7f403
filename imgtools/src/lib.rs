//! umlctl-imgtools: disk images (deterministic ext4 writer, tar/directory
//! sources, manifests and verify, the UML COW format).
//!
//! A leaf crate: it depends on none of umlctl's other crates. Its contents
//! arrive with the image and COW issues; `umlctl run --image` uses UML's own
//! `ubdN=cow,backing` overlay until then.
