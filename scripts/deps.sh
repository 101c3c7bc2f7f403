#!/usr/bin/env bash
# scripts/deps.sh PKG... — install the Debian packages that are missing
# (as root), after one `apt-get update`. Sourced by install.sh and test.sh.
set -euo pipefail

ensure_debs() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo (Rust ≥ 1.80) is not installed; install Rust with rustup (https://rustup.rs) and run this again" >&2
    exit 1
  fi
}

ensure_clippy() {
  if ! cargo clippy --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      rustup component add clippy >&2
    else
      echo "error: cargo clippy is missing; install it with your Rust (rustup component add clippy)" >&2
      exit 1
    fi
  fi
}
