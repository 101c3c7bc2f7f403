# checks: the package (with its unit tests), and real UML guests booted by
# umlctl inside the Nix build sandbox — UML needs no KVM, only ptrace.
{ pkgs, umlctl, uml-kernel, mkRootfsImage }:

let
  kernel = "${uml-kernel}/bin/linux";

  # A tiny root: static busybox and a file to read back.
  busyboxRoot = pkgs.runCommand "busybox-root" { } ''
    mkdir -p $out/bin $out/etc
    cp ${pkgs.pkgsStatic.busybox}/bin/busybox $out/bin/busybox
    ln -s busybox $out/bin/sh
    echo nix-check > $out/etc/motd
  '';
  image = mkRootfsImage { name = "check-rootfs"; sources = [ busyboxRoot ]; };
in
{
  package = umlctl;

  # Host root (the sandbox's own /) through hostfs: the command's output and
  # exit status come back through umlctl. Shell builtins only: the sandbox
  # has /bin/sh and the store, nothing else.
  boot = pkgs.runCommand "umlctl-check-boot" { nativeBuildInputs = [ umlctl ]; } ''
    export HOME=$TMPDIR
    status=0
    umlctl run --kernel ${kernel} -- /bin/sh -c \
      'read r < /proc/sys/kernel/osrelease; echo "kernel $r"; echo to-stderr >&2; exit 7' \
      > stdout 2> stderr || status=$?
    cat stdout stderr
    test "$status" = 7
    grep -qx "kernel ${uml-kernel.version}.*" stdout
    grep -qx to-stderr stderr
    touch $out
  '';

  # An image from lib.mkRootfsImage: verified against its manifest, rebuilt
  # bit-for-bit, and booted as the guest's root.
  image = pkgs.runCommand "umlctl-check-image"
    {
      nativeBuildInputs = [ umlctl ];
      passthru = { inherit busyboxRoot image; };
    } ''
    export HOME=$TMPDIR
    umlctl image verify ${image} --manifest ${image.manifest}
    umlctl image build --output again.img --epoch 1 --dir-owner 0:0 ${busyboxRoot}
    cmp ${image} again.img
    got=$(umlctl run --kernel ${kernel} --image ${image} -- /bin/sh -c 'read m < /etc/motd; echo "$m"')
    test "$got" = nix-check
    touch $out
  '';
}
