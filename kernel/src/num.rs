//! Integer conversions at the system-call boundary, in one place (the
//! workspace denies the cast lints; these are the reviewed exceptions).

use nix::unistd::Pid;

/// A process id from whatever integer type an API hands it out in (`u32`
/// from `std::process::Child::id`, `c_long` from a raw `clone`). A value
/// that is no pid at all becomes `i32::MAX`, above any `pid_max`, so a
/// signal or wait aimed at it finds no process instead of a wrong one.
pub(crate) fn pid(raw: impl TryInto<i32>) -> Pid {
    Pid::from_raw(raw.try_into().unwrap_or(i32::MAX))
}

/// An exit code as the 0–255 byte `exit(2)` keeps; anything outside that
/// range (never from the kernel) becomes 255.
pub(crate) fn exit_byte(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(u8::MAX)
}

/// A small count (descriptors, list lengths, test numbers) as the 32-bit
/// integer a protocol or system call takes; saturates instead of wrapping.
pub(crate) fn small_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// As [`small_u32`], for the signed `int` of descriptors.
pub(crate) fn small_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// A size that fits memory on every target umlctl runs on (64-bit Linux):
/// buffer and slot lengths given as `u64`.
pub(crate) fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_saturate_instead_of_wrapping() {
        assert_eq!(pid(7u32).as_raw(), 7);
        assert_eq!(pid(u32::MAX).as_raw(), i32::MAX);
        assert_eq!(pid(-1i64).as_raw(), -1);
        assert_eq!(exit_byte(300), 255);
        assert_eq!(exit_byte(3), 3);
        assert_eq!(small_u32(usize::MAX), u32::MAX);
        assert_eq!(small_i32(5), 5);
        assert_eq!(usize_of(1 << 20), 1 << 20);
    }
}
