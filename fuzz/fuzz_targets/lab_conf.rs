//! Fuzz lab.conf, lab.dep and lab.ext (a lab directory is someone else's files): no
//! input may panic; what lab.conf accepts is internally sane (device names
//! valid, interfaces below the limit, MACs unicast), and an error names a
//! line that exists.
//!
//!     cargo fuzz run lab_conf fuzz/corpus/lab_conf fuzz/seeds/lab_conf
#![no_main]

use libfuzzer_sys::fuzz_target;
use umlctl_lab::{parse_conf, parse_dep, parse_ext, LabError};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().count();
    match parse_conf(&text, "lab.conf") {
        Ok(c) => {
            for (name, d) in &c.devices {
                assert!(!name.is_empty() && name.len() <= 30);
                for (idx, i) in &d.interfaces {
                    assert!(*idx < 64);
                    assert!(!i.domain.is_empty());
                    assert!(i.line >= 1 && i.line <= lines);
                    if let Some(m) = i.mac {
                        assert_eq!(m[0] & 1, 0, "multicast MAC accepted");
                    }
                }
            }
        }
        Err(LabError::Syntax { line, .. }) => assert!(line >= 1 && line <= lines),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    match parse_dep(&text, "lab.dep") {
        Ok(d) => {
            for (k, on) in &d {
                assert!(!on.is_empty() && !on.contains(k));
            }
        }
        Err(LabError::Syntax { line, .. }) => assert!(line >= 1 && line <= lines),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
    // lab.ext: what it accepts is an interface name the kernel would
    // take (no `/`, short enough with the VLAN suffix) and a VLAN id
    // 802.1Q allows.
    match parse_ext(&text, "lab.ext") {
        Ok(v) => {
            for e in &v {
                let n = e.host_name();
                assert!(!n.is_empty() && n.len() < 16 && !n.contains('/'), "{n:?}");
                assert!(!n.chars().any(char::is_whitespace), "{n:?}");
                assert!(e.vlan.is_none_or(|id| (1..=4094).contains(&id)));
                assert!(e.line >= 1 && e.line <= lines);
            }
        }
        Err(LabError::Syntax { line, .. }) => assert!(line >= 1 && line <= lines),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
});
