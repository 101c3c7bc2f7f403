#!/usr/bin/env bash
# bench/kernel.sh — kernel builds and KUnit, from scratch, in one run:
#
#   1. `umlctl kernel build` of Debian's linux-source-6.12 (defconfig + umlctl's
#      options) into an empty cache, next to a plain `make ARCH=um defconfig &&
#      make ARCH=um linux` of the same tree (the peer: what people do by hand);
#   2. a second `umlctl kernel build` (nothing changed: "up to date");
#   3. `umlctl kernel test` on a small KUnit suite, next to kunit.py run from the
#      same tree on the same kunitconfig (both build their kernel from scratch);
#   4. `umlctl run --kernel <the built kernel> -- true`, median of RUNS.
#
#   bench/kernel.sh [SOURCE_TARBALL]     (default /usr/src/linux-source-6.12.tar.xz)
#   JOBS=2 RUNS=21 UMLCTL=target/release/umlctl
#
# Takes about 10 minutes on 2 cores. Needs linux-source-6.12 bc bison flex python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-/usr/src/linux-source-6.12.tar.xz}
JOBS=${JOBS:-$(nproc)}
RUNS=${RUNS:-21}
UMLCTL=${UMLCTL:-target/release/umlctl}
[ -x "$UMLCTL" ] || cargo build --release -q -p umlctl
UMLCTL=$(realpath "$UMLCTL")

work=$(mktemp -d /var/tmp/umlctl-bench-kernel.XXXXXX)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.${3:-1}f}')"; }

export UMLCTL_CACHE_DIR=$work/cache
printf 'CONFIG_KUNIT=y\nCONFIG_KUNIT_EXAMPLE_TEST=y\nCONFIG_KUNIT_TEST=y\n' > "$work/small.kunitconfig"

# The tree, extracted once for the peers (umlctl extracts its own copy, timed
# separately below).
mkdir -p "$work/tree"
tar -xf "$SRC" -C "$work/tree"
tree=$(find "$work/tree" -mindepth 1 -maxdepth 1 -type d | head -1)

t0=$(now)
"$UMLCTL" kernel build --source "$SRC" -j "$JOBS" --json > "$work/build.json"
t1=$(now)
"$UMLCTL" kernel build --source "$SRC" -j "$JOBS" > /dev/null
t2=$(now)
build_secs=$(python3 -c "import json; print(f'{json.load(open(\"$work/build.json\"))[\"meta\"][\"build_secs\"]:.1f}')")
kernel=$(python3 -c "import json; print(json.load(open(\"$work/build.json\"))[\"path\"])")

t3=$(now)
make -s -C "$tree" O="$work/plain" ARCH=um defconfig > /dev/null
make -s -C "$tree" O="$work/plain" ARCH=um -j "$JOBS" linux > /dev/null 2>&1
t4=$(now)

t5=$(now)
"$UMLCTL" kernel test --source "$SRC" --kunitconfig "$work/small.kunitconfig" -j "$JOBS" --json > "$work/kunit.json" || true
t6=$(now)
ours=$(python3 -c "
import json; o = json.load(open('$work/kunit.json'))['outcome']; c = o['report']['counts']
print(f\"{c['passed']+c['failed']+c['skipped']+c['crashed']} tests (passed {c['passed']}, skipped {c['skipped']}, failed {c['failed']}), run {o['run_secs']:.2f} s\")")

t7=$(now)
kpy=$(cd "$tree" && python3 tools/testing/kunit/kunit.py run --kunitconfig="$work/small.kunitconfig" \
  --build_dir="$work/kunitpy" --jobs="$JOBS" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -E "Testing complete|Elapsed" | sed 's/^\[[0-9:]*\] //' | paste -sd' ')
t8=$(now)

times=()
for _ in $(seq "$RUNS"); do
  a=$(now); "$UMLCTL" run --kernel "$kernel" -- true; b=$(now)
  times+=("$(secs "$a" "$b" 3)")
done
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")

echo
echo "kernel: $(python3 -c "import json; print(json.load(open('$work/build.json'))['meta']['version'])") from $SRC, -j$JOBS"
printf '| %-62s | %10s |\n' "step" "seconds"
printf '|%s|%s|\n' "$(printf -- '-%.0s' {1..64})" "$(printf -- '-%.0s' {1..12})"
printf '| %-62s | %10s |\n' "umlctl kernel build, cold (extract + configure + check + make)" "$(secs "$t0" "$t1")"
printf '| %-62s | %10s |\n' "  of which configure + make" "$build_secs"
printf '| %-62s | %10s |\n' "plain make defconfig + make linux (same tree, same -j)" "$(secs "$t3" "$t4")"
printf '| %-62s | %10s |\n' "umlctl kernel build again (up to date)" "$(secs "$t1" "$t2")"
printf '| %-62s | %10s |\n' "umlctl kernel test, cold (build KUnit kernel + run)" "$(secs "$t5" "$t6")"
printf '| %-62s | %10s |\n' "kunit.py run, cold, same tree and kunitconfig" "$(secs "$t7" "$t8")"
printf '| %-62s | %10s |\n' "umlctl run --kernel <built> -- true (median of $RUNS)" "$median"
echo
echo "umlctl kernel test: $ours"
echo "kunit.py:           $kpy"
