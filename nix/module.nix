# nixosModules.netd: `umlctl netd` as a systemd service. The unit is the
# repository's netd/systemd/umlctl-netd.service (installed by the package
# and picked up through systemd.packages, so its sandboxing settings are the
# defaults); this module only points it at the package and at a config file
# generated from `settings`, which has the shape of netd.toml.
{ defaultPackage }:

{ config, lib, pkgs, ... }:

let
  cfg = config.services.umlctl-netd;
  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "umlctl-netd.toml" cfg.settings;
  umlctl = "${cfg.package}/bin/umlctl";
in
{
  options.services.umlctl-netd = {
    enable = lib.mkEnableOption "the umlctl network helper daemon (taps on host bridges for UML guests)";

    package = lib.mkOption {
      type = lib.types.package;
      default = defaultPackage;
      description = "The umlctl package whose `umlctl netd` runs.";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = {
        socket_group = "uml";
        socket_mode = "0660";
        bridge = [
          { name = "umlbr0"; address = "10.77.0.1/24"; forward = false; }
          { name = "natbr0"; address = "10.78.0.1/24"; nat = true; uplink = "eth0"; }
        ];
        allow = [
          { groups = [ "uml" ]; bridges = [ "umlbr0" "natbr0" ]; max_taps = 4; }
        ];
      };
      description = ''
        netd's configuration, written out as its TOML file: `socket`,
        `socket_mode`, `socket_group`, `state`, a list of `bridge`s
        (`name`, `address` as CIDR, `forward`, `mtu`, `nat`, `uplink`) and a list of `allow`
        rules (`users`, `groups`, `bridges`, `max_taps`). The file is checked
        with `umlctl netd --check` before the daemon starts. A `socket_group`
        given by name is created.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    systemd.packages = [ cfg.package ];
    boot.kernelModules = [ "tun" "bridge" ];
    # A socket group named in the settings exists (add users to it).
    users.groups = lib.optionalAttrs (builtins.isString (cfg.settings.socket_group or null)) {
      ${cfg.settings.socket_group} = { };
    };

    systemd.services.umlctl-netd = {
      wantedBy = [ "multi-user.target" ];
      restartTriggers = [ configFile ];
      # The empty string clears the unit's own ExecStart lines (a drop-in).
      serviceConfig = {
        ExecStartPre = [ "" "${umlctl} netd --config ${configFile} --check" ];
        ExecStart = [ "" "${umlctl} netd --config ${configFile}" ];
      };
    };
  };
}
