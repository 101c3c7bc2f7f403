#!/usr/bin/env bash
# scripts/test-hostile-host.sh [VARIATION...] [-- CARGO-TEST-ARGS...]
#
# Run by hand as root, not by CI: the whole suite (scripts/test.sh) once per
# host variation that a stock or lived-in Debian/Ubuntu/Fedora host, or a
# container, brings with it. Each variation is made in namespaces of its own
# (a private mount namespace, a network namespace, a stand-in home), so the
# host's own device nodes, mounts, interfaces, routes and firewall are never
# changed. Variations (default: all of them):
#
#   tun-0666        /dev/net/tun is mode 0666, as udev makes it on stock
#                   Debian, Ubuntu and Fedora (this build machine has 0600)
#   ip-forward      net.ipv4.ip_forward=1, as Docker, Podman or a router
#                   leave it: the suite runs in a network namespace with
#                   forwarding on, and namespaces made inside it start with
#                   forwarding on too (net.core.devconf_inherit_init_net=3
#                   for the duration: it only decides what new namespaces
#                   copy, and is put back on exit)
#   noexec-shm      /dev/shm is a noexec tmpfs (Docker's default)
#   lived-in-home   the invoking user's home is lived in: its umlctl cache
#                   names a default kernel (one that is not a UML kernel, so
#                   a test that silently used it fails loudly), and ~/.uml
#                   holds a dead guest's record and a stray file
#
# Not emulated here (each is a host-wide setting with no private copy):
# Yama's ptrace_scope (not built into every host kernel; umlctl doctor
# reports it), Docker's iptables FORWARD policy (the suite's network tests
# run in namespaces of their own, which the host's rules do not reach).
#
# Prints one line per variation and exits non-zero if any failed; the logs
# stay in the directory it names.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

all=(tun-0666 ip-forward noexec-shm lived-in-home)
chosen=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    tun-0666|ip-forward|noexec-shm|lived-in-home) chosen+=("$1"); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown variation '$1'; choose from: ${all[*]}" >&2; exit 2 ;;
  esac
done
[ ${#chosen[@]} -eq 0 ] && chosen=("${all[@]}")

if [ "$(id -u)" -ne 0 ]; then
  echo "error: run as root: the variations are made with mount and network namespaces" >&2
  exit 2
fi
for tool in unshare mknod ip; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing: apt-get install util-linux iproute2 coreutils" >&2; exit 2; }
done

# The toolchain stays where it is when HOME changes.
export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
export RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
export PATH="$CARGO_HOME/bin:$PATH"

logs=$(mktemp -d /tmp/umlctl-hostile-XXXXXX)
inherit=/proc/sys/net/core/devconf_inherit_init_net
inherit_was=$(cat "$inherit" 2>/dev/null || true)
cleanup() {
  if [ -n "$inherit_was" ] && [ "$(cat "$inherit")" != "$inherit_was" ]; then
    echo "$inherit_was" > "$inherit"
  fi
}
trap cleanup EXIT

# Build once, with the network, so that the variations (one of them has no
# network) only run.
scripts/test.sh --no-run >"$logs/build.log" 2>&1 || {
  echo "error: building the suite failed; see $logs/build.log" >&2
  exit 1
}

run_variation() {
  local v=$1; shift
  case "$v" in
    tun-0666)
      unshare -m --propagation private sh -c '
        set -e
        d=$(mktemp -d)
        mount -t tmpfs -o mode=0755 hostile-tun "$d"
        mknod -m 0666 "$d/tun" c 10 200
        mount --bind "$d/tun" /dev/net/tun
        umount -l "$d"; rmdir "$d"
        exec "$@"' sh scripts/test.sh "$@"
      ;;
    ip-forward)
      [ -n "$inherit_was" ] || { echo "this host kernel has no $inherit" >&2; return 1; }
      echo 3 > "$inherit"
      CARGO_NET_OFFLINE=true unshare -n sh -c '
        set -e
        ip link set lo up
        echo 1 > /proc/sys/net/ipv4/ip_forward
        exec "$@"' sh scripts/test.sh "$@"
      local rc=$?
      echo "$inherit_was" > "$inherit"
      return $rc
      ;;
    noexec-shm)
      unshare -m --propagation private sh -c '
        set -e
        mount -t tmpfs -o noexec,nosuid,nodev hostile-shm /dev/shm
        exec "$@"' sh scripts/test.sh "$@"
      ;;
    lived-in-home)
      local home
      home=$(mktemp -d /tmp/umlctl-hostile-home-XXXXXX)
      mkdir -p "$home/.cache/umlctl/kernels/stale" "$home/.uml/dead.umlctl"
      cp /bin/true "$home/.cache/umlctl/kernels/stale/linux"
      echo stale > "$home/.cache/umlctl/kernels/default"
      echo 999999999 > "$home/.uml/dead.umlctl/pid"
      echo "not a guest" > "$home/.uml/stray"
      ln -s dead.umlctl/uml/dead "$home/.uml/dead"
      local rc=0
      env -u XDG_CACHE_HOME -u XDG_RUNTIME_DIR -u UMLCTL_KERNEL HOME="$home" \
        scripts/test.sh "$@" || rc=$?
      rm -rf "$home"
      return $rc
      ;;
  esac
}

failed=0
summary=()
for v in "${chosen[@]}"; do
  echo "== $v (log: $logs/$v.log)"
  start=$(date +%s)
  set +e
  ( set +e; run_variation "$v" "$@" ) >"$logs/$v.log" 2>&1
  rc=$?
  set -e
  last=$(tail -n 1 "$logs/$v.log")
  summary+=("$v: exit $rc in $(( $(date +%s) - start )) s — $last")
  [ "$rc" -eq 0 ] || failed=1
done
echo
echo "scripts/test-hostile-host.sh: logs in $logs"
printf '%s\n' "${summary[@]}"
exit $failed
