#!/usr/bin/env bash
# Resolver benchmark (issue 4 "Speed"): starts the local services if needed, then runs the release
# example pipeline/examples/resolver_bench.rs with every argument passed through, e.g.
#   scripts/bench.sh                                   # 200,000 events; 1,000/s for 20 s
#   scripts/bench.sh --events 50000 --rate 2000 --seconds 10
#   SYNCFLOW_RESOLVER_BATCH_MAX=5000 scripts/bench.sh  # SYNCFLOW_RESOLVER_* reach the resolver
# The results table goes to stdout; progress and logs to stderr. See docs/BENCHMARKS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/services.sh up
cargo build --release -p pipeline --example resolver_bench
exec cargo run --quiet --release -p pipeline --example resolver_bench -- "$@"
