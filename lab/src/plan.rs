//! A lab directory read into a checked plan: devices with their interfaces
//! and MACs, collision domains, and the start order lab.dep asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::conf::{parse_conf, valid_device_name, Conf, LabMeta, Options};
use crate::dep::parse_dep;
use crate::LabError;

/// One interface of a device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Interface {
    /// `eth0`, `eth1`, …
    pub name: String,
    /// The collision domain it is on.
    pub domain: String,
    /// Its MAC, `02:…` when lab.conf gives none.
    pub mac: String,
}

/// One device of the lab.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Device {
    /// Its name (and hostname).
    pub name: String,
    /// Its interfaces, `eth0` first.
    pub interfaces: Vec<Interface>,
    /// Its options from lab.conf.
    pub options: Options,
    /// The devices whose startup must finish before it starts (lab.dep).
    pub after: Vec<String>,
    /// `DEVICE/` exists: a tree copied over its root.
    pub tree: bool,
    /// `DEVICE.startup` exists.
    pub startup: bool,
    /// `DEVICE.shutdown` exists.
    pub shutdown: bool,
}

/// One collision domain: an L2 segment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Domain {
    /// Its name in lab.conf.
    pub name: String,
    /// `(device, interface)` pairs on it.
    pub members: Vec<(String, String)>,
}

/// A checked lab.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lab {
    /// The lab directory.
    pub dir: PathBuf,
    /// `LAB_*` metadata.
    pub meta: LabMeta,
    /// Devices, by name.
    pub devices: Vec<Device>,
    /// Collision domains, by name.
    pub domains: Vec<Domain>,
    /// The start order: each wave starts once the previous waves' startup
    /// scripts have finished; the devices of a wave start together.
    pub waves: Vec<Vec<String>>,
    /// `shared/` exists (mounted at `/shared` in every device).
    pub shared: bool,
    /// `lab.ext`: collision domains put on host interfaces (root only).
    pub externals: Vec<crate::External>,
    /// What was accepted but will not be used.
    pub warnings: Vec<String>,
}

/// The MAC an interface gets when lab.conf gives none: locally
/// administered, unicast, the same on every start.
pub(crate) fn stable_mac(device: &str, index: u32) -> [u8; 6] {
    let h = Sha256::new()
        .chain_update(b"umlctl-lab-mac\0")
        .chain_update(device.as_bytes())
        .chain_update(b"\0")
        .chain_update(index.to_le_bytes())
        .finalize();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

pub(crate) fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn read(path: &Path) -> Result<Option<String>, LabError> {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|_| LabError::Invalid(format!("{}: not UTF-8 text", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LabError::Io {
            path: path.to_path_buf(),
            op: "read",
            source: e,
        }),
    }
}

/// What the lab directory holds besides lab.conf: device trees and
/// scripts, `shared/`.
#[derive(Debug, Default)]
struct Found {
    trees: BTreeSet<String>,
    startups: BTreeSet<String>,
    shutdowns: BTreeSet<String>,
    shared: bool,
}

fn scan(dir: &Path) -> Result<Found, LabError> {
    let io = |e| LabError::Io {
        path: dir.to_path_buf(),
        op: "list the lab directory",
        source: e,
    };
    let mut f = Found::default();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_dir = e.file_type().map_err(io)?.is_dir();
        if is_dir {
            if name == "shared" {
                f.shared = true;
            } else if valid_device_name(&name) && name != "_test" {
                f.trees.insert(name);
            }
        } else if let Some(d) = name.strip_suffix(".startup") {
            if d != "shared" && valid_device_name(d) {
                f.startups.insert(d.to_string());
            }
        } else if let Some(d) = name.strip_suffix(".shutdown") {
            if d != "shared" && valid_device_name(d) {
                f.shutdowns.insert(d.to_string());
            }
        }
    }
    Ok(f)
}

impl Lab {
    /// Read and check the lab in `dir`.
    pub fn load(dir: &Path) -> Result<Lab, LabError> {
        if !dir.is_dir() {
            return Err(LabError::Invalid(format!(
                "{} is not a directory (a lab is a directory with lab.conf; -d names it)",
                dir.display()
            )));
        }
        let conf = match read(&dir.join("lab.conf"))? {
            Some(t) => parse_conf(&t, "lab.conf")?,
            None => Conf::default(),
        };
        let deps = match read(&dir.join("lab.dep"))? {
            Some(t) => parse_dep(&t, "lab.dep")?,
            None => BTreeMap::new(),
        };
        let found = scan(dir)?;
        let mut lab = Lab::assemble(dir, conf, deps, &found)?;
        if let Some(t) = read(&dir.join("lab.ext"))? {
            lab.externals = crate::parse_ext(&t, "lab.ext")?;
        }
        lab.check_externals()?;
        Ok(lab)
    }

