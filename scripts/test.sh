#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need
# (redis-server from Debian, the official openai Python SDK in a virtualenv), starts a
# redis-server on a free loopback port, runs `cargo test`, and stops what it started.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p tower-fallback-cache   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

# redis-server (Debian package) for the Redis store tests.
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
APT_UPDATED=""
apt_install() {
  if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server"
  apt_install redis-server
fi
# promtool (Debian's prometheus package) checks the /metrics page (tests/proxy_metrics.rs).
if ! command -v promtool >/dev/null 2>&1; then
  log "installing promtool (prometheus)"
  apt_install prometheus
fi

# The official openai SDK, for the end-to-end tests that drive the proxy as a user would.
VENV="$(scripts/venv.sh 'openai>=1.40,<3')"
export FALLBACK_CACHE_TEST_PYTHON="$VENV/bin/python"

# A redis-server of our own on a free loopback port, stopped on exit.
REDIS_DIR="$(mktemp -d)"
REDIS_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --dir "$REDIS_DIR" --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log"
cleanup() {
  if [ -f "$REDIS_DIR/redis.pid" ]; then kill "$(cat "$REDIS_DIR/redis.pid")" 2>/dev/null || true; fi
  rm -rf "$REDIS_DIR"
}
trap cleanup EXIT
for _ in $(seq 50); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
export FALLBACK_CACHE_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
log "redis-server on $FALLBACK_CACHE_TEST_REDIS_URL"

log "cargo test --workspace --all-features $*"
cargo test --workspace --all-features "$@"
