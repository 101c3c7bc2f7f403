# lib.mkRootfsImage { name; sources; size ? null; epoch ? 1; }
#
# An ext4 root filesystem image made by `umlctl image build`, without root:
# `sources` (directories and tar archives — store paths or derivations) are
# layered in order; entries read from directories are owned by root (the
# build user's uid means nothing in the guest), tar entries keep theirs;
# every timestamp is clamped to `epoch`. The build is deterministic (the
# UUID is derived from the content), so the output hash is stable.
#
# Outputs: `out` is the image file itself (use it as `--image`), `manifest`
# the manifest `umlctl image verify --manifest` checks it against.
{ pkgs, umlctl }:

{
  mkRootfsImage =
    { name
    , sources
    , size ? null
    , epoch ? 1
    , label ? ""
    }:
    assert builtins.isList sources && sources != [ ];
    assert size == null || builtins.isString size || builtins.isInt size;
    pkgs.runCommand "${name}.img"
      {
        nativeBuildInputs = [ umlctl ];
        outputs = [ "out" "manifest" ];
        passthru = { inherit sources size epoch; };
      }
      ''
        umlctl image build \
          --output "$out" \
          --manifest "$manifest" \
          --epoch ${toString epoch} \
          --dir-owner 0:0 \
          ${pkgs.lib.optionalString (size != null) "--size ${toString size}"} \
          ${pkgs.lib.optionalString (label != "") "--label ${pkgs.lib.escapeShellArg label}"} \
          ${pkgs.lib.escapeShellArgs (map toString sources)}
      '';
}
