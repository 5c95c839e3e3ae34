#!/usr/bin/env bash
# Long runs that are not part of every CI run (./scripts/test.sh runs the suite).
#   ./scripts/soak.sh fuzz [SECONDS]    every fuzz target of tests/fuzz for SECONDS (default 300)
#   ./scripts/soak.sh crash [CYCLES]    the crash cycles across every backend, CYCLES
#                                       (default 50) with a random seed, printed
#   ./scripts/soak.sh load [CLIENTS REQUESTS SUBSCRIBERS]
#                                       the load test (default 200 x 1000 with 50)
#   ./scripts/soak.sh report [FUZZ_SECONDS]
#                                       all of it at full size, plus each fault test once,
#                                       and writes RELIABILITY.md (fuzzing default 60 s
#                                       per target)
# cargo-fuzz needs the compiler's unstable sanitizer flags; this machine has only a
# stable toolchain, and RUSTC_BOOTSTRAP=1 lets it accept them (for these builds only).
# The full sizes run on release builds, with nextest's soak profile (an hour per test).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-fuzz}
targets=(protocol_decode config_parse manifest_parse package_open mesh_config)

nextest() { cargo nextest run --cargo-profile release --profile soak -p tests --no-capture "$@"; }

fuzz() { # SECONDS: prints "TARGET RUNS passed|FAILED" per target; fails if one failed
  local secs=$1 scratch failed=0 runs
  command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
  # New inputs go to a scratch corpus: the committed seeds stay as they are.
  scratch=$(mktemp -d)
  for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target"
    echo "== $target: $secs s" >&2
    local status=passed
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz -O "$target" \
      "$scratch/$target" "tests/fuzz/corpus/$target" \
      -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
      tail -40 "$scratch/$target.log" >&2
      echo "$target: the fuzz run failed (output above and in $scratch; a crash it found is kept in tests/fuzz/artifacts/$target/)" >&2
      status=FAILED failed=1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$target.log" | tail -1)
    echo "$target ${runs:-0} $status"
  done
  [ "$failed" = 1 ] || rm -rf "$scratch"
  return $failed
}

crash() { # CYCLES
  local seed=${CRASH_SEED:-$RANDOM$RANDOM}
  echo "== crash cycles: $1, CRASH_SEED=$seed" >&2
  CRASH_CYCLES=$1 CRASH_SEED=$seed nextest -E 'test(/crash_cycles/)'
}

load() { # CLIENTS REQUESTS SUBSCRIBERS
  # Two threads for the test's own clients: 250 connections on one would measure it.
  SMOL_THREADS=2 LOAD_CLIENTS=$1 LOAD_REQUESTS=$2 LOAD_SUBSCRIBERS=$3 nextest -E 'test(/^load::/)'
}

