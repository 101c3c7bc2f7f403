//! `lab.dep`: `DEVICE: DEV2 DEV3` — DEVICE starts only once DEV2 and DEV3
//! have finished their startup scripts.

use std::collections::BTreeMap;

use crate::conf::valid_device_name;
use crate::LabError;

/// Parse lab.dep's text into DEVICE → the devices it waits for (each line
/// adds to what earlier lines said).
pub fn parse_dep(text: &str, file: &str) -> Result<BTreeMap<String, Vec<String>>, LabError> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |what: String| LabError::Syntax {
            file: file.to_string(),
            line: i + 1,
            what,
        };
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (dev, rest) = line.split_once(':').ok_or_else(|| {
            err(format!(
                "{line:?} is not a lab.dep line: expected DEVICE: DEVICE2 DEVICE3"
            ))
        })?;
        let dev = dev.trim();
        if !valid_device_name(dev) {
            return Err(err(format!("{dev:?} is not a device name")));
        }
        let on: Vec<&str> = rest.split_whitespace().collect();
        if on.is_empty() {
            return Err(err(format!(
                "{dev} waits for nothing: name the devices after the colon"
            )));
        }
        for d in on {
            if !valid_device_name(d) {
                return Err(err(format!("{d:?} is not a device name")));
            }
            if d == dev {
                return Err(err(format!("{dev} cannot wait for itself")));
            }
            let list = deps.entry(dev.to_string()).or_default();
            if !list.iter().any(|x| x == d) {
                list.push(d.to_string());
            }
        }
    }
    Ok(deps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_accumulate_and_errors_name_the_line() {
        let d = parse_dep("# order\nr1: r2 r3\nr1: r4 r2\n\npc: r1\n", "lab.dep").unwrap();
        assert_eq!(d["r1"], ["r2", "r3", "r4"]);
        assert_eq!(d["pc"], ["r1"]);
        for (t, want) in [
            ("r1 r2\n", "line 1"),
            ("r1:\n", "waits for nothing"),
            ("r1: r1\n", "itself"),
            ("\nR1: r2\n", "line 2"),
        ] {
            let e = parse_dep(t, "lab.dep").unwrap_err().to_string();
            assert!(e.contains(want), "{t:?}: {e}");
        }
    }
}
