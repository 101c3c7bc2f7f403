# A stand-in for the few nixpkgs functions umlctl's flake uses, so that the
# flake can be evaluated on a machine that cannot fetch nixpkgs. It is not a
# build system: a "derivation" here is its attribute set plus an outPath,
# `${outDir}/${name}`, so that tests can run the generated build scripts
# themselves with those paths filled in. Every function checks the shape of
# its arguments the way nixpkgs would reject them.
{ outDir, linuxVersion ? "6.12.0", busyboxVersion ? "1.36.1" }:

let
  system = "x86_64-linux";

  mkDrv = attrs:
    let
      name = attrs.name or "${attrs.pname}-${attrs.version}";
      out = "${outDir}/${name}";
      outputs = attrs.outputs or [ "out" ];
      outputAttrs = builtins.listToAttrs (map
        (o: {
          name = o;
          value = { outPath = if o == "out" then out else "${out}-${o}"; };
        })
        outputs);
    in
    assert builtins.isString name;
    attrs // outputAttrs // (attrs.passthru or { }) // {
      type = "derivation";
      inherit name outputs system;
      outPath = out;
      drvAttrs = attrs;
    };

  lib = {
    fileset = {
      unions = paths: assert builtins.all builtins.isPath paths; { _fileset = paths; };
      toSource = { root, fileset }:
        assert builtins.isPath root;
        { outPath = toString root; inherit root; paths = fileset._fileset; };
    };
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
    escapeShellArgs = l: builtins.concatStringsSep " " (map lib.escapeShellArg l);
    concatMapStringsSep = sep: f: l: builtins.concatStringsSep sep (map f l);
    concatMapStrings = f: l: builtins.concatStringsSep "" (map f l);
    optionalString = c: s: if c then s else "";
    optionalAttrs = c: a: if c then a else { };
    licenses = { mit = "MIT"; asl20 = "Apache-2.0"; gpl2Only = "GPL-2.0-only"; gpl2Plus = "GPL-2.0-or-later"; };
    platforms.linux = [ system ];
    mkOption = o: o // { _type = "option"; };
    mkEnableOption = d: { _type = "option"; default = false; description = "Whether to enable ${d}."; type = "bool"; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    types.package = "package";
  };

  leaf = pname: mkDrv { inherit pname; version = "stub"; };

  pkgs = {
    inherit lib system;
    stdenv.mkDerivation = mkDrv;
    rustPlatform.buildRustPackage = attrs:
      assert attrs ? cargoLock || attrs ? cargoHash;
      mkDrv attrs;
    runCommand = name: env: buildCommand: mkDrv (env // { inherit name buildCommand; });
    mkShell = attrs: mkDrv (attrs // { name = "shell"; });
    fetchurl = { url, hash }: mkDrv { name = baseNameOf url; inherit url hash; };
    callPackage = fn: args:
      let
        f = if builtins.isFunction fn then fn else import fn;
        wanted = builtins.functionArgs f;
        auto = builtins.intersectAttrs wanted pkgs;
        missing = builtins.filter (n: !(wanted.${n}) && !(auto ? ${n}) && !(args ? ${n})) (builtins.attrNames wanted);
      in
      if missing != [ ] then throw "callPackage: no package for ${toString missing}" else f (auto // args);
    formats.toml = { }: {
      type = "toml-value";
      generate = name: value: mkDrv { inherit name value; json = builtins.toJSON value; };
    };
    linux_6_12 = mkDrv { pname = "linux"; version = linuxVersion; src = leaf "linux-src"; };
    pkgsStatic.busybox = mkDrv { pname = "busybox"; version = busyboxVersion; };
    bc = leaf "bc";
    bison = leaf "bison";
    flex = leaf "flex";
    perl = leaf "perl";
    readline = leaf "readline";
    installShellFiles = leaf "install-shell-files";
    e2fsprogs = leaf "e2fsprogs";
    cargo = leaf "cargo";
    rustc = leaf "rustc";
    clippy = leaf "clippy";
    rustfmt = leaf "rustfmt";
  };
in
{
  inherit lib;
  legacyPackages.${system} = pkgs;
}
