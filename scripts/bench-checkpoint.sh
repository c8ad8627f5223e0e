#!/usr/bin/env bash
# Checkpoint benchmark (issue 7 "Speed"): checkpoint creation and restore time for a state of
# 1,000,000 documents (default), with baselines from the same run. Starts the local services if
# needed, then runs the release example pipeline/examples/checkpoint_bench.rs with every argument
# passed through, e.g.
#   scripts/bench-checkpoint.sh                       # 1,000,000 documents, 10,000 updates
#   scripts/bench-checkpoint.sh --docs 100000         # a quicker run
# The results table goes to stdout; progress to stderr. See docs/BENCHMARKS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/services.sh up
cargo build --release -p pipeline --example checkpoint_bench
exec cargo run --quiet --release -p pipeline --example checkpoint_bench -- "$@"
