#!/usr/bin/env bash
# bench/start.sh [KERNEL] — time from `umlctl start` to a reachable mconsole,
# and the host memory an idle busybox guest with --mem 64M costs (PSS summed
# over all of the guest's UML processes, and the growth of the host's used
# memory), from one run.
set -euo pipefail
cd "$(dirname "$0")/.."
UMLCTL=${UMLCTL:-target/release/umlctl}
[ -x "$UMLCTL" ] || cargo build --release -q -p umlctl
UMLCTL=$(realpath "$UMLCTL")
KERNEL=${1:-$("$UMLCTL" kernel info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')}
work=$(mktemp -d /tmp/umlctl-bench-start.XXXXXX)
export UMLCTL_UML_DIR="$work/uml"
cleanup() { "$UMLCTL" stop --force bench >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
. bench/lib-guest-image.sh
make_guest_image "$work"

now() { date +%s%N; }
used_kb() { awk '/MemTotal/ {t=$2} /MemAvailable/ {a=$2} END {print t-a}' /proc/meminfo; }
shmem_kb() { awk '/^Shmem:/ {print $2}' /proc/meminfo; }
shm0=$(shmem_kb)
before=$(used_kb)
t0=$(now)
"$UMLCTL" start --name bench --image "$work/guest.ext4" --mem 64M --kernel "$KERNEL" >/dev/null
t1=$(now)
"$UMLCTL" ctl bench version >/dev/null
t2=$(now)
sleep 5   # let the guest settle into idle
pid=$("$UMLCTL" ps --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])')
pss=$(for p in $(pgrep -g "$pid"); do awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null; done | awk '{s+=$1} END {print s}')
procs=$(pgrep -g "$pid" | wc -l)
after=$(used_kb)
shm1=$(shmem_kb)
printf 'kernel            %s\n' "$("$UMLCTL" kernel info --json "$KERNEL" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')"
printf 'start returned    %.3f s\n' "$(awk -v d=$((t1 - t0)) 'BEGIN {print d/1e9}')"
printf 'mconsole answers  %.3f s after start was called\n' "$(awk -v d=$((t2 - t0)) 'BEGIN {print d/1e9}')"
printf 'idle guest        %d processes, PSS %.1f MiB (guest RAM in use: shmem +%.1f MiB), host used memory +%.1f MiB\n' "$procs" "$(awk -v k="$pss" 'BEGIN {print k/1024}')" "$(awk -v k=$((shm1 - shm0)) 'BEGIN {print k/1024}')" "$(awk -v k=$((after - before)) 'BEGIN {print k/1024}')"
