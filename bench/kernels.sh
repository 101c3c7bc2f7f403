#!/usr/bin/env bash
# bench/kernels.sh — the same guest work on Debian's 6.1 linux.uml, a 6.12
# build and a 7.x build (ptrace mode; 7.x also in seccomp mode, and in
# seccomp mode with 2 CPUs), and on the host itself, in one run.
#
#   bench/kernels.sh                       (kernels from the test suite's cache; built if missing)
#   K61=… K612=… K7=… bench/kernels.sh     (any UML kernel binaries instead)
#   RUNS=5 bench/kernels.sh                (runs per figure; the median is reported)
#   UMLCTL=path/to/umlctl                  (default: target/release/umlctl, built if missing)
#
# Figures, each the median of RUNS guests (one guest per run does every step):
#   boot      `umlctl run -- true`, wall seconds
#   getppid   µs per call (python3 loop of 20,000 calls, loop cost included)
#   forkexec  µs per fork+exec+wait of /bin/true (bash loop of 100)
#   pagefault seconds for `gzip -c /usr/bin/bash >/dev/null` ×20
#   serial    seconds for one CPU-bound loop (python3, 3,000,000 additions, no
#             system calls: a bash loop is no good here, since bash makes
#             system calls on every command once it has had children)
#   parallel  seconds for two such loops at once
#   make      seconds for `make -j$(nproc)` of 16 small C files (gcc)
# then the ratios the issue asks for: seccomp vs ptrace on 7.x (fork+exec,
# target ≥ 1.3×), and 2 CPUs vs 1 (parallel loops, target ≥ 1.6×; and each
# serial step, which should be no slower).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
UMLCTL=${UMLCTL:-target/release/umlctl}
if [ ! -x "$UMLCTL" ]; then
  cargo build --release -q -p umlctl
fi
UMLCTL=$(realpath "$UMLCTL")
cache=${UMLCTL_BENCH_KERNELS:-/var/tmp/umlctl-test-kernels}
build() { UMLCTL_CACHE_DIR=$cache "$UMLCTL" kernel build --json --source "$1" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])'; }
K61=${K61:-/usr/bin/linux.uml}
K612=${K612:-$(build /usr/src/linux-source-6.12.tar.xz)}
K7=${K7:-$(build "$(scripts/sid-linux-source.sh "$cache/sid")")}
for k in "$K61" "$K612" "$K7"; do
  [ -x "$k" ] || { echo "error: $k is not a kernel binary" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/umlctl-bench-kernels.XXXXXX)
