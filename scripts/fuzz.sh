#!/usr/bin/env bash
# Fuzzes every parser of outside input with proptest: the Stripe-Signature header and webhook
# envelope (shared/tests/fuzz_signature.rs), event bodies, bearer tokens, the catalog file and
# `dlq replay --from-file` lines (processor/tests/fuzz_inputs.rs). Each property asserts no panic
# and a named error.
#
# Usage: scripts/fuzz.sh [cases per property = 1000000]
#   The replay-lines property runs a hundredth of the cases (a file and a command run each).
#   FUZZ_THREADS (default 2) properties run at once. Failures print proptest's minimal input and
#   are saved under */proptest-regressions/.
set -euo pipefail
cd "$(dirname "$0")/.."

cases=${1:-1000000}
export PROPTEST_CASES=$cases
# The replay property runs the command, which logs each refused file; keep the output readable.
export RUST_LOG=${RUST_LOG:-off}
targets=(-p shared --test fuzz_signature -p processor --test fuzz_inputs)

echo "building the fuzz properties (release)…"
cargo test --release --no-run --quiet "${targets[@]}"

properties=$(grep -ho 'fn fuzz_[a-z_]*' shared/tests/fuzz_signature.rs processor/tests/fuzz_inputs.rs | wc -l)
replay=$(( cases / 100 > 16 ? cases / 100 : 16 ))
total=$(( cases * (properties - 1) + replay ))
echo "running $properties properties, $total cases in all…"
start=$(date +%s.%N)
cargo test --release --quiet "${targets[@]}" -- fuzz_ --test-threads "${FUZZ_THREADS:-2}"
end=$(date +%s.%N)
seconds=$(echo "$end - $start" | bc)
printf 'RESULT fuzz properties=%s cases=%s seconds=%.0f\n' "$properties" "$total" "$seconds"
