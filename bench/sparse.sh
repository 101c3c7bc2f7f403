#!/usr/bin/env bash
# bench/sparse.sh [GIB] — `umlctl image build` of a directory holding one
# sparse file of GIB GiB (default 20) with a few KiB of data, against
# `mke2fs -t ext4 -d` on the same directory (e2fsprogs also reads sparse
# files by SEEK_DATA/SEEK_HOLE). Prints both times and the ratio; both
# images are checked with e2fsck -fn. umlctl still hashes every zero (the
# manifest's sha256 is of the whole content); mke2fs hashes nothing.
#
#   bench/sparse.sh           WORK=/somewhere bench/sparse.sh 50
#   UMLCTL=/path/to/umlctl bench/sparse.sh   (a binary built elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
GIB=${1:-20}
WORK=${WORK:-/var/tmp/umlctl-bench-sparse}
if [ -z "${UMLCTL:-}" ]; then
  cargo build --release -q -p umlctl
  UMLCTL=$(realpath target/release/umlctl)
fi
command -v mke2fs >/dev/null || { echo "mke2fs missing: apt-get install e2fsprogs" >&2; exit 1; }

rm -rf "$WORK" && mkdir -p "$WORK/src"
f=$WORK/src/sparse
truncate -s "${GIB}G" "$f"
for at in 1 4095 $((1 << 30)) $((GIB << 29)); do
  printf 'data at %s' "$at" | dd of="$f" bs=1 seek="$at" conv=notrunc status=none
done
echo "source: $(du -h --apparent-size "$f" | cut -f1) apparent, $(du -h "$f" | cut -f1) on disk"

secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }

sync
ours=$(secs "$UMLCTL" image build -o "$WORK/ours.img" "$WORK/src")
size=$(stat -c %s "$WORK/ours.img")
sync
peer=$(secs mke2fs -q -F -t ext4 -d "$WORK/src" "$WORK/mke2fs.img" "$((size / 1024))k")
e2fsck -fn "$WORK/ours.img" >/dev/null
e2fsck -fn "$WORK/mke2fs.img" >/dev/null
printf '%-44s %8.2f s\n' "umlctl image build (directory)" "$ours"
printf '%-44s %8.2f s\n' "mke2fs -t ext4 -d (same directory)" "$peer"
printf '%-44s %8.2f\n' "ratio (umlctl / mke2fs)" "$(echo "$ours / $peer" | bc -l)"
rm -rf "$WORK"
