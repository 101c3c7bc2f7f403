#!/usr/bin/env bash
# bench/net.sh — networking figures from one run, in a private network namespace:
#   1. TCP throughput guest → host over a netd tap on a bridge, with a sender
#      that writes 1 MiB per system call (the network path's figure) and one
#      that writes 4 KiB per call (what most tools do: bound by UML's guest
#      system call cost), in both tap modes:
#        owned — a persistent tap owned by the user, opened by UML's vector
#                driver (transport=tap: vnet headers, offloads); root here,
#                since /dev/net/tun is 0600 on this machine;
#        fd    — netd opens the tap and passes the descriptor (transport=fd,
#                no offloads); uid 65534, which cannot open /dev/net/tun.
#      Peer: the same sender and receiver over a veth pair between two host
#      namespaces (no UML), for scale. And an owned-tap guest on a NAT
#      bridge sending through netd's masquerade to the other end of that
#      veth ("the outside").
#      And `--net user` (passt, as uid 65534: no root, no netd, no tap)
#      sending to the same outside, beside netd's NAT.
#   2. The time to obtain a tap from netd (hello once, then create_tap round
#      trips, released each time), against `ip tuntap add` + `ip link set
#      master` doing the same job from the shell.
#
#   MIB=4096 RUNS=3 KERNEL=/path/to/linux bench/net.sh      (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/net.sh: run as root (it makes network namespaces)" >&2; exit 1; }
MIB=${MIB:-4096}
UMLCTL=${UMLCTL:-target/release/umlctl}
[ -x "$UMLCTL" ] || cargo build --release -q -p umlctl
UMLCTL=$(realpath "$UMLCTL")
kernel_args=()
[ -n "${KERNEL:-}" ] && kernel_args=(--kernel "$KERNEL")
work=$(mktemp -d /var/tmp/umlctl-bench-net.XXXXXX)
chmod 755 "$work"
ns=umlbn$$
peer=umlbp$$
netd_pid=
cleanup() {
  [ -n "$netd_pid" ] && kill "$netd_pid" 2>/dev/null && wait "$netd_pid" 2>/dev/null
  ip netns del "$ns" 2>/dev/null || true
  ip netns del "$peer" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
gcc -O2 -o "$work/tcpblast" bench/net/tcpblast.c

ip netns add "$ns"
ip -n "$ns" link set lo up
# The peer namespace: the veth peer for scale, and "the outside" for NAT
# (the bridge namespace's default route; no route back to the bridges).
ip netns add "$peer"
ip link add vb0 netns "$ns" type veth peer name vb1 netns "$peer"
ip -n "$ns" addr add 10.96.0.1/24 dev vb0 && ip -n "$ns" link set vb0 up
ip -n "$peer" addr add 10.96.0.2/24 dev vb1 && ip -n "$peer" link set vb1 up
ip -n "$ns" route add default via 10.96.0.2
# start_netd [nat]: netd with br0 (no NAT: no conntrack in the namespace,
# so the plain figures are not taxed by it), or with the NAT bridge nat0.
start_netd() {
  local bridge='name = "br0"
address = "10.97.0.1/24"'
  [ "${1:-}" = nat ] && bridge='name = "nat0"
address = "10.98.0.1/24"
nat = true'
  cat > "$work/netd.toml" <<TOML
socket = "$work/netd.sock"
state = "$work/netd.state"
socket_mode = "0666"

[[bridge]]
$bridge

[[allow]]
users = [0, "nobody"]
bridges = ["*"]
max_taps = 4
TOML
  if [ -n "$netd_pid" ]; then kill "$netd_pid"; wait "$netd_pid" || true; fi
  rm -f "$work/netd.sock"
  ip netns exec "$ns" "$UMLCTL" netd --config "$work/netd.toml" 2>"$work/netd.log" &
  netd_pid=$!
  for _ in $(seq 100); do [ -S "$work/netd.sock" ] && break; sleep 0.05; done
  [ -S "$work/netd.sock" ] || { cat "$work/netd.log" >&2; exit 1; }
}
start_netd

# recv NS: start a receiver in NS, print its "BYTES SECONDS GBITS" when done.
start_recv() {
  ip netns exec "$1" "$work/tcpblast" recv 5001 >"$work/recv.out" &
  recv_pid=$!
  for _ in $(seq 100); do grep -q listening "$work/recv.out" 2>/dev/null && return; sleep 0.02; done
  echo "receiver did not start" >&2; exit 1
}
finish_recv() { wait "$recv_pid"; tail -1 "$work/recv.out" | awk '{print $3}'; }

guest_send() { # MODE CHUNK_KIB MIB [nat]
  local who=() bridge=br0 recv_ns=$ns to=10.97.0.1
  [ "$1" = fd ] && who=(setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/nonexistent)
  [ "${4:-}" = nat ] && { bridge=nat0; recv_ns=$peer; to=10.96.0.2; }
  start_recv "$recv_ns"
  ip netns exec "$ns" "${who[@]}" "$UMLCTL" run "${kernel_args[@]}" --net "$bridge" \
    --netd-socket "$work/netd.sock" --workdir "$work" -- \
    ./tcpblast send "$to" 5001 "$3" "$2" >/dev/null 2>"$work/guest.err" ||
    { cat "$work/guest.err" >&2; exit 1; }
  finish_recv
}

user_send() { # CHUNK_KIB MIB: --net user (passt) as uid 65534 to the outside
  start_recv "$peer"
  ip netns exec "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/nonexistent \
    "$UMLCTL" run "${kernel_args[@]}" --net user --workdir "$work" -- \
    ./tcpblast send 10.96.0.2 5001 "$2" "$1" >/dev/null 2>"$work/guest.err" ||
    { cat "$work/guest.err" >&2; exit 1; }
  finish_recv
}

host_send() { # CHUNK_KIB
  start_recv "$ns"
  ip netns exec "$peer" "$work/tcpblast" send 10.96.0.1 5001 "$MIB" "$1"
  finish_recv
}

small=$((MIB / 8))
RUNS=${RUNS:-3}
# median VALUES...: the median; spread VALUES...: "min-max".
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
spread() { printf '%s\n' "$@" | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {print lo "-" hi}'; }
echo "TCP guest -> host, $MIB MiB in 1 MiB writes (median of $RUNS runs, range) and $small MiB in 4 KiB writes (one run), Gbit/s:"
printf '  %-40s %8s %13s %8s\n' "" "1 MiB" "range" "4 KiB"
row() { # LABEL FN ARG...: RUNS runs of FN ARG... 1024, one of FN ARG... 4
  local label=$1 fn=$2; shift 2
  local v=() i
  for i in $(seq "$RUNS"); do v+=("$($fn "$@" 1024)"); done
  local m; m=$(median "${v[@]}")
  printf '  %-40s %8s %13s %8s\n' "$label" "$m" "$(spread "${v[@]}")" "$($fn "$@" 4)"
  echo "$m" > "$work/last.median"
}
host_row() { host_send "$2"; }        # (ARG ignored) CHUNK
guest_row() { # MODE [nat] CHUNK
  local mode=$1 nat=
  [ "$2" = nat ] && { nat=nat; shift; }
  guest_send "$mode" "$2" "$([ "$2" = 4 ] && echo "$small" || echo "$MIB")" "$nat"
}
row "host veth (peer, no UML)" host_row -; h1=$(cat "$work/last.median")
row "guest, owned tap (vector, offloads)" guest_row owned; o1=$(cat "$work/last.median")
row "guest, fd passed (uid 65534)" guest_row fd; f1=$(cat "$work/last.median")
awk -v o="$o1" -v f="$f1" -v h="$h1" 'BEGIN {
  printf "  owned/fd %.1fx; owned is %.0f%% of the veth figure; target >= 10 Gbit/s (1 MiB writes, median): %s\n",
    o / f, 100 * o / h, (o >= 10 ? "met" : "NOT met") }'

echo "Time to obtain a tap on br0 (create + attach + up; released each time), ms:"
ip netns exec "$ns" /usr/bin/python3 - "$work/netd.sock" <<'PY'
import json, socket, statistics, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb", buffering=0)
def ask(m):
    f.write((json.dumps(dict(v=1, **m)) + "\n").encode()); return json.loads(f.readline())
ask(dict(op="hello", versions=[1]))
ts = []
for _ in range(200):
    t = time.perf_counter(); r = ask(dict(op="create_tap", bridge="br0")); ts.append((time.perf_counter() - t) * 1e3)
    assert r["reply"] == "tap", r
    ask(dict(op="release", ifname=r["lease"]["ifname"]))
ts.sort()
print(f"  umlctl netd create_tap:      median {statistics.median(ts):6.2f}  p99 {ts[197]:6.2f}  (target < 20)")
PY
ts=()
for i in $(seq 50); do
  t0=$(date +%s%N)
  ip -n "$ns" tuntap add dev bt0 mode tap
  ip -n "$ns" link set bt0 master br0 up
  t1=$(date +%s%N)
  ip -n "$ns" link del bt0
  ts+=($(( (t1 - t0) / 1000 )))
done
printf '%s\n' "${ts[@]}" | sort -n | awk '{a[NR]=$1} END {printf "  ip tuntap add + link set (peer): median %6.2f\n", a[int((NR+1)/2)]/1000}'

echo "Through NAT: guest -> the outside (the veth peer, no route back), netd masquerading, Gbit/s:"
start_netd nat
printf '  %-40s %8s %13s %8s\n' "" "1 MiB" "range" "4 KiB"
row "guest, owned tap, NAT bridge" guest_row owned nat; n1=$(cat "$work/last.median")
user_row() { user_send "$2" "$([ "$2" = 4 ] && echo "$small" || echo "$MIB")"; }
row "guest, --net user (passt, uid 65534)" user_row -; u1=$(cat "$work/last.median")
awk -v u="$u1" -v n="$n1" 'BEGIN {
  printf "  --net user is %.0f%% of netd NAT (%.2fx)\n", 100 * u / n, u / n }'
