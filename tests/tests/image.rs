//! `umlctl image ...` end to end: images built by our ext4 writer checked by
//! independent oracles (e2fsck -fn, a loop mount by the host kernel,
//! debugfs, a UML guest booting the image), determinism, bad input, and
//! reading images (also through COW overlays).

mod common;

use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn umlctl_os<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(args: I) -> Output {
    Command::new(umlctl_bin())
        .args(args)
        .output()
        .expect("run umlctl")
}

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the image tests run as root (loop mounts, mknod, chown)"
    );
}

fn tool(name: &str, pkg: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "{name} is missing: apt-get install {pkg}");
}

fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fsck_clean(img: &Path) {
    tool("e2fsck", "e2fsprogs");
    let out = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {} is not clean:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mount `img` read-only and return a listing of everything under it with
/// type, mode, owner, size, mtime (ns), link target, device, xattrs and
/// content digest, in a form comparable with the same listing of a source
/// directory.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(img: &Path, at: &Path) -> Mounted {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(img)
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "loop mount of {} failed", img.display());
        Mounted {
            dir: at.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// `find`-based listing (the host's view, independent of umlctl).
fn listing(root: &Path, skip_lost_found: bool) -> String {
    tool("getfattr", "attr");
    let script = format!(
        r#"cd '{}' && find . -mindepth 1 {} ! -type d -printf '%p %y %m %U %G %s %T@ %l %n\n' | LC_ALL=C sort;
           find . -mindepth 1 -type d -printf '%p %y %m %U %G %T@ %n\n' | grep -v '^./lost+found ' | LC_ALL=C sort;
           find . -mindepth 1 {} \( -type c -o -type b \) -exec stat -c '%n %t:%T' {{}} + | LC_ALL=C sort;
           find . -mindepth 1 {} -type f -exec sha256sum {{}} + | LC_ALL=C sort -k2;
           getfattr -R -P -h -d -m - --absolute-names . 2>/dev/null | grep -v '^$' || true"#,
        root.display(),
        if skip_lost_found {
            "-path ./lost+found -prune -o"
        } else {
            ""
        },
        if skip_lost_found {
            "-path ./lost+found -prune -o"
        } else {
            ""
        },
        if skip_lost_found {
            "-path ./lost+found -prune -o"
        } else {
            ""
        },
    );
    sh(&script).replace("-prune", "")
}

/// Compare two listings, showing only the lines that differ.
fn same_listing(a: &str, b: &str, what: &str) {
    let mut sa: Vec<&str> = a.lines().collect();
    let mut sb: Vec<&str> = b.lines().collect();
    sa.sort_unstable();
    sb.sort_unstable();
    if sa == sb {
        return;
    }
    let la: std::collections::BTreeSet<&str> = a.lines().collect();
    let lb: std::collections::BTreeSet<&str> = b.lines().collect();
    let only_a: Vec<&&str> = la.difference(&lb).take(15).collect();
    let only_b: Vec<&&str> = lb.difference(&la).take(15).collect();
    panic!("{what}: the mounted image differs from the source\nonly in the source: {only_a:#?}\nonly in the image: {only_b:#?}");
}

/// A tree with every kind of entry a root filesystem has.
fn rich_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/sub")).unwrap();
    fs::create_dir_all(root.join("big dir")).unwrap();
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::hard_link(root.join("etc/passwd"), root.join("etc/sub/hard")).unwrap();
    symlink("passwd", root.join("etc/fast")).unwrap();
    symlink("x".repeat(300), root.join("etc/slow")).unwrap();
    let mut data = vec![0u8; 3 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    fs::write(root.join("data.bin"), &data).unwrap();
    // Sparse: a hole then a tail.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(50 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"tail", 50 << 20).unwrap();
    fs::write(root.join("setuid"), "x").unwrap();
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(root.join("etc/sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    sh(&format!(
        "cd '{}' && mknod null c 1 3 && mknod disk b 259 65537 && mkfifo fifo && chown 1234:5678 setuid && chown -h 70000:70001 etc/fast \
         && python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind(\"sock\")' \
         && printf nonutf8 > \"$(printf 'name\\377\\376')\"",
        root.display()
    ));
    tool("setfattr", "attr");
    tool("setcap", "libcap2-bin");
    tool("setfacl", "acl");
    sh(&format!(
        "cd '{}' && setfattr -n user.color -v blue etc/passwd && setfattr -n user.big -v \"$(head -c 2000 /dev/zero | tr '\\0' a)\" data.bin \
         && setcap cap_net_raw+ep setuid && setfacl -m u:1000:r,g:50:rw etc/passwd && setfacl -d -m u:1000:rwx etc",
        root.display()
    ));
    for i in 0..2000 {
        fs::write(
            root.join("big dir")
                .join(format!("file-{i:05}-{}", "n".repeat(i % 40))),
            format!("{i}"),
        )
        .unwrap();
    }
    // Nanosecond mtimes survive.
    sh(&format!(
        "touch -h -d '2021-03-04 05:06:07.123456789' '{}/etc/passwd' '{}/etc/fast'",
        root.display(),
        root.display()
    ));
}

#[test]
fn built_image_passes_fsck_and_mounts_as_the_source() {
    need_root();
    let s = scratch();
    let src = s.path().join("src");
    rich_tree(&src);
    let img = s.path().join("out.ext4");
    let man = s.path().join("m.json");
    let out = umlctl_os(["image", "build", "-o"].iter().map(Path::new).chain([
        img.as_path(),
        Path::new("--manifest"),
        man.as_path(),
        src.as_path(),
    ]));
    assert_ok(&out, "image build");
    fsck_clean(&img);
    let m = Mounted::new(&img, &s.path().join("mnt"));
    let a = listing(&src, false);
    let b = listing(&m.dir, true);
    same_listing(&a, &b, "rich tree");
    // debugfs: device numbers, link counts, xattrs, as e2fsprogs reads them.
    let dbg = |req: &str| {
        sh(&format!(
            "debugfs -R '{req}' '{}' 2>/dev/null",
            img.display()
        ))
    };
    assert!(
        dbg("stat /disk").contains("Device major/minor number: 259:65537"),
        "{}",
        dbg("stat /disk")
    );
    assert!(dbg("stat /etc/passwd").contains("Links: 2"));
    let ea = dbg("ea_list /setuid");
    assert!(ea.contains("security.capability"), "{ea}");
    drop(m);
    // Our own verify agrees, and the manifest of the image equals the build's.
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("verify"),
            &img,
            Path::new("--manifest"),
            &man,
        ]),
        "verify",
    );
    let derived = s.path().join("derived.json");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("manifest"),
            &img,
            Path::new("-o"),
            &derived,
        ]),
        "manifest",
    );
    assert_ok(
        &umlctl_os([Path::new("image"), Path::new("diff"), &man, &derived]),
        "diff of the two manifests",
    );
}

