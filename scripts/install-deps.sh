#!/usr/bin/env bash
# Installs the Debian packages Tessera needs to build and run (GStreamer 1.22 + plugins,
# pkg-config) and, with --test, what the test suite needs too (Chromium, Node packages, nftables,
# nats-server for the cluster tests, curl for the TLS test,
# Janus for the side-by-side benchmark smoke test).
# Packages already present are skipped, so running it again is cheap. Needs root or sudo
# only when something is missing.
set -euo pipefail

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

pkgs=(pkg-config make
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-tools gstreamer1.0-x
  gstreamer1.0-plugins-base-apps)
if [ "$want_tests" = 1 ]; then
  pkgs+=(chromium iproute2 util-linux nftables nats-server nodejs npm janus curl)
fi

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
# node and npm may come from outside Debian (nodesource, nvm): count them as present then.
if [ "$want_tests" = 1 ] && command -v node >/dev/null && command -v npm >/dev/null; then
  kept=()
  for p in "${missing[@]}"; do [ "$p" = nodejs ] || [ "$p" = npm ] || kept+=("$p"); done
  missing=("${kept[@]+"${kept[@]}"}")
fi

if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
      echo "install-deps: missing packages ${missing[*]}; run this script as root or install sudo" >&2
      exit 1
    fi
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$want_tests" = 1 ]; then
  root="$(cd "$(dirname "$0")/.." && pwd)"
  for dir in "$root/clients/js" "$root/tests/node"; do
    [ -f "$dir/package.json" ] || continue
    # Install when node_modules is missing, or older than the lock file (a dependency was
    # added or changed since; npm writes node_modules/.package-lock.json on install).
    if [ ! -d "$dir/node_modules" ] || [ ! -f "$dir/node_modules/.package-lock.json" ] ||
      { [ -f "$dir/package-lock.json" ] && [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; }; then
      echo "install-deps: npm ci in $dir" >&2
      (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    fi
  done
fi

# OWT's own JS SDK (5.1, archived, not on npm) for the interop browser test
# (clients/js/test-browser/owt-sdk.test.mjs): fetched when GitHub is reachable; without it
# that test is skipped and says so. OWT_SDK_DIR points the test at another copy.
if [ "$want_tests" = 1 ] && [ -z "${OWT_SDK_DIR:-}" ]; then
  root="$(cd "$(dirname "$0")/.." && pwd)"
  sdk="$root/target/owt-client-javascript"
  if [ ! -f "$sdk/src/sdk/export.js" ] && command -v git >/dev/null; then
    rm -rf "$sdk"
    if timeout 120 git clone -q --depth 1 --branch v5.1 https://github.com/open-webrtc-toolkit/owt-client-javascript "$sdk" 2>/dev/null; then
      echo "install-deps: fetched OWT JS SDK 5.1 into $sdk" >&2
    else
      rm -rf "$sdk"
      echo "install-deps: GitHub unreachable: the OWT JS SDK interop test will be skipped" >&2
    fi
  fi
fi
