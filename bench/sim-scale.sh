#!/usr/bin/env bash
# How far the simulator goes: the scale run (a cluster forms over 10 s, attaches, publishes
# endpoints, runs to 60 s of virtual time) at growing sizes, with wall time, peak memory and
# where the work went. Runs that would pass the memory cap stop early and say when.
# usage: bench/sim-scale.sh [SIZES] [MAX_RSS_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
sizes="${1:-500,1000,2000}"
cap="${2:-20000}"
cargo build --release -q -p weft-sim
IFS=, read -ra list <<<"$sizes"
for n in "${list[@]}"; do
  target/release/weft-sim scale --nodes "$n" --max-rss-mib "$cap" --progress
done