#[test]
fn same_inputs_give_the_same_bytes() {
    need_root();
    let s = scratch();
    let a = s.path().join("a");
    rich_tree(&a);
    // The same tree created in another order (different readdir order).
    let b = s.path().join("b");
    fs::create_dir(&b).unwrap();
    sh(&format!(
        "cd '{a}' && find . -mindepth 1 | sort -r > ../order && cd '{b}' && tar -C '{a}' --no-recursion --xattrs --xattrs-include='*' --acls -cf - -T ../order | tar --xattrs --xattrs-include='*' --acls -xpf - ",
        a = a.display(),
        b = b.display()
    ));
    // tar cannot carry sockets: make the copy's by hand, with the same time.
    sh(&format!(
        "cd '{b}' && python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind(\"sock\")' && touch -h -r '{a}/sock' sock && touch -d @1600000000 '{a}' '{b}'",
        a = a.display(),
        b = b.display()
    ));
    let build = |src: &Path, out: &Path| {
        assert_ok(
            &umlctl_os([
                Path::new("image"),
                Path::new("build"),
                Path::new("--epoch"),
                Path::new("1700000000"),
                Path::new("-o"),
                out,
                src,
            ]),
            "build",
        )
    };
    let (i1, i2, i3) = (
        s.path().join("1.img"),
        s.path().join("2.img"),
        s.path().join("3.img"),
    );
    build(&a, &i1);
    build(&a, &i2);
    build(&b, &i3);
    assert_eq!(
        sha256_file(&i1),
        sha256_file(&i2),
        "two builds of the same tree differ"
    );
    assert_eq!(
        sha256_file(&i1),
        sha256_file(&i3),
        "a tree created in another order gives other bytes"
    );
    // A tarball of the tree gives the same manifest digest as the tree.
    let tgz = s.path().join("a.tar.gz");
    sh(&format!(
        "tar -C '{}' --xattrs --xattrs-include='*' --acls --format=posix -czf '{}' .",
        a.display(),
        tgz.display()
    ));
    let from_tar = s.path().join("4.img");
    build(&tgz, &from_tar);
    fsck_clean(&from_tar);
    // Identical but for the socket, which tar cannot carry.
    let d = umlctl_os([Path::new("image"), Path::new("diff"), &i1, &from_tar]);
    assert_eq!(
        String::from_utf8_lossy(&d.stdout),
        "/sock: missing\n",
        "diff dir-built and tar-built images"
    );
    assert_eq!(d.status.code(), Some(1));
}

#[test]
fn layers_and_whiteouts() {
    let s = scratch();
    let l1 = s.path().join("l1");
    let l2 = s.path().join("l2");
    fs::create_dir_all(l1.join("etc/keep")).unwrap();
    fs::create_dir_all(l1.join("opt/old")).unwrap();
    fs::write(l1.join("etc/gone"), "x").unwrap();
    fs::write(l1.join("etc/replaced"), "old").unwrap();
    fs::write(l1.join("etc/keep/f"), "keep").unwrap();
    fs::write(l1.join("opt/old/f"), "old").unwrap();
    fs::create_dir_all(l2.join("etc")).unwrap();
    fs::create_dir_all(l2.join("opt")).unwrap();
    fs::write(l2.join("etc/.wh.gone"), "").unwrap();
    fs::write(l2.join("etc/replaced"), "new").unwrap();
    fs::write(l2.join("opt/.wh..wh..opq"), "").unwrap();
    fs::write(l2.join("opt/new"), "new").unwrap();
    let t1 = s.path().join("l1.tar");
    let t2 = s.path().join("l2.tar.gz");
    sh(&format!(
        "tar -C '{}' -cf '{}' . && tar -C '{}' -czf '{}' .",
        l1.display(),
        t1.display(),
        l2.display(),
        t2.display()
    ));
    let img = s.path().join("i.img");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("build"),
            Path::new("-o"),
            &img,
            &t1,
            &t2,
        ]),
        "layered build",
    );
    fsck_clean(&img);
    let ls = |p: &str| {
        assert_ok(
            &umlctl_os([Path::new("image"), Path::new("ls"), &img, Path::new(p)]),
            "ls",
        )
    };
    let etc = ls("/etc");
    assert!(
        !etc.contains("gone") && etc.contains("keep") && etc.contains("replaced"),
        "{etc}"
    );
    assert_eq!(
        ls("/opt").trim(),
        "new",
        "the opaque marker hides the lower /opt"
    );
    let cat = assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("cat"),
            &img,
            Path::new("/etc/replaced"),
        ]),
        "cat",
    );
    assert_eq!(cat, "new");
}

