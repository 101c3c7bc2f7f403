//! The guest side of `start`: umlctl's init runs first, from the init disk,
//! and gives the guest what `start` promised before the image's own init
//! exists — the image mounted as the root, the hostname, every `--net`
//! interface up with its address, MTU and default route, the resolver
//! pointed at the bridge's name servers — and then execs the image's init
//! (systemd, sysvinit, busybox, OpenRC: any) as PID 1. Nothing of the image
//! is written: the resolver and hostname files are bind-mounted from
//! /run, and the init disk is detached before the image's init starts.

use std::ffi::{CString, OsString};
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::protocol::NicSpec;

/// Kernel-command-line variable naming the image's device; its presence
/// selects this mode.
pub(crate) const BOOT_ENV: &str = "UMLCTL_BOOT";
/// The image's init, when the user chose one (`start --init`).
pub(crate) const INIT_ENV: &str = "UMLCTL_BOOT_INIT";
/// The guest's hostname.
pub(crate) const HOSTNAME_ENV: &str = "UMLCTL_HOSTNAME";
/// The serial lines of the exec slots (`1,2,3,4`): the exec agent serves
/// them.
pub(crate) const EXEC_ENV: &str = "UMLCTL_EXEC_LINES";
/// The exec slots' stdin ring disks (`/dev/ubdl,…`), in the lines' order.
pub(crate) const EXEC_RINGS_ENV: &str = "UMLCTL_EXEC_RINGS";

/// What the console shows just before the image's init is exec'd (after
/// the init exists and is executable); `start` waits for it.
pub(crate) const STARTING_MARK: &str = "umlctl-init: starting the image's init ";

/// Where the kernel looks for an init when none is named.
const INITS: &[&str] = &["/sbin/init", "/etc/init", "/bin/init", "/bin/sh"];

/// Boot the image on `device`: never returns (the image's init replaces
/// this process, or the guest powers off with the reason on its console).
pub(super) fn main(device: &str) -> ! {
    let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    if let Err(e) = prepare(device, &env) {
        super::console(&e);
        super::power_off(crate::exit::FAILURE);
    }
    if let Some(lines) = lookup(&env, EXEC_ENV) {
        let lines: Vec<u32> = lines.split(',').filter_map(|n| n.parse().ok()).collect();
        let rings: Vec<String> = lookup(&env, EXEC_RINGS_ENV)
            .map(|r| r.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        super::agent::spawn(lines, rings);
    }
    let chosen = lookup(&env, INIT_ENV).filter(|s| !s.is_empty());
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let kept: Vec<CString> = env
        .iter()
        .filter(|(k, _)| {
            ![
                BOOT_ENV,
                INIT_ENV,
                HOSTNAME_ENV,
                EXEC_ENV,
                EXEC_RINGS_ENV,
                super::lab::LAYER_ENV,
                super::lab::SHARED_ENV,
                super::lab::IFNAMES_ENV,
            ]
            .iter()
            .any(|o| k == *o)
        })
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let candidates: Vec<String> = match &chosen {
        Some(c) => vec![c.clone()],
        None => INITS.iter().map(|s| (*s).to_string()).collect(),
    };
    let mut tried = Vec::new();
    for path in &candidates {
        let Ok(c) = CString::new(path.as_bytes()) else {
            continue;
        };
        if let Err(e) = nix::unistd::access(c.as_c_str(), nix::unistd::AccessFlags::X_OK) {
            tried.push(format!("{path}: {e}"));
            continue;
        }
        // console() adds the "umlctl-init: " prefix.
        let mark = STARTING_MARK.trim_start_matches("umlctl-init: ");
        super::console(&format!("{mark}{path}"));
        let mut argv = vec![c.clone()];
        argv.extend(args.iter().filter_map(|a| CString::new(a.as_bytes()).ok()));
        // Returns only on failure.
        let e = nix::unistd::execve(&c, &argv, &kept).err();
        tried.push(format!(
            "{path}: {}",
            e.map_or("?".into(), |e| e.to_string())
        ));
    }
    super::console(&format!(
        "no init to run in the image ({}); fix: give `umlctl start --init PATH` an init the image has",
        tried.join("; ")
    ));
    super::power_off(crate::exit::NOT_FOUND)
}

fn lookup(env: &[(OsString, OsString)], key: &str) -> Option<String> {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.to_string_lossy().into_owned())
}

/// Everything before the exec: root, hostname, network.
fn prepare(device: &str, env: &[(OsString, OsString)]) -> Result<(), String> {
    super::mount_image(device)?;
    super::mount_dev("")?;
    let _ = fs::DirBuilder::new().create("/run");
    super::mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    if let Some(name) = lookup(env, HOSTNAME_ENV).filter(|n| !n.is_empty()) {
        set_hostname(&name)?;
    }
    super::lab::prepare(&|k| lookup(env, k))?;
    let nics = nics_from_env(env)?;
    if nics.is_empty() {
        crate::guestnet::up("lo")?;
    } else if let Some(w) = crate::guestnet::setup(&nics)? {
        // The network works; only the resolver could not be pointed.
        super::console(&format!("name servers: {w}"));
    }
    Ok(())
}

