#!/usr/bin/env bash
# bench/exec.sh — data into and out of a running guest with `umlctl exec`,
# against the host's own pipe, from one run: MIB MiB of stdin through
# `exec -i` (the slot's stdin ring); MIB_SERIAL MiB through the serial line
# that carried stdin before the rings (a guest whose own disks take the
# ring slots falls back to it); and MIB MiB of stdout. Median of RUNS, in
# MB/s. The guest command is busybox dd (bs=1M) to or from /dev/null.
#
#   bench/exec.sh                    (256 MiB, serial 4 MiB, median of 3)
#   MIB=64 MIB_SERIAL=2 RUNS=5 bench/exec.sh
#   UMLCTL=path/to/umlctl KERNEL=path/to/linux
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${MIB:-256}
MIB_SERIAL=${MIB_SERIAL:-4}
RUNS=${RUNS:-3}
UMLCTL=${UMLCTL:-target/release/umlctl}
if [ ! -x "$UMLCTL" ]; then
  cargo build --release -q -p umlctl
fi
UMLCTL=$(realpath "$UMLCTL")
. bench/lib-guest-image.sh
work=$(mktemp -d /var/tmp/umlctl-bench-exec.XXXXXX)
export UMLCTL_UML_DIR="$work/uml"
cleanup() {
  "$UMLCTL" stop --force --rm bench-ring >/dev/null 2>&1 || true
  "$UMLCTL" stop --force --rm bench-serial >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
chmod 755 "$work"
make_guest_image "$work"
kernel=()
[ -n "${KERNEL:-}" ] && kernel=(--kernel "$KERNEL")
"$UMLCTL" start --name bench-ring --wait --image "$work/guest.ext4" "${kernel[@]}" >/dev/null
disks=()
for i in $(seq 11); do
  truncate -s 1M "$work/d$i.img"
  disks+=(--disk "$work/d$i.img")
done
"$UMLCTL" start --name bench-serial --wait --image "$work/guest.ext4" "${kernel[@]}" "${disks[@]}" >/dev/null

now() { date +%s%N; }
# MB/s of MiB moved in the median of the times on stdin (ns).
rate() { sort -n | awk -v m="$1" '{a[NR]=$1} END {t=a[int((NR+1)/2)]/1e9; printf "%.1f", m*1048576/1e6/t}'; }
timed() {
  local mib=$1; shift
  for _ in $(seq "$RUNS"); do
    t=$(now); "$@" >/dev/null || { echo "bench/exec.sh: failed: $*" >&2; exit 1; }; echo $(( $(now) - t ))
  done | rate "$mib"
}
bytes=$((MIB << 20))
sbytes=$((MIB_SERIAL << 20))
ring=$(timed "$MIB" sh -c "head -c $bytes /dev/zero | '$UMLCTL' exec -i bench-ring -- busybox dd of=/dev/null bs=1M 2>/dev/null")
serial=$(timed "$MIB_SERIAL" sh -c "head -c $sbytes /dev/zero | '$UMLCTL' exec -i bench-serial -- busybox dd of=/dev/null bs=1M 2>/dev/null")
out=$(timed "$MIB" sh -c "'$UMLCTL' exec bench-ring -- busybox dd if=/dev/zero bs=1M count=$MIB 2>/dev/null | cat >/dev/null")
host=$(timed "$MIB" sh -c "head -c $bytes /dev/zero | cat | cat >/dev/null")
ver=$("$UMLCTL" ps --json | python3 -c 'import json,sys; print([g for g in json.load(sys.stdin) if g["name"]=="bench-ring"][0]["kernel_version"])')
printf '%-10s %-28s %12s %12s\n' kernel what "MB/s" "vs host"
for row in "exec -i (stdin ring):$ring" "exec -i (serial line):$serial" "exec (stdout, serial line):$out" "host cat | cat:$host"; do
  what=${row%%:*}; v=${row##*:}
  printf '%-10s %-28s %12s %11sx\n' "$ver" "$what" "$v" "$(awk -v a="$v" -v b="$host" 'BEGIN {printf "%.3f", a/b}')"
done
printf 'stdin ring vs serial line: %sx\n' "$(awk -v a="$ring" -v b="$serial" 'BEGIN {printf "%.0f", a/b}')"
