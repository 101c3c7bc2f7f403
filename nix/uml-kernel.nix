# packages.uml-kernel: a User-mode Linux kernel from nixpkgs' kernel source,
# configured like `umlctl kernel build` does it: `make ARCH=um defconfig`,
# then every option of kernel/config/umlctl.config, then olddefconfig, then
# a check that each option landed in the final .config (the build fails
# naming the ones that did not). Installs $out/bin/linux and $out/config.
{ lib
, stdenv
, linux
, bc
, bison
, flex
, perl
, umlctlConfig
}:

let
  options = import ./kconfig.nix (builtins.readFile umlctlConfig);
  setOption = o:
    if o.value == "n" then "scripts/config --file .config --disable ${o.name}"
    else "scripts/config --file .config --set-val ${o.name} ${lib.escapeShellArg o.value}";
  checkOption = o:
    if o.value == "n" then ''
      if grep -q '^${o.name}=' .config; then missing+=" ${o.name}=n"; fi
    '' else ''
      grep -qxF ${lib.escapeShellArg "${o.name}=${o.value}"} .config || missing+=" ${o.name}=${o.value}"
    '';
in
stdenv.mkDerivation {
  pname = "uml-kernel";
  inherit (linux) version src;

  nativeBuildInputs = [ bc bison flex perl ];
  # UML is an ordinary (dynamically linked) program built by the kernel's
  # own flags; the wrapper's hardening flags break the kernel build.
  hardeningDisable = [ "all" ];
  enableParallelBuilding = true;

  postPatch = ''
    patchShebangs scripts
  '';

  configurePhase = ''
    runHook preConfigure
    make ARCH=um defconfig
    ${lib.concatMapStringsSep "\n" setOption options}
    make ARCH=um olddefconfig
    missing=""
    ${lib.concatMapStrings checkOption options}
    if [ -n "$missing" ]; then
      echo "uml-kernel: options from kernel/config/umlctl.config that did not land in .config:$missing" >&2
      exit 1
    fi
    runHook postConfigure
  '';

  buildPhase = ''
    runHook preBuild
    make ARCH=um -j$NIX_BUILD_CORES linux
    runHook postBuild
  '';

  installPhase = ''
    runHook preInstall
    install -Dm755 linux $out/bin/linux
    install -Dm644 .config $out/config
    runHook postInstall
  '';

  # The guest kernel is run, not linked against: keep its symbols for
  # debugging (gdb on a UML kernel is a normal gdb session).
  dontStrip = true;

  passthru = {
    # The parsed option list, for tests and for users extending the kernel.
    umlctlOptions = options;
  };

  meta = {
    description = "User-mode Linux kernel with the options umlctl relies on";
    license = lib.licenses.gpl2Only;
    platforms = [ "x86_64-linux" ];
    mainProgram = "linux";
  };
}
