#!/usr/bin/env bash
# Builds gemgate (release) and runs it on conf/gemgate.toml, or on the arguments given.
# Settings may also come from the environment or a .env file, with gemini-balance's names.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
[ $# -gt 0 ] || set -- --config conf/gemgate.toml
exec cargo run --release --locked --bin gemgate -- "$@"
