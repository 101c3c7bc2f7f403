#!/usr/bin/env bash
# scripts/sid-linux-source.sh [CACHE] — print the path of the newest Linux
# source tarball (>= 7.0) that Debian's unstable suite carries
# (linux-source-7.N), fetched once into CACHE (default
# /var/tmp/umlctl-test-kernels/sid) with `apt-get download` and a temporary
# sources list: the host's apt configuration is not changed. Later calls
# reuse the fetched tarball without the network (UMLCTL_SID_REFRESH=1
# fetches again). Used by scripts/test.sh and bench/kernels.sh.
set -euo pipefail
cache=${1:-/var/tmp/umlctl-test-kernels/sid}
have=$(ls "$cache"/x/usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -1 || true)
if [ -n "$have" ] && [ "${UMLCTL_SID_REFRESH:-0}" != 1 ]; then
  echo "$have"
  exit 0
fi
for t in apt-get apt-cache dpkg-deb; do
  command -v "$t" >/dev/null || { echo "error: $t is missing (a Debian host is needed to fetch Debian's kernel source)" >&2; exit 1; }
done
mkdir -p "$cache/lists/partial" "$cache/archives/partial" "$cache/apt-cache" "$cache/debs"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { echo "error: $keyring is missing: apt-get install debian-archive-keyring" >&2; exit 1; }
echo "deb [signed-by=$keyring] http://deb.debian.org/debian sid main" >"$cache/sources.list"
opts=(-o "Dir::Etc::sourcelist=$cache/sources.list" -o Dir::Etc::sourceparts=- \
  -o "Dir::State::Lists=$cache/lists" -o "Dir::Cache=$cache/apt-cache" \
  -o "Dir::Cache::archives=$cache/archives" -o APT::Get::List-Cleanup=0)
echo "fetching Debian unstable's package lists (for its linux-source)…" >&2
apt-get "${opts[@]}" -qq update >&2
pkg=$(apt-cache "${opts[@]}" pkgnames linux-source- | grep -E '^linux-source-[0-9]+\.[0-9]+$' | sort -V | tail -1 || true)
major=${pkg#linux-source-}
major=${major%%.*}
if [ -z "$pkg" ] || [ "$major" -lt 7 ]; then
  echo "error: Debian unstable has no linux-source-7.x package (found: ${pkg:-none})" >&2
  exit 1
fi
rm -f "$cache"/debs/*.deb
(cd "$cache/debs" && apt-get "${opts[@]}" -qq download "$pkg" >&2 2>/dev/null || apt-get "${opts[@]}" -qq download "$pkg" >&2)
deb=$(ls "$cache"/debs/"$pkg"_*.deb | tail -1)
tmp="$cache/x.new"
rm -rf "$tmp"
dpkg-deb -x "$deb" "$tmp"
tar=$(ls "$tmp"/usr/src/"$pkg".tar.xz)
rm -rf "$cache/x"
mv "$tmp" "$cache/x"
rm -f "$deb"
echo "$cache/x/usr/src/$(basename "$tar")"
