//! Helpers shared by unit tests.

/// The fuzz targets' deterministic short version: `check` on every seed,
/// then on `runs` copies of random seeds with one to four bytes replaced
/// (xorshift from `state`, so every run sees the same inputs).
pub fn byte_flips(seeds: &[Vec<u8>], mut state: u64, runs: usize, mut check: impl FnMut(&[u8])) {
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for s in seeds {
        check(s);
    }
    for _ in 0..runs {
        let mut s = seeds[usize::try_from(next() % seeds.len() as u64).unwrap()].clone();
        for _ in 0..1 + next() % 4 {
            let i = usize::try_from(next() % s.len() as u64).unwrap();
            s[i] = (next() & 0xff) as u8;
        }
        check(&s);
    }
}
