# uml-utilities (uml_mkcow, uml_moo, uml_mconsole, ...): the classic tools,
# used in the dev shell as independent oracles for umlctl's COW format and
# mconsole. nixpkgs does not package them; this builds Debian's source (the
# hash is the one in Debian's signed uml-utilities_20070815.4-1.dsc).
{ lib
, stdenv
, fetchurl
, readline
}:

stdenv.mkDerivation {
  pname = "uml-utilities";
  version = "20070815.4";

  src = fetchurl {
    url = "https://deb.debian.org/debian/pool/main/u/uml-utilities/uml-utilities_20070815.4.orig.tar.gz";
    hash = "sha256-fXOOWWJIAHH0y5ypBTxxMNaXsjLIHz+Asgq8jLmYMVQ=";
  };

  buildInputs = [ readline ];

  # Only the tools the tests use; the tree's other programs need FUSE and
  # obsolete headers.
  buildPhase = ''
    runHook preBuild
    make -C moo
    make -C mconsole
    runHook postBuild
  '';

  installPhase = ''
    runHook preInstall
    install -Dm755 -t $out/bin moo/uml_moo moo/uml_mkcow mconsole/uml_mconsole
    runHook postInstall
  '';

  meta = {
    description = "User-mode Linux utilities: uml_mkcow, uml_moo, uml_mconsole";
    homepage = "https://user-mode-linux.sourceforge.net/";
    license = lib.licenses.gpl2Plus;
    platforms = lib.platforms.linux;
  };
}
