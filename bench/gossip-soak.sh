#!/usr/bin/env bash
# Runs the gossip "always converges" property over many more cases than CI does.
# usage: bench/gossip-soak.sh [CASES] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
WEFT_PROPTEST_CASES="${1:-5000}" WEFT_PROPTEST_SEED="${2:-$RANDOM}" \
  cargo test --release -p weft-sim --test converges always_converges -- --nocapture
