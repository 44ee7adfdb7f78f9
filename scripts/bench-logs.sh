#!/usr/bin/env bash
# How fast the request and error logs answer the admin API's queries with a million rows
# (ROWS=… for another size). Bounded: one write of ROWS records, then six queries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
cargo run --release --locked -q --example log_queries
