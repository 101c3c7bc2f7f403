#!/usr/bin/env bash
# scripts/install.sh — the main job: build and install umlctl, with a UML
# kernel to run, then check the host with `umlctl doctor`.
# Works as root on a fresh Debian 12 machine (installs missing packages).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ensure_debs build-essential pkg-config user-mode-linux e2fsprogs
ensure_cargo
cargo install --locked --path cli --root "${PREFIX:-$HOME/.cargo}"
bin="${PREFIX:-$HOME/.cargo}/bin/umlctl"
"$bin" --version
"$bin" doctor