#[test]
fn verify_catches_a_flipped_byte_and_a_changed_mode() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8 + 1).collect();
    fs::write(src.join("file"), &data).unwrap();
    fs::write(src.join("other"), "x").unwrap();
    let img = s.path().join("i.img");
    let man = s.path().join("m.json");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("build"),
            Path::new("-o"),
            &img,
            Path::new("--manifest"),
            &man,
            &src,
        ]),
        "build",
    );
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("verify"),
            &img,
            Path::new("--manifest"),
            &man,
        ]),
        "verify",
    );
    // Flip one byte of the file's content.
    let blk: u64 = sh(&format!(
        "debugfs -R 'bmap /file 20' '{}' 2>/dev/null",
        img.display()
    ))
    .trim()
    .parse()
    .unwrap();
    let bad = s.path().join("bad.img");
    fs::copy(&img, &bad).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&bad)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, blk * 4096 + 123).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], blk * 4096 + 123).unwrap();
    }
    let out = umlctl_os([
        Path::new("image"),
        Path::new("verify"),
        &bad,
        Path::new("--manifest"),
        &man,
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a flipped byte must fail verify"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/file: sha256"), "{text}");
    // Change a mode and an owner with debugfs (it fixes the checksums).
    let bad2 = s.path().join("bad2.img");
    fs::copy(&img, &bad2).unwrap();
    sh(&format!(
        "debugfs -w -R 'sif /other mode 0100600' '{}' && debugfs -w -R 'sif /other uid 42' '{}'",
        bad2.display(),
        bad2.display()
    ));
    let out = umlctl_os([
        Path::new("image"),
        Path::new("verify"),
        &bad2,
        Path::new("--manifest"),
        &man,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("/other: mode is 0600 but 0644 was expected"),
        "{text}"
    );
    assert!(
        text.contains("/other: uid is 42 but 0 was expected"),
        "{text}"
    );
    // A corrupted inode (checksum) is a structural problem, named.
    let bad3 = s.path().join("bad3.img");
    fs::copy(&img, &bad3).unwrap();
    let ino: u64 = sh(&format!(
        "debugfs -R 'stat /other' '{}' 2>/dev/null | sed -n 's/^Inode: \\([0-9]*\\).*/\\1/p'",
        bad3.display()
    ))
    .trim()
    .parse()
    .unwrap();
    let itable: u64 = sh(&format!(
        "dumpe2fs '{}' 2>/dev/null | sed -n 's/.*Inode table at \\([0-9]*\\)-.*/\\1/p' | head -1",
        bad3.display()
    ))
    .trim()
    .parse()
    .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&bad3).unwrap();
        f.write_all_at(&[0x5a], itable * 4096 + (ino - 1) * 256 + 0x2c)
            .unwrap();
    }
    let out = umlctl_os([Path::new("image"), Path::new("verify"), &bad3]);
    assert_ne!(out.status.code(), Some(0));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("inode {ino} has a bad checksum")),
        "{text}"
    );
}

/// `umlctl image build -o OUT SOURCES…`, which must succeed.
fn build_image(out: &Path, sources: &[&Path]) {
    let mut args: Vec<&Path> = vec![Path::new("image"), Path::new("build"), Path::new("-o"), out];
    args.extend_from_slice(sources);
    assert_ok(&umlctl_os(args), "build");
}

