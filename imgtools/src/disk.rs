//! A disk to read an image from: a plain image file, or a UML COW overlay
//! read merged with its backing file, so images can be inspected as a
//! guest sees them now, without booting or merging.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cow::{Cow, CowError};
use crate::ext4::read::ReadAt;

/// An image file or an overlay over one.
pub enum Disk {
    Raw(File),
    Overlay { cow: Cow, backing: File },
}

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cow(#[from] CowError),
}

impl Disk {
    /// Open `path`; a COW file (recognized by its magic) is read through.
    pub fn open(path: &Path) -> Result<Disk, DiskError> {
        match Cow::open(path) {
            Ok(cow) => {
                let backing = cow.open_backing()?;
                Ok(Disk::Overlay { cow, backing })
            }
            // Not there at all (or unreadable): say so about the image,
            // not about a COW file the user never mentioned.
            Err(CowError::Io {
                op: "open COW file",
                source,
                ..
            }) => Err(DiskError::Open {
                path: path.into(),
                source,
            }),
            Err(CowError::NotCow { .. }) => {
                let f = File::open(path).map_err(|source| DiskError::Open {
                    path: path.into(),
                    source,
                })?;
                Ok(Disk::Raw(f))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The overlay, when reading through one.
    pub fn overlay(&self) -> Option<&Cow> {
        match self {
            Disk::Overlay { cow, .. } => Some(cow),
            Disk::Raw(_) => None,
        }
    }
}

impl ReadAt for Disk {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        match self {
            Disk::Raw(f) => f.read_at(buf, off),
            Disk::Overlay { cow, backing } => cow
                .read_merged(backing, off, buf)
                .map_err(std::io::Error::other),
        }
    }
}

/// Adapter for the `ext4-view` crate.
#[derive(Clone)]
pub struct ViewDisk(pub Arc<Disk>);

impl ext4_view::Ext4Read for ViewDisk {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0
            .read_at(dst, start_byte)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    }
}
