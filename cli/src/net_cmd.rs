//! `umlctl netd` (the privileged network helper) and `umlctl net ...`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use umlctl_netd::client::{socket_path, Client};
use umlctl_netd::config::Config;

use crate::exit;

#[derive(Args)]
#[command(
    after_help = "Runs as root (it creates taps and bridges). Every decision goes to stderr.\n\
Config: see `umlctl-netd`'s config module docs or the README (netd section)."
)]
pub struct NetdArgs {
    /// The TOML configuration (bridges and policy).
    #[arg(long, value_name = "FILE", default_value = "/etc/umlctl/netd.toml")]
    config: PathBuf,
    /// Listen here instead of the config's `socket`.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

#[derive(Subcommand)]
pub enum NetCmd {
    /// The bridges netd lets me use, and my taps.
    Ls(LsArgs),
}

#[derive(Args)]
pub struct LsArgs {
    /// netd's socket (default: $UMLCTL_NETD_SOCKET, else /run/umlctl/netd.sock).
    #[arg(long, value_name = "PATH")]
    netd_socket: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn lookup_user(n: &str) -> Option<u32> {
    nix::unistd::User::from_name(n)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

fn lookup_group(n: &str) -> Option<u32> {
    nix::unistd::Group::from_name(n)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

pub fn netd(a: NetdArgs) -> u8 {
    let mut config = match Config::load(&a.config, &lookup_user, &lookup_group) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("umlctl netd: {e}");
            return exit::FAILURE;
        }
    };
    if let Some(s) = a.socket {
        if !s.is_absolute() {
            eprintln!(
                "umlctl netd: --socket {}: must be an absolute path",
                s.display()
            );
            return exit::FAILURE;
        }
        config.socket = s;
    }
    if a.check {
        println!(
            "{}: OK ({} bridge(s), {} rule(s), socket {})",
            a.config.display(),
            config.bridges.len(),
            config.allow.len(),
            config.socket.display()
        );
        return 0;
    }
    match umlctl_netd::daemon::run(config) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umlctl netd: {e}");
            exit::FAILURE
        }
    }
}

pub fn main(c: NetCmd) -> u8 {
    match c {
        NetCmd::Ls(a) => ls(a),
    }
}

fn ls(a: LsArgs) -> u8 {
    let path = socket_path(a.netd_socket.as_deref());
    let res = Client::connect(&path).and_then(|mut c| Ok((c.bridges()?, c.list()?)));
    let (bridges, taps) = match res {
        Ok(v) => v,
        Err(e) => {
            eprintln!("umlctl: {e}");
            return exit::FAILURE;
        }
    };
    if a.json {
        let v = serde_json::json!({ "socket": path, "bridges": bridges, "taps": taps });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    println!(
        "{:<16} {:<20} {:<20} {:>9}",
        "BRIDGE", "ADDRESS", "OUTSIDE", "TAPS LEFT"
    );
    for b in &bridges {
        let outside = match (&b.nat, b.forward) {
            (Some(uplink), _) => format!("nat via {uplink}"),
            (None, true) => "routed".to_string(),
            (None, false) => "isolated".to_string(),
        };
        println!(
            "{:<16} {:<20} {:<20} {:>9}",
            b.name,
            format!("{}/{}", b.address, b.prefix),
            outside,
            b.taps_left
        );
    }
    if bridges.is_empty() {
        println!("(no bridge: netd's policy gives you none)");
    }
    if !taps.is_empty() {
        println!();
        println!(
            "{:<12} {:<16} {:<20} {:<18} MODE",
            "TAP", "BRIDGE", "ADDRESS", "MAC"
        );
        for t in &taps {
            println!(
                "{:<12} {:<16} {:<20} {:<18} {:?}",
                t.ifname,
                t.bridge,
                format!("{}/{}", t.address, t.prefix),
                t.mac,
                t.mode
            );
        }
    }
    0
}
