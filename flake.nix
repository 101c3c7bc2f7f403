# umlctl as a Nix flake. Inputs: nixpkgs only. Everything is x86_64-linux:
# User-mode Linux exists for x86 only, and this is the arch umlctl is tested on.
#
#   nix build                  # packages.umlctl (the default)
#   nix build .#uml-kernel     # a UML kernel with the options umlctl relies on
#   nix run . -- run --kernel ./result/bin/linux -- uname -a
#   nix flake check            # the package, a real UML boot, a rootfs image
#
# The other .nix files live in nix/; tests/tests/nix.rs parses all of them
# and evaluates these outputs against a stand-in for nixpkgs (no network here).
{
  description = "umlctl: run commands and guests in User-mode Linux — images, COW disks, networking";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      lib = nixpkgs.lib;
      version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).workspace.package.version;

      # Only what the build needs, so editing the README does not rebuild.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./Cargo.toml
          ./Cargo.lock
          ./cli
          ./kernel
          ./imgtools
          ./netd
          ./lab
          ./tests
        ];
      };

      umlctl = pkgs.callPackage ./nix/package.nix { inherit src version; };
      uml-kernel = pkgs.callPackage ./nix/uml-kernel.nix {
        linux = pkgs.linux_6_12;
        umlctlConfig = ./kernel/config/umlctl.config;
      };
      uml-utilities = pkgs.callPackage ./nix/uml-utilities.nix { };
      rootfs = import ./nix/lib.nix { inherit pkgs umlctl; };
    in
    {
      packages.${system} = {
        default = umlctl;
        inherit umlctl uml-kernel uml-utilities;
      };

      apps.${system}.default = {
        type = "app";
        program = "${umlctl}/bin/umlctl";
      };

      devShells.${system}.default = pkgs.mkShell {
        inputsFrom = [ umlctl ];
        packages = [
          pkgs.cargo
          pkgs.rustc
          pkgs.clippy
          pkgs.rustfmt
          pkgs.e2fsprogs
          uml-utilities
        ];
      };

      nixosModules.netd = import ./nix/module.nix { defaultPackage = umlctl; };
      nixosModules.default = self.nixosModules.netd;

      # mkRootfsImage { name; sources; size ? null; epoch ? 1; }: an ext4 image
      # made by `umlctl image build` from directories and tarballs (store paths
      # or derivations), owned by root, bit-for-bit reproducible.
      lib = {
        inherit (rootfs) mkRootfsImage;
      };

      checks.${system} = import ./nix/checks.nix {
        inherit pkgs umlctl uml-kernel;
        inherit (rootfs) mkRootfsImage;
      };

    };
}
