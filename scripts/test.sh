#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests that start gemgate and the fake Gemini
# upstream on loopback ports, including the official openai and google-genai Python SDKs
# against gemgate (their virtual environment is made on first run, in target/sdk-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh

OPENAI_SDK_VERSION=3.57.0
GENAI_SDK_VERSION=3.6.1
venv=target/sdk-venv
if ! "$venv/bin/python" -c "import openai, google.genai as g, sys; sys.exit(openai.__version__ != '$OPENAI_SDK_VERSION' or g.__version__ != '$GENAI_SDK_VERSION')" 2>/dev/null; then
  echo "test: installing the openai $OPENAI_SDK_VERSION and google-genai $GENAI_SDK_VERSION Python SDKs into $venv" >&2
  mkdir -p target
  if ! python3 -m venv "$venv" 2>/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q "openai==$OPENAI_SDK_VERSION" "google-genai==$GENAI_SDK_VERSION"
fi
export GEMGATE_SDK_PYTHON="$PWD/$venv/bin/python"
exec cargo test --locked "$@"
