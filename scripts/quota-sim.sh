#!/usr/bin/env bash
# The quota simulation, longer: three gateways (round robin, project cooldowns, proactive
# limits) side by side against the fake upstream's per-project quota model, under a bursty load
# at 1.5 times the pool's capacity. Prints the table the README shows.
#
#   scripts/quota-sim.sh [seconds]     # default 600
#
# It runs the test `simulation::` of tests/gateway with GEMGATE_SIM_SECONDS set; everything
# stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
case "$seconds" in
  ''|*[!0-9]*) echo "usage: $0 [seconds]" >&2; exit 2 ;;
esac
GEMGATE_SIM_SECONDS="$seconds" cargo test --locked --test gateway -- simulation:: --nocapture \
  2>&1 | grep -E '^\||projects x|test result|panicked'
