//! `umlctl lab`: Kathará/Netkit lab directories (the plan and its picture;
//! starting labs builds on these).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{Args, Subcommand};
use umlctl_lab::Lab;

use crate::exit;

/// `umlctl lab …`
#[derive(Subcommand)]
pub enum LabCmd {
    /// Check a lab and show its plan: devices, interfaces and MACs, collision domains, start order.
    Info(InfoArgs),
    /// Draw the lab's topology with Graphviz (DOT, SVG or PNG, by the output's extension).
    Graph(GraphArgs),
}

/// The lab directory, as every `lab` subcommand takes it.
#[derive(Args)]
pub struct LabDir {
    /// The lab directory (default: the current directory).
    #[arg(
        short = 'd',
        long = "directory",
        value_name = "DIR",
        default_value = "."
    )]
    dir: PathBuf,
}

/// `lab info`
#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    lab: LabDir,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// `lab graph`
#[derive(Args)]
pub struct GraphArgs {
    #[command(flatten)]
    lab: LabDir,
    /// Write here: FILE.dot (DOT), FILE.svg, FILE.png or FILE.pdf (drawn by Graphviz's `dot`);
    /// default: DOT on stdout. A FILE that is not a regular file (/dev/null, a FIFO) is written in place.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// The format, when FILE's extension does not say it: dot, svg, png or pdf.
    #[arg(long, value_name = "FORMAT", value_parser = ["dot", "svg", "png", "pdf"])]
    format: Option<String>,
}

/// Run a `lab` subcommand.
pub fn main(cmd: LabCmd) -> u8 {
    let r = match cmd {
        LabCmd::Info(a) => info(&a),
        LabCmd::Graph(a) => graph(&a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umlctl: {e}");
            exit::FAILURE
        }
    }
}

fn load(dir: &Path) -> Result<Lab, String> {
    let lab = Lab::load(dir).map_err(|e| format!("lab {}: {e}", dir.display()))?;
    for w in &lab.warnings {
        eprintln!("umlctl: warning: {w}");
    }
    Ok(lab)
}

fn info(a: &InfoArgs) -> Result<(), String> {
    let lab = load(&a.lab.dir)?;
    if a.json {
        let text = serde_json::to_string_pretty(&lab).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    let m = &lab.meta;
    println!(
        "lab {}{}",
        m.name.as_deref().unwrap_or("(no LAB_NAME)"),
        m.description
            .as_deref()
            .map(|d| format!(" — {d}"))
            .unwrap_or_default()
    );
    for (k, v) in [
        ("version", &m.version),
        ("author", &m.author),
        ("email", &m.email),
        ("web", &m.web),
    ] {
        if let Some(v) = v {
            println!("  {k}: {v}");
        }
    }
    println!("devices:");
    for d in &lab.devices {
        let mut extra = Vec::new();
        if let Some(i) = &d.options.image {
            extra.push(format!("image {i}"));
        }
        if d.options.bridged {
            extra.push("bridged".into());
        }
        if d.startup {
            extra.push("startup".into());
        }
        if d.tree {
            extra.push(format!("{}/ tree", d.name));
        }
        if !d.after.is_empty() {
            extra.push(format!("after {}", d.after.join(" ")));
        }
        println!(
            "  {}{}",
            d.name,
            if extra.is_empty() {
                String::new()
            } else {
                format!(" ({})", extra.join(", "))
            }
        );
        for i in &d.interfaces {
            println!("    {} {} on {}", i.name, i.mac, i.domain);
        }
    }
    println!("collision domains:");
    for c in &lab.domains {
        let members: Vec<String> = c.members.iter().map(|(d, i)| format!("{d}.{i}")).collect();
        println!("  {}: {}", c.name, members.join(" "));
    }
    println!("start order:");
    for (n, w) in lab.waves.iter().enumerate() {
        println!("  {}. {}", n + 1, w.join(" "));
    }
    if lab.shared {
        println!("shared/ is mounted at /shared in every device");
    }
    Ok(())
}

fn graph(a: &GraphArgs) -> Result<(), String> {
    let lab = load(&a.lab.dir)?;
    let dot = lab.dot(&BTreeMap::new());
    let Some(out) = &a.output else {
        return match a.format.as_deref() {
            None | Some("dot") => {
                print!("{dot}");
                Ok(())
            }
            Some(f) => std::io::stdout()
                .write_all(&render(&dot, f)?)
                .map_err(|e| format!("write stdout: {e}")),
        };
    };
    let ext = out.extension().and_then(|e| e.to_str());
    let format = match (a.format.as_deref(), ext) {
        (Some("dot"), _) | (None, Some("dot" | "gv")) => None,
        (Some(f), _) => Some(f),
        (None, Some(f @ ("svg" | "png" | "pdf"))) => Some(f),
        (None, _) => {
            return Err(format!(
                "{}: name the output FILE.dot, FILE.svg, FILE.png or FILE.pdf, or give --format",
                out.display()
            ))
        }
    };
    let bytes = match format {
        None => dot.into_bytes(),
        Some(f) => render(&dot, f)?,
    };
    crate::image_cmd::write_atomic(out, &bytes)
}

/// Graphviz's `dot -T FORMAT`, fed the graph on stdin.
fn render(dot: &str, format: &str) -> Result<Vec<u8>, String> {
    let mut child = Command::new("dot")
        .arg(format!("-T{format}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "run Graphviz's dot: {e} (install it: apt-get install graphviz; or write FILE.dot)"
            )
        })?;
    let mut stdin = child.stdin.take().ok_or("dot: no stdin")?;
    let text = dot.to_string();
    let w = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().map_err(|e| format!("dot: {e}"))?;
    let _ = w.join();
    if !out.status.success() {
        return Err(format!(
            "Graphviz's dot failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}
