#!/usr/bin/env bash
# bench/io.sh — data through the guest, both ways, against the host's own
# pipe and qemu (TCG: this host has no usable KVM) with a minimal busybox
# initramfs and virtio-serial; and `run -- true` against bare boots.
#
#   bench/io.sh                      (1 GiB each way, median of 3)
#   MIB=256 RUNS=5 bench/io.sh
#   UMLCTL=path/to/umlctl            (default: target/release/umlctl, built if missing)
#   KERNELS="/usr/bin/linux.uml /path/to/linux"   (default: Debian's and umlctl's default)
#
# Throughput is MIB MiB divided by (the run's time minus the same tool's
# boot with nothing to move), in MB/s. The guest command is the same for
# every tool: `dd bs=1M count=N iflag=fullblock` from stdin (or the
# virtio-serial port) to /dev/null, and from /dev/zero to stdout (or the
# port). Installs what it needs (qemu-system-x86, busybox-static; Debian's
# cloud kernel is downloaded, not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_debs qemu-system-x86 busybox-static cpio gcc libc6-dev
MIB=${MIB:-1024}
RUNS=${RUNS:-3}
UMLCTL=${UMLCTL:-target/release/umlctl}
if [ ! -x "$UMLCTL" ]; then
  cargo build --release -q -p umlctl
fi
UMLCTL=$(realpath "$UMLCTL")
work=$(mktemp -d /var/tmp/umlctl-bench-io.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT

if [ -z "${KERNELS:-}" ]; then
  def=$("$UMLCTL" kernel info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
  KERNELS=/usr/bin/linux.uml
  [ "$def" != /usr/bin/linux.uml ] && KERNELS="$KERNELS $def"
fi

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
# time (ns) of a shell command line, median of RUNS
timed() {
  for _ in $(seq "$RUNS"); do
    t=$(now); bash -c "$1" >/dev/null 2>&1; echo $(( $(now) - t ))
  done | median
}
mbps() { awk -v ns="$1" -v boot="$2" -v mib="$MIB" 'BEGIN { d=(ns-boot)/1e9; if (d<=0) print "-"; else printf "%.0f", mib*1048576/1e6/d }'; }
secs() { awk -v ns="$1" 'BEGIN {printf "%.3f", ns/1e9}'; }

bytes=$((MIB * 1048576))
in_cmd="dd of=/dev/null bs=1M count=$MIB iflag=fullblock status=none"
out_cmd="dd if=/dev/zero bs=1M count=$MIB status=none"

printf '%-34s %12s %12s %10s\n' "" "stdin→guest" "guest→stdout" "boot s"
# The host's own pipe.
hin=$(timed "head -c $bytes /dev/zero | cat | cat > /dev/null")
printf '%-34s %9s MB/s %9s MB/s %10s\n' "host pipe (cat | cat)" "$(mbps "$hin" 0)" "$(mbps "$hin" 0)" "-"

for k in $KERNELS; do
  ver=$("$UMLCTL" kernel info --json "$k" | python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
  "$UMLCTL" run --kernel "$k" -- true   # warm caches
  boot=$(timed "'$UMLCTL' run --kernel '$k' -- true")
  tin=$(timed "head -c $bytes /dev/zero | '$UMLCTL' run --kernel '$k' -- $in_cmd")
  tout=$(timed "'$UMLCTL' run --kernel '$k' -- $out_cmd | cat > /dev/null")
  printf '%-34s %9s MB/s %9s MB/s %10s\n' "umlctl run ($ver)" "$(mbps "$tin" "$boot")" "$(mbps "$tout" "$boot")" "$(secs "$boot")"
done

# qemu: Debian 12's cloud kernel (virtio as modules) and a busybox initramfs
# whose init moves the data through a virtio-serial port, then powers off.
(cd "$work" && apt-get download -qq "$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image/{print $2; exit}')" 2>/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
vmlinuz=$(ls "$work"/k/boot/vmlinuz-*)
mods=$(ls -d "$work"/k/lib/modules/*/kernel)
mkdir -p "$work/ir/bin" "$work/ir/m" "$work/ir/dev" "$work/ir/proc" "$work/ir/sys"
cp /bin/busybox "$work/ir/bin/busybox"
for m in virtio/virtio virtio/virtio_ring virtio/virtio_pci_modern_dev virtio/virtio_pci_legacy_dev virtio/virtio_pci; do
  cp "$mods/drivers/$m.ko" "$work/ir/m/"
done
cp "$mods/drivers/char/virtio_console.ko" "$work/ir/m/"
cat > "$work/ir/init" <<'SH'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc p /proc; mount -t sysfs s /sys; mount -t devtmpfs d /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console; do insmod /m/$m.ko; done
mode=$(sed -n 's/.*bench=\([a-z]*\).*/\1/p' /proc/cmdline)
mib=$(sed -n 's/.*mib=\([0-9]*\).*/\1/p' /proc/cmdline)
i=0; while [ ! -e /dev/vport1p1 ] && [ ! -e /dev/vport0p1 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
port=$(ls /dev/vport*p1 | head -1)
case $mode in
  in) dd if=$port of=/dev/null bs=1M count=$mib iflag=fullblock 2>/dev/null ;;
  out) dd if=/dev/zero of=$port bs=1M count=$mib 2>/dev/null ;;
esac
poweroff -f
SH
chmod +x "$work/ir/init"
(cd "$work/ir" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")
# The port's host side: qemu's stdin (its EOF would disconnect the port, so
# output goes to a file chardev on qemu's stdout instead).
qemu() {
  echo "qemu-system-x86_64 -accel tcg -m 512 -nodefaults -no-reboot -display none -kernel '$vmlinuz' -initrd '$work/initrd.gz' \
    -append 'console=ttyS0 quiet bench=$1 mib=$2' -serial file:/dev/null -monitor none \
    -chardev $3,id=io -device virtio-serial-pci -device virtserialport,chardev=io,name=io"
}
qboot=$(timed "$(qemu none 0 stdio) < /dev/null")
qin=$(timed "head -c $bytes /dev/zero | $(qemu in "$MIB" stdio)")
qout=$(timed "$(qemu out "$MIB" file,path=/dev/stdout) < /dev/null | cat > /dev/null")
printf '%-34s %9s MB/s %9s MB/s %10s\n' "qemu TCG, busybox, virtio-serial" "$(mbps "$qin" "$qboot")" "$(mbps "$qout" "$qboot")" "$(secs "$qboot")"
echo
echo "(MB/s over ${MIB} MiB after subtracting each tool's own boot; medians of $RUNS; run -- true against bare boots: bench/boot.sh)"
