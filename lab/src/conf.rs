//! `lab.conf`: `DEVICE[N]="DOMAIN[/MAC]"`, `DEVICE[OPTION]="VALUE"` and
//! `LAB_*="..."` lines, `#` comments, values quoted (`"` or `'`) or not —
//! the grammar of Kathará's own parser, with every rejected line named.

use std::collections::BTreeMap;

use crate::LabError;

/// The most interfaces one device may have (`eth0` … `eth63`).
pub const MAX_INTERFACES: u32 = 64;

/// Names a device may not have: they are the lab's own directories.
const RESERVED: &[&str] = &["shared", "_test"];

/// Options that make sense for a container, not for a UML guest: accepted
/// (Kathará's labs use them) with a warning.
const IGNORED: &[&str] = &[
    "privileged",
    "entrypoint",
    "ulimit",
    "hosthome",
    "bridged_ipv6",
];

/// The lab's metadata (`LAB_NAME`, …), shown by `lab info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LabMeta {
    /// `LAB_NAME`.
    pub name: Option<String>,
    /// `LAB_DESCRIPTION`.
    pub description: Option<String>,
    /// `LAB_VERSION`.
    pub version: Option<String>,
    /// `LAB_AUTHOR`.
    pub author: Option<String>,
    /// `LAB_EMAIL`.
    pub email: Option<String>,
    /// `LAB_WEB`.
    pub web: Option<String>,
}

/// One `DEVICE[N]=` line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IfaceConf {
    /// The collision domain.
    pub domain: String,
    /// The MAC given after `/`, if any.
    pub mac: Option<[u8; 6]>,
    /// Where it was given (1-based).
    pub line: usize,
}

/// A published port: `HOST:GUEST/PROTO` (`tcp` unless given).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Port {
    /// The host's port.
    pub host: u16,
    /// The device's port.
    pub guest: u16,
    /// `tcp` or `udp`.
    pub proto: &'static str,
}

/// A device's options.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Options {
    /// `image`: the name of the device's image (resolved by the caller).
    pub image: Option<String>,
    /// `mem`, in bytes.
    pub mem: Option<u64>,
    /// `cpus`.
    pub cpus: Option<u32>,
    /// `bridged`: an extra interface that reaches the outside through NAT.
    pub bridged: bool,
    /// `sysctl` (repeatable): `net.*` settings, `KEY=VALUE`.
    pub sysctl: Vec<String>,
    /// `env` (repeatable): `KEY=VALUE` for the startup scripts.
    pub env: Vec<String>,
    /// `exec`: a command run in the device after its startup scripts.
    pub exec: Option<String>,
    /// `shell`: the shell `lab console`/`lab exec` use.
    pub shell: Option<String>,
    /// `ipv6`.
    pub ipv6: Option<bool>,
    /// `num_terms`.
    pub num_terms: Option<u32>,
    /// `port` (repeatable).
    pub ports: Vec<Port>,
}

/// One device as lab.conf describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceConf {
    /// Interfaces by number.
    pub interfaces: BTreeMap<u32, IfaceConf>,
    /// Options.
    pub options: Options,
}

/// A parsed lab.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Conf {
    /// `LAB_*` lines.
    pub meta: LabMeta,
    /// Devices by name.
    pub devices: BTreeMap<String, DeviceConf>,
    /// What was accepted but will not be used, one line each.
    pub warnings: Vec<String>,
}

/// Whether `s` is a device name Kathará accepts: `[a-z0-9_]{1,30}`.
pub(crate) fn valid_device_name(s: &str) -> bool {
    (1..=30).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `\w+` in ASCII, at most 64 bytes (collision domains, option names).
pub(crate) fn word(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Split `VALUE` off the right of `=`: quoted with `"` or `'` (no quotes
/// inside), or bare; then nothing but an optional ` # comment`.
fn value(rest: &str) -> Result<String, String> {
    let rest = rest.trim();
    let (v, after) = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => {
            let body = &rest[1..];
            let end = body
                .find(q)
                .ok_or_else(|| format!("the value opens with {q} but never closes it"))?;
            (&body[..end], &body[end + 1..])
        }
        _ => match rest.find(" #").or_else(|| rest.find("\t#")) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        },
    };
    let after = after.trim_start();
    if !after.is_empty() && !after.starts_with('#') {
        return Err(format!(
            "unexpected {after:?} after the value (a comment starts with #)"
        ));
    }
    let v = v.trim();
    if v.is_empty() {
        return Err("the value is empty".into());
    }
    if v.contains(['"', '\'']) {
        return Err("a value may not contain quotes".into());
    }
    Ok(v.to_string())
}

/// `aa:bb:cc:dd:ee:ff`, unicast.
fn mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address (six hex pairs: 02:00:00:00:00:01)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(bad());
        }
        m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if m[0] & 1 == 1 {
        return Err(format!(
            "{s} is a multicast address; an interface needs a unicast one (first byte even)"
        ));
    }
    if m == [0; 6] {
        return Err(format!("{s} is not a usable MAC address"));
    }
    Ok(m)
}