fn build_fails(s: &Path, args: &[&Path], needle: &str) {
    let out_img = s.join("never.img");
    let mut all: Vec<&Path> = vec![
        Path::new("image"),
        Path::new("build"),
        Path::new("-o"),
        &out_img,
    ];
    all.extend_from_slice(args);
    let out = umlctl_os(all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(125),
        "expected failure with {needle:?}, got: {err}"
    );
    assert!(
        err.contains(needle),
        "message {err:?} does not mention {needle:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out_img.exists(),
        "a failed build left {}",
        out_img.display()
    );
    let leftovers: Vec<_> = fs::read_dir(s)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("umlctl-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// Make a tar with Python's tarfile so that hostile entries can be crafted.
fn py_tar(out: &Path, body: &str) {
    py_tar_format(out, "GNU_FORMAT", body)
}

fn py_tar_format(out: &Path, format: &str, body: &str) {
    let script = format!("import tarfile, io\nt = tarfile.open('{}', 'w', format=tarfile.{format})\ndef add(name, data=b'', **kw):\n    i = tarfile.TarInfo(name)\n    i.size = len(data)\n    for k, v in kw.items(): setattr(i, k, v)\n    t.addfile(i, io.BytesIO(data))\n{}\nt.close()\n", out.display(), body);
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_nothing() {
    let s = scratch();
    let p = s.path();
    let t = |n: &str| p.join(n);
    // Corrupt gzip.
    fs::write(
        t("c.tar.gz"),
        [
            0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3,
        ],
    )
    .unwrap();
    build_fails(p, &[&t("c.tar.gz")], "c.tar.gz");
    // Truncated tar: cut inside a file's data.
    py_tar(&t("full.tar"), "add('f', b'x' * 100000)");
    let full = fs::read(t("full.tar")).unwrap();
    fs::write(t("trunc.tar"), &full[..50_000]).unwrap();
    build_fails(p, &[&t("trunc.tar")], "truncated");
    py_tar(&t("abs.tar"), "add('/etc/passwd', b'x')");
    build_fails(p, &[&t("abs.tar")], "absolute paths are not allowed");
    py_tar(&t("dotdot.tar"), "add('a/../../x', b'x')");
    build_fails(p, &[&t("dotdot.tar")], "`..` components");
    py_tar(
        &t("link.tar"),
        "add('l', type=tarfile.LNKTYPE, linkname='missing')",
    );
    build_fails(p, &[&t("link.tar")], "hard link \"/l\" -> \"/missing\"");
    py_tar(&t("long.tar"), "add('d/' + 'n' * 256, b'x')");
    build_fails(p, &[&t("long.tar")], "longer than 255 bytes");
    py_tar(&t("parent.tar"), "add('f', b'x')\nadd('f/g', b'y')");
    build_fails(p, &[&t("parent.tar")], "parent \"/f\" is not a directory");
    py_tar(&t("ok.tar"), "add('big', b'\\1' * (3 << 20))");
    build_fails(
        p,
        &[Path::new("--size"), Path::new("1M"), &t("ok.tar")],
        "use --size",
    );
    build_fails(p, &[&t("nope.tar")], "nope.tar");
    // Metadata GNU tar refuses is refused, with the entry named, never
    // replaced by the header's value.
    py_tar_format(
        &t("mtime.tar"),
        "PAX_FORMAT",
        "add('f', b'x', pax_headers={'mtime': '-99999999999999999999.5'})",
    );
    build_fails(p, &[&t("mtime.tar")], "entry \"f\": PAX mtime record");
    py_tar_format(
        &t("uid.tar"),
        "PAX_FORMAT",
        "add('f', b'x', pax_headers={'uid': '99999999999999999999'})",
    );
    build_fails(p, &[&t("uid.tar")], "entry \"f\": PAX uid record");
    // GNU headers hold ids in base-256, up to 64 bits: one above 2^32 is
    // refused (it was cut to its low 32 bits, another user's id).
    py_tar_format(
        &t("biguid.tar"),
        "GNU_FORMAT",
        "add('f', b'x', uid=2**32 + 5)",
    );
    build_fails(p, &[&t("biguid.tar")], "entry \"f\": header uid 4294967301");
    // A regular file where ext4's lost+found directory goes.
    py_tar(&t("lpf.tar"), "add('lost+found', b'x')");
    build_fails(p, &[&t("lpf.tar")], "/lost+found a regular file");
    // GNU tar's sparse files, in every form it writes, are refused by name
    // (they used to become the data alone, or a directory GNUSparseFile.N/).
    let sp = p.join("sp");
    fs::create_dir_all(&sp).unwrap();
    sh(&format!(
        "cd '{}' && head -c 4096 /dev/urandom > s && dd if=/dev/urandom of=s bs=4096 seek=256 count=1 conv=notrunc 2>/dev/null && truncate -s 5M s",
        sp.display()
    ));
    for (name, args, form) in [
        ("sgnu.tar", "--format=gnu", "old GNU"),
        ("s00.tar", "--format=posix --sparse-version=0.0", "PAX 0.0"),
        ("s01.tar", "--format=posix --sparse-version=0.1", "PAX 0.1"),
        ("s10.tar", "--format=posix --sparse-version=1.0", "PAX 1.0"),
    ] {
        sh(&format!(
            "tar --sparse {args} -cf '{}' -C '{}' s",
            t(name).display(),
            sp.display()
        ));
        build_fails(
            p,
            &[&t(name)],
            &format!("entry \"s\": a sparse file in GNU tar's sparse format ({form})"),
        );
    }
    // A missing image is named as such (it used to say "open COW file").
    let out = umlctl_os([Path::new("image"), Path::new("ls"), &t("missing.ext4")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("missing.ext4: open: No such file") && !err.contains("COW"),
        "{err}"
    );
    // A failed build does not touch an existing OUT either.
    let keep = p.join("keep.img");
    fs::write(&keep, "precious").unwrap();
    let out = umlctl_os([
        Path::new("image"),
        Path::new("build"),
        Path::new("-o"),
        &keep,
        &t("abs.tar"),
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(fs::read(&keep).unwrap(), b"precious");
}

#[test]
fn hostile_image_metadata_is_reported_never_a_crash() {
    // Checksum-valid images (debugfs fixes the checksums) whose metadata
    // point outside the filesystem.
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "hi\n").unwrap();
    let img = s.path().join("i.img");
    build_image(&img, &[&src]);
    // An xattr block number far past the end (verify used to panic).
    let acl = s.path().join("acl.img");
    fs::copy(&img, &acl).unwrap();
    sh(&format!(
        "debugfs -w -R 'sif /f file_acl 0xffffffff' '{}'",
        acl.display()
    ));
    let out = umlctl_os([Path::new("image"), Path::new("verify"), &acl]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("extended-attribute block 4294967295 is outside the filesystem"),
        "{text}"
    );
    // A size raised to 1 TiB (legal: a sparse file): extract writes what the
    // image holds and keeps the rest a hole (it used to fill the disk).
    let big = s.path().join("big.img");
    fs::copy(&img, &big).unwrap();
    sh(&format!(
        "debugfs -w -R 'sif /f size 0x10000000000' '{}'",
        big.display()
    ));
    let dest = s.path().join("out");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("extract"),
            &big,
            Path::new("/f"),
            &dest,
        ]),
        "extract",
    );
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(&dest).unwrap();
    assert_eq!(md.len(), 1 << 40);
    assert!(md.blocks() < 1024, "{} blocks written", md.blocks());
    let mut head = [0u8; 8];
    use std::io::Read;
    fs::File::open(&dest)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"hi\n\0\0\0\0\0");
    // An impossible block size (2^30): every reader refuses it by name
    // instead of allocating gigabytes (ls and cat used to abort).
    let lbs = s.path().join("lbs.img");
    fs::copy(&img, &lbs).unwrap();
    sh(&format!(
        "debugfs -w -R 'ssv log_block_size 20' '{}'",
        lbs.display()
    ));
    for args in [
        &["ls", "/"][..],
        &["cat", "/f"],
        &["verify"],
        &["manifest"],
        &["info"],
    ] {
        let mut a: Vec<&std::ffi::OsStr> =
            vec!["image".as_ref(), args[0].as_ref(), lbs.as_os_str()];
        a.extend(args[1..].iter().map(|x| std::ffi::OsStr::new(*x)));
        let out = umlctl_os(a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "image {}: {err}", args[0]);
        assert!(
            err.contains("block size 2^30 is impossible"),
            "image {}: {err}",
            args[0]
        );
    }
}

/// A copy of an image of `src` without metadata_csum (so its directory
/// blocks can be patched by hand) in which the root directory's entry
/// named `from` is renamed to `to` (the same length).
fn patched_root_entry(s: &Path, src: &Path, from: u8, to: u8, name: &str) -> PathBuf {
    let img = s.join(name);
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("build"),
            Path::new("-o"),
            &img,
            src,
        ]),
        "build",
    );
    sh(&format!(
        "tune2fs -O ^metadata_csum '{}' >/dev/null",
        img.display()
    ));
    let blk: u64 = sh(&format!(
        "debugfs -R 'bmap / 0' '{}' 2>/dev/null",
        img.display()
    ))
    .trim()
    .parse()
    .unwrap();
    let mut data = fs::read(&img).unwrap();
    let off = (blk * 4096) as usize;
    let dir = &data[off..off + 4096];
    // name_len 1, file type 1 (regular), the name.
    let i = dir
        .windows(3)
        .position(|w| w == [1, 1, from])
        .expect("the entry to patch");
    data[off + i + 2] = to;
    fs::write(&img, data).unwrap();
    img
}

