#!/usr/bin/env bash
# WebSocket load benchmark (issue 6 "Speed"): starts the local services if needed, builds the
# `syncflow` binary and the release example pipeline/examples/ws_load.rs, then runs it with every
# argument passed through, e.g.
#   scripts/bench-ws.sh                                    # 1,000 subscribers, 100 buckets, 1,000 writes/s, 30 s
#   scripts/bench-ws.sh --subscribers 200 --rate 200 --seconds 10
#   SYNCFLOW_PROJECTOR_BATCH_MAX=100 scripts/bench-ws.sh   # SYNCFLOW_* reach both server processes
# BENCH_SKIP_SERVICES=1 skips `scripts/services.sh up` (services already running from another
# checkout). The results table goes to stdout; progress and logs to stderr. See docs/BENCHMARKS.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${BENCH_SKIP_SERVICES:-}" ]]; then
  bash scripts/services.sh up
fi
# 1,000 WebSockets on each side, plus Kafka and HTTP connections.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release -p pipeline --bin syncflow --example ws_load
exec cargo run --quiet --release -p pipeline --example ws_load -- "$@"
