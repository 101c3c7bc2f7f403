# Evaluate umlctl's flake.nix against stub-nixpkgs.nix and return, as JSON,
# what tests/tests/nix.rs checks: attribute names, the paths the flake
# names, the kernel option list, and the build scripts to run for real.
{ repo, outDir, linuxVersion ? "6.12.0", imageSource ? null, netdSettings ? "{}", kernelConfig ? null }:

let
  nixpkgs = import ./stub-nixpkgs.nix { inherit outDir linuxVersion; };
  flake = import (repo + "/flake.nix");
  self = outputs // { outPath = toString repo; };
  outputs = flake.outputs { inherit self nixpkgs; };
  sys = "x86_64-linux";
  pkgs = nixpkgs.legacyPackages.${sys};
  umlctl = outputs.packages.${sys}.umlctl;
  kernel = outputs.packages.${sys}.uml-kernel;
  names = drvs: map (d: d.name) drvs;

  module = outputs.nixosModules.netd {
    inherit pkgs;
    lib = nixpkgs.lib;
    config.services.umlctl-netd = {
      enable = true;
      package = umlctl;
      settings = builtins.fromJSON netdSettings;
    };
  };
  service = module.config.content.systemd.services.umlctl-netd;

  image = outputs.lib.mkRootfsImage {
    name = "test-rootfs";
    sources = [ imageSource ];
    size = "16M";
    epoch = 1234;
  };
in
{
  inputs = builtins.attrNames flake.inputs;
  outputs = builtins.attrNames outputs;
  packages = builtins.attrNames outputs.packages.${sys};
  checks = builtins.attrNames outputs.checks.${sys};
  lib = builtins.attrNames outputs.lib;
  defaultIsUmlctl = outputs.packages.${sys}.default.name == umlctl.name;
  app = outputs.apps.${sys}.default;
  devShellPackages = names outputs.devShells.${sys}.default.packages;

  umlctl = {
    inherit (umlctl) name version cargoBuildFlags cargoTestFlags postInstall;
    lockFile = toString umlctl.cargoLock.lockFile;
    srcRoot = toString umlctl.src.root;
    srcPaths = map toString umlctl.src.paths;
    mainProgram = umlctl.meta.mainProgram;
  };

  kernel = {
    inherit (kernel) name version configurePhase buildPhase installPhase;
    options = kernel.umlctlOptions;
    nativeBuildInputs = names kernel.nativeBuildInputs;
    out = kernel.outPath;
  };

  # The kernel package with another option file (to see its check fail).
  kernelWith = if kernelConfig == null then null else
    (pkgs.callPackage (repo + "/nix/uml-kernel.nix") {
      linux = pkgs.linux_6_12;
      umlctlConfig = kernelConfig;
    }).configurePhase;

  utilities = {
    inherit (outputs.packages.${sys}.uml-utilities.src) url hash;
  };

  module = {
    options = builtins.attrNames (module.options.services.umlctl-netd);
    enabledWhen = module.config.condition;
    serviceConfig = service.serviceConfig;
    wantedBy = service.wantedBy;
    systemdPackages = names module.config.content.systemd.packages;
    groups = builtins.attrNames module.config.content.users.groups;
    # What the stand-in TOML generator was given, and the option's example.
    configFile = (builtins.head service.restartTriggers).outPath;
    configValue = (builtins.head service.restartTriggers).value;
    settingsExample = module.options.services.umlctl-netd.settings.example;
  };

  image = if imageSource == null then null else {
    inherit (image) name outputs;
    out = image.outPath;
    manifest = image.manifest.outPath;
    script = image.buildCommand;
  };

  # The checks' build scripts, in the order they depend on each other.
  checkScripts =
    let c = outputs.checks.${sys}; in
    {
      busyboxOut = pkgs.pkgsStatic.busybox.outPath;
      kernelOut = kernel.outPath;
      busyboxRoot = { out = c.image.busyboxRoot.outPath; script = c.image.busyboxRoot.buildCommand; };
      rootfs = {
        out = c.image.image.outPath;
        manifest = c.image.image.manifest.outPath;
        script = c.image.image.buildCommand;
      };
      boot = { out = c.boot.outPath; script = c.boot.buildCommand; };
      image = { out = c.image.outPath; script = c.image.buildCommand; };
    };
}