/// Sizes as Kathará writes them: `128m`, `1G`, `512` (MiB), `256M`.
fn mem(s: &str) -> Result<u64, String> {
    let bad = || format!("mem {s:?}: expected a size like 128m or 1g");
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => return Err(bad()),
            };
            (&s[..i], m)
        }
        _ => (s, 1 << 20),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if !(32 << 20..=64 << 30).contains(&bytes) {
        return Err(format!("mem {s:?}: a device needs between 32m and 64g"));
    }
    Ok(bytes)
}

fn boolean(key: &str, s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{key} {s:?}: expected true or false")),
    }
}

fn port(s: &str) -> Result<Port, String> {
    let bad = || format!("port {s:?}: expected HOST:GUEST or HOST:GUEST/tcp|udp, e.g. 8080:80/tcp");
    let (ports, proto) = match s.split_once('/') {
        Some((p, "tcp")) => (p, "tcp"),
        Some((p, "udp")) => (p, "udp"),
        Some(_) => return Err(bad()),
        None => (s, "tcp"),
    };
    let (h, g) = ports.split_once(':').ok_or_else(bad)?;
    let host: u16 = h.parse().map_err(|_| bad())?;
    let guest: u16 = g.parse().map_err(|_| bad())?;
    if host == 0 || guest == 0 {
        return Err(bad());
    }
    Ok(Port { host, guest, proto })
}

impl Options {
    /// Apply `key = v`; `Ok(Some(warning))` for what is accepted but unused.
    fn set(&mut self, key: &str, v: String) -> Result<Option<String>, String> {
        match key {
            "image" => self.image = Some(v),
            "mem" => self.mem = Some(mem(&v)?),
            "cpus" => {
                // Kathará takes a fraction of a CPU; a guest has whole ones.
                let f: f64 = v
                    .parse()
                    .map_err(|_| format!("cpus {v:?}: expected a number such as 1 or 2"))?;
                if !(f > 0.0 && f <= 64.0) {
                    return Err(format!("cpus {v:?}: expected a number between 1 and 64"));
                }
                let whole = (1..=64u32).find(|&c| f64::from(c) >= f).unwrap_or(64);
                self.cpus = Some(whole);
                if f64::from(whole) != f {
                    return Ok(Some(format!(
                        "cpus={v}: a UML guest has whole CPUs; it gets {whole}"
                    )));
                }
            }
            "bridged" => self.bridged = boolean(key, &v)?,
            "sysctl" => {
                let (k, val) = v
                    .split_once('=')
                    .ok_or_else(|| format!("sysctl {v:?}: expected KEY=VALUE"))?;
                if !k.starts_with("net.") || k.contains(['/', ' ']) || val.is_empty() {
                    return Err(format!(
                        "sysctl {v:?}: only net.* settings may be given (e.g. net.ipv4.ip_forward=1)"
                    ));
                }
                self.sysctl.push(v);
            }
            "env" => {
                let (k, _) = v
                    .split_once('=')
                    .ok_or_else(|| format!("env {v:?}: expected KEY=VALUE"))?;
                if !word(k) {
                    return Err(format!("env {v:?}: {k:?} is not a variable name"));
                }
                self.env.push(v);
            }
            "exec" => self.exec = Some(v),
            "shell" => self.shell = Some(v),
            "ipv6" => self.ipv6 = Some(boolean(key, &v)?),
            "num_terms" => {
                self.num_terms = Some(
                    v.parse()
                        .map_err(|_| format!("num_terms {v:?}: expected a number"))?,
                )
            }
            "port" => self.ports.push(port(&v)?),
            k if IGNORED.contains(&k) => {
                return Ok(Some(format!(
                    "option {k} is for containers; a UML guest has no use for it (ignored)"
                )))
            }
            k => return Ok(Some(format!("unknown option {k} (ignored)"))),
        }
        Ok(None)
    }
}

