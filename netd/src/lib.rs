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
//! A leaf crate: it depends on none of umlctl's other crates. Without its
//! `daemon` feature (on by default) it is the client side only —
//! [`protocol`], [`client`], [`tap`] — on std, serde and nix; umlctl's
//! kernel crate uses it so.

// Unit tests build fixtures with plain casts; the cast lints guard the
// code that handles real input.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_possible_wrap
    )
)]

pub mod client;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod lease;
#[cfg(feature = "daemon")]
pub mod link;
#[cfg(feature = "daemon")]
pub mod nat;
#[cfg(feature = "daemon")]
pub mod policy;
pub mod protocol;
pub mod tap;
