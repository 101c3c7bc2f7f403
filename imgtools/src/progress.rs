//! Progress reporting for long operations. Libraries report through this
//! trait; the CLI draws (a progress bar on a terminal, nothing otherwise).

/// Receives progress of one operation, in bytes.
pub trait Progress {
    /// The operation starts and will cover `total` bytes.
    fn start(&self, total: u64);
    /// `n` more bytes are done.
    fn advance(&self, n: u64);
    /// The operation is complete.
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}
