//! Baseline for bench/image.sh: decompress and parse a tar.gz with the same
//! crates `image build` uses (flate2 with zlib-rs, tar), reading every
//! entry's data, and nothing else. Prints entries and bytes.

// A benchmark helper: any failure simply ends it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::Read;

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: tarparse FILE.tar.gz");
    let f = std::fs::File::open(&path).expect("open");
    let gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, f));
    let mut ar = tar::Archive::new(gz);
    let mut buf = vec![0u8; 1 << 20];
    let (mut entries, mut bytes) = (0u64, 0u64);
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let _ = e.path_bytes();
        let _ = e.pax_extensions();
        loop {
            let n = e.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
        entries += 1;
    }
    println!("{entries} entries, {bytes} bytes");
}
