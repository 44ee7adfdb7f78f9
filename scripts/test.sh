#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests that start gemgate and the fake Gemini
# upstream on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec cargo test --locked "$@"
