#!/usr/bin/env bash
# Installs what building gemgate needs beyond the Rust toolchain: cmake (pingora's zlib-ng is
# built with it) and a C compiler. Safe to run again: it installs only what is missing.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "bootstrap: installing ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if command -v apt-get >/dev/null 2>&1; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v dnf >/dev/null 2>&1; then
  $sudo dnf install -y "${missing[@]}"
elif command -v brew >/dev/null 2>&1; then
  brew install "${missing[@]}"
else
  echo "bootstrap: please install: ${missing[*]}" >&2
  exit 1
fi
