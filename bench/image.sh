#!/usr/bin/env bash
# bench/image.sh — `umlctl image build` and `image verify` against the
# decompress-and-parse floor and `mke2fs -t ext4 -d`, from one run.
#
# Input: a tar.gz of about 70,000 entries / 1.2 GB made from this machine's
# /usr (bin sbin include share libexec lib/python3*), cached in $WORK
# (default /var/tmp/umlctl-bench-image) because making it takes a minute.
# Prints: our build time and peak RSS, the time to merely decompress and
# parse the same tar.gz with the same crates (imgtools/examples/tarparse),
# the time of `mke2fs -t ext4 -d` on the extracted tree (same image size,
# Debian's default features), verify throughput, and the ratios.
#
#   bench/image.sh            WORK=/somewhere/with/6GB bench/image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/umlctl-bench-image}
mkdir -p "$WORK"
cargo build --release -q -p umlctl
cargo build --release -q -p umlctl-imgtools --example tarparse
UMLCTL=$(realpath target/release/umlctl)
TARPARSE=$(realpath target/release/examples/tarparse)
command -v mke2fs >/dev/null || { echo "mke2fs missing: apt-get install e2fsprogs" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: apt-get install time" >&2; exit 1; }

tgz=$WORK/usr.tar.gz
if [ ! -s "$tgz" ]; then
  echo "making $tgz (once) ..." >&2
  tar -C / -czf "$tgz.tmp" --sort=name usr/bin usr/sbin usr/include usr/share usr/libexec \
    $(cd / && ls -d usr/lib/python3*)
  mv "$tgz.tmp" "$tgz"
fi
tree=$WORK/tree
if [ ! -d "$tree" ]; then
  mkdir -p "$tree.tmp" && tar -C "$tree.tmp" -xzf "$tgz" && mv "$tree.tmp" "$tree"
fi
# Warm the page cache for everybody.
cat "$tgz" >/dev/null
rm -f "$WORK/ours.img" "$WORK/mke2fs.img" "$WORK/manifest.json"

# `sync` before each timed step: no step pays for an earlier one's writeback.
parse_out=$(mktemp)
sync
parse=$( { /usr/bin/time -f %e "$TARPARSE" "$tgz" >"$parse_out"; } 2>&1 )
sync
ours=$( { /usr/bin/time -f "%e %M" "$UMLCTL" image build -o "$WORK/ours.img" --manifest "$WORK/manifest.json" \
  --epoch 1700000000 "$tgz" >/dev/null; } 2>&1 | tail -1)
ours_t=${ours% *}; ours_rss=${ours#* }
size=$(stat -c %s "$WORK/ours.img")
e2fsck -fn "$WORK/ours.img" >/dev/null 2>&1 && fsck=clean || fsck="NOT CLEAN"
sync
mke=$( { /usr/bin/time -f %e mke2fs -q -F -t ext4 -d "$tree" "$WORK/mke2fs.img" "$((size / 1024))k"; } 2>&1 | tail -1)
content=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sum(e['size'] for e in m['entries'] if e['type']=='file'))" "$WORK/manifest.json")
entries=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['entries']))" "$WORK/manifest.json")
sync
ver=$( { /usr/bin/time -f "%e %M" "$UMLCTL" image verify "$WORK/ours.img" --manifest "$WORK/manifest.json" >/dev/null; } 2>&1 | tail -1)
ver_t=${ver% *}; ver_rss=${ver#* }

printf '\ninput: %s (%s entries, %s bytes of file content, %s compressed)\n' "$tgz" "$entries" "$content" "$(stat -c %s "$tgz")"
printf '%-44s %8s\n' "step" "seconds"
printf '%-44s %8.2f\n' "decompress+parse (flate2/zlib-rs + tar)" "$parse"
printf '%-44s %8.2f   peak RSS %d MB, e2fsck -fn: %s\n' "umlctl image build" "$ours_t" "$((ours_rss / 1024))" "$fsck"
printf '%-44s %8.2f\n' "mke2fs -t ext4 -d (extracted tree)" "$mke"
printf '%-44s %8.2f   peak RSS %d MB\n' "umlctl image verify --manifest" "$ver_t" "$((ver_rss / 1024))"
echo
echo "build / parse:   $(echo "scale=2; $ours_t / $parse" | bc)x   (target <= 1.5)"
echo "mke2fs / build:  $(echo "scale=2; $mke / $ours_t" | bc)x   (target >= 5)"
echo "verify:          $(echo "scale=2; $content / $ver_t / 1000000000" | bc) GB/s of file content   (target >= 1)"
rm -f "$parse_out" "$WORK/mke2fs.img"
