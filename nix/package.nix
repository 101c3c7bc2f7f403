# packages.umlctl: the umlctl binary, its netd systemd unit, shell
# completions and man pages.
{ lib
, rustPlatform
, installShellFiles
, e2fsprogs
, src
, version
}:

rustPlatform.buildRustPackage {
  pname = "umlctl";
  inherit version src;

  # The workspace's own lock file: no vendoring step, no hash to keep in sync.
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [ "--package" "umlctl" ];

  nativeBuildInputs = [ installShellFiles ];

  # Unit tests of every crate run (the image writer's use e2fsck as oracle).
  # The end-to-end suite, package `umlctl-tests`, is excluded: it boots real
  # UML kernels from the host, needs root for network namespaces, taps and
  # loop mounts, and uses uml-utilities/busybox as oracles — none of which a
  # Nix build sandbox has. `checks.boot` and `checks.image` boot a real guest
  # in the sandbox instead.
  nativeCheckInputs = [ e2fsprogs ];
  cargoTestFlags = [ "--workspace" "--exclude" "umlctl-tests" ];

  postInstall = ''
    install -Dm644 netd/systemd/umlctl-netd.service \
      $out/lib/systemd/system/umlctl-netd.service
    substituteInPlace $out/lib/systemd/system/umlctl-netd.service \
      --replace-fail /usr/local/bin/umlctl $out/bin/umlctl

    installShellCompletion --cmd umlctl \
      --bash <($out/bin/umlctl completions bash) \
      --zsh <($out/bin/umlctl completions zsh) \
      --fish <($out/bin/umlctl completions fish)

    $out/bin/umlctl manpages man
    installManPage man/*.1
  '';

  meta = {
    description = "Run commands and long-lived guests in User-mode Linux: images, COW disks, networking";
    license = with lib.licenses; [ mit asl20 ];
    platforms = [ "x86_64-linux" ];
    mainProgram = "umlctl";
  };
}