    /// Every `lab.ext` line names a collision domain of the lab, and no host
    /// interface is named twice.
    fn check_externals(&self) -> Result<(), LabError> {
        let mut seen = BTreeMap::new();
        for e in &self.externals {
            let syntax = |what: String| LabError::Syntax {
                file: "lab.ext".into(),
                line: e.line,
                what,
            };
            if !self.domains.iter().any(|d| d.name == e.domain) {
                return Err(syntax(format!(
                    "collision domain {} is not used by any device in lab.conf",
                    e.domain
                )));
            }
            if let Some(l) = seen.insert(e.host_name(), e.line) {
                return Err(syntax(format!(
                    "{} is already put on a collision domain on line {l}",
                    e.host_name()
                )));
            }
        }
        Ok(())
    }

    fn assemble(
        dir: &Path,
        conf: Conf,
        deps: BTreeMap<String, Vec<String>>,
        found: &Found,
    ) -> Result<Lab, LabError> {
        let mut names: BTreeSet<String> = conf.devices.keys().cloned().collect();
        names.extend(found.trees.iter().cloned());
        names.extend(found.startups.iter().cloned());
        if names.is_empty() {
            return Err(LabError::Invalid(format!(
                "{}: no devices (lab.conf names none, and there is no DEVICE/ directory or DEVICE.startup file)",
                dir.display()
            )));
        }
        for (dev, on) in &deps {
            for d in std::iter::once(dev).chain(on) {
                if !names.contains(d) {
                    return Err(LabError::Invalid(format!(
                        "lab.dep names {d}, which is not a device of this lab"
                    )));
                }
            }
        }
        let mut devices = Vec::new();
        let mut domains: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        let mut macs: BTreeMap<[u8; 6], String> = BTreeMap::new();
        for name in &names {
            let dc = conf.devices.get(name).cloned().unwrap_or_default();
            let mut interfaces = Vec::new();
            for (want, (idx, ic)) in (0u32..).zip(&dc.interfaces) {
                if *idx != want {
                    return Err(LabError::Invalid(format!(
                        "{name} has eth{idx} (lab.conf line {}) but no eth{want}: number a device's interfaces from 0 without gaps",
                        ic.line
                    )));
                }
                let ifname = format!("eth{idx}");
                let mac = ic.mac.unwrap_or_else(|| stable_mac(name, *idx));
                if let Some(other) = macs.insert(mac, format!("{name} {ifname}")) {
                    return Err(LabError::Invalid(format!(
                        "{name} {ifname} and {other} have the same MAC {}",
                        mac_text(mac)
                    )));
                }
                domains
                    .entry(ic.domain.clone())
                    .or_default()
                    .push((name.clone(), ifname.clone()));
                interfaces.push(Interface {
                    name: ifname,
                    domain: ic.domain.clone(),
                    mac: mac_text(mac),
                });
            }
            devices.push(Device {
                name: name.clone(),
                interfaces,
                options: dc.options,
                after: deps.get(name).cloned().unwrap_or_default(),
                tree: found.trees.contains(name),
                startup: found.startups.contains(name),
                shutdown: found.shutdowns.contains(name),
            });
        }
        let waves = waves(&devices)?;
        Ok(Lab {
            dir: dir.to_path_buf(),
            meta: conf.meta,
            devices,
            domains: domains
                .into_iter()
                .map(|(name, members)| Domain { name, members })
                .collect(),
            waves,
            shared: found.shared,
            externals: Vec::new(),
            warnings: conf.warnings,
        })
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }
}

