#!/usr/bin/env bash
# Long runs that are not part of every CI run (./scripts/test.sh runs the suite).
#   ./scripts/soak.sh fuzz [SECONDS]   every fuzz target of tests/fuzz for SECONDS (default 300)
#   ./scripts/soak.sh crash [CYCLES]    the crash cycles across every backend, CYCLES
#                                       (default 50) with a random seed, printed
# cargo-fuzz needs the compiler's unstable sanitizer flags; this machine has only a
# stable toolchain, and RUSTC_BOOTSTRAP=1 lets it accept them (for these builds only).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-fuzz}
secs=${2:-300}
case "$what" in
  fuzz)
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    for target in protocol_decode config_parse manifest_parse package_open mesh_config; do
      mkdir -p "tests/fuzz/corpus/$target"
      echo "== $target: $secs s"
      RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz -O "$target" "tests/fuzz/corpus/$target" \
        -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
        grep -E '^(Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY|.*panicked)' || true
      if ls "tests/fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
        echo "$target found a crash: tests/fuzz/artifacts/$target/"; exit 1
      fi
    done
    ;;
  crash)
    cycles=${2:-50}
    seed=${CRASH_SEED:-$RANDOM$RANDOM}
    echo "== crash cycles: $cycles, CRASH_SEED=$seed"
    cargo build --workspace --bins --quiet
    CRASH_CYCLES=$cycles CRASH_SEED=$seed cargo nextest run -p tests \
      -E 'test(/crash_cycles/)' --no-capture
    ;;
  *) echo "usage: $0 fuzz [SECONDS] | crash [CYCLES]" >&2; exit 2 ;;
esac