#[test]
fn impossible_directory_entries_are_refused_and_extract_stays_inside() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a"), "1").unwrap();
    fs::write(src.join("b"), "2").unwrap();
    // Two entries with the same name in one directory.
    let dup = patched_root_entry(s.path(), &src, b'b', b'a', "dup.img");
    let out = umlctl_os([Path::new("image"), Path::new("verify"), &dup]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("/a: the name appears more than once"),
        "{text}"
    );
    // A name with '/' in it: no reader hands it on, and extract creates
    // nothing from it.
    let slash = patched_root_entry(s.path(), &src, b'b', b'/', "slash.img");
    let dest = s.path().join("out");
    let out = umlctl_os([
        Path::new("image"),
        Path::new("extract"),
        &slash,
        Path::new("/"),
        &dest,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("impossible entry name"), "{err}");
    assert!(!dest.exists(), "a failed extract left {}", dest.display());
    let out = umlctl_os([Path::new("image"), Path::new("verify"), &slash]);
    assert_ne!(out.status.code(), Some(0));
}

/// A tiny deterministic generator for randomized trees.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_tree(root: &Path, seed: u64) {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut dirs = vec![root.to_path_buf()];
    let mut files: Vec<PathBuf> = Vec::new();
    fs::create_dir_all(root).unwrap();
    for i in 0..(50 + r.below(400)) {
        let parent = dirs[r.below(dirs.len() as u64) as usize].clone();
        let len = 1 + r.below(60) as usize;
        let mut name: Vec<u8> = (0..len)
            .map(|_| {
                let c = 1 + r.below(255) as u8;
                if c == b'/' {
                    b'_'
                } else {
                    c
                }
            })
            .collect();
        name.extend_from_slice(format!("-{i}").as_bytes());
        if name == b"." || name == b".." || name.starts_with(b".wh.") {
            continue;
        }
        let p = parent.join(std::ffi::OsStr::from_bytes(&name));
        match r.below(10) {
            0..=1 => {
                fs::create_dir(&p).unwrap();
                dirs.push(p);
            }
            2..=6 => {
                let size = match r.below(4) {
                    0 => 0,
                    1 => r.below(5000),
                    2 => r.below(200_000),
                    _ => 4096 * r.below(64),
                };
                let mut data: Vec<u8> = (0..size).map(|_| r.below(256) as u8).collect();
                if size > 20_000 && r.below(2) == 0 {
                    // Zero runs become holes.
                    let a = r.below(size / 2) as usize;
                    data[a..a + 12_000].fill(0);
                }
                fs::write(&p, &data).unwrap();
                if r.below(4) == 0 {
                    let v: Vec<u8> = (0..1 + r.below(300)).map(|_| r.below(256) as u8).collect();
                    let name = std::ffi::CString::new(format!("user.r{}", r.below(9))).unwrap();
                    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
                    // SAFETY: NUL-terminated strings and a valid buffer.
                    let rc = unsafe {
                        libc::setxattr(c.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                    };
                    assert_eq!(rc, 0, "setxattr");
                }
                files.push(p);
            }
            7 if !files.is_empty() => {
                let target = &files[r.below(files.len() as u64) as usize];
                fs::hard_link(target, &p).unwrap();
            }
            8 => {
                let tl = 1 + r.below(200) as usize;
                let t: String = (0..tl)
                    .map(|_| (b'a' + r.below(26) as u8) as char)
                    .collect();
                symlink(t, &p).unwrap();
            }
            _ => {
                fs::write(&p, b"").unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode((r.below(0o10000)) as u32))
                    .unwrap();
            }
        }
    }
}

use std::os::unix::ffi::OsStrExt;

#[test]
fn randomized_trees_are_fsck_clean_and_round_trip() {
    need_root();
    tool("setfattr", "attr");
    for seed in 1..=6u64 {
        let s = scratch();
        let src = s.path().join("src");
        random_tree(&src, seed);
        let img = s.path().join("r.img");
        let man = s.path().join("m.json");
        let out = umlctl_os([
            Path::new("image"),
            Path::new("build"),
            Path::new("-o"),
            &img,
            Path::new("--manifest"),
            &man,
            &src,
        ]);
        assert_ok(&out, &format!("build seed {seed}"));
        fsck_clean(&img);
        assert_ok(
            &umlctl_os([
                Path::new("image"),
                Path::new("verify"),
                &img,
                Path::new("--manifest"),
                &man,
            ]),
            &format!("verify seed {seed}"),
        );
        let m = Mounted::new(&img, &s.path().join("mnt"));
        same_listing(
            &listing(&src, false),
            &listing(&m.dir, true),
            &format!("seed {seed}"),
        );
        // The image's root also holds lost+found.
        let nlinks = fs::symlink_metadata(&src).unwrap().nlink();
        assert_eq!(
            nlinks + 1,
            fs::symlink_metadata(&m.dir).unwrap().nlink(),
            "seed {seed}: root link count"
        );
    }
}

#[test]
fn a_guest_boots_a_built_image_and_overlays_read_back() {
    let s = scratch();
    let root = s.path().join("root");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox is missing: apt-get install busybox-static");
    for t in ["sh", "cat", "ls", "echo", "getfattr", "stat", "sha256sum"] {
        symlink("busybox", root.join("bin").join(t)).unwrap();
    }
    fs::write(root.join("etc/marker"), "built by umlctl\n").unwrap();
    let tgz = s.path().join("root.tar.gz");
    sh(&format!(
        "tar -C '{}' -czf '{}' .",
        root.display(),
        tgz.display()
    ));
    let img = s.path().join("root.img");
    build_image(&img, &[&tgz]);
    let base_sum = sha256_file(&img);
    let cow = s.path().join("disk.cow");
    let (code, out, err) = run(
        &[
            "--image",
            img.to_str().unwrap(),
            "--overlay",
            cow.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            "cat /etc/marker && echo written-in-guest > /root/note && stat -c %s /bin/busybox",
        ],
    );
    assert_eq!(code, 0, "guest run failed: {err}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("built by umlctl\n"), "{out}");
    assert_eq!(sha256_file(&img), base_sum, "the base image changed");
    // Read the guest's disk as it is now, through the overlay.
    let cat = assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("cat"),
            &cow,
            Path::new("/root/note"),
        ]),
        "cat via overlay",
    );
    assert_eq!(cat, "written-in-guest\n");
    assert_ok(
        &umlctl_os([Path::new("image"), Path::new("verify"), &cow]),
        "verify via overlay",
    );
    let diff = umlctl_os([Path::new("image"), Path::new("diff"), &img, &cow]);
    assert_eq!(diff.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&diff.stdout).contains("/root/note: not expected"),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    let dest = s.path().join("extracted");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("extract"),
            &cow,
            Path::new("/root"),
            &dest,
        ]),
        "extract via overlay",
    );
    assert_eq!(
        fs::read_to_string(dest.join("note")).unwrap(),
        "written-in-guest\n"
    );
}

