#!/usr/bin/env bash
# bench/lab.sh — labs of N devices in a chain (d1 — d2 — … — dN, one
# collision domain between each pair, addresses set by startup scripts):
# the time from `lab start` to every startup script done, the host memory
# per idle device, and the time of `lab stop`; beside it the same lab
# under Kathará (PyPI `kathara`, Debian's docker.io, a Docker image
# imported from the same root tree) when Docker runs here — it says so
# when it does not.
#
#   bench/lab.sh                         (busybox devices, N = 5 20 50)
#   NS="5 20" bench/lab.sh
#   KIND=debian NS=20 bench/lab.sh       (Debian devices running FRR/OSPF under systemd)
#   KIND=debian-sysv NS=20 bench/lab.sh  (the same without systemd: sysvinit,
#                                         FRR started by /etc/init.d/frr, as
#                                         in Kathará's containers)
#   UMLCTL=path/to/umlctl KERNEL=path/to/linux MEM=64M
#
# "Memory per device" is the drop of MemAvailable over the idle lab (10 s
# after start), divided by N: everything the lab costs the host (UML
# processes, their memory files, page cache of the images), not only RSS;
# beside it the part of that in the guests' memory files (their RAM as the
# host holds it). Each N runs twice: `lab start --no-reclaim`, then plain
# `lab start` (which gives the host back the devices' page cache and free
# memory once the startup scripts are done).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_debs busybox-static e2fsprogs iputils-ping
UMLCTL=${UMLCTL:-target/release/umlctl}
[ -x "$UMLCTL" ] || cargo build --release -q -p umlctl
UMLCTL=$(realpath "$UMLCTL")
KERNEL=${KERNEL:-$("$UMLCTL" kernel info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')}
KIND=${KIND:-busybox}
NS=${NS:-5 20 50}
case $KIND in busybox | debian | debian-sysv) ;; *) echo "KIND=$KIND: busybox, debian or debian-sysv" >&2; exit 2 ;; esac
MEM=${MEM:-$([ "$KIND" = busybox ] && echo 64M || echo 160M)}
work=$(mktemp -d /var/tmp/umlctl-bench-lab.XXXXXX)
export UMLCTL_UML_DIR="$work/uml"
cleanup() {
  for d in "$work"/lab*; do
    [ -d "$d" ] && "$UMLCTL" lab stop -d "$d" --timeout 2 >/dev/null 2>&1 || true
  done
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s%N; }
avail_kb() { awk '/MemAvailable/ {print $2}' /proc/meminfo; }
# The guests' memory files, MiB per device: each running guest's UML
# process holds its RAM as a deleted file of exactly the guest's memory size.
memfile_mib() {
  "$UMLCTL" ps --json | python3 -c '
import json, os, sys
n, total = int(sys.argv[1]), 0
for g in json.load(sys.stdin):
    fd = "/proc/%d/fd" % g["pid"]
    for e in os.listdir(fd) if os.path.isdir(fd) else []:
        try:
            if not os.readlink(os.path.join(fd, e)).endswith(" (deleted)"):
                continue
            st = os.stat(os.path.join(fd, e))
        except OSError:
            continue
        if st.st_size == g["mem_bytes"]:
            total += st.st_blocks * 512
            break
print("%.1f" % (total / 1048576 / n))' "$1"
}
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", (b-a)/1e9}'; }

# The device image.
if [ "$KIND" != busybox ]; then
  ensure_debs mmdebstrap
  if [ "$KIND" = debian ]; then
    pkgs=systemd-sysv,udev,iproute2,openssh-server,frr,iputils-ping
  else
    pkgs=sysvinit-core,iproute2,frr,iputils-ping
  fi
  img=${IMAGE:-/var/tmp/umlctl-test-images/bookworm-minbase+${pkgs//,/+}-v1.ext4}
  if [ ! -f "$img" ]; then
    mkdir -p "$(dirname "$img")"
    mmdebstrap --quiet --variant=minbase --include="$pkgs" bookworm - | "$UMLCTL" image build -o "$img.part" -
    mv "$img.part" "$img"
  fi
else
  root=$work/bbroot
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root}
  cp /bin/busybox "$root/bin/busybox"
  for a in $(/bin/busybox --list-full); do
    case $a in */busybox) ;; *) ln -sf /bin/busybox "$root/$a" ;; esac
  done
  printf '%s\n' '::sysinit:/bin/mount -t proc proc /proc' '::respawn:/bin/sleep 1000000' \
    '::ctrlaltdel:/bin/poweroff' > "$root/etc/inittab"
  img=$work/bb.ext4
  mke2fs -q -F -t ext4 -d "$root" "$img" 32M
fi

