//! Arbitrary bytes as a tar source: reading them into a tree and writing
//! the image must return errors, never panic; a written image must read
//! back clean.
#![no_main]
use libfuzzer_sys::fuzz_target;
use umlctl_imgtools::build::{build, BuildOptions};
use umlctl_imgtools::progress::NoProgress;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("umlctl-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let src = dir.join("in.tar");
    let out = dir.join("out.img");
    if std::fs::write(&src, data).is_err() {
        return;
    }
    if build(&[src], &out, &BuildOptions::default(), &NoProgress, &NoProgress).is_ok() {
        let disk = umlctl_imgtools::disk::Disk::open(&out).expect("reopen");
        let img = umlctl_imgtools::ext4::read::Image::open(disk).expect("our image opens");
        let w = umlctl_imgtools::verify::walk(&img).expect("our image walks");
        let problems = umlctl_imgtools::verify::check(&img, &w).expect("our image checks");
        assert!(problems.is_empty(), "{problems:?}");
    }
});
