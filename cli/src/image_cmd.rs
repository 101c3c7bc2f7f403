//! `umlctl image ...`: build, verify and read ext4 root filesystem images.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use umlctl_imgtools::build::{self, BuildOptions};
use umlctl_imgtools::ext4::{Headroom, Options};
use umlctl_imgtools::manifest::Manifest;

use crate::exit;
use crate::fmt::human;
use crate::progress::bar;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build an ext4 image from tar archives and directories (layered in order).
    Build(BuildArgs),
}

#[derive(Args)]
#[command(
    after_help = "SOURCE is a directory or a tar archive (plain, gzip or zstd). Several sources are \
layered in order: later entries replace earlier ones, and OCI whiteouts (.wh.NAME, .wh..wh..opq) remove \
entries of earlier sources. The same sources and options always give the same bytes."
)]
pub struct BuildArgs {
    /// The image to create (replaced if it exists; appears only when complete).
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
    /// Image size (e.g. 512M, 2G); default: the content plus --headroom.
    #[arg(long, value_name = "SIZE")]
    size: Option<String>,
    /// Free space of an automatically sized image: a percentage (10%) or a size (64M).
    #[arg(
        long,
        value_name = "PCT|SIZE",
        default_value = "10%",
        conflicts_with = "size"
    )]
    headroom: String,
    /// Number of inodes (default: what the sources need plus headroom; one per 16 KiB with --size).
    #[arg(long, value_name = "N")]
    inodes: Option<u64>,
    /// Volume label (at most 16 bytes).
    #[arg(long, default_value = "")]
    label: String,
    /// Fixed filesystem UUID (default: derived from the sources and options).
    #[arg(long)]
    uuid: Option<String>,
    /// Clamp every newer timestamp to SECS and use it for the superblock times.
    #[arg(long, value_name = "SECS", env = "SOURCE_DATE_EPOCH")]
    epoch: Option<i64>,
    /// Include an empty journal (default: none).
    #[arg(long)]
    journal: bool,
    /// Also write the manifest of the sources to FILE.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Directories and tar archives, layered in order.
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<PathBuf>,
}

pub fn main(cmd: ImageCmd) -> u8 {
    let r = match cmd {
        ImageCmd::Build(a) => build_cmd(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("umlctl: {e}");
            exit::FAILURE
        }
    }
}

fn parse_headroom(s: &str) -> Result<Headroom, String> {
    if let Some(p) = s.strip_suffix('%') {
        return p.trim().parse().map(Headroom::Percent).map_err(|_| {
            format!("invalid --headroom {s:?}: expected a percentage like 10% or a size like 64M")
        });
    }
    umlctl_kernel::cmdline::parse_size(s)
        .map(Headroom::Bytes)
        .map_err(|e| e.to_string())
}

/// Write `text` to `path` so that it appears complete or not at all.
fn write_atomic(path: &std::path::Path, text: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let f = build::AtomicFile::new(path).map_err(|e| format!("{}: create: {e}", path.display()))?;
    (&mut f.file())
        .write_all(text)
        .map_err(|e| format!("{}: write: {e}", path.display()))?;
    f.commit()
        .map_err(|e| format!("{}: move into place: {e}", path.display()))
}

fn build_cmd(a: BuildArgs) -> Result<u8, String> {
    let size = a
        .size
        .as_deref()
        .map(umlctl_kernel::cmdline::parse_size)
        .transpose()
        .map_err(|e| e.to_string())?;
    let uuid = match &a.uuid {
        Some(u) => Some(build::parse_uuid(u).ok_or_else(|| {
            format!("invalid --uuid {u:?}: expected the form 01234567-89ab-cdef-0123-456789abcdef")
        })?),
        None => None,
    };
    if let Some(e) = a.epoch {
        if !(0..=i32::MAX as i64).contains(&e) {
            return Err(format!(
                "invalid --epoch {e}: it must lie between 0 and 2147483647 (2038-01-19)"
            ));
        }
    }
    let opts = BuildOptions {
        ext4: Options {
            size,
            headroom: parse_headroom(&a.headroom)?,
            inodes: a.inodes,
            label: a.label.as_bytes().to_vec(),
            journal: a.journal,
        },
        uuid,
        epoch: a.epoch,
    };
    let read_bar = bar("reading");
    let write_bar = bar("writing");
    let built = build::build(&a.sources, &a.output, &opts, &read_bar, &write_bar)
        .map_err(|e| e.to_string())?;
    if let Some(m) = &a.manifest {
        let text = serde_json::to_vec_pretty(&built.manifest).map_err(|e| e.to_string())?;
        write_atomic(m, &text)?;
    }
    let entries = built.manifest.entries.len();
    let content: u64 = built
        .manifest
        .entries
        .iter()
        .filter(|e| e.kind == "file")
        .map(|e| e.size)
        .sum();
    if a.json {
        let v = serde_json::json!({
            "image": a.output,
            "uuid": build::uuid_string(&built.uuid),
            "label": a.label,
            "size": built.report.size,
            "blocks": built.report.blocks,
            "free_blocks": built.report.free_blocks,
            "inodes": built.report.inodes,
            "free_inodes": built.report.free_inodes,
            "journal_blocks": built.report.journal_blocks,
            "entries": entries,
            "content_bytes": content,
            "manifest_digest": built.manifest.digest,
            "manifest": a.manifest,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let used = (built.report.blocks - built.report.free_blocks) * 4096;
        println!(
            "{}: {} ext4 image, {} entries, {} of content, {} used, uuid {}",
            a.output.display(),
            human(built.report.size),
            entries,
            human(content),
            human(used),
            build::uuid_string(&built.uuid)
        );
    }
    Ok(0)
}

#[allow(dead_code)]
fn load_manifest(path: &std::path::Path) -> Result<Manifest, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("{}: read manifest: {e}", path.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a umlctl manifest: {e}", path.display()))
}
