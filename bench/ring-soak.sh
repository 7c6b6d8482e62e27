#!/usr/bin/env bash
# Runs the IPAM ring properties (merge laws, donation safety on 2-50 nodes, Paxos seeding, the
# removal race) over many more cases than CI does. A failure prints the seed that replays it.
# usage: bench/ring-soak.sh [CASES] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
WEFT_PROPTEST_CASES="${1:-1500}" WEFT_PROPTEST_SEED="${2:-$RANDOM}" \
  cargo test --release -p weft-ipam --test ring_props
