//! umlctl's exit codes (documented in the README's table): defined once, in
//! `umlctl_kernel::exit`.

pub use umlctl_kernel::exit::*;
