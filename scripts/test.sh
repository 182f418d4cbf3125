#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need
# (redis-server from Debian, the official openai and anthropic Python SDKs in a virtualenv,
# nodejs and npm from Debian and the openai Node SDK under target/), starts a
# redis-server on a free loopback port, runs `cargo test`, and stops what it started.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p tower-fallback-cache   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

# redis-server (Debian package) for the Redis store tests.
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
if ! command -v redis-server >/dev/null 2>&1; then
  log "installing redis-server"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

# The official openai and anthropic Python SDKs, for the end-to-end tests that drive the
# proxy as a user would.
VENV="$(scripts/venv.sh 'openai>=1.40,<3' 'anthropic>=0.40,<1')"
export FALLBACK_CACHE_TEST_PYTHON="$VENV/bin/python"

# The official openai Node SDK (Debian's nodejs and npm, the SDK under target/).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  log "installing nodejs and npm"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
NODE_SDK="$PWD/target/node-sdk"
if [ ! -d "$NODE_SDK/node_modules/openai" ]; then
  log "installing the openai Node SDK into $NODE_SDK"
  mkdir -p "$NODE_SDK"
  [ -f "$NODE_SDK/package.json" ] || echo '{"name":"fallback-cache-e2e","private":true}' >"$NODE_SDK/package.json"
  (cd "$NODE_SDK" && npm install --silent --no-audit --no-fund 'openai@>=4.80 <6')
fi
export FALLBACK_CACHE_TEST_NODE="$(command -v node)"
export FALLBACK_CACHE_TEST_NODE_MODULES="$NODE_SDK"

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