trap 'rm -rf "$work"' EXIT
# The guest's work (also run on the host): one "name value" line per figure.
cat > "$work/probe.sh" <<'SH'
#!/bin/bash
set -e
# The same interpreter in the guest and on the host (a PATH may differ).
cd "$(mktemp -d)"
/usr/bin/python3 -c 'import os,time
n=20000
t=time.perf_counter()
for _ in range(n): os.getppid()
print("getppid", round((time.perf_counter()-t)/n*1e6, 3))'
s=$EPOCHREALTIME; for i in {1..100}; do /bin/true; done; e=$EPOCHREALTIME
echo "forkexec $(/usr/bin/python3 -c "print(round(($e-$s)/100*1e6))")"
s=$EPOCHREALTIME; for i in {1..20}; do gzip -c /usr/bin/bash >/dev/null; done; e=$EPOCHREALTIME
echo "pagefault $(/usr/bin/python3 -c "print(round($e-$s, 3))")"
loop() { /usr/bin/python3 -c 'x = 0
for i in range(3000000): x += i'; }
s=$EPOCHREALTIME; loop; e=$EPOCHREALTIME
echo "serial $(/usr/bin/python3 -c "print(round($e-$s, 3))")"
s=$EPOCHREALTIME; loop & loop & wait; e=$EPOCHREALTIME
echo "parallel $(/usr/bin/python3 -c "print(round($e-$s, 3))")"
for i in $(seq 16); do
  printf 'int f%d(int x) { int s = 0; for (int i = 0; i < x; i++) s += i * %d; return s; }\n' "$i" "$i" > "f$i.c"
done
printf 'all: %s\n%%.o: %%.c\n\tgcc -O2 -c $< -o $@\n' "$(echo f{1..16}.o)" > Makefile
s=$EPOCHREALTIME; make -s -j"$(nproc)"; e=$EPOCHREALTIME
echo "make $(/usr/bin/python3 -c "print(round($e-$s, 3))")"
SH
chmod +x "$work/probe.sh"

# name kernel [run options]
configs=(
  "6.1-ptrace|$K61|"
  "6.12-ptrace|$K612|"
  "7.x-ptrace|$K7|"
  "7.x-seccomp|$K7|--userspace seccomp"
  "7.x-seccomp-2cpu|$K7|--userspace seccomp --cpus 2"
)
declare -A vals
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for r in $(seq "$RUNS"); do
  for c in "${configs[@]}"; do
    IFS='|' read -r name k opts <<<"$c"
    # shellcheck disable=SC2086
    s=$(date +%s.%N); "$UMLCTL" run --kernel "$k" $opts -- true; e=$(date +%s.%N)
    vals[$name,boot]+="$(/usr/bin/python3 -c "print(round($e-$s, 3))") "
    # shellcheck disable=SC2086
    out=$("$UMLCTL" run --kernel "$k" $opts --mem 512M -w "$work" -- ./probe.sh)
    while read -r key v; do vals[$name,$key]+="$v "; done <<<"$out"
  done
  out=$("$work/probe.sh")
  while read -r key v; do vals[host,$key]+="$v "; done <<<"$out"
  vals[host,boot]+="0 "
done

figs=(boot getppid forkexec pagefault serial parallel make)
med() { echo "${vals[$1,$2]}" | tr ' ' '\n' | grep . | median; }
printf '%-18s' "medians of $RUNS"
for f in "${figs[@]}"; do printf '%11s' "$f"; done
echo
for name in 6.1-ptrace 6.12-ptrace 7.x-ptrace 7.x-seccomp 7.x-seccomp-2cpu host; do
  printf '%-18s' "$name"
  for f in "${figs[@]}"; do printf '%11s' "$(med "$name" "$f")"; done
  echo
done
echo "(boot s; getppid and forkexec µs per call; the rest s)"
echo "kernels: 6.1 $K61; 6.12 $K612; 7.x $K7 ($("$UMLCTL" kernel info --json "$K7" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])'))"
ratio() { /usr/bin/python3 -c "a=$1; b=$2; print(f'{a/b:.2f}x' if b else 'n/a')"; }
echo
echo "7.x seccomp vs ptrace, fork+exec: $(ratio "$(med 7.x-ptrace forkexec)" "$(med 7.x-seccomp forkexec)") faster (target >= 1.3x)"
echo "7.x seccomp vs ptrace, getppid:   $(ratio "$(med 7.x-ptrace getppid)" "$(med 7.x-seccomp getppid)") faster"
echo "7.x seccomp vs ptrace, pagefault: $(ratio "$(med 7.x-ptrace pagefault)" "$(med 7.x-seccomp pagefault)") faster"
echo "2 CPUs vs 1 (seccomp), two loops at once: $(ratio "$(med 7.x-seccomp parallel)" "$(med 7.x-seccomp-2cpu parallel)") faster (target >= 1.6x)"
echo "2 CPUs vs 1 (seccomp), make -j:           $(ratio "$(med 7.x-seccomp make)" "$(med 7.x-seccomp-2cpu make)") faster"
for f in getppid forkexec pagefault serial; do
  echo "2 CPUs vs 1 (seccomp), serial $f: $(ratio "$(med 7.x-seccomp "$f")" "$(med 7.x-seccomp-2cpu "$f")") (below 1.00x: slower with 2 CPUs)"
done
