//! The checksums and hashes ext4 uses: crc32c in the kernel's convention
//! (no final inversion) and the half-MD4 directory hash (signed chars).

/// `crc32c(seed, data)` as the kernel computes it (`ext4_chksum`).
pub fn crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Checksum seed of an inode (`ext4_inode_csum_seed`): the fs seed over the
/// inode number and generation.
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    crc(crc(fs_seed, &ino.to_le_bytes()), &generation.to_le_bytes())
}

// A port of the kernel's str2hashbuf_signed (fs/ext4/hash.c): the casts
// are C's, signed chars included, and the hash depends on them.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
fn str2hashbuf_signed(msg: &[u8], num: usize) -> [u32; 8] {
    let mut buf = [0u32; 8];
    let len = msg.len();
    let mut pad = (len as u32) | ((len as u32) << 8);
    pad |= pad << 16;
    let mut val = pad;
    let take = len.min(num * 4);
    let mut out = 0;
    let mut left = num as isize;
    for (i, &c) in msg[..take].iter().enumerate() {
        val = (i32::from(c as i8) as u32).wrapping_add(val << 8);
        if i % 4 == 3 {
            buf[out] = val;
            out += 1;
            val = pad;
            left -= 1;
        }
    }
    left -= 1;
    if left >= 0 {
        buf[out] = val;
        out += 1;
    }
    while left > 0 {
        left -= 1;
        buf[out] = pad;
        out += 1;
    }
    buf
}

fn half_md4(buf: &mut [u32; 4], input: &[u32; 8]) {
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let (mut a, mut b, mut c, mut d) = (buf[0], buf[1], buf[2], buf[3]);
    macro_rules! round {
        ($f:expr, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a
                .wrapping_add($f($b, $c, $d))
                .wrapping_add($x)
                .rotate_left($s);
        };
    }
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let i = input;
    round!(f, a, b, c, d, i[0], 3);
    round!(f, d, a, b, c, i[1], 7);
    round!(f, c, d, a, b, i[2], 11);
    round!(f, b, c, d, a, i[3], 19);
    round!(f, a, b, c, d, i[4], 3);
    round!(f, d, a, b, c, i[5], 7);
    round!(f, c, d, a, b, i[6], 11);
    round!(f, b, c, d, a, i[7], 19);
    round!(g, a, b, c, d, i[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, i[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, i[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, i[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, i[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, i[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, i[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, i[6].wrapping_add(K2), 13);
    round!(h, a, b, c, d, i[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, i[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, i[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, i[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, i[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, i[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, i[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, i[4].wrapping_add(K3), 15);
    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// The htree hash of `name` (half-MD4, signed chars, as selected by
/// `s_flags` = signed hash): returns (major, minor).
pub fn dirhash(name: &[u8], seed: &[u32; 4]) -> (u32, u32) {
    let mut buf = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    if seed.iter().any(|&w| w != 0) {
        buf = *seed;
    }
    let mut p = name;
    loop {
        let input = str2hashbuf_signed(p, 8);
        half_md4(&mut buf, &input);
        if p.len() <= 32 {
            break;
        }
        p = &p[32..];
    }
    let mut hash = buf[1] & !1;
    if hash == 0x7fff_ffff << 1 {
        hash = (0x7fff_ffff - 1) << 1;
    }
    (hash, buf[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_convention() {
        // The superblock checksum is !crc32c(data) in the usual convention.
        let data = b"123456789";
        assert_eq!(crc(!0, data), !crc32c::crc32c(data));
    }

    #[test]
    fn dirhash_is_stable() {
        // Values from e2fsprogs' `debugfs -R "dx_hash -h half_md4 NAME"`
        // with a zero seed are checked in the end-to-end tests (e2fsck
        // validates every htree we write); here only basic properties.
        let s = [0u32; 4];
        // `debugfs -R "dx_hash -h half_md4 hello"` (e2fsprogs 1.47.0).
        assert_eq!(dirhash(b"hello", &s), (0x1746da32, 0x420013b5));
        let (a, _) = dirhash(b"hello", &s);
        assert_eq!(a & 1, 0);
        assert_ne!(dirhash(b"hello", &s), dirhash(b"hellp", &s));
        // A 70-byte name (three rounds) with a seed, also from debugfs
        // (`-s 00000001-0000-0002-0000-000300000004`).
        let long = vec![b'x'; 70];
        let seed = [0x0100_0000, 0x0200_0000, 0x0300_0000, 0x0400_0000];
        assert_eq!(dirhash(&long, &seed), (0x879109d8, 0xb17f3505));
    }
}
