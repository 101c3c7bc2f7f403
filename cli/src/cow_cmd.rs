//! `umlctl cow ...`: UML copy-on-write overlays.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use umlctl_imgtools::cow::{self, Cow, Identity};

use crate::exit;
use crate::fmt::{human, utc};
use crate::progress::bar;

#[derive(Subcommand)]
pub enum CowCmd {
    /// Create an empty overlay over BASE (like uml_mkcow: sparse and instant).
    Create(CreateArgs),
    /// Show an overlay's header, how much it holds, and whether its backing file still matches.
    Info(InfoArgs),
    /// Merge an overlay with its backing file (like uml_moo).
    Merge(MergeArgs),
    /// Point an overlay at a moved or copied backing file, after checking it is the same image.
    Rebase(RebaseArgs),
}

#[derive(Args)]
pub struct CreateArgs {
    /// The backing image (opened read-only by guests).
    #[arg(long, value_name = "BASE")]
    backing: PathBuf,
    /// The overlay file to create (must not exist).
    cow: PathBuf,
}

#[derive(Args)]
#[command(
    after_help = "Exit status: 0 when the backing file matches, 1 when it does not (the message says why and how to fix it), 125 on errors."
)]
pub struct InfoArgs {
    cow: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(
    group(clap::ArgGroup::new("mode").required(true).args(["output", "in_place"])),
    after_help = "--in-place writes only the overlay's sectors into the backing file, so a kill at any point leaves \
every other sector intact; it leaves COW.merging behind, and running the same command again finishes the merge. \
Afterwards the overlay is empty and valid for the merged backing file; other overlays on that backing file are not."
)]
pub struct MergeArgs {
    cow: PathBuf,
    /// Write the merged disk to a new sparse image.
    #[arg(short = 'o', long = "output", value_name = "NEW")]
    output: Option<PathBuf>,
    /// Write the overlay's sectors into the backing file itself.
    #[arg(long)]
    in_place: bool,
    /// With -o: replace NEW if it exists.
    #[arg(long)]
    force: bool,
    /// With --in-place: also free the overlay's old data blocks (slow on fragmented overlays;
    /// otherwise they stay allocated until the overlay is removed).
    #[arg(long, requires = "in_place")]
    reclaim: bool,
    /// With --in-place: merge only if the overlay's header names this backing file (an
    /// overlay's header decides which file an in-place merge writes to).
    #[arg(long, value_name = "IMAGE", requires = "in_place")]
    backing: Option<PathBuf>,
}

#[derive(Args)]
pub struct RebaseArgs {
    cow: PathBuf,
    /// The backing file's new location.
    #[arg(long, value_name = "NEW_PATH")]
    backing: PathBuf,
    /// Accept a backing file whose content cannot be verified (mtime changed, original gone).
    #[arg(long)]
    force: bool,
}

pub fn main(cmd: CowCmd) -> u8 {
    let r = match cmd {
        CowCmd::Create(a) => create(a),
        CowCmd::Info(a) => return info(a),
        CowCmd::Merge(a) => merge(a),
        CowCmd::Rebase(a) => rebase(a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("umlctl: {e}");
            exit::FAILURE
        }
    }
}

fn create(a: CreateArgs) -> Result<(), cow::CowError> {
    let h = cow::create(&a.cow, &a.backing)?;
    println!(
        "{}: overlay for {} ({} bytes)",
        a.cow.display(),
        h.backing.display(),
        h.size
    );
    Ok(())
}

fn info(a: InfoArgs) -> u8 {
    let c = match Cow::open(&a.cow) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("umlctl: {e}");
            return exit::FAILURE;
        }
    };
    let h = &c.header;
    let allocated = c.allocated_sectors() * cow::SECTOR;
    let on_disk = std::fs::metadata(&a.cow)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    let check = c.check_backing();
    if a.json {
        let v = serde_json::json!({
            "path": a.cow,
            "header": h,
            "bitmap_offset": h.bitmap_offset(),
            "bitmap_len": h.bitmap_len(),
            "data_offset": h.data_offset(),
            "sectors": h.sectors(),
            "allocated_sectors": c.allocated_sectors(),
            "allocated_bytes": allocated,
            "disk_usage_bytes": on_disk,
            "backing_ok": check.is_ok(),
            "backing_problem": check.as_ref().err(),
            "merge_in_progress": cow::merge_marker(&a.cow).exists(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let pct = if h.size > 0 {
            100.0 * allocated as f64 / h.size as f64
        } else {
            0.0
        };
        println!("overlay:     {}", a.cow.display());
        println!("version:     {:?}", h.version);
        println!("backing:     {}", h.backing.display());
        println!("size:        {} bytes ({})", h.size, human(h.size));
        println!("mtime:       {} ({})", h.mtime, utc(i64::from(h.mtime)));
        println!("sector size: {}, alignment {}", h.sectorsize, h.alignment);
        println!(
            "layout:      bitmap at {} ({} bytes), data at {}",
            h.bitmap_offset(),
            h.bitmap_len(),
            h.data_offset()
        );
        println!(
            "allocated:   {} sectors ({}, {pct:.2}%)",
            c.allocated_sectors(),
            human(allocated)
        );
        println!("on disk:     {}", human(on_disk));
        if cow::merge_marker(&a.cow).exists() {
            println!("merge:       an in-place merge was interrupted; run `umlctl cow merge {} --in-place` to finish it", a.cow.display());
        }
        match &check {
            Ok(()) => println!("status:      backing file matches"),
            Err(p) => println!("status:      BACKING FILE DOES NOT MATCH\n{p}"),
        }
    }
    if check.is_ok() {
        0
    } else {
        1
    }
}

fn merge(a: MergeArgs) -> Result<(), cow::CowError> {
    let progress = bar("merging");
    match (a.output, a.in_place) {
        (Some(out), false) => {
            let n = cow::merge_to(&a.cow, &out, a.force, &progress)?;
            println!(
                "{}: {} bytes merged from {}",
                out.display(),
                n,
                a.cow.display()
            );
        }
        (None, true) => {
            let n = cow::merge_in_place(&a.cow, a.reclaim, a.backing.as_deref(), &progress)?;
            println!(
                "{}: {} bytes written into the backing file; the overlay is empty again",
                a.cow.display(),
                n
            );
        }
        _ => unreachable!("clap enforces exactly one mode"),
    }
    Ok(())
}

fn rebase(a: RebaseArgs) -> Result<(), cow::CowError> {
    let progress = bar("comparing");
    let how = cow::rebase(&a.cow, &a.backing, a.force, &progress)?;
    let why = match how {
        Identity::SameStamp => "same size and mtime",
        Identity::Compared => "same size and same bytes as the original",
        Identity::Forced => "NOT verified (--force)",
    };
    println!(
        "{}: now backed by {} ({why})",
        a.cow.display(),
        a.backing.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(0x6593_7D25), "2024-01-02 03:04:05 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
