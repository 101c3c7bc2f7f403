#!/usr/bin/env bash
# bench/boot.sh — boot overhead of `umlctl run -- true` against the same
# kernel started by hand with a minimal static init that powers off at once.
#
#   bench/boot.sh [KERNEL...]        (default: umlctl's default kernel and /usr/bin/linux.uml)
#   RUNS=21 bench/boot.sh            (runs per measurement; the median is reported)
#   UMLCTL=path/to/umlctl            (default: target/release/umlctl, built if missing)
#
# Prints one row per kernel: median wall time of each, and their ratio; and
# `umlctl run --no-jail -- true` measured interleaved with the jailed runs,
# with the jail's cost (the difference of the medians, in ms). A second table
# times 200,000 guest system calls (`dd bs=1 count=100000` from /dev/zero to
# /dev/null in the guest), jailed and not, interleaved (median of SYSCALL_RUNS=5).
# A third times `run -- true` with --cpu-quota and --memory-max against without.
# Needs gcc with static libc (libc6-dev) for the minimal init.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-21}
UMLCTL=${UMLCTL:-target/release/umlctl}
if [ ! -x "$UMLCTL" ]; then
  cargo build --release -q -p umlctl
fi
UMLCTL=$(realpath "$UMLCTL")

work=$(mktemp -d /tmp/umlctl-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat > "$work/init.c" <<'C'
#include <sys/reboot.h>
int main(void) { reboot(RB_POWER_OFF); return 0; }
C
gcc -static -O2 -o "$work/init" "$work/init.c"
# A second reference: a minimal init that also runs /usr/bin/true, i.e. the
# same guest work as `umlctl run -- true` without umlctl.
cat > "$work/init-true.c" <<'C'
#include <spawn.h>
#include <sys/reboot.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
int main(void) {
  pid_t p; int st; char *argv[] = {"true", 0};
  if (posix_spawn(&p, "/usr/bin/true", 0, 0, argv, environ) == 0) waitpid(p, &st, 0);
  reboot(RB_POWER_OFF); return 0;
}
C
gcc -static -O2 -o "$work/init-true" "$work/init-true.c"

kernels=("$@")
if [ ${#kernels[@]} -eq 0 ]; then
  def=$("$UMLCTL" kernel info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
  kernels=("$def")
  [ -x /usr/bin/linux.uml ] && [ "$def" != /usr/bin/linux.uml ] && kernels+=(/usr/bin/linux.uml)
fi

now() { date +%s%N; }
# median of the numbers on stdin (nanoseconds) printed as seconds
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m/1e9}'; }

printf '%-22s %-10s %11s %11s %7s %15s %7s %11s %9s\n' kernel version "umlctl run" "bare boot" ratio "bare+true" ratio "--no-jail" "jail ms"
for k in "${kernels[@]}"; do
  info=$("$UMLCTL" kernel info --json "$k")
  ver=$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
  shim=$(printf '%s' "$info" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("xstate_shim_path") or "")')
  # Warm both paths once (page cache, umlctl's caches).
  "$UMLCTL" run --kernel "$k" -- true
  (cd "$work" && env ${shim:+LD_PRELOAD=$shim} "$k" mem=256M rootfstype=hostfs rootflags=/ ro init="$work/init" \
      con=null con0=fd:0,fd:1 ssl=null uml_dir="$work/" umid=bare noreboot </dev/null >/dev/null 2>&1) || true
  "$UMLCTL" run --no-jail --kernel "$k" -- true 2>/dev/null
  pairs=$(for _ in $(seq "$RUNS"); do
    t=$(now); "$UMLCTL" run --kernel "$k" -- true; a=$(( $(now) - t ))
    t=$(now); "$UMLCTL" run --no-jail --kernel "$k" -- true 2>/dev/null; b=$(( $(now) - t ))
    echo "$a $b"
  done)
  ours=$(printf '%s\n' "$pairs" | awk '{print $1}' | median)
  nojail=$(printf '%s\n' "$pairs" | awk '{print $2}' | median)
  jailms=$(awk -v a="$ours" -v b="$nojail" 'BEGIN {printf "%.1f", (a-b)*1000}')
  # $2: more boot options (umlctl's own: the same kernel work as `run`).
  bare_with() {
    for _ in $(seq "$RUNS"); do
      t=$(now)
      (cd "$work" && env ${shim:+LD_PRELOAD=$shim} "$k" mem=256M rootfstype=hostfs rootflags=/ ro init="$work/$1" ${2:-} \
          con=null con0=fd:0,fd:1 ssl=null uml_dir="$work/" umid=bare noreboot </dev/null >/dev/null 2>&1) || true
      echo $(( $(now) - t ))
    done | median
  }
  bare=$(bare_with init)
  baretrue=$(bare_with init-true)
  # The boot options umlctl adds for speed (`run --json` says which
  # initcalls it skips; legacy ptys always), given to the bare boot too.
  opts="pty.legacy_count=0"
  skips=$("$UMLCTL" run --json --kernel "$k" -- true 2>&1 >/dev/null | tail -1 |
    python3 -c 'import json,sys; print(",".join(json.loads(sys.stdin.read()).get("skipped_initcalls") or []))')
  [ -n "$skips" ] && opts="$opts initcall_blacklist=$skips"
  baretrue_opts=$(bare_with init-true "$opts")
  ratio=$(awk -v a="$ours" -v b="$bare" 'BEGIN {printf "%.2f", a/b}')
  ratio2=$(awk -v a="$ours" -v b="$baretrue" 'BEGIN {printf "%.2f", a/b}')
  ratio3=$(awk -v a="$ours" -v b="$baretrue_opts" 'BEGIN {printf "%.2f", a/b}')
  printf '%-22s %-10s %10ss %10ss %7s %14ss %7s %10ss %9s\n' "$(basename "$(dirname "$k")")/$(basename "$k")" "$ver" "$ours" "$bare" "$ratio" "$baretrue" "$ratio2" "$nojail" "$jailms"
  printf '%-22s %-10s bare+true with umlctl'"'"'s boot options (%s): %ss, ratio %s\n' "" "" "$opts" "$baretrue_opts" "$ratio3"
done

SYSCALL_RUNS=${SYSCALL_RUNS:-5}
echo
printf '%-22s %-10s %14s %14s %9s\n' kernel version "dd jailed" "dd --no-jail" "jail ms"
for k in "${kernels[@]}"; do
  ver=$("$UMLCTL" kernel info --json "$k" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
  pairs=$(for _ in $(seq "$SYSCALL_RUNS"); do
    t=$(now); "$UMLCTL" run --kernel "$k" -- dd if=/dev/zero of=/dev/null bs=1 count=100000 2>/dev/null; a=$(( $(now) - t ))
    t=$(now); "$UMLCTL" run --no-jail --kernel "$k" -- dd if=/dev/zero of=/dev/null bs=1 count=100000 2>/dev/null; b=$(( $(now) - t ))
    echo "$a $b"
  done)
  j=$(printf '%s\n' "$pairs" | awk '{print $1}' | median)
  n=$(printf '%s\n' "$pairs" | awk '{print $2}' | median)
  d=$(awk -v a="$j" -v b="$n" 'BEGIN {printf "%.1f", (a-b)*1000}')
  printf '%-22s %-10s %13ss %13ss %9s\n' "$(basename "$(dirname "$k")")/$(basename "$k")" "$ver" "$j" "$n" "$d"
done

# The cost of --cpu-quota/--memory-max (a cgroup made, joined and removed
# per run), interleaved with plain runs; where the host offers no cgroup
# umlctl may use, this says so instead.
echo
printf '%-22s %-10s %14s %22s %9s\n' kernel version "run -- true" "with both limits" "limits ms"
for k in "${kernels[@]}"; do
  ver=$("$UMLCTL" kernel info --json "$k" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
  if ! "$UMLCTL" run --kernel "$k" --cpu-quota 100% --memory-max 1G -- true 2>"$work/limits.err"; then
    printf '%-22s %-10s limits unavailable here: %s\n' "$(basename "$(dirname "$k")")/$(basename "$k")" "$ver" "$(head -1 "$work/limits.err")"
    continue
  fi
  pairs=$(for _ in $(seq "$RUNS"); do
    t=$(now); "$UMLCTL" run --kernel "$k" -- true; a=$(( $(now) - t ))
    t=$(now); "$UMLCTL" run --kernel "$k" --cpu-quota 100% --memory-max 1G -- true; b=$(( $(now) - t ))
    echo "$a $b"
  done)
  a=$(printf '%s\n' "$pairs" | awk '{print $1}' | median)
  b=$(printf '%s\n' "$pairs" | awk '{print $2}' | median)
  d=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.1f", (b-a)*1000}')
  printf '%-22s %-10s %13ss %21ss %9s\n' "$(basename "$(dirname "$k")")/$(basename "$k")" "$ver" "$a" "$b" "$d"
done
