//! Numeric conversions in one place. The on-disk formats split wide values
//! into low and high fields and keep 16- and 32-bit counters; the helpers
//! here say which bits a field takes, so that nowhere else in the crate
//! does a cast cut a value by accident (the workspace denies the cast
//! lints; these are the reviewed exceptions).

// umlctl supports 64-bit hosts only (UML itself is built for x86_64 here);
// with this, a u64 that indexes memory converts to usize exactly.
const _: () = assert!(usize::BITS == 64, "umlctl supports 64-bit hosts only");

/// A u64 length, offset or index as usize: exact on the 64-bit hosts
/// umlctl builds for (asserted at compile time above).
#[inline]
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn us(v: u64) -> usize {
    v as usize
}

/// Bits 0..32 of `v`: the low field of a lo/hi pair, or a 32-bit
/// on-disk field whose excess bits live elsewhere (or nowhere, by design).
#[inline]
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn lo32(v: impl Into<u64>) -> u32 {
    v.into() as u32
}

/// Bits 0..16 of `v`: the low field of a lo/hi pair, or the low half of a
/// crc32c kept in 16 bits.
#[inline]
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn lo16(v: impl Into<u64>) -> u16 {
    v.into() as u16
}

/// Bits 32..48 of `v`: the high field of a 48-bit block number or count.
#[inline]
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn hi16(v: u64) -> u16 {
    (v >> 32) as u16
}

/// The low 32 bits of a signed time, as ext4 and the COW header store
/// seconds (ext4 keeps the two bits above them in `extra` fields).
#[inline]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) const fn time32(v: i64) -> u32 {
    v as u32
}

/// A count or size the format keeps in 16 bits and the caller has already
/// bounded (block-group limits, block-size records). Saturates instead of
/// wrapping if that bound is ever broken, and trips in debug builds.
#[inline]
pub(crate) fn fit16(v: impl TryInto<u16> + Copy + std::fmt::Debug) -> u16 {
    match v.try_into() {
        Ok(x) => x,
        Err(_) => {
            debug_assert!(false, "{v:?} does not fit in 16 bits");
            u16::MAX
        }
    }
}

/// As [`fit16`], for 32-bit fields (inode and block counts, sizes of
/// in-memory tables).
#[inline]
pub(crate) fn fit32(v: impl TryInto<u32> + Copy + std::fmt::Debug) -> u32 {
    match v.try_into() {
        Ok(x) => x,
        Err(_) => {
            debug_assert!(false, "{v:?} does not fit in 32 bits");
            u32::MAX
        }
    }
}

/// As [`fit16`], for 8-bit fields (name lengths, bounded by 255 upstream).
#[inline]
pub(crate) fn fit8(v: impl TryInto<u8> + Copy + std::fmt::Debug) -> u8 {
    match v.try_into() {
        Ok(x) => x,
        Err(_) => {
            debug_assert!(false, "{v:?} does not fit in 8 bits");
            u8::MAX
        }
    }
}

/// A file offset as the `off_t` system calls take, or an error naming it
/// (offsets above `i64::MAX` cannot exist in a file).
pub(crate) fn off_t(v: u64) -> std::io::Result<i64> {
    i64::try_from(v).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("offset {v} is beyond what a file can hold"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_fields_take_the_bits_they_name() {
        let v = 0x0000_ABCD_1234_5678u64;
        assert_eq!(lo32(v), 0x1234_5678);
        assert_eq!(lo16(v), 0x5678);
        assert_eq!(hi16(v), 0xABCD);
        assert_eq!(time32(-1), u32::MAX);
        assert_eq!(time32(1 << 32 | 7), 7);
        assert_eq!(us(u64::MAX), usize::MAX);
        assert_eq!(fit16(65535u64), 65535);
        assert_eq!(fit8(255usize), 255);
        assert!(off_t(u64::MAX).is_err());
        assert_eq!(off_t(5).ok(), Some(5));
    }
}
