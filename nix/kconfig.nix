# Parse kernel/config/umlctl.config — the one list of kernel options that
# `umlctl kernel build` applies and checks (it embeds the same file) — into
# [ { name = "CONFIG_X"; value = "y"; } ... ]; value "n" means "is not set" (as in `umlctl kernel build`).
# Pure builtins, so tests can evaluate it without nixpkgs.
text:
let
  lines = builtins.filter builtins.isString (builtins.split "\n" text);
  parse = line:
    let
      set = builtins.match "[[:space:]]*(CONFIG_[A-Za-z0-9_]+)=(.*[^[:space:]])[[:space:]]*" line;
      unset = builtins.match "[[:space:]]*# (CONFIG_[A-Za-z0-9_]+) is not set[[:space:]]*" line;
    in
    if set != null then [{ name = builtins.elemAt set 0; value = builtins.elemAt set 1; }]
    else if unset != null then [{ name = builtins.elemAt unset 0; value = "n"; }]
    else [ ];
in
builtins.concatMap parse lines