#[test]
fn info_and_ls_describe_the_image() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), "hi").unwrap();
    let img = s.path().join("i.img");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("build"),
            Path::new("--label"),
            Path::new("rootfs"),
            Path::new("--uuid"),
            Path::new("01234567-89ab-4def-8123-456789abcdef"),
            Path::new("--size"),
            Path::new("64M"),
            Path::new("-o"),
            &img,
            &src,
        ]),
        "build",
    );
    let info = assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("info"),
            Path::new("--json"),
            &img,
        ]),
        "info",
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["label"], "rootfs");
    assert_eq!(v["uuid"], "01234567-89ab-4def-8123-456789abcdef");
    assert_eq!(v["size"], 64 << 20);
    assert_eq!(
        sh(&format!("blkid -o value -s UUID '{}'", img.display())).trim(),
        "01234567-89ab-4def-8123-456789abcdef"
    );
    let ls = assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("ls"),
            Path::new("-l"),
            &img,
            Path::new("/d"),
        ]),
        "ls -l",
    );
    assert!(
        ls.contains("-rw-r--r--") && ls.trim_end().ends_with(" f"),
        "{ls}"
    );
    let missing = umlctl_os([
        Path::new("image"),
        Path::new("cat"),
        &img,
        Path::new("/nope"),
    ]);
    assert_eq!(missing.status.code(), Some(125));
}

/// A group holds at most 32768 inodes: automatic sizing makes as many
/// groups as the entries need (a source of many small files used to fail
/// asking for a larger --size), and an explicit --inodes is honoured.
#[test]
fn many_small_files_size_the_image_by_their_inodes() {
    let s = scratch();
    let src = s.path().join("many");
    fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..40_000 {
        fs::File::create(src.join("d").join(i.to_string())).unwrap();
    }
    let inodes = |img: &Path| -> u64 {
        let out = Command::new("dumpe2fs")
            .arg("-h")
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Inode count:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no inode count from dumpe2fs -h {}", img.display()))
    };
    let auto = s.path().join("auto.ext4");
    build_image(&auto, &[&src]);
    fsck_clean(&auto);
    assert!(inodes(&auto) >= 40_012, "{}", inodes(&auto));
    let given = s.path().join("given.ext4");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("build"),
            Path::new("--inodes"),
            Path::new("120000"),
            Path::new("-o"),
            &given,
            &src,
        ]),
        "build --inodes 120000",
    );
    fsck_clean(&given);
    assert_eq!(inodes(&given), 120_000);
    let out = umlctl_os([
        Path::new("image"),
        Path::new("ls"),
        &auto,
        Path::new("/d/39999"),
    ]);
    assert_ok(&out, "ls the last file");
}

/// A full output filesystem is named as such, not blamed on the sources
/// (it used to say the archive could not be read), and nothing is left.
#[test]
fn a_full_output_filesystem_is_named_and_nothing_is_left() {
    need_root();
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let mut big = vec![0u8; 12 << 20];
    for (i, b) in big.iter_mut().enumerate() {
        *b = (i * 7 + i / 4096) as u8 | 1;
    }
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("small"), "hi\n").unwrap();
    let tar = s.path().join("s.tar");
    sh(&format!(
        "tar -C {} -cf {} big small",
        src.display(),
        tar.display()
    ));
    let out = s.path().join("out");
    fs::create_dir_all(&out).unwrap();
    for (source, name) in [(&tar, "from-tar.ext4"), (&src, "from-dir.ext4")] {
        let img = out.join(name);
        let o = with_private_mounts(&format!(
            "mount -t tmpfs -o size=4m umlctl-test-full {}",
            out.display()
        ))
        .arg(umlctl_bin())
        .args(["image", "build", "-o"])
        .arg(&img)
        .arg(source)
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{err}");
        assert!(
            err.contains(&format!(
                "{}: cannot write the image: No space left on device",
                img.display()
            )) && err.contains("the filesystem holding it is full"),
            "{err}"
        );
        assert!(!err.contains("cannot read the archive"), "{err}");
    }
    assert!(fs::read_dir(&out).unwrap().next().is_none());
}

