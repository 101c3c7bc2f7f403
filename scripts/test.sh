#!/usr/bin/env bash
# scripts/test.sh — the whole test suite: unit tests and end-to-end tests
# against a real UML kernel. Works as root on a fresh Debian 12 machine
# (installs missing packages). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
# user-mode-linux: the kernel; e2fsprogs: mke2fs/e2fsck oracles; busybox-static:
# test images; uml-utilities: uml_mkcow/uml_moo/uml_mconsole oracles;
# iproute2: network namespaces; util-linux: setpriv for the unprivileged case;
# attr, acl, libcap2-bin, python3, tar: the image tests make trees with
# xattrs, ACLs, file capabilities and crafted archives;
# linux-source-6.12, bc, bison, flex, xz-utils: the kernel tests build a real
# 6.12 UML kernel (once per machine, cached in /var/tmp/umlctl-test-kernels)
# and compare with kunit.py (python3);
# nix-bin: nix-instantiate parses and evaluates flake.nix and nix/*.nix;
# xfsprogs: a reflink filesystem (loop-mounted) for cow merge's clone path;
# nftables: `nft` is the oracle for the NAT table netd writes over netlink;
# zstd: a tar.zst source on standard input;
# mmdebstrap: a stock Debian image for the distribution-guest tests (built once
# per machine, cached in /var/tmp/umlctl-test-images); openssh-client: ssh into it;
# graphviz: `dot` draws and checks `umlctl lab graph`; slirp4netns: a lab's
# `bridged` devices reach the outside through it; passt: `--net user`; gdb: `run --gdb-batch` and
# `debug` on a real guest kernel; tmux: a terminal for `run --gdb`;
# debian-archive-keyring: Debian unstable's linux-source-7.x (the current-kernel
# tests build it once per machine, cached in /var/tmp/umlctl-test-kernels).
ensure_debs build-essential pkg-config user-mode-linux e2fsprogs busybox-static uml-utilities iproute2 util-linux \
  attr acl libcap2-bin python3 tar linux-source-6.12 bc bison flex xz-utils nix-bin xfsprogs \
  nftables zstd mmdebstrap openssh-client graphviz slirp4netns passt gdb tmux debian-archive-keyring
ensure_cargo
ensure_clippy
# Debian unstable's newest linux-source-7.x, fetched once (apt-get download
# with a temporary sources list; the host's apt configuration is untouched).
UMLCTL_TEST_SOURCE_7=$(scripts/sid-linux-source.sh /var/tmp/umlctl-test-kernels/sid)
export UMLCTL_TEST_SOURCE_7
# Build every binary first: the end-to-end tests drive target/debug/umlctl.
cargo build --workspace --locked
# The workspace lints (Cargo.toml) and clippy's defaults, as errors; the
# tests run either way.
set +e
cargo clippy --workspace --all-targets --locked -- -D warnings
lint_rc=$?
set -e
# Every test binary runs even when an earlier one fails; the last line says
# what failed.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
failed=$(sed -nE 's/^test (.*) \.\.\. FAILED$/\1/p' "$log" | sort -u | tr '\n' ' ')
if [ "$rc" -eq 0 ] && [ "$lint_rc" -eq 0 ]; then
  echo "scripts/test.sh: every test passed, clippy clean"
elif [ "$rc" -eq 0 ]; then
  echo "scripts/test.sh: FAILED: clippy found problems (see above); every test passed"
  rc=$lint_rc
else
  echo "scripts/test.sh: FAILED (exit $rc): ${failed:-a test binary failed to build or crashed; see above}$([ "$lint_rc" -eq 0 ] || echo '; clippy found problems too')"
fi
exit "$rc"
