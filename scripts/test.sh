#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests that start gemgate and the fake Gemini
# upstream on loopback ports, including the official openai, anthropic and google-genai Python SDKs
# against gemgate, and the admin page in headless Chromium (Playwright). Their virtual
# environment is made on first run, in target/sdk-venv; Chromium comes from the system's
# package manager. The browser test's screenshots are kept in target/browser-shots/. The fleet
# tests start their own redis-server (Debian's, installed when missing); promtool (Debian's
# prometheus package) checks the alert rules.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh

OPENAI_SDK_VERSION=3.57.0
GENAI_SDK_VERSION=3.6.1
ANTHROPIC_SDK_VERSION=2.17.0
# Playwright drives the system's Chromium; it never downloads a browser of its own.
PLAYWRIGHT_VERSION=1.64.1
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $sudo apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

venv=target/sdk-venv
if ! "$venv/bin/python" -c "import openai, anthropic, google.genai as g, playwright, importlib.metadata as m, sys; sys.exit(openai.__version__ != '$OPENAI_SDK_VERSION' or g.__version__ != '$GENAI_SDK_VERSION' or anthropic.__version__ != '$ANTHROPIC_SDK_VERSION' or m.version('playwright') != '$PLAYWRIGHT_VERSION')" 2>/dev/null; then
  echo "test: installing openai $OPENAI_SDK_VERSION, google-genai $GENAI_SDK_VERSION, anthropic $ANTHROPIC_SDK_VERSION and playwright $PLAYWRIGHT_VERSION into $venv" >&2
  mkdir -p target
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q "openai==$OPENAI_SDK_VERSION" "google-genai==$GENAI_SDK_VERSION" \
    "anthropic==$ANTHROPIC_SDK_VERSION" "playwright==$PLAYWRIGHT_VERSION"
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "test: installing Chromium for the admin page's browser test" >&2
  apt_install chromium fonts-liberation
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "test: installing Prometheus's promtool to check the alert rules" >&2
  apt_install prometheus
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "test: installing redis-server for the fleet tests" >&2
  apt_install redis-server
fi
export GEMGATE_SDK_PYTHON="$PWD/$venv/bin/python"
export GEMGATE_BROWSER_PYTHON="$PWD/$venv/bin/python"
export GEMGATE_CHROMIUM="$(command -v chromium)"
export GEMGATE_REDIS_SERVER="$(command -v redis-server)"
export GEMGATE_PROMTOOL="$(command -v promtool)"
exec cargo test --locked --workspace "$@"