/// A gzip-compressed archive cut anywhere is refused, naming the entry it
/// was cut in (the decompressor's last good bytes used to be dropped, so
/// the error came up in an earlier entry), or the entry it was cut after —
/// also inside gzip's trailer, whose checksum used to go unread.
#[test]
fn a_cut_gzip_archive_names_the_entry_where_it_ends() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(&src).unwrap();
    // Incompressible data, so that offsets in the .gz track the tar's.
    let mut x = 0x9e3779b97f4a7c15u64;
    for name in ["a", "b"] {
        let data: Vec<u8> = (0..300_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(src.join(name), data).unwrap();
    }
    fs::write(src.join("c"), "c\n").unwrap();
    let gz = s.path().join("t.tar.gz");
    sh(&format!(
        "tar -C {} -cf - a b c | gzip -n > {}",
        src.display(),
        gz.display()
    ));
    let whole = fs::read(&gz).unwrap();
    let n = whole.len();
    for (cut, want) in [
        (
            200_000,
            "entry \"a\": the archive ends inside this file's data",
        ),
        (
            400_000,
            "entry \"b\": the archive ends inside this file's data",
        ),
        (n - 4, "the archive ends early after entry \"c\""),
        (n - 1, "the archive ends early after entry \"c\""),
    ] {
        let cut_gz = s.path().join(format!("cut-{cut}.tar.gz"));
        fs::write(&cut_gz, &whole[..cut]).unwrap();
        let img = s.path().join("never.ext4");
        let out = umlctl_os([
            Path::new("image"),
            Path::new("build"),
            Path::new("-o"),
            &img,
            &cut_gz,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "cut at {cut} of {n}: {err}");
        assert!(err.contains(want), "cut at {cut} of {n}: {err}");
        assert!(!img.exists());
    }
    let img = s.path().join("whole.ext4");
    build_image(&img, &[&gz]);
    fsck_clean(&img);
}

/// Extraction cannot leave DEST or run away, whatever the image holds: a
/// symlink and a file of the same name (the file used to be written where
/// the symlink pointed), a directory linked into itself (it used to recurse
/// thousands of levels), and hard links come out as hard links. A single
/// file goes onto /dev/null in place and replaces a regular file whole.
#[test]
fn extraction_stays_inside_and_ends_on_hostile_images() {
    need_root();
    tool("debugfs", "e2fsprogs");
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    let escaped = s.path().join("escaped");
    fs::write(&escaped, "untouched\n").unwrap();
    symlink(&escaped, src.join("a")).unwrap();
    fs::write(src.join("b"), "pwned\n").unwrap();
    fs::write(src.join("dir/f"), "linked\n").unwrap();
    fs::hard_link(src.join("dir/f"), src.join("g")).unwrap();
    let extract = |img: &Path, path: &str, dest: &Path| {
        umlctl_os([
            Path::new("image"),
            Path::new("extract"),
            img,
            Path::new(path),
            dest,
        ])
    };

    // The file entry renamed to the symlink's name.
    let twin = patched_root_entry(s.path(), &src, b'b', b'a', "twin.img");
    let dest = s.path().join("out-twin");
    let out = extract(&twin, "/", &dest);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("File exists"), "{err}");
    assert_eq!(fs::read_to_string(&escaped).unwrap(), "untouched\n");
    assert!(!dest.exists(), "a failed extract left {}", dest.display());

    // A directory linked into itself.
    let img = s.path().join("plain.img");
    build_image(&img, &[&src]);
    let looped = s.path().join("loop.img");
    fs::copy(&img, &looped).unwrap();
    sh(&format!(
        "debugfs -w -R 'link /dir /dir/again' '{}' 2>/dev/null",
        looped.display()
    ));
    let dest = s.path().join("out-loop");
    let out = extract(&looped, "/", &dest);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("out-loop/dir/again: the image links directory inode"),
        "{err}"
    );
    assert!(!dest.exists(), "a failed extract left {}", dest.display());

    // Hard links stay hard links.
    let dest = s.path().join("out");
    assert_ok(&extract(&img, "/", &dest), "extract");
    let (a, b) = (
        fs::metadata(dest.join("dir/f")).unwrap(),
        fs::metadata(dest.join("g")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));

    // One file onto /dev/null: written in place, /dev/null stays a device.
    assert_ok(
        &extract(&img, "/g", Path::new("/dev/null")),
        "extract to /dev/null",
    );
    assert!(fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    // Onto a regular file: replaced whole.
    let old = s.path().join("old");
    fs::write(&old, "a much longer old content\n").unwrap();
    assert_ok(&extract(&img, "/g", &old), "extract over a file");
    assert_eq!(fs::read_to_string(&old).unwrap(), "linked\n");
}

/// A directory source's sparse files are read by their data only
/// (SEEK_DATA/SEEK_HOLE) and give the very bytes a dense copy gives.
#[test]
fn sparse_directory_sources_give_the_same_image_as_dense_copies() {
    let s = scratch();
    let (sparse, dense) = (s.path().join("sparse"), s.path().join("dense"));
    fs::create_dir_all(&sparse).unwrap();
    fs::create_dir_all(&dense).unwrap();
    let write_at = |f: &Path, at: u64, data: &[u8]| {
        use std::os::unix::fs::FileExt;
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(f)
            .unwrap();
        file.write_all_at(data, at).unwrap();
    };
    // Data at odd offsets, across block edges, at the very end, and none.
    let f = sparse.join("holes");
    fs::File::create(&f).unwrap().set_len(64 << 20).unwrap();
    for (at, data) in [
        (1u64, &b"start"[..]),
        (4095, b"edge"),
        ((8 << 20) + 7, b"middle"),
        ((64 << 20) - 3, b"end"),
    ] {
        write_at(&f, at, data);
    }
    fs::File::create(sparse.join("empty-but-long"))
        .unwrap()
        .set_len(5 << 20)
        .unwrap();
    let f = sparse.join("tail-hole");
    write_at(&f, 0, b"head");
    fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    sh(&format!(
        "cp --sparse=never -a {}/. {}/ && touch -r {} {}",
        sparse.display(),
        dense.display(),
        sparse.display(),
        dense.display()
    ));
    let (a, b) = (s.path().join("a.ext4"), s.path().join("b.ext4"));
    for (src, img) in [(&sparse, &a), (&dense, &b)] {
        assert_ok(
            &umlctl_os([
                Path::new("image"),
                Path::new("build"),
                Path::new("--epoch"),
                Path::new("1"),
                Path::new("-o"),
                img,
                src,
            ]),
            "build",
        );
    }
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "the images differ"
    );
    fsck_clean(&a);
    let out = umlctl_os([
        Path::new("image"),
        Path::new("cat"),
        &a,
        Path::new("/holes"),
    ]);
    assert_eq!(sha256(&out.stdout), sha256_file(&sparse.join("holes")));
}