case "$what" in
  fuzz) fuzz "${2:-300}" >&2 ;;
  crash) ./scripts/ensure-dockerd.sh; cargo build --release --workspace --bins --quiet; crash "${2:-50}" ;;
  load) cargo build --release --workspace --bins --quiet; load "${2:-200}" "${3:-1000}" "${4:-50}" ;;
  report)
    fuzz_secs=${2:-60}
    ./scripts/ensure-dockerd.sh
    cargo build --release --workspace --bins --quiet
    log=$(mktemp -d)
    rows=() any_failed=0
    # row NAME SIZE REPRODUCE SUMMARY_PREFIX -- COMMAND...: runs it, adds a table row
    row() {
      local name=$1 size=$2 repro=$3 prefix=$4; shift 5
      local result=passed figures
      "$@" >"$log/out" 2>&1 || result="**FAILED** (output kept in $log)"
      figures=""
      [ -z "$prefix" ] || figures=$(grep -h "^$prefix" "$log/out" | tail -1 || true)
      if [ -z "$figures" ]; then
        figures=$(grep -E '^ +Summary' "$log/out" | tail -1 | sed 's/^ *//' || true)
      fi
      cp "$log/out" "$log/$(printf %s "$name" | tr -c 'a-z0-9' _).log"
      [ "$result" = passed ] || any_failed=1
      rows+=("| $name | $size | ${figures//|/\\|} | $result | \`${repro//|/\\|}\` |")
      echo "$name: $result" >&2
    }
    row "crash cycles, every backend (a process, a container, a LAN service, a mesh service)" \
      "50 cycles, a random seed" "CRASH_SEED=N ./scripts/soak.sh crash 50" "crash cycles:" -- crash 50
    row "load: clients, subscribers following events and logs, restarts, one stuck subscriber" \
      "200 clients × 1000 requests, 50 subscribers" "./scripts/soak.sh load 200 1000 50" "load:" -- load 200 1000 50
    row "dockerd restarted under a running stack, without --live-restore" "1 restart" \
      "cargo nextest run -p tests -E 'test(/a_container_its_engine_stopped/)'" "" -- \
      nextest -E 'test(/a_container_its_engine_stopped/)'
    row "SSH host's sshd killed and its link cut during a deploy" "1 of each" \
      "cargo nextest run -p tests -E 'test(/mid_upload/)'" "" -- nextest -E 'test(/mid_upload/)'
    row "a LAN service's sshd killed, then its link cut, during health checks" "1 of each" \
      "cargo nextest run -p tests -E 'test(/a_lan_service_rides_out/)'" "" -- \
      nextest -E 'test(/a_lan_service_rides_out/)'
    row "state directory full, then read-only (ext4 error) under the daemon" "1 of each" \
      "cargo nextest run -p tests -E 'test(/_state_directory_/)'" "" -- nextest -E 'test(/_state_directory_/)'
    row "crash loop: a service that dies at once (backoff to the limit, then failed; CPU measured)" "1 run" \
      "cargo nextest run -p tests -E 'test(/backs_off_without_a_busy_loop/)'" "" -- \
      nextest -E 'test(/backs_off_without_a_busy_loop/)'
    row "secrets (token, WireGuard private keys, secret_env values) kept out of logs, events, ps and output" "each once" \
      "cargo nextest run -p tests -E 'test(/secret_env_value|nodes_reach_the_hub/)'" "" -- \
      nextest -E 'test(/secret_env_value|nodes_reach_the_hub/)'
    row "hostile input: malformed JSON, oversized frames, unknown methods, bad YAML, wrong tokens" "every case once" \
      "cargo nextest run -p tests -E 'test(/^bad_input::/)'" "" -- nextest -E 'test(/^bad_input::/)'
    row "remote clients without a client certificate, or with another CA's" "1 of each" \
      "cargo nextest run -p tests -E 'test(/remote_clients/)'" "" -- nextest -E 'test(/remote_clients/)'
    fuzz "$fuzz_secs" >"$log/fuzz" 2>"$log/fuzz.log" || any_failed=1
    while read -r target runs status; do
      if [ "$status" = passed ]; then figures="$runs inputs tried, 0 crashes"; result=passed
      else figures="$runs inputs tried"; result="**FAILED** (see $log/fuzz.log)"; fi
      rows+=("| fuzzing \`$target\` | $fuzz_secs s | $figures | $result | \`./scripts/soak.sh fuzz $fuzz_secs\` |")
    done <"$log/fuzz"
    [ -s "$log/fuzz" ] || rows+=("| fuzzing | $fuzz_secs s per target | none ran | **FAILED** (see $log/fuzz.log) | \`./scripts/soak.sh fuzz $fuzz_secs\` |")
    {
      echo "# Reliability"
      echo
      echo "Written by \`./scripts/soak.sh report $fuzz_secs\` on $(date -u +%Y-%m-%d) at commit"
      echo "$(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with local changes)'), on $(nproc) cores. CI runs the"
      echo "reduced sizes of the same tests (\`./scripts/test.sh\`: 10 crash cycles, 20 clients × 100"
      if [ "$any_failed" = 0 ]; then
        echo "requests with 5 subscribers). Every run below passed, and none lost data (each test"
        echo "fails otherwise)."
      else
        echo "requests with 5 subscribers). **Some runs below failed**: see their rows."
      fi
      echo
      echo "| test | size | figures | result | reproduce |"
      echo "|---|---|---|---|---|"
      printf '%s\n' "${rows[@]}"
      echo
      # What people wrote by hand (findings, history) is kept below the marker.
      sed -n '/^<!-- kept by soak.sh -->$/,$p' RELIABILITY.md 2>/dev/null || true
    } >"$log/RELIABILITY.md"
    grep -q '^<!-- kept by soak.sh -->$' "$log/RELIABILITY.md" || echo '<!-- kept by soak.sh -->' >>"$log/RELIABILITY.md"
    mv "$log/RELIABILITY.md" RELIABILITY.md
    echo "wrote RELIABILITY.md (logs in $log)" >&2
    exit "$any_failed"
    ;;
  *) echo "usage: $0 fuzz [SECONDS] | crash [CYCLES] | load [CLIENTS REQUESTS SUBSCRIBERS] | report [FUZZ_SECONDS]" >&2; exit 2 ;;
esac
