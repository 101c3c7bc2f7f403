//! Arbitrary bytes as an ext4 image: opening, walking, checking and reading
//! it must return errors, never panic or loop.
//!
//! The first byte chooses how the rest is taken: as it is (checksums and
//! all), or with `metadata_csum` switched off in the superblock, so that a
//! mutated image gets past the checksums and the fuzzer reaches the
//! structures behind them (the reader checks the same structures either
//! way; only the checksums are skipped). Then the target walks, checks,
//! lists, resolves paths (symlinks included) and reads the content of what
//! it finds, holes and unwritten extents as lengths only.
//!
//!     cargo fuzz run image_read fuzz/corpus/image_read fuzz/seeds/image_read -- -max_len=262144
#![no_main]
use libfuzzer_sys::fuzz_target;
use umlctl_imgtools::ext4::read::{Image, Piece};
use umlctl_imgtools::verify;

/// s_feature_ro_compat (superblock offset 0x64) bit RO_COMPAT_METADATA_CSUM.
const RO_COMPAT: usize = 1024 + 0x64;
const METADATA_CSUM: u8 = 0x04; // 0x400 >> 8, in the second byte

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() > RO_COMPAT + 2 {
        bytes[RO_COMPAT + 1] &= !METADATA_CSUM;
    }
    let Ok(img) = Image::open(bytes) else { return };
    if img.sb.blocks > 1 << 20 || img.sb.inodes > 1 << 20 {
        return;
    }
    if let Ok(w) = verify::walk(&img) {
        let _ = verify::check(&img, &w);
        // Content hashes are not computed: a legitimately huge sparse file
        // would only make the run slow. Pieces are, below, as lengths.
        let _ = verify::manifest(&img, &w, false);
        for (path, ino) in w.entries.iter().take(64) {
            let _ = img.resolve(path);
            if ino.is_reg() {
                let mut data = 0u64;
                let _ = img.read_pieces(ino, &mut |p| {
                    if let Piece::Data(d) = p {
                        data += d.len() as u64;
                    }
                });
                assert!(data <= 1 << 32, "more data than an image this size holds");
            }
            if ino.is_symlink() {
                let _ = img.symlink_target(ino);
            }
        }
    }
});
