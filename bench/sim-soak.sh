#!/usr/bin/env bash
# Runs the simulator's soak (random load and faults on the agent, every checker on) over many
# more seeds than CI's 50, on several cluster sizes. A failing seed is printed and replays
# exactly with `weft-sim soak --seed S --seeds 1 --nodes N`.
# usage: bench/sim-soak.sh [SEEDS] [FIRST_SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-500}"
first="${2:-$RANDOM}"
cargo build --release -q -p weft-sim
for nodes in 3 5 8 13 21; do
  target/release/weft-sim soak --nodes "$nodes" --seeds "$seeds" --seed "$first" --duration-s 90 | tail -n 1
done
