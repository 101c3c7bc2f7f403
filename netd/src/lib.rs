//! umlctl-netd: the small privileged network helper. It creates taps on
//! host bridges for unprivileged users, under an explicit policy, over a
//! unix socket; a tap lives as long as the connection that asked for it.
//!
//! * [`config`]: the TOML configuration (socket, bridges, policy), checked on load;
//! * [`policy`]: who may take taps on which bridge, and how many;
//! * [`protocol`]: the versioned JSON-lines wire protocol;
//! * [`lease`]: addresses, stable MACs, tap names;
//! * [`tap`] and [`link`]: tun ioctls and rtnetlink (never `ip`);
//! * [`nat`]: masquerading to the uplink, nftables over netlink (never `nft`);
//! * [`daemon`]: the daemon loop; [`client`]: the blocking client.
//!
//! A leaf crate: it depends on none of umlctl's other crates.

pub mod client;
pub mod config;
pub mod daemon;
pub mod lease;
pub mod link;
pub mod nat;
pub mod policy;
pub mod protocol;
pub mod tap;
