#!/usr/bin/env bash
# Runs every test of the workspace on a fresh machine: installs what the tests need
# (redis-server from Debian, the official openai and anthropic Python SDKs in a virtualenv,
# nodejs and npm from Debian and the openai Node SDK under target/), starts a
# redis-server, a 3-node Redis Cluster and a TLS redis-server on free loopback ports, runs
# `cargo test`, and stops what it started.
#
#   scripts/test.sh            # everything
#   scripts/test.sh -p tower-fallback-cache   # extra arguments go to `cargo test`
#   scripts/test.sh --run cargo bench --bench stores   # another command, with the servers
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

# openssl, for the TLS redis-server's certificates.
if ! command -v openssl >/dev/null 2>&1; then
  log "installing openssl"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl >/dev/null
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

# Free loopback ports: `free_ports N [BUS]` prints N of them; with BUS, each one's cluster
# bus port (port + 10000) is free as well.
free_ports() {
  python3 - "$@" <<'PY'
import socket, sys
count, bus = int(sys.argv[1]), len(sys.argv) > 2
def free(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); return True
    except OSError:
        return False
    finally:
        s.close()
found = []
while len(found) < count:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    if port in found or (bus and (port + 10000 > 65535 or not free(port + 10000))):
        continue
    found.append(port)
print(" ".join(map(str, found)))
PY
}

# Everything started below writes its PID file in $SERVERS; each is stopped by that PID on
# exit, pass or fail (a cluster node a test restarted writes its new PID there too). The
# directory goes only once they have exited: a redis-server shutting down still writes its
# log. The run's exit status is the tests', never the clean-up's.
SERVERS="$(mktemp -d)"
cleanup() {
  local status=$? pids="" pid
  for pidfile in "$SERVERS"/*/redis.pid; do
    if [ -f "$pidfile" ] && pid="$(cat "$pidfile" 2>/dev/null)" && kill "$pid" 2>/dev/null; then
      pids="$pids $pid"
    fi
  done
  for pid in $pids; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$SERVERS" 2>/dev/null || { sleep 0.2; rm -rf "$SERVERS" 2>/dev/null; } ||
    log "could not remove $SERVERS"
  exit "$status"
}
trap cleanup EXIT
wait_for() { # port [redis-cli args...]
  local port="$1"; shift
  for _ in $(seq 100); do
    redis-cli -p "$port" "$@" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "redis-server on port $port did not answer"; return 1
}

# A redis-server of our own on a free loopback port.
REDIS_DIR="$SERVERS/single"; mkdir -p "$REDIS_DIR"
REDIS_PORT="$(free_ports 1)"
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
  --dir "$REDIS_DIR" --daemonize yes --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log"
wait_for "$REDIS_PORT"
export FALLBACK_CACHE_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
log "redis-server on $FALLBACK_CACHE_TEST_REDIS_URL"

# A 3-node Redis Cluster (no replicas). Each node's settings are in $dir/redis.conf, so a
# test can kill a node and start it again as it was (`redis-server $dir/redis.conf`).
# Nodes that stay up keep serving their slots while one is down (full coverage not
# required), and a dead node is noticed within a second.
CLUSTER_NODES=""
CLUSTER_DIRS=""
for port in $(free_ports 3 bus); do
  dir="$SERVERS/cluster-$port"; mkdir -p "$dir"
  cat >"$dir/redis.conf" <<CONF
bind 127.0.0.1
port $port
dir $dir
daemonize yes
pidfile $dir/redis.pid
logfile $dir/redis.log
save ""
appendonly no
cluster-enabled yes
cluster-config-file $dir/nodes.conf
cluster-node-timeout 1000
cluster-require-full-coverage no
CONF
  redis-server "$dir/redis.conf"
  CLUSTER_NODES="$CLUSTER_NODES 127.0.0.1:$port"
  CLUSTER_DIRS="$CLUSTER_DIRS${CLUSTER_DIRS:+,}$dir"
done
for node in $CLUSTER_NODES; do wait_for "${node#*:}"; done
# shellcheck disable=SC2086
redis-cli --cluster create $CLUSTER_NODES --cluster-replicas 0 --cluster-yes >"$SERVERS/cluster-create.log"
for _ in $(seq 100); do
  ok=1
  for node in $CLUSTER_NODES; do
    redis-cli -p "${node#*:}" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || ok=0
  done
  [ "$ok" = 1 ] && break
  sleep 0.1
done
[ "$ok" = 1 ] || { log "the Redis Cluster did not reach cluster_state:ok"; exit 1; }
export FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL="redis+cluster://$(echo $CLUSTER_NODES | tr ' ' ',')"
export FALLBACK_CACHE_TEST_REDIS_CLUSTER_DIRS="$CLUSTER_DIRS"
log "Redis Cluster on $FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL"

# A TLS redis-server (no plain port), its certificate for 127.0.0.1 and localhost signed
# by a CA made for this run.
TLS_DIR="$SERVERS/tls"; mkdir -p "$TLS_DIR"
TLS_PORT="$(free_ports 1)"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=fallback-cache test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$TLS_DIR/server.ext"
openssl x509 -req -days 1 -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
  -CAcreateserial -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.crt" 2>/dev/null
redis-server --bind 127.0.0.1 --port 0 --tls-port "$TLS_PORT" --save '' --appendonly no \
  --tls-cert-file "$TLS_DIR/server.crt" --tls-key-file "$TLS_DIR/server.key" \
  --tls-ca-cert-file "$TLS_DIR/ca.crt" --tls-auth-clients no \
  --dir "$TLS_DIR" --daemonize yes --pidfile "$TLS_DIR/redis.pid" --logfile "$TLS_DIR/redis.log"
wait_for "$TLS_PORT" --tls --cacert "$TLS_DIR/ca.crt"
export FALLBACK_CACHE_TEST_REDIS_TLS_URL="rediss://127.0.0.1:$TLS_PORT/0"
export FALLBACK_CACHE_TEST_REDIS_CA_FILE="$TLS_DIR/ca.crt"
log "TLS redis-server on $FALLBACK_CACHE_TEST_REDIS_TLS_URL"

# `scripts/test.sh --run CMD ARGS...` runs CMD with these servers instead of the tests
# (e.g. one test file, or `cargo bench --bench stores`).
if [ "${1:-}" = "--run" ]; then
  shift
  log "$*"
  "$@"
  exit
fi

log "cargo test --workspace --all-features $*"
cargo test --workspace --all-features "$@"