# make_lab DIR N: the chain, in Kathará's format.
make_lab() {
  local dir=$1 n=$2 i
  mkdir -p "$dir"
  : > "$dir/lab.conf"
  for i in $(seq 1 "$n"); do
    local s=$dir/d$i.startup
    : > "$s"
    if [ "$i" -gt 1 ]; then
      echo "d$i[0]=\"c$((i - 1))\"" >> "$dir/lab.conf"
      echo "ip address add 10.$(((i - 1) / 250)).$(((i - 1) % 250)).2/24 dev eth0" >> "$s"
    fi
    if [ "$i" -lt "$n" ]; then
      local k=$([ "$i" -gt 1 ] && echo 1 || echo 0)
      echo "d$i[$k]=\"c$i\"" >> "$dir/lab.conf"
      echo "ip address add 10.$((i / 250)).$((i % 250)).1/24 dev eth$k" >> "$s"
    fi
    if [ "$KIND" != busybox ]; then
      mkdir -p "$dir/d$i/etc/frr"
      printf 'zebra=yes\nospfd=yes\nvtysh_enable=yes\nzebra_options="  -A 127.0.0.1 -s 90000000"\nospfd_options="  -A 127.0.0.1"\n' \
        > "$dir/d$i/etc/frr/daemons"
      printf 'frr defaults traditional\nhostname d%s\nrouter ospf\n network 10.0.0.0/8 area 0\n' "$i" \
        > "$dir/d$i/etc/frr/frr.conf"
      if [ "$KIND" = debian ]; then echo "systemctl start frr" >> "$s"; else echo "/etc/init.d/frr start" >> "$s"; fi
    fi
  done
}

# Kathará, when Docker runs here (this script does not start a Docker daemon:
# it would rewrite the host's firewall and add bridges to the host) and
# Kathará's network plugin (kathara/katharanp, from Docker Hub) is there or
# can be pulled.
kathara_ok= kathara_why=
if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
  kathara_why="Docker does not run on this machine (docker info fails; start dockerd to compare)"
elif ! docker plugin inspect kathara/katharanp >/dev/null 2>&1 &&
  ! timeout 20 docker plugin install --grant-all-permissions kathara/katharanp >/dev/null 2>&1; then
  kathara_why="Kathará's Docker network plugin kathara/katharanp is not installed and cannot be pulled from Docker Hub here"
else
  command -v kathara >/dev/null || python3 -m pip install -q kathara >/dev/null 2>&1 || true
  if command -v kathara >/dev/null; then kathara_ok=1; else kathara_why="pip install kathara failed"; fi
fi

printf '%-20s %4s %10s %14s %14s %9s\n' tool N "start (s)" "MiB/idle dev" "RAM file MiB" "stop (s)"
for n in $NS; do
  dir=$work/lab$n
  make_lab "$dir" "$n"
  for how in --no-reclaim ""; do
    sync
    a0=$(avail_kb)
    t0=$(now)
    # shellcheck disable=SC2086
    "$UMLCTL" lab start -d "$dir" --image "$img" --kernel "$KERNEL" --mem "$MEM" $how > "$work/start$n.log" 2>&1 ||
      { cat "$work/start$n.log"; exit 1; }
    t1=$(now)
    # The chain works: d1 reaches d2.
    if [ "$n" -gt 1 ]; then
      "$UMLCTL" lab exec -d "$dir" d1 -- ping -c 1 -W 5 10.0.1.2 > /dev/null ||
        { echo "d1 does not reach d2"; exit 1; }
    fi
    sleep 10
    a1=$(avail_kb)
    ram=$(memfile_mib "$n")
    t2=$(now)
    "$UMLCTL" lab stop -d "$dir" --timeout 5 > /dev/null
    t3=$(now)
    printf '%-20s %4s %10s %14s %14s %9s\n' "umlctl ${how:-(reclaim)}" "$n" "$(secs "$t0" "$t1")" \
      "$(awk -v a="$a0" -v b="$a1" -v n="$n" 'BEGIN {printf "%.1f", (a-b)/1024/n}')" "$ram" "$(secs "$t2" "$t3")"
  done
  if [ -n "$kathara_ok" ]; then
    # The same root tree as a Docker image, the same lab.
    if ! docker image inspect umlctl-bench-lab:latest > /dev/null 2>&1; then
      mkdir -p "$work/tree"
      "$UMLCTL" image extract "$img" "$work/tree" > /dev/null
      tar -C "$work/tree" -c . | docker import -c 'CMD ["/bin/sleep","1000000"]' - umlctl-bench-lab:latest > /dev/null
    fi
    for i in $(seq 1 "$n"); do echo "d$i[image]=\"umlctl-bench-lab:latest\"" >> "$dir/lab.conf"; done
    sync
    a0=$(avail_kb)
    t0=$(now)
    (cd "$dir" && kathara lstart --noterminals > "$work/kstart$n.log" 2>&1) || { cat "$work/kstart$n.log"; exit 1; }
    t1=$(now)
    sleep 10
    a1=$(avail_kb)
    t2=$(now)
    (cd "$dir" && kathara lclean > /dev/null 2>&1)
    t3=$(now)
    printf '%-20s %4s %10s %14s %14s %9s\n' kathara "$n" "$(secs "$t0" "$t1")" \
      "$(awk -v a="$a0" -v b="$a1" -v n="$n" 'BEGIN {printf "%.1f", (a-b)/1024/n}')" - "$(secs "$t2" "$t3")"
  fi
done
if [ -z "$kathara_ok" ]; then
  echo "kathara: not measured — $kathara_why"
fi