/// Group devices into start waves (Kahn's algorithm); a cycle is an error
/// naming it.
fn waves(devices: &[Device]) -> Result<Vec<Vec<String>>, LabError> {
    let mut left: BTreeMap<&str, BTreeSet<&str>> = devices
        .iter()
        .map(|d| {
            (
                d.name.as_str(),
                d.after.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let mut out = Vec::new();
    while !left.is_empty() {
        let ready: Vec<&str> = left
            .iter()
            .filter(|(_, on)| on.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            // Follow waits from any device still left until one repeats.
            let mut path: Vec<&str> = Vec::new();
            let mut at = *left.keys().next().unwrap_or(&"");
            while !path.contains(&at) {
                path.push(at);
                at = left
                    .get(at)
                    .and_then(|on| on.iter().next().copied())
                    .unwrap_or(at);
            }
            let start = path.iter().position(|p| *p == at).unwrap_or(0);
            let mut cycle: Vec<&str> = path[start..].to_vec();
            cycle.push(at);
            return Err(LabError::Invalid(format!(
                "lab.dep has a cycle: {} (each waits for the next)",
                cycle.join(" → ")
            )));
        }
        for r in &ready {
            left.remove(r);
        }
        for on in left.values_mut() {
            for r in &ready {
                on.remove(r);
            }
        }
        out.push(ready.into_iter().map(String::from).collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn lab(files: &[(&str, &str)], dirs: &[&str]) -> (tempfile::TempDir, Result<Lab, LabError>) {
        let t = tempfile::tempdir().unwrap();
        for d in dirs {
            fs::create_dir_all(t.path().join(d)).unwrap();
        }
        for (f, text) in files {
            fs::write(t.path().join(f), text).unwrap();
        }
        let l = Lab::load(t.path());
        (t, l)
    }

    #[test]
    fn devices_domains_macs_and_waves() {
        let (_t, l) = lab(
            &[
                (
                    "lab.conf",
                    "r1[0]=A\nr1[1]=B/02:00:00:00:00:0b\nr2[0]=B\nr3[0]=A\n",
                ),
                ("lab.dep", "r3: r1 r2\n"),
                ("pc.startup", "ip link\n"),
                ("r1.shutdown", "true\n"),
            ],
            &["r2/etc/frr", "shared", "_test"],
        );
        let l = l.unwrap();
        let names: Vec<&str> = l.devices.iter().map(|d| d.name.as_str()).collect();
        // pc exists only as a startup file, r2's tree is found too.
        assert_eq!(names, ["pc", "r1", "r2", "r3"]);
        assert!(l.shared);
        let r1 = l.device("r1").unwrap();
        assert_eq!(r1.interfaces[1].mac, "02:00:00:00:00:0b");
        assert!(r1.interfaces[0].mac.starts_with("02:"));
        assert!(r1.shutdown && !r1.startup);
        assert!(l.device("r2").unwrap().tree);
        assert!(l.device("pc").unwrap().startup);
        assert_eq!(l.domains[0].name, "A");
        assert_eq!(
            l.domains[0].members,
            [("r1".into(), "eth0".into()), ("r3".into(), "eth0".into())]
        );
        assert_eq!(l.waves, [vec!["pc", "r1", "r2"], vec!["r3"]]);
        // Stable: the same lab gets the same MACs.
        let (_t2, again) = lab(
            &[(
                "lab.conf",
                "r1[0]=A\nr1[1]=B/02:00:00:00:00:0b\nr2[0]=B\nr3[0]=A\n",
            )],
            &[],
        );
        assert_eq!(
            again.unwrap().device("r1").unwrap().interfaces[0].mac,
            r1.interfaces[0].mac
        );
    }

    #[test]
    fn a_lab_that_does_not_hold_together_is_refused_by_name() {
        for (files, want) in [
            (
                vec![("lab.conf", "r1[0]=A\nr1[2]=B\n")],
                "has eth2 (lab.conf line 2) but no eth1",
            ),
            (
                vec![(
                    "lab.conf",
                    "r1[0]=A/02:00:00:00:00:01\nr2[0]=A/02:00:00:00:00:01\n",
                )],
                "same MAC",
            ),
            (
                vec![("lab.conf", "r1[0]=A\n"), ("lab.dep", "r1: r9\n")],
                "r9, which is not a device",
            ),
            (
                vec![
                    ("lab.conf", "a[0]=X\nb[0]=X\nc[0]=X\n"),
                    ("lab.dep", "a: b\nb: c\nc: a\n"),
                ],
                "cycle: a → b → c → a",
            ),
            (vec![("README", "nothing\n")], "no devices"),
        ] {
            let (_t, l) = lab(&files, &[]);
            let e = l.unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
