#!/usr/bin/env bash
# The whole test suite: starts the real services (installing them on first use), checks format
# and lints, runs every test of the workspace against Kafka, FerretDB and Redis, and prints the
# total as "N passed, N failed". Exit status is non-zero when anything fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p .data/logs

start=$(date +%s)
# A one-shot build gains nothing from incremental caches, which doubled the target folder.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# A full disk shows up as a linker "Bus error" minutes later; say so up front.
free_gib=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1048576 ))
if [ "$free_gib" -lt 8 ]; then
  echo "WARNING: only ${free_gib} GiB free here; a clean test build takes about 4 GiB" >&2
fi
bash scripts/services.sh up

# Format and lints do not stop the tests: every run ends with the summary line, and fails if
# any of the three failed.
checks=0
echo "== cargo fmt --check"
cargo fmt --all -- --check || checks=$((checks + 1))
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings || checks=$((checks + 1))

echo "== cargo test"
log=.data/logs/test-output.log
set +e
# A test that hangs must fail the run, not outlast CI's time limit: the whole run takes about
# 13 minutes from a clean clone, so 40 minutes means something is stuck.
timeout --kill-after=30s "${TEST_TIMEOUT:-40m}" cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "cargo test was stopped after ${TEST_TIMEOUT:-40m}: a test hung (the last one running is named above)" >&2
fi

# (No match, as when the tests did not build, is a count of 0, not the end of this script.)
passed=$({ grep -Eo 'test result: [A-Za-z]+\. [0-9]+ passed' "$log" || true; } | awk '{s+=$4} END {print s+0}')
failed=$({ grep -Eo '[0-9]+ failed;' "$log" || true; } | awk '{s+=$1} END {print s+0}')
echo
echo "== summary: ${passed} passed, ${failed} failed ($(( $(date +%s) - start ))s)"
if [ "$checks" -ne 0 ]; then
  echo "FORMAT OR LINT CHECKS FAILED (see above)" >&2
  exit 1
fi
if [ "$status" -ne 0 ] || [ "$failed" -ne 0 ]; then
  echo "TESTS FAILED" >&2
  exit 1
fi
