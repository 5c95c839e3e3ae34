#!/usr/bin/env bash
# Builds harness and brings up the quickstart stack (four local processes) through
# harnessd, which `harness up` starts in the background. Needs only Rust.
# Usage: ./scripts/quickstart.sh        then: ./target/debug/harness -f examples/quickstart/harness.yaml ps | logs api | down
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --workspace --bins
./target/debug/harness -f examples/quickstart/harness.yaml up
./target/debug/harness -f examples/quickstart/harness.yaml ps
