//! `umlctl image ...`: build, verify and read ext4 root filesystem images.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use umlctl_imgtools::build::{self, BuildOptions};
use umlctl_imgtools::disk::{Disk, ViewDisk};
use umlctl_imgtools::ext4::read::{Image, ReadError};
use umlctl_imgtools::ext4::{Headroom, Options};
use umlctl_imgtools::manifest::{compare, Manifest};
use umlctl_imgtools::verify;

use crate::exit;
use crate::fmt::{human, utc};
use crate::progress::bar;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Build an ext4 image from tar archives and directories (layered in order).
    Build(BuildArgs),
    /// Check an image's structure and, with --manifest, every entry against a manifest.
    Verify(VerifyArgs),
    /// Print the manifest of an image (every path, its metadata and content digest).
    Manifest(ManifestArgs),
    /// Show an image's label, UUID, size, features and usage.
    Info(InfoArgs),
    /// List a directory of an image.
    Ls(LsArgs),
    /// Write a file of an image to stdout.
    Cat(CatArgs),
    /// Copy a file or directory tree out of an image.
    Extract(ExtractArgs),
    /// Compare two images (or manifests) entry by entry.
    Diff(DiffArgs),
}

const IMG_HELP: &str =
    "IMG is an image file or a UML COW overlay; an overlay is read merged with its backing \
file, as the guest sees the disk now.";

#[derive(Args)]
#[command(
    after_help = "Exit status: 0 when the image is sound (and matches the manifest), 1 when it is not \
(each problem is listed), 125 when it cannot be read at all."
)]
pub struct VerifyArgs {
    /// Image file or COW overlay.
    img: PathBuf,
    /// Compare every entry with this manifest (from `image build --manifest` or `image manifest`).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_help = IMG_HELP)]
pub struct ManifestArgs {
    img: PathBuf,
    /// Write to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Args)]
#[command(after_help = IMG_HELP)]
pub struct InfoArgs {
    img: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_help = IMG_HELP)]
pub struct LsArgs {
    img: PathBuf,
    /// Directory in the image.
    #[arg(default_value = "/")]
    path: String,
    /// Long format: mode, owner, size, mtime, name (-> target).
    #[arg(short = 'l')]
    long: bool,
}

#[derive(Args)]
#[command(after_help = IMG_HELP)]
pub struct CatArgs {
    img: PathBuf,
    /// File in the image (symlinks are followed).
    path: String,
}

#[derive(Args)]
#[command(
    after_help = "IMG is an image file or a UML COW overlay. A file is written to DEST (or into DEST \
when it is a directory); a directory is copied to DEST, which must not exist yet. Modes and times are kept; \
owners, device nodes and attributes other than user.* only when run as root."
)]
pub struct ExtractArgs {
    img: PathBuf,
    /// File or directory in the image.
    path: String,
    /// Where to put it on the host.
    dest: PathBuf,
}

#[derive(Args)]
#[command(
    after_help = "A and B are images, COW overlays or manifest files (JSON). Exit status: 0 when they \
hold the same entries, 1 when they differ, 125 on errors."
)]
pub struct DiffArgs {
    a: PathBuf,
    b: PathBuf,
    /// Print the differences as JSON.
    #[arg(long)]
    json: bool,
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
    /// Owner of every entry read from a directory source (e.g. 0:0 to build a
    /// root filesystem as an ordinary user); tar entries keep their owners.
    #[arg(long, value_name = "UID:GID")]
    dir_owner: Option<String>,
    /// Include an empty journal (default: none).
    #[arg(long)]
    journal: bool,
    /// Also write the manifest of the sources to FILE.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Directories and tar archives (plain, gzip, zstd), layered in order;
    /// `-` is a tar on standard input.
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<PathBuf>,
}