/// Parse lab.conf's text; `file` names it in errors.
pub fn parse_conf(text: &str, file: &str) -> Result<Conf, LabError> {
    let mut conf = Conf::default();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let err = |what: String| LabError::Syntax {
            file: file.to_string(),
            line: n,
            what,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, rest)) = line.split_once('=') {
            let meta = &mut conf.meta;
            let slot = match k.trim() {
                "LAB_NAME" => Some(&mut meta.name),
                "LAB_DESCRIPTION" => Some(&mut meta.description),
                "LAB_VERSION" => Some(&mut meta.version),
                "LAB_AUTHOR" => Some(&mut meta.author),
                "LAB_EMAIL" => Some(&mut meta.email),
                "LAB_WEB" => Some(&mut meta.web),
                _ => None,
            };
            if let Some(slot) = slot {
                *slot = Some(value(rest).map_err(err)?);
                continue;
            }
        }
        let Some(open) = line.find('[') else {
            return Err(err(format!(
                "{line:?} is not a lab.conf line: expected DEVICE[N]=\"DOMAIN\", DEVICE[OPTION]=\"VALUE\" or LAB_NAME=\"...\""
            )));
        };
        let device = &line[..open];
        let Some(close) = line[open..].find(']').map(|c| open + c) else {
            return Err(err(format!("{line:?}: [ without ]")));
        };
        let arg = &line[open + 1..close];
        let Some(rest) = line[close + 1..].strip_prefix('=') else {
            return Err(err(format!("{line:?}: expected = after ]")));
        };
        if device == "CD_MODE" {
            conf.warnings.push(format!(
                "{file} line {n}: collision domain modes (CD_MODE) are not supported (ignored)"
            ));
            continue;
        }
        if !valid_device_name(device) {
            return Err(err(format!(
                "{device:?} is not a device name (1 to 30 of a-z, 0-9 and _)"
            )));
        }
        if RESERVED.contains(&device) {
            return Err(err(format!(
                "{device:?} is reserved for the lab's own directory; name the device differently"
            )));
        }
        let v = value(rest).map_err(err)?;
        let dev = conf.devices.entry(device.to_string()).or_default();
        if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_digit()) {
            let idx: u32 = arg
                .parse()
                .ok()
                .filter(|i| *i < MAX_INTERFACES)
                .ok_or_else(|| {
                    err(format!(
                        "interface {arg} of {device}: at most {MAX_INTERFACES} interfaces (0 to {})",
                        MAX_INTERFACES - 1
                    ))
                })?;
            let (domain, mac_text) = match v.split_once('/') {
                Some((d, m)) => (d, Some(m)),
                None => (v.as_str(), None),
            };
            if !word(domain) {
                return Err(err(format!(
                    "collision domain {domain:?}: use letters, digits and _ (at most 64)"
                )));
            }
            let mac = mac_text.map(mac).transpose().map_err(err)?;
            if let Some(prev) = dev.interfaces.get(&idx) {
                return Err(err(format!(
                    "{device}[{idx}] is already given on line {}",
                    prev.line
                )));
            }
            dev.interfaces.insert(
                idx,
                IfaceConf {
                    domain: domain.to_string(),
                    mac,
                    line: n,
                },
            );
        } else {
            if !word(arg) {
                return Err(err(format!("{arg:?} is not an option name")));
            }
            if let Some(w) = dev.options.set(arg, v).map_err(err)? {
                conf.warnings
                    .push(format!("{file} line {n}: {device}: {w}"));
            }
        }
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn katharas_forms_parse() {
        let c = parse_conf(
            "LAB_NAME=\"OSPF, three routers\"\nLAB_AUTHOR=someone\n\
             # a comment\n\
             r1[0]=\"A\"\n\
             r1[1]='B/02:00:00:00:01:01'   # with a MAC\n\
             r2[0]=B\n\
             r2[image]=\"kathara/frr\"\n\
             r2[mem]=128m\n\
             r2[sysctl]=\"net.ipv4.ip_forward=1\"\n\
             r2[sysctl]=\"net.ipv6.conf.all.forwarding=1\"\n\
             r2[env]=\"ROLE=core\"\n\
             r2[port]=\"8080:80/tcp\"\n\
             r2[bridged]=true\n\
             r2[privileged]=true\n",
            "lab.conf",
        )
        .unwrap();
        assert_eq!(c.meta.name.as_deref(), Some("OSPF, three routers"));
        assert_eq!(c.meta.author.as_deref(), Some("someone"));
        let r1 = &c.devices["r1"];
        assert_eq!(r1.interfaces[&0].domain, "A");
        assert_eq!(r1.interfaces[&1].mac, Some([2, 0, 0, 0, 1, 1]));
        let r2 = &c.devices["r2"].options;
        assert_eq!(r2.image.as_deref(), Some("kathara/frr"));
        assert_eq!(r2.mem, Some(128 << 20));
        assert_eq!(r2.sysctl.len(), 2);
        assert_eq!(r2.env, ["ROLE=core"]);
        assert_eq!(
            r2.ports,
            [Port {
                host: 8080,
                guest: 80,
                proto: "tcp"
            }]
        );
        assert!(r2.bridged);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("line 14") && c.warnings[0].contains("privileged"));
    }

    #[test]
    fn bad_lines_name_file_line_and_problem() {
        for (text, want) in [
            ("pc1[0]=\"A\"\nthis is not right\n", "line 2"),
            ("PC1[0]=A\n", "not a device name"),
            ("shared[0]=A\n", "reserved"),
            ("pc1[0]=\"A\n", "never closes"),
            ("pc1[0]=A-B\n", "collision domain"),
            ("pc1[0]=A/01:00:00:00:00:01\n", "multicast"),
            ("pc1[0]=A/zz\n", "not a MAC"),
            ("pc1[99]=A\n", "at most 64"),
            ("pc1[0]=A\npc1[0]=B\n", "already given on line 1"),
            ("pc1[sysctl]=kernel.panic=1\n", "only net.*"),
            ("pc1[mem]=lots\n", "size like"),
            ("pc1[port]=80\n", "HOST:GUEST"),
            ("pc1[0]=\"A\" extra\n", "after the value"),
            ("pc1[0]=\n", "empty"),
        ] {
            let e = parse_conf(text, "lab.conf").unwrap_err().to_string();
            assert!(e.starts_with("lab.conf line "), "{text:?}: {e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