/// Set the kernel's hostname and make the image's /etc/hostname say the
/// same (bind-mounted; systemd and sysvinit set the hostname from it).
fn set_hostname(name: &str) -> Result<(), String> {
    nix::unistd::sethostname(name).map_err(|e| format!("set the hostname {name:?}: {e}"))?;
    let etc = Path::new("/etc/hostname");
    if fs::symlink_metadata(etc).is_ok_and(|m| m.is_file()) {
        let ours = Path::new("/run/umlctl-hostname");
        fs::write(ours, format!("{name}\n"))
            .map_err(|e| format!("write {}: {e}", ours.display()))?;
        nix::mount::mount(
            Some(ours),
            etc,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind-mount the hostname over /etc/hostname: {e}"))?;
    }
    Ok(())
}

/// The interfaces `start` put on the command line as `UMLCTL_NET<i>_*`
/// (the same variables stay in the image init's environment for scripts).
pub(crate) fn nics_from_env(env: &[(OsString, OsString)]) -> Result<Vec<NicSpec>, String> {
    let get = |i: usize, what: &str| lookup(env, &format!("UMLCTL_NET{i}_{what}"));
    let mut out = Vec::new();
    for i in 0.. {
        let Some(device) = get(i, "DEVICE") else {
            break;
        };
        let bad = |what: &str, v: &str| format!("UMLCTL_NET{i}_{what}={v:?} is not valid");
        let addr = get(i, "ADDRESS").unwrap_or_default();
        let (a, p) = addr.split_once('/').ok_or_else(|| bad("ADDRESS", &addr))?;
        let address: Ipv4Addr = a.parse().map_err(|_| bad("ADDRESS", &addr))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad("ADDRESS", &addr))?;
        let gw = get(i, "GATEWAY").unwrap_or_default();
        let gateway: Ipv4Addr = gw.parse().map_err(|_| bad("GATEWAY", &gw))?;
        let mtu_s = get(i, "MTU").unwrap_or_else(|| "1500".into());
        let mtu: u32 = mtu_s.parse().map_err(|_| bad("MTU", &mtu_s))?;
        let dns = match get(i, "DNS") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|s| s.parse::<Ipv4Addr>().map_err(|_| bad("DNS", &list)))
                .collect::<Result<_, _>>()?,
        };
        out.push(NicSpec {
            device,
            address,
            prefix,
            gateway,
            mtu,
            dns,
        });
    }
    Ok(out)
}

/// Whether `name` is an environment key this mode consumes.
#[cfg(test)]
fn ours(name: &std::ffi::OsStr) -> bool {
    [BOOT_ENV, INIT_ENV, HOSTNAME_ENV]
        .iter()
        .any(|o| name == *o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn interfaces_come_from_the_command_line_variables_in_order() {
        let e = env(&[
            ("UMLCTL_NET0_DEVICE", "vec0"),
            ("UMLCTL_NET0_ADDRESS", "10.77.0.2/24"),
            ("UMLCTL_NET0_GATEWAY", "10.77.0.1"),
            ("UMLCTL_NET0_MTU", "1400"),
            ("UMLCTL_NET0_DNS", "10.77.0.1,192.0.2.53"),
            ("UMLCTL_NET1_DEVICE", "vec1"),
            ("UMLCTL_NET1_ADDRESS", "10.78.0.5/16"),
            ("UMLCTL_NET1_GATEWAY", "10.78.0.1"),
            ("UMLCTL_NET3_DEVICE", "vec3"),
        ]);
        let n = nics_from_env(&e).unwrap();
        assert_eq!(n.len(), 2, "stops at the first gap");
        assert_eq!(n[0].device, "vec0");
        assert_eq!(n[0].address, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(n[0].prefix, 24);
        assert_eq!(n[0].mtu, 1400);
        assert_eq!(n[0].dns.len(), 2);
        assert_eq!(n[1].mtu, 1500);
        assert!(n[1].dns.is_empty());
        assert!(nics_from_env(&env(&[])).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_variable_is_named() {
        for (k, v) in [
            ("UMLCTL_NET0_ADDRESS", "10.77.0.2"),
            ("UMLCTL_NET0_ADDRESS", "10.77.0.2/33"),
            ("UMLCTL_NET0_GATEWAY", "nope"),
            ("UMLCTL_NET0_MTU", "-1"),
            ("UMLCTL_NET0_DNS", "1.2.3.4,x"),
        ] {
            let mut e = env(&[
                ("UMLCTL_NET0_DEVICE", "vec0"),
                ("UMLCTL_NET0_ADDRESS", "10.77.0.2/24"),
                ("UMLCTL_NET0_GATEWAY", "10.77.0.1"),
            ]);
            e.retain(|(ek, _)| ek != k);
            e.push((k.into(), v.into()));
            let err = nics_from_env(&e).unwrap_err();
            assert!(err.contains(k), "{k}={v}: {err}");
        }
        assert!(ours(OsStr::new(BOOT_ENV)) && !ours(OsStr::new("UMLCTL_NET0_DEVICE")));
    }
}
