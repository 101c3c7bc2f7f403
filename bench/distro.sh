#!/usr/bin/env bash
# bench/distro.sh — a stock Debian guest from one run, per kernel:
#   - from `umlctl start` to `umlctl exec` answering, and to sshd accepting on
#     the guest's leased address (a netd bridge in a private namespace);
#   - the host memory of the idle guest (PSS of its UML processes, 10 s after
#     sshd accepts), and again after `umlctl reclaim`;
#   - `umlctl exec NAME -- true` latency (median of RUNS) next to
#     `ssh root@GUEST true` on the same guest (key placed through exec; the
#     ssh client runs in the bridge's namespace) — ssh's peer figure.
# The image is the test suite's (mmdebstrap minbase + systemd-sysv, udev,
# iproute2, openssh-server; built once into /var/tmp/umlctl-test-images).
#
#   KERNELS="/usr/bin/linux.uml /path/to/6.12/linux" RUNS=50 bench/distro.sh   (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/distro.sh: run as root (it makes a network namespace)" >&2; exit 1; }
RUNS=${RUNS:-50}
UMLCTL=${UMLCTL:-target/release/umlctl}
[ -x "$UMLCTL" ] || cargo build --release -q -p umlctl
UMLCTL=$(realpath "$UMLCTL")
if [ -z "${KERNELS:-}" ]; then
  KERNELS=/usr/bin/linux.uml
  k612=/var/tmp/umlctl-test-kernels/kernels/6.12.118/linux
  [ -x "$k612" ] && KERNELS="$KERNELS $k612"
fi
images=/var/tmp/umlctl-test-images
img=$images/bookworm-minbase+systemd-sysv+udev+iproute2+openssh-server-v1.ext4
if [ ! -f "$img" ]; then
  command -v mmdebstrap >/dev/null || { echo "bench/distro.sh: apt-get install mmdebstrap" >&2; exit 1; }
  mkdir -p "$images"
  mmdebstrap --quiet --variant=minbase --include=systemd-sysv,udev,iproute2,openssh-server bookworm - \
    | "$UMLCTL" image build -o "$img.tmp" - && mv "$img.tmp" "$img"
fi
work=$(mktemp -d /var/tmp/umlctl-bench-distro.XXXXXX)
chmod 755 "$work"
ns=umlbd$$
netd_pid=
export UMLCTL_UML_DIR=$work/uml UMLCTL_NETD_SOCKET=$work/netd.sock
cleanup() {
  for g in $(ip netns exec "$ns" "$UMLCTL" ps --json 2>/dev/null | python3 -c 'import json,sys; [print(g["name"]) for g in json.load(sys.stdin)]' 2>/dev/null); do
    ip netns exec "$ns" "$UMLCTL" stop --rm --force "$g" >/dev/null 2>&1 || true
  done
  [ -n "$netd_pid" ] && kill "$netd_pid" 2>/dev/null && wait "$netd_pid" 2>/dev/null
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
cat > "$work/netd.toml" <<TOML
socket = "$work/netd.sock"
state = "$work/netd.state"

[[bridge]]
name = "br0"
address = "10.95.0.1/24"

[[allow]]
users = [0]
bridges = ["*"]
max_taps = 4
TOML
ip netns exec "$ns" "$UMLCTL" netd --config "$work/netd.toml" 2>"$work/netd.log" &
netd_pid=$!
for _ in $(seq 100); do [ -S "$work/netd.sock" ] && break; sleep 0.05; done
[ -S "$work/netd.sock" ] || { cat "$work/netd.log" >&2; exit 1; }
ssh-keygen -q -t ed25519 -N '' -f "$work/key"
in_ns() { ip netns exec "$ns" "$@"; }
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# ms_of CMD…: wall time of one run in milliseconds.
ms_of() { local t0 t1; t0=$(now); "$@" >/dev/null 2>&1; t1=$(now); echo "($t1 - $t0) * 1000" | bc -l; }

printf '%-12s %10s %10s %10s %12s %14s %12s %12s\n' kernel start_s exec_s sshd_s idle_pss_MiB reclaimed_MiB exec_true_ms ssh_true_ms
for k in $KERNELS; do
  name=d$$
  ver=$("$UMLCTL" kernel info "$k" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
  t0=$(now)
  in_ns "$UMLCTL" start --name "$name" --image "$img" --kernel "$k" --mem 384M --net br0 >/dev/null
  t_start=$(now)
  until in_ns "$UMLCTL" exec "$name" -- true 2>/dev/null; do sleep 0.05; done
  t_exec=$(now)
  addr=$(in_ns "$UMLCTL" ps --json | python3 -c 'import json,sys; g=[g for g in json.load(sys.stdin) if g["name"]=="'"$name"'"][0]; print(g["nics"][0].split()[1].split("/")[0])')
  until in_ns timeout 2 bash -c "exec 3<>/dev/tcp/$addr/22" 2>/dev/null; do sleep 0.05; done
  t_ssh=$(now)
  sleep 10
  pss_of() {
    local pss=0 p pid
    for pid in $(pgrep -f "umid=$name " || true); do
      p=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
      pss=$((pss + ${p:-0}))
    done
    echo "$pss"
  }
  pss=$(pss_of)
  in_ns "$UMLCTL" reclaim "$name" >/dev/null
  pss_reclaimed=$(pss_of)
  in_ns "$UMLCTL" exec -i "$name" -- sh -c 'mkdir -p -m 700 /root/.ssh && cat > /root/.ssh/authorized_keys' < "$work/key.pub"
  exec_ms=$(for _ in $(seq "$RUNS"); do ms_of in_ns "$UMLCTL" exec "$name" -- true; done | median)
  ssh_opts=(-i "$work/key" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR)
  ssh_ms=$(for _ in $(seq "$RUNS"); do ms_of in_ns ssh "${ssh_opts[@]}" "root@$addr" true; done | median)
  printf '%-12s %10.2f %10.2f %10.2f %12.1f %14.1f %12.1f %12.1f\n' "$ver" \
    "$(echo "$t_start - $t0" | bc -l)" "$(echo "$t_exec - $t0" | bc -l)" "$(echo "$t_ssh - $t0" | bc -l)" \
    "$(echo "$pss / 1024" | bc -l)" "$(echo "$pss_reclaimed / 1024" | bc -l)" "$exec_ms" "$ssh_ms"
  printf '%-12s exec is %.1fx faster than ssh\n' "" "$(echo "$ssh_ms / $exec_ms" | bc -l)"
  in_ns "$UMLCTL" stop --rm "$name" >/dev/null
done
