//! SEEK_DATA / SEEK_HOLE on an open file, through nix, with offsets as u64.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::num::off_t;

/// What the file holds at and after an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Data starts here (at or after the offset asked about).
    Data(u64),
    /// Only a hole follows, to the end of the file (ENXIO).
    NoMoreData,
}

/// Where the next data at or after `at` starts. Errors: the filesystem
/// cannot answer (EINVAL on filesystems without SEEK_DATA, for example).
pub(crate) fn next_data(f: &File, at: u64) -> io::Result<Next> {
    match lseek(f.as_raw_fd(), off_t(at)?, Whence::SeekData) {
        Ok(o) => Ok(Next::Data(offset(o)?)),
        Err(Errno::ENXIO) => Ok(Next::NoMoreData),
        Err(e) => Err(e.into()),
    }
}

/// Where the next hole at or after `at` starts (the end of the file counts
/// as a hole).
pub(crate) fn next_hole(f: &File, at: u64) -> io::Result<u64> {
    offset(lseek(f.as_raw_fd(), off_t(at)?, Whence::SeekHole)?)
}

fn offset(o: i64) -> io::Result<u64> {
    u64::try_from(o).map_err(|_| io::Error::other(format!("lseek returned {o}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_and_holes_of_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 24).unwrap();
        f.write_all_at(b"x", 1 << 22).unwrap();
        match next_data(&f, 0).unwrap() {
            // Filesystems without hole tracking report all data; others the block.
            Next::Data(d) => assert!(d <= 1 << 22, "{d}"),
            Next::NoMoreData => panic!("the data was not found"),
        }
        let h = next_hole(&f, 1 << 22).unwrap();
        assert!(h > 1 << 22 && h <= 1 << 24, "{h}");
        assert_eq!(next_data(&f, 1 << 24).unwrap(), Next::NoMoreData);
    }
}
