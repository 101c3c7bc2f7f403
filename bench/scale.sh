#!/usr/bin/env bash
# bench/scale.sh [N] [KERNEL] — start N idle busybox guests (--mem 64M),
# check that each answers `ctl version`, stop them all, and print N, the host
# memory used per guest, the idle CPU load, and the time to start and stop.
#   PAR=4 (parallel starts/stops)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
UMLCTL=${UMLCTL:-target/release/umlctl}
[ -x "$UMLCTL" ] || cargo build --release -q -p umlctl
UMLCTL=$(realpath "$UMLCTL")
KERNEL=${2:-$("$UMLCTL" kernel info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')}
PAR=${PAR:-4}
work=$(mktemp -d /tmp/umlctl-bench-scale.XXXXXX)
export UMLCTL_UML_DIR="$work/uml" UMLCTL KERNEL work
cleanup() {
  "$UMLCTL" ps --json 2>/dev/null | python3 -c 'import json,sys; [print(g["name"]) for g in json.load(sys.stdin)]' |
    xargs -r -P "$PAR" -n 1 "$UMLCTL" stop --force >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
. bench/lib-guest-image.sh
make_guest_image "$work" 2>/dev/null

now() { date +%s%N; }
used_kb() { awk '/MemTotal/ {t=$2} /MemAvailable/ {a=$2} END {print t-a}' /proc/meminfo; }
shmem_kb() { awk '/^Shmem:/ {print $2}' /proc/meminfo; }
cpu_busy() { awk '/^cpu / {print $2+$3+$4+$6+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }

sync; u0=$(used_kb); s0=$(shmem_kb)
t0=$(now)
seq -f "s%05g" "$N" | xargs -P "$PAR" -I{} sh -c '"$UMLCTL" start --name {} --image "$work/guest.ext4" --mem 64M --kernel "$KERNEL" >/dev/null || echo "start {} failed" >&2'
t1=$(now)
running=$("$UMLCTL" ps --json | python3 -c 'import json,sys; print(sum(1 for g in json.load(sys.stdin) if g["state"] == "running"))')
answering=$(seq -f "s%05g" "$N" | xargs -P "$PAR" -I{} sh -c '"$UMLCTL" ctl {} version >/dev/null 2>&1 && echo ok' | wc -l)
sleep 10
read -r b0 a0 < <(cpu_busy); sleep 10; read -r b1 a1 < <(cpu_busy)
u1=$(used_kb); s1=$(shmem_kb)
t2=$(now)
seq -f "s%05g" "$N" | xargs -P "$PAR" -n 1 "$UMLCTL" stop --timeout 10 >/dev/null
t3=$(now)
left=$(ls "$UMLCTL_UML_DIR" | wc -l)
printf 'guests started        %d (running %d, answering ctl version %d)\n' "$N" "$running" "$answering"
printf 'host memory per guest %.1f MiB used (%.1f MiB of it guest RAM in shmem)\n' \
  "$(awk -v k=$((u1 - u0)) -v n="$N" 'BEGIN {print k/1024/n}')" "$(awk -v k=$((s1 - s0)) -v n="$N" 'BEGIN {print k/1024/n}')"
printf 'idle CPU load         %.1f%% of the machine\n' "$(awk -v b=$((b1 - b0)) -v a=$((a1 - a0)) 'BEGIN {print 100*b/a}')"
printf 'start all             %.1f s (PAR=%d)\n' "$(awk -v d=$((t1 - t0)) 'BEGIN {print d/1e9}')" "$PAR"
printf 'stop all              %.1f s, %d files left\n' "$(awk -v d=$((t3 - t2)) 'BEGIN {print d/1e9}')" "$left"