pub fn main(cmd: ImageCmd) -> u8 {
    let r = match cmd {
        ImageCmd::Build(a) => build_cmd(a),
        ImageCmd::Verify(a) => verify_cmd(a),
        ImageCmd::Manifest(a) => manifest_cmd(a),
        ImageCmd::Info(a) => info_cmd(a),
        ImageCmd::Ls(a) => ls_cmd(a),
        ImageCmd::Cat(a) => cat_cmd(a),
        ImageCmd::Extract(a) => extract_cmd(a),
        ImageCmd::Diff(a) => diff_cmd(a),
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
pub(crate) fn write_atomic(path: &Path, text: &[u8]) -> Result<(), String> {
    let f = build::AtomicFile::new(path).map_err(|e| format!("{}: create: {e}", path.display()))?;
    (&mut f.file())
        .write_all(text)
        .map_err(|e| format!("{}: write: {e}", path.display()))?;
    f.commit()
        .map_err(|e| format!("{}: move into place: {e}", path.display()))
}

/// `UID:GID`, both numeric: an image's owners are numbers, and the names a
/// host gives them need not be the guest's.
fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let bad = || {
        format!("invalid --dir-owner {s:?}: expected numeric UID:GID, for example 0:0 (names are not looked up: the guest's users are not the host's)")
    };
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

fn build_cmd(a: BuildArgs) -> Result<u8, String> {
    if a.sources.iter().filter(|p| *p == Path::new("-")).count() > 1 {
        return Err("`-` (standard input) can be given as a source only once".into());
    }
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
        if !(0..=i64::from(i32::MAX)).contains(&e) {
            return Err(format!(
                "invalid --epoch {e}: it must lie between 0 and 2147483647 (2038-01-19)"
            ));
        }
    }
    let dir_owner = a.dir_owner.as_deref().map(parse_owner).transpose()?;
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
        dir_owner,
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
    // With `-o -` the image itself is on stdout: the summary goes to stderr.
    let to_stdout = a.output == Path::new("-");
    let say = |line: String| {
        if to_stdout {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
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
        say(serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        let used = (built.report.blocks - built.report.free_blocks) * 4096;
        say(format!(
            "{}: {} ext4 image, {} entries, {} of content, {} used, uuid {}",
            a.output.display(),
            human(built.report.size),
            entries,
            human(content),
            human(used),
            build::uuid_string(&built.uuid)
        ));
    }
    Ok(0)
}

fn load_manifest(path: &std::path::Path) -> Result<Manifest, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("{}: read manifest: {e}", path.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a umlctl manifest: {e}", path.display()))
}

type Img = Image<Disk>;

fn open_image(path: &Path) -> Result<Img, String> {
    let disk = Disk::open(path).map_err(|e| e.to_string())?;
    Image::open(disk).map_err(|e| format!("{}: {e}", path.display()))
}

fn view(path: &Path) -> Result<ext4_view::Ext4, String> {
    // Our reader checks the superblock's geometry first: ext4-view sizes
    // its block cache from it (a crafted block size of 1 GiB aborted umlctl).
    open_image(path)?;
    let disk = Disk::open(path).map_err(|e| e.to_string())?;
    ext4_view::Ext4::load(Box::new(ViewDisk(Arc::new(disk))))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn abs(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

fn verify_cmd(a: VerifyArgs) -> Result<u8, String> {
    let start = std::time::Instant::now();
    let expected = a.manifest.as_deref().map(load_manifest).transpose()?;
    let img = open_image(&a.img)?;
    let err = |e: ReadError| format!("{}: {e}", a.img.display());
    let w = verify::walk(&img).map_err(err)?;
    let mut problems = verify::check(&img, &w).map_err(err)?;
    let mut differences = Vec::new();
    let mut content = 0u64;
    if let Some(m) = &expected {
        if !m.digest_ok() {
            problems.push(format!(
                "{}: the manifest's digest does not match its entries (it was edited or damaged)",
                a.manifest.as_deref().unwrap_or(Path::new("")).display()
            ));
        }
        let actual = verify::manifest(&img, &w, true).map_err(err)?;
        content = actual
            .entries
            .iter()
            .filter(|e| e.kind == "file")
            .map(|e| e.size)
            .sum();
        differences = compare(m, &actual);
    }
    let ok = problems.is_empty() && differences.is_empty();
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "image": a.img,
            "ok": ok,
            "entries": w.entries.len(),
            "content_bytes": content,
            "seconds": secs,
            "problems": problems,
            "differences": differences,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for p in &problems {
            println!("problem: {p}");
        }
        for d in &differences {
            println!("differs: {d}");
        }
        if img.sb.compat & 0x10 != 0 {
            println!("note: block ownership not checked (resize_inode images keep reserved descriptor blocks)");
        }
        let what = if expected.is_some() {
            "structure and manifest"
        } else {
            "structure"
        };
        if ok {
            println!(
                "{}: {what} OK ({} entries{})",
                a.img.display(),
                w.entries.len(),
                if expected.is_some() {
                    format!(", {} of content checked", human(content))
                } else {
                    String::new()
                }
            );
        } else if expected.is_some() {
            println!(
                "{}: {} problem(s), {} difference(s) from the manifest",
                a.img.display(),
                problems.len(),
                differences.len()
            );
        } else {
            println!("{}: {} problem(s)", a.img.display(), problems.len());
        }
    }
    Ok(if ok { 0 } else { exit::CHECK_FAILED })
}

fn image_manifest(path: &Path) -> Result<Manifest, String> {
    let img = open_image(path)?;
    let err = |e: ReadError| format!("{}: {e}", path.display());
    let w = verify::walk(&img).map_err(err)?;
    verify::manifest(&img, &w, true).map_err(err)
}

fn manifest_cmd(a: ManifestArgs) -> Result<u8, String> {
    let m = image_manifest(&a.img)?;
    let text = serde_json::to_vec_pretty(&m).map_err(|e| e.to_string())?;
    match &a.output {
        Some(p) => write_atomic(p, &text)?,
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&text)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(|e| format!("stdout: {e}"))?;
        }
    }
    Ok(0)
}

fn info_cmd(a: InfoArgs) -> Result<u8, String> {
    let img = open_image(&a.img)?;
    let sb = &img.sb;
    let bs = u64::from(sb.block_size);
    let uuid = build::uuid_string(&sb.uuid);
    let used_blocks = sb.blocks - sb.free_blocks;
    let used_inodes = sb.inodes - sb.free_inodes;
    let overlay = img.reader().overlay().map(|c| c.header.backing.clone());
    if a.json {
        let v = serde_json::json!({
            "image": a.img,
            "overlay_of": overlay,
            "label": sb.label,
            "uuid": uuid,
            "size": sb.blocks * bs,
            "block_size": bs,
            "blocks": sb.blocks,
            "free_blocks": sb.free_blocks,
            "inodes": sb.inodes,
            "free_inodes": sb.free_inodes,
            "features": sb.feature_names(),
            "created": sb.mkfs_time,
            "written": sb.write_time,
            "clean": sb.state & 1 != 0,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("image:    {}", a.img.display());
        if let Some(b) = overlay {
            println!("overlay:  read merged with {}", b.display());
        }
        println!(
            "label:    {}",
            if sb.label.is_empty() {
                "(none)"
            } else {
                &sb.label
            }
        );
        println!("uuid:     {uuid}");
        println!(
            "size:     {} ({} blocks of {bs})",
            human(sb.blocks * bs),
            sb.blocks
        );
        println!(
            "used:     {} of blocks, {} free",
            human(used_blocks * bs),
            human(sb.free_blocks * bs)
        );
        println!("inodes:   {used_inodes} used of {}", sb.inodes);
        println!("features: {}", sb.feature_names().join(" "));
        println!("created:  {}", utc(i64::from(sb.mkfs_time)));
        println!(
            "state:    {}",
            if sb.state & 1 != 0 {
                "clean"
            } else {
                "not clean (mounted, or needs e2fsck)"
            }
        );
    }
    Ok(0)
}

fn type_char(t: ext4_view::FileType) -> char {
    if t.is_dir() {
        'd'
    } else if t.is_symlink() {
        'l'
    } else if t.is_char_dev() {
        'c'
    } else if t.is_block_dev() {
        'b'
    } else if t.is_fifo() {
        'p'
    } else if t.is_socket() {
        's'
    } else {
        '-'
    }
}

fn mode_string(t: ext4_view::FileType, mode: u16) -> String {
    let mut s = String::new();
    s.push(type_char(t));
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o40, 'r'),
        (0o20, 'w'),
        (0o10, 'x'),
        (0o4, 'r'),
        (0o2, 'w'),
        (0o1, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        s.push(match (special, set, i) {
            (true, true, 8) => 't',
            (true, false, 8) => 'T',
            (true, true, _) => 's',
            (true, false, _) => 'S',
            (false, true, _) => *c,
            (false, false, _) => '-',
        });
    }
    s
}

fn ls_cmd(a: LsArgs) -> Result<u8, String> {
    let fs = view(&a.img)?;
    let path = abs(&a.path);
    let err = |e: ext4_view::Ext4Error| format!("{}:{path}: {e}", a.img.display());
    let md = fs.symlink_metadata(path.as_str()).map_err(err)?;
    // (name, metadata with -l, symlink target with -l)
    type Row = (Vec<u8>, Option<ext4_view::Metadata>, Option<Vec<u8>>);
    let mut rows: Vec<Row> = Vec::new();
    if md.is_dir() {
        for e in fs.read_dir(path.as_str()).map_err(err)? {
            let e = e.map_err(err)?;
            let name = e.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let m = if a.long {
                Some(e.metadata().map_err(err)?)
            } else {
                None
            };
            let target = match &m {
                Some(m) if m.is_symlink() => {
                    Some(fs.read_link(&e.path()).map_err(err)?.as_ref().to_vec())
                }
                _ => None,
            };
            rows.push((name, m, target));
        }
        rows.sort_by(|x, y| x.0.cmp(&y.0));
    } else {
        let target = if md.is_symlink() {
            Some(fs.read_link(path.as_str()).map_err(err)?.as_ref().to_vec())
        } else {
            None
        };
        rows.push((path.as_bytes().to_vec(), Some(md), target));
    }
    let mut out = std::io::stdout().lock();
    for (name, m, target) in rows {
        let mut line = Vec::new();
        if let (true, Some(m)) = (a.long, m) {
            let t = m.modified();
            line.extend_from_slice(
                format!(
                    "{} {:>6} {:>6} {:>12} {} ",
                    mode_string(m.file_type(), m.mode()),
                    m.uid(),
                    m.gid(),
                    m.len(),
                    utc(t.seconds())
                )
                .as_bytes(),
            );
        }
        line.extend_from_slice(&name);
        if let (true, Some(t)) = (a.long, target) {
            line.extend_from_slice(b" -> ");
            line.extend_from_slice(&t);
        }
        line.push(b'\n');
        if out.write_all(&line).is_err() {
            return Ok(0);
        }
    }
    Ok(0)
}

fn cat_cmd(a: CatArgs) -> Result<u8, String> {
    // Our own reader: it follows symlinks inside the image and reads
    // unwritten (preallocated) extents as zeros, as the kernel does.
    let img = open_image(&a.img)?;
    let path = abs(&a.path);
    let at = |e: String| format!("{}:{path}: {e}", a.img.display());
    let node = img
        .resolve(path.as_bytes())
        .map_err(|e| at(e.to_string()))?
        .ok_or_else(|| at("no such file in the image".into()))?;
    if node.is_dir() {
        return Err(at("is a directory (`umlctl image ls` lists it)".into()));
    }
    if !node.is_reg() {
        return Err(at(format!("is a {}, not a regular file", node.kind_name())));
    }
    let mut out = std::io::stdout().lock();
    match umlctl_imgtools::extract::write_content(&img, &node, &mut out, Path::new(&path)) {
        Ok(_) => Ok(0),
        Err(umlctl_imgtools::extract::ExtractError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(0)
        }
        Err(e) => Err(format!("{}: {e}", a.img.display())),
    }
}

fn extract_cmd(a: ExtractArgs) -> Result<u8, String> {
    let img = open_image(&a.img)?;
    let rel = a.path.trim_start_matches('/').as_bytes().to_vec();
    let err = |e: ReadError| format!("{}: {e}", a.img.display());
    let node = img.lookup(&rel).map_err(err)?.ok_or_else(|| {
        format!(
            "{}: {} does not exist in the image",
            a.img.display(),
            abs(&a.path)
        )
    })?;
    let mut dest = a.dest.clone();
    if !node.is_dir() && dest.is_dir() {
        let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(b"file");
        dest.push(std::ffi::OsStr::from_bytes(name));
    } else if node.is_dir() && dest.exists() {
        return Err(format!(
            "{}: already exists; give a new directory to extract {} into",
            dest.display(),
            abs(&a.path)
        ));
    }
    use umlctl_imgtools::extract::{extract, write_content, ExtractOptions};
    let opts = ExtractOptions {
        privileged: unsafe_is_root(),
    };
    let done = match std::fs::metadata(&dest) {
        // One file onto an existing path: a regular file is replaced whole
        // (extracted next to it, then renamed over it); a FIFO, a device or
        // a terminal is written in place, holes as zeros.
        Ok(m) if node.is_reg() && !m.is_dir() => {
            if !m.is_file() {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&dest)
                    .map_err(|e| format!("{}: open: {e}", dest.display()))?;
                write_content(&img, &node, &mut f, &dest).map_err(|e| e.to_string())?;
                return Ok(0);
            }
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(dest.file_name().unwrap_or_default());
            tmp_name.push(format!(".umlctl-tmp.{}", std::process::id()));
            let tmp = dest.with_file_name(tmp_name);
            let done = extract(&img, &node, &tmp, opts).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &dest).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("{}: replace: {e}", dest.display())
            })?;
            done
        }
        Ok(_) => {
            return Err(format!(
                "{}: already exists; give a path that does not exist yet",
                dest.display()
            ))
        }
        Err(_) => extract(&img, &node, &dest, opts).map_err(|e| e.to_string())?,
    };
    for w in &done.warnings {
        eprintln!("umlctl: warning: {w}");
    }
    Ok(if done.warnings.is_empty() {
        0
    } else {
        exit::CHECK_FAILED
    })
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn load_any(p: &Path) -> Result<Manifest, String> {
    let mut head = [0u8; 1];
    let mut f = std::fs::File::open(p).map_err(|e| format!("{}: open: {e}", p.display()))?;
    let n = std::io::Read::read(&mut f, &mut head)
        .map_err(|e| format!("{}: read: {e}", p.display()))?;
    if n == 1 && head[0] == b'{' {
        load_manifest(p)
    } else {
        image_manifest(p)
    }
}

fn diff_cmd(a: DiffArgs) -> Result<u8, String> {
    let x = load_any(&a.a)?;
    let y = load_any(&a.b)?;
    let d = compare(&x, &y);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
    } else {
        for diff in &d {
            println!("{diff}");
        }
    }
    Ok(if d.is_empty() { 0 } else { exit::CHECK_FAILED })
}
