//! Kathará/Netkit lab directories, the way Kathará reads them: `lab.conf`
//! (devices, their interfaces on collision domains, their options, the
//! lab's metadata), `lab.dep` (which device waits for which), `lab.ext`
//! (collision domains put on host interfaces), and the devices that exist
//! only as a `DEVICE/` tree or a `DEVICE.startup` file.
//!
//! [`Lab::load`] reads a directory into a checked [`Lab`]: every interface
//! numbered from `eth0` up without gaps, a MAC for each (the given one, or a
//! stable one derived from the device and interface), one [`Domain`] per
//! collision domain, and a start order that honours `lab.dep` (a cycle is
//! an error naming it). Errors name the file and line. [`Lab::dot`] draws
//! the topology for Graphviz.
//!
//! Nothing here starts a guest: orchestration builds on this plan.
#![deny(missing_docs)]

mod conf;
mod dep;
mod ext;
mod graph;
mod plan;
pub mod runtime;

pub use conf::{parse_conf, Conf, DeviceConf, IfaceConf, LabMeta, Options, Port};
pub use dep::parse_dep;
pub use ext::{parse_ext, External};
pub use plan::{Device, Domain, Interface, Lab};

/// What went wrong reading a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A line that is not what the format allows.
    #[error("{file} line {line}: {what}")]
    Syntax {
        /// `lab.conf` or `lab.dep`.
        file: String,
        /// 1-based.
        line: usize,
        /// What is wrong, and what was expected.
        what: String,
    },
    /// The lab as a whole does not hold together (interface gaps, duplicate
    /// MACs, a dependency cycle, no devices).
    #[error("{0}")]
    Invalid(String),
    /// A file of the lab could not be read.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}
