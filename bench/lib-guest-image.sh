# Shared by the bench scripts: make_guest_image DIR builds DIR/guest.ext4, a
# busybox root whose init stays up (and powers off on ctrl-alt-del).
make_guest_image() {
  local dir=$1 root=$1/groot
  mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,root}
  cp /bin/busybox "$root/bin/"
  for t in sh mount echo poweroff sleep; do ln -sf busybox "$root/bin/$t"; done
  ln -sf ../bin/busybox "$root/sbin/init"
  printf '%s\n' '::sysinit:/bin/mount -t proc proc /proc' '::respawn:/bin/sleep 1000000' \
    '::ctrlaltdel:/bin/poweroff' > "$root/etc/inittab"
  mke2fs -q -F -t ext4 -d "$root" "$dir/guest.ext4" 16M
}
