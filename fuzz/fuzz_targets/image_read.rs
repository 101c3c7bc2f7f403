//! Arbitrary bytes as an ext4 image: opening, walking, checking and reading
//! it must return errors, never panic or loop.
#![no_main]
use libfuzzer_sys::fuzz_target;
use umlctl_imgtools::ext4::read::{Image, ReadAt};
use umlctl_imgtools::verify;

struct Bytes(Vec<u8>);

impl ReadAt for Bytes {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        buf.fill(0);
        let off = off as usize;
        if off < self.0.len() {
            let n = buf.len().min(self.0.len() - off);
            buf[..n].copy_from_slice(&self.0[off..off + n]);
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::open(Bytes(data.to_vec())) else { return };
    if img.sb.blocks > 1 << 20 || img.sb.inodes > 1 << 20 {
        return;
    }
    if let Ok(w) = verify::walk(&img) {
        let _ = verify::check(&img, &w);
        // Content is not read: a legitimately huge sparse file would only
        // make the run slow.
        let _ = verify::manifest(&img, &w, false);
    }
});
