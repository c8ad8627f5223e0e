#!/usr/bin/env bash
# MongoDB view benchmark (issue 5 "Speed"): starts the local services if needed, then runs the
# release example pipeline/examples/view_bench.rs with every argument passed through, e.g.
#   scripts/bench-view.sh                          # 100,000-document bucket, default budgets
#   scripts/bench-view.sh --docs 20000 --requests 50 --budget-secs 120
#   scripts/bench-view.sh --help                   # every option
# Measures (a) documents/s applied by MongoView::apply_batch (fresh collection and at size) next
# to raw insert_many / replace_one, and (b) GET /v1/buckets/{bucket}/changes latency next to the
# raw driver find. Uses a fresh database (viewbench_<pid>_<ms>) and drops it at the end.
# SYNCFLOW_MONGO_URI / SYNCFLOW_KAFKA_BROKERS point it elsewhere. The results table (markdown)
# goes to stdout; progress to stderr. See docs/BENCHMARKS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/services.sh up
cargo build --release -p pipeline --example view_bench
exec cargo run --quiet --release -p pipeline --example view_bench -- "$@"