/// A real guest's disk: files with unwritten (preallocated) extents, as
/// journald and fallocate leave them, read as zeros everywhere — whatever
/// the blocks hold — instead of "unsupported ext4 feature". `cat` follows
/// symlinks inside the image only.
#[test]
fn unwritten_extents_read_as_zeros_and_cat_follows_symlinks_inside_the_image() {
    tool("debugfs", "e2fsprogs");
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(src.join("usr/lib")).unwrap();
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("usr/lib/os-release"), "ID=test\n").unwrap();
    symlink("../usr/lib/os-release", src.join("etc/os-release")).unwrap();
    symlink("/usr/lib/os-release", src.join("abs")).unwrap();
    symlink("../../../../../usr/lib/os-release", src.join("etc/climb")).unwrap();
    symlink("loop", src.join("loop")).unwrap();
    fs::write(src.join("journal"), "hello").unwrap();
    let img = s.path().join("guest.ext4");
    build_image(&img, &[&src]);
    // Preallocate blocks 1..9 of /journal, then fill them with garbage on
    // disk, as a reused block would hold.
    sh(&format!(
        "debugfs -w -R 'fallocate /journal 1 9' '{0}' 2>/dev/null && debugfs -w -R 'sif /journal size 40960' '{0}' 2>/dev/null",
        img.display()
    ));
    let stat = sh(&format!(
        "debugfs -R 'stat /journal' '{}' 2>/dev/null",
        img.display()
    ));
    let ext = stat
        .lines()
        .skip_while(|l| !l.starts_with("EXTENTS:"))
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let (first, _) = ext
        .split_once("[u]):")
        .and_then(|(_, r)| r.split_once('-'))
        .unwrap_or_else(|| panic!("no unwritten extent in: {ext}"));
    let first: u64 = first.trim().parse().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0xAB; 9 * 4096], first * 4096).unwrap();
    }
    fsck_clean(&img);
    let mut want = b"hello".to_vec();
    want.resize(40960, 0);
    let out = umlctl_os([
        Path::new("image"),
        Path::new("cat"),
        &img,
        Path::new("/journal"),
    ]);
    assert_ok(&out, "cat");
    assert!(out.stdout == want, "unwritten blocks did not read as zeros");
    let out = umlctl_os([Path::new("image"), Path::new("verify"), &img]);
    assert_ok(&out, "verify");
    let out = umlctl_os([Path::new("image"), Path::new("manifest"), &img]);
    let m: serde_json::Value = serde_json::from_str(&assert_ok(&out, "manifest")).unwrap();
    let j = m["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "/journal")
        .unwrap();
    assert_eq!(j["sha256"].as_str().unwrap(), sha256(&want));
    let dest = s.path().join("journal.out");
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("extract"),
            &img,
            Path::new("/journal"),
            &dest,
        ]),
        "extract",
    );
    assert!(fs::read(&dest).unwrap() == want);

    // Symlinks: relative, absolute (the image's root, not the host's), one
    // that climbs past the root (stays at it), and a loop.
    for p in ["/etc/os-release", "/abs", "/etc/climb"] {
        let out = umlctl_os([Path::new("image"), Path::new("cat"), &img, Path::new(p)]);
        assert_eq!(assert_ok(&out, p), "ID=test\n");
    }
    let out = umlctl_os([
        Path::new("image"),
        Path::new("cat"),
        &img,
        Path::new("/loop"),
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than 40 symbolic links"));
}

/// Outputs that are not regular files are written in place, never
/// replaced (`image manifest -o /dev/null` used to turn the host's
/// /dev/null into a regular file): a character device (a /dev/null made
/// here), a FIFO; `-o -` is standard output.
#[test]
fn outputs_that_are_not_regular_files_are_written_in_place() {
    need_root();
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "content\n").unwrap();
    let null = s.path().join("null");
    sh(&format!("mknod -m 666 '{}' c 1 3", null.display()));
    let img = s.path().join("i.ext4");
    build_image(&img, &[&src]);
    for args in [
        vec![
            "image",
            "manifest",
            img.to_str().unwrap(),
            "-o",
            null.to_str().unwrap(),
        ],
        vec![
            "image",
            "build",
            "-o",
            null.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
        vec![
            "image",
            "build",
            "-o",
            s.path().join("j.ext4").to_str().unwrap(),
            "--manifest",
            null.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
    ] {
        assert_ok(&umlctl_os(&args), &format!("{args:?}"));
        let m = fs::symlink_metadata(&null).unwrap();
        assert!(
            m.file_type().is_char_device(),
            "{args:?} replaced the device"
        );
        assert_eq!(m.rdev(), libc::makedev(1, 3));
    }
    // A FIFO: the reader gets the whole manifest.
    let fifo = s.path().join("fifo");
    sh(&format!("mkfifo '{}'", fifo.display()));
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read_to_string(fifo).unwrap())
    };
    assert_ok(
        &umlctl_os([
            Path::new("image"),
            Path::new("manifest"),
            &img,
            Path::new("-o"),
            &fifo,
        ]),
        "manifest into a FIFO",
    );
    let text = reader.join().unwrap();
    assert!(text.contains("\"path\": \"/f\""), "{text}");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    // `-o -`: the image on stdout, the summary on stderr.
    let out = umlctl_os([
        Path::new("image"),
        Path::new("build"),
        Path::new("-o"),
        Path::new("-"),
        &src,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-: "),
        "summary on stderr"
    );
    let piped = s.path().join("piped.ext4");
    fs::write(&piped, &out.stdout).unwrap();
    fsck_clean(&piped);
    assert!(!Path::new("-").exists());
}

/// `image build -o IMG -` reads a tar (plain, gzip or zstd) on standard
/// input, as `mmdebstrap --mode=unshare bookworm - | umlctl image build -o
/// IMG -` needs, and gives the very image the same archive as a file gives.
#[test]
fn a_tar_on_standard_input_is_a_source() {
    let s = scratch();
    let src = s.path().join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), "guest\n").unwrap();
    for (name, filter) in [
        ("t.tar", "cat"),
        ("t.tar.gz", "gzip -n"),
        ("t.tar.zst", "zstd -q"),
    ] {
        let tar = s.path().join(name);
        sh(&format!(
            "tar -C '{}' -cf - . | {filter} > '{}'",
            src.display(),
            tar.display()
        ));
        let (a, b) = (s.path().join("file.ext4"), s.path().join("stdin.ext4"));
        assert_ok(
            &umlctl_os([
                Path::new("image"),
                Path::new("build"),
                Path::new("--epoch"),
                Path::new("1"),
                Path::new("-o"),
                &a,
                &tar,
            ]),
            "build from the file",
        );
        let out = Command::new(umlctl_bin())
            .args(["image", "build", "--epoch", "1", "-o"])
            .arg(&b)
            .arg("-")
            .stdin(fs::File::open(&tar).unwrap())
            .output()
            .unwrap();
        assert_ok(&out, &format!("build {name} from stdin"));
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "{name}: the images differ"
        );
    }
    let out = umlctl_os(["image", "build", "-o", "x.ext4", "-", "-"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only once"));
}
