//! `lab.ext`, Kathará's "external" links: lines `DOMAIN IFACE` or
//! `DOMAIN IFACE.VLAN` put a host interface (or an 802.1Q VLAN of it,
//! made for the lab) on a collision domain, so the lab reaches a real
//! network. `#` starts a comment line; blank lines are skipped.

use crate::LabError;

/// One line of `lab.ext`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct External {
    /// The collision domain.
    pub domain: String,
    /// The host interface (the VLAN's parent when `vlan` is set).
    pub interface: String,
    /// The VLAN id (1–4094), when the line names `IFACE.VLAN`.
    pub vlan: Option<u16>,
    /// 1-based line in lab.ext.
    pub line: usize,
}

impl External {
    /// The interface put on the domain: `IFACE`, or `IFACE.VLAN`.
    pub fn host_name(&self) -> String {
        match self.vlan {
            Some(v) => format!("{}.{v}", self.interface),
            None => self.interface.clone(),
        }
    }
}

fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() < libc::IFNAMSIZ
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'@' | b':'))
}

/// Parse lab.ext's text (`file` names it in errors).
pub fn parse_ext(text: &str, file: &str) -> Result<Vec<External>, LabError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let err = |what: String| LabError::Syntax {
            file: file.to_string(),
            line,
            what,
        };
        let words: Vec<&str> = l.split_whitespace().collect();
        let [domain, iface] = words[..] else {
            return Err(err(format!(
                "{l:?}: expected `DOMAIN INTERFACE` or `DOMAIN INTERFACE.VLAN` (e.g. `A enp9s0.20`)"
            )));
        };
        if !crate::conf::word(domain) {
            return Err(err(format!("{domain:?} is not a collision domain name")));
        }
        let (name, vlan) = match iface.rsplit_once('.') {
            Some((n, v)) => {
                let id: u16 = v
                    .parse()
                    .ok()
                    .filter(|id| (1..=4094).contains(id))
                    .ok_or_else(|| {
                        err(format!(
                            "{iface}: the VLAN id after the dot must be a number from 1 to 4094"
                        ))
                    })?;
                (n, Some(id))
            }
            None => (iface, None),
        };
        if !ifname_ok(name) || iface.len() >= libc::IFNAMSIZ {
            return Err(err(format!(
                "{iface:?} is not a host interface name (letters, digits, `_`, `-`, at most {} characters with the VLAN suffix)",
                libc::IFNAMSIZ - 1
            )));
        }
        out.push(External {
            domain: domain.to_string(),
            interface: name.to_string(),
            vlan,
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn katharas_forms_parse() {
        let e = parse_ext("# external\nA enp9s0\n\nB  enp9s0.20 \n", "lab.ext").unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].host_name(), "enp9s0");
        assert_eq!((e[0].vlan, e[0].line), (None, 2));
        assert_eq!(e[1].host_name(), "enp9s0.20");
        assert_eq!((e[1].interface.as_str(), e[1].vlan), ("enp9s0", Some(20)));
    }

    #[test]
    fn bad_lines_name_the_line_and_the_problem() {
        for (text, want) in [
            ("A\n", "expected `DOMAIN INTERFACE`"),
            ("A eth0 eth1\n", "expected"),
            ("A eth0.0\n", "1 to 4094"),
            ("A eth0.4095\n", "1 to 4094"),
            ("A eth0.x\n", "1 to 4094"),
            ("A et/c\n", "not a host interface name"),
            ("A ../etc\n", "1 to 4094"),
            ("A averyveryverylongname0\n", "not a host interface name"),
            ("A enp0s31f6.1000x\n", "1 to 4094"),
            ("A enp0s31f6ab.1000\n", "not a host interface name"),
        ] {
            let e = parse_ext(&format!("# c\n{text}"), "lab.ext")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("lab.ext line 2: "), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
