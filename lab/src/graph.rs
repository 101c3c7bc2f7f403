//! The lab's topology as a Graphviz graph: devices as boxes, collision
//! domains as ellipses, one edge per interface labelled with its name (and
//! its address when the caller knows it).

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::Lab;

/// A DOT string literal.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            '\n' => q.push_str("\\n"),
            c if c.is_control() => {}
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

impl Lab {
    /// The topology in Graphviz's DOT language. `addresses` maps
    /// `(device, interface)` to what to show beside the interface name
    /// (addresses of a running lab); it may be empty.
    pub fn dot(&self, addresses: &BTreeMap<(String, String), String>) -> String {
        let mut g = String::from("graph lab {\n");
        let title = self.meta.name.clone().unwrap_or_else(|| {
            self.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "lab".into())
        });
        let _ = writeln!(g, "  label={};\n  labelloc=t;", quote(&title));
        g.push_str(
            "  node [fontname=\"sans-serif\"];\n  edge [fontname=\"sans-serif\", fontsize=10];\n",
        );
        for d in &self.devices {
            let _ = writeln!(
                g,
                "  {} [shape=box, style=rounded];",
                quote(&format!("dev:{}", d.name))
            );
            let _ = writeln!(
                g,
                "  {} [label={}];",
                quote(&format!("dev:{}", d.name)),
                quote(&d.name)
            );
        }
        for c in &self.domains {
            let _ = writeln!(
                g,
                "  {} [shape=ellipse, style=dashed, label={}];",
                quote(&format!("cd:{}", c.name)),
                quote(&c.name)
            );
        }
        for d in &self.devices {
            for i in &d.interfaces {
                let label = match addresses.get(&(d.name.clone(), i.name.clone())) {
                    Some(a) => format!("{}\n{a}", i.name),
                    None => i.name.clone(),
                };
                let _ = writeln!(
                    g,
                    "  {} -- {} [label={}];",
                    quote(&format!("dev:{}", d.name)),
                    quote(&format!("cd:{}", i.domain)),
                    quote(&label)
                );
            }
        }
        // lab.ext: the host interfaces the domains are put on.
        for e in &self.externals {
            let node = quote(&format!("host:{}", e.host_name()));
            let _ = writeln!(
                g,
                "  {node} [shape=box, style=filled, fillcolor=lightgrey, label={}];",
                quote(&format!("host {}", e.host_name()))
            );
            let _ = writeln!(
                g,
                "  {node} -- {} [style=bold];",
                quote(&format!("cd:{}", e.domain))
            );
        }
        g.push_str("}\n");
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_interface_is_an_edge_and_names_are_quoted() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("lab.conf"),
            "LAB_NAME=\"a \\\\ lab\"\nr1[0]=A\nr1[1]=B\nr2[0]=B\n",
        )
        .unwrap();
        let lab = Lab::load(t.path()).unwrap();
        let mut addrs = BTreeMap::new();
        addrs.insert(
            ("r2".to_string(), "eth0".to_string()),
            "10.0.0.2/24".to_string(),
        );
        let dot = lab.dot(&addrs);
        assert!(dot.starts_with("graph lab {"));
        assert!(dot.contains("label=\"a \\\\\\\\ lab\""), "{dot}");
        assert!(
            dot.contains("\"dev:r1\" -- \"cd:A\" [label=\"eth0\"]"),
            "{dot}"
        );
        assert!(
            dot.contains("\"dev:r2\" -- \"cd:B\" [label=\"eth0\\n10.0.0.2/24\"]"),
            "{dot}"
        );
        assert_eq!(dot.matches(" -- ").count(), 3);
    }

    #[test]
    fn lab_ext_links_are_drawn_to_their_domains() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("lab.conf"), "r1[0]=A\nr1[1]=B\n").unwrap();
        std::fs::write(t.path().join("lab.ext"), "A enp9s0\nB enp9s0.20\n").unwrap();
        let dot = Lab::load(t.path()).unwrap().dot(&BTreeMap::new());
        assert!(dot.contains("\"host:enp9s0\" -- \"cd:A\""), "{dot}");
        assert!(dot.contains("\"host:enp9s0.20\" -- \"cd:B\""), "{dot}");
        assert!(dot.contains("label=\"host enp9s0.20\""), "{dot}");
    }
}
