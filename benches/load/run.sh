#!/usr/bin/env bash
# Load comparison on loopback: fallback-cache-proxy against nginx proxy_cache (keyed on the
# request body), in front of the same mock upstream, for HIT and FALLBACK, at several
# concurrencies. Prints requests/s, p50/p99 latency and CPU time per request of each, and
# proxy/nginx ratios.
#
#   benches/load/run.sh
#
# Settings (environment): DURATION seconds per run (10), CONCURRENCY list ("1 16 64"),
# THREADS of wrk (2), PIN (0), HEADERS (plain; sdk: the OpenAI Python SDK's headers too). Installs nginx and wrk with apt-get when they are missing (as
# root), builds the release binaries, and stops every process it started, whatever happens.
#
# PIN=1 puts wrk on CPU 0 (one thread unless THREADS says otherwise) and every server on
# the other CPUs (nginx with one worker process per CPU of theirs, the proxies and
# static-http with one worker thread per CPU of theirs), as a load generator on another
# machine would be: on a small machine, a server whose requests take more CPU is otherwise
# also preempted more often by wrk's threads, and its ratio moves with the scheduler.
#
# Scenarios: HIT (proxy --mode cache-first; nginx serving a fresh cached answer);
# HIT-vs-static (the same proxy against nginx answering the same bytes with `return 200`,
# no cache at all: the ceiling); HIT-vs-hyper (the same proxy against `static-http`, the
# proxy's HTTP stack alone, hyper on Tokio answering the same bytes: what the proxy adds to
# it); HIT-vs-shared (the same proxy, its connections on one worker thread each, the
# default, against the same proxy with --workers shared); FALLBACK (the upstream answers 429 insufficient_quota; the proxy with --no-quota-breaker and nginx
# both ask it every time and serve the stored answer); FALLBACK-breaker (the proxy's
# default quota breaker, open: the stored answer is served without asking; nginx as above).
# All traffic stays on 127.0.0.1; every run is bounded by DURATION (and a timeout).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"

DURATION="${DURATION:-10}"
CONCURRENCY="${CONCURRENCY:-1 16 64}"
PIN="${PIN:-0}"
SERVE=()
CLIENT=()
NGINX_WORKERS=auto
if [ "$PIN" = 1 ]; then
  CPUS="$(nproc)"
  [ "$CPUS" -ge 2 ] || { printf 'run.sh: PIN=1 needs at least 2 CPUs\n' >&2; exit 1; }
  SERVE=(taskset -c "1-$((CPUS - 1))")
  CLIENT=(taskset -c 0)
  NGINX_WORKERS=$((CPUS - 1))
  THREADS="${THREADS:-1}"
fi
THREADS="${THREADS:-2}"
BODY_FILE="$ROOT/benches/load/request.json"

SCRIPT=run.sh
# shellcheck source=benches/load/common.sh
. "$ROOT/benches/load/common.sh"
chmod 755 "$WORK" # nginx workers may run as another user

# --- tools ------------------------------------------------------------------------------
missing=()
[ "$PIN" = 1 ] && ! command -v taskset >/dev/null 2>&1 && missing+=(util-linux)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
install_missing ${missing[@]+"${missing[@]}"}
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

build_servers

# A port for nginx to listen on: free now, and below the ephemeral range, where no outgoing
# connection (wrk's, the proxies') can take it before nginx binds it.
free_port() {
  local port low
  low="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
  [ "$low" -gt 12000 ] || die "the ephemeral port range starts at $low: no room below it"
  for _ in $(seq 50); do
    port=$((10000 + RANDOM % (low - 10000)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  die "no free port found"
}

say "starting the mock upstream, four proxies and nginx on 127.0.0.1"
${SERVE[@]+"${SERVE[@]}"} "$BIN/mock-upstream" --listen 127.0.0.1:0 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
MOCK="$(listening_on "$WORK/mock.log")"

${SERVE[@]+"${SERVE[@]}"} "$BIN/fallback-cache-proxy" --listen 127.0.0.1:0 --upstream "$MOCK" \
  --store memory --mode cache-first --fresh-for 1h 2>"$WORK/proxy-hit.log" &
PIDS+=($!)
PID_HIT=$!
PROXY_HIT="$(listening_on "$WORK/proxy-hit.log")"
${SERVE[@]+"${SERVE[@]}"} "$BIN/fallback-cache-proxy" --listen 127.0.0.1:0 --upstream "$MOCK" \
  --store memory --mode cache-first --fresh-for 1h --workers shared 2>"$WORK/proxy-shared.log" &
PIDS+=($!)
PID_SHARED=$!
PROXY_SHARED="$(listening_on "$WORK/proxy-shared.log")"
${SERVE[@]+"${SERVE[@]}"} "$BIN/fallback-cache-proxy" --listen 127.0.0.1:0 --upstream "$MOCK" \
  --store memory --mode fallback 2>"$WORK/proxy-fallback.log" &
PIDS+=($!)
PID_FALLBACK=$!
PROXY_FALLBACK="$(listening_on "$WORK/proxy-fallback.log")"
# Without the quota breaker every request asks the upstream, as nginx does.
${SERVE[@]+"${SERVE[@]}"} "$BIN/fallback-cache-proxy" --listen 127.0.0.1:0 --upstream "$MOCK" \
  --store memory --mode fallback --no-quota-breaker 2>"$WORK/proxy-asking.log" &
PIDS+=($!)
PID_ASKING=$!
PROXY_ASKING="$(listening_on "$WORK/proxy-asking.log")"

HIT_PORT="$(free_port)"
FALLBACK_PORT="$(free_port)"
while [ "$FALLBACK_PORT" = "$HIT_PORT" ]; do FALLBACK_PORT="$(free_port)"; done
STATIC_PORT="$(free_port)"
while [ "$STATIC_PORT" = "$HIT_PORT" ] || [ "$STATIC_PORT" = "$FALLBACK_PORT" ]; do
  STATIC_PORT="$(free_port)"
done

# The answer the proxy serves for the bench request, for nginx's static server: asked of
# the HIT proxy (which stores it), then written into nginx's configuration as a quoted
# string (backslashes and quotes escaped; nginx has no escape for `$`).
post_chat "$WORK/answer.json" "$PROXY_HIT"
grep -q '[$]' "$WORK/answer.json" && die "the answer holds a \$: nginx cannot return it as is"
# nginx's escapes in a quoted string (\\ and \'), then the escapes of a sed replacement.
sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g" "$WORK/answer.json" | tr -d '\n' >"$WORK/answer.nginx"
sed -e 's/[\\&|]/\\&/g' "$WORK/answer.nginx" >"$WORK/answer.sed"
sed -e "s|@WORK@|$WORK|g" -e "s|@USER@|$(id -un)|g" -e "s|@UPSTREAM@|${MOCK#http://}|g" \
  -e "s|@HIT_PORT@|$HIT_PORT|g" -e "s|@FALLBACK_PORT@|$FALLBACK_PORT|g" \
  -e "s|@STATIC_PORT@|$STATIC_PORT|g" -e "s|@STATIC_ANSWER@|$(cat "$WORK/answer.sed")|" \
  -e "s|^worker_processes auto;|worker_processes $NGINX_WORKERS;|" \
  "$ROOT/benches/load/nginx.conf.template" >"$WORK/nginx.conf"
"$NGINX" -p "$WORK" -c "$WORK/nginx.conf" -t -q 2>"$WORK/nginx-test.log" ||
  { cat "$WORK/nginx-test.log" >&2; die "nginx refused its configuration"; }
${SERVE[@]+"${SERVE[@]}"} "$NGINX" -p "$WORK" -c "$WORK/nginx.conf" 2>>"$WORK/nginx-error.log" &
PIDS+=($!)
PID_NGINX=$!
NGINX_HIT="http://127.0.0.1:$HIT_PORT"
NGINX_FALLBACK="http://127.0.0.1:$FALLBACK_PORT"
NGINX_STATIC="http://127.0.0.1:$STATIC_PORT"
for _ in $(seq 100); do
  curl -s -o /dev/null "$NGINX_FALLBACK/v1/models" && break
  sleep 0.05
done
curl -s -o /dev/null "$NGINX_FALLBACK/v1/models" ||
  { cat "$WORK/nginx-error.log" >&2; die "nginx did not start"; }

# --- requests ---------------------------------------------------------------------------
PATH_CHAT=/v1/chat/completions
# Prints the value of HEADER in the answer to the bench request sent to BASE.
marking() {
  local base="$1" header="$2"
  curl -sS -o /dev/null -D - -X POST "$base$PATH_CHAT" \
    -H 'content-type: application/json' -H 'authorization: Bearer sk-load-test' \
    --data-binary "@$BODY_FILE" | tr -d '\r' | grep -i "^$header:" | head -1 | cut -d' ' -f2-
}
expect_marking() {
  local base="$1" header="$2" want="$3" got
  got="$(marking "$base" "$header")"
  [ "$got" = "$want" ] || die "$base answered $header: '$got', expected '$want'"
}
set_mock() {
  curl -sSf -o /dev/null -X POST "$MOCK/_mock/mode" -H 'content-type: application/json' -d "$1"
}

write_post_lua "$BODY_FILE"

say "warming: every server stores the answer"
set_mock '{"mode":"ok"}'
for base in "$PROXY_HIT" "$PROXY_SHARED" "$PROXY_FALLBACK" "$PROXY_ASKING" "$NGINX_HIT" "$NGINX_FALLBACK"; do
  curl -sS -o /dev/null -X POST "$base$PATH_CHAT" -H 'content-type: application/json' \
    -H 'authorization: Bearer sk-load-test' --data-binary "@$BODY_FILE"
done
expect_marking "$PROXY_HIT" x-fallback-cache HIT
expect_marking "$PROXY_SHARED" x-fallback-cache HIT
expect_marking "$NGINX_HIT" x-cache-status HIT
# nginx's static server answers the very bytes the proxy serves.
curl -sSf -o "$WORK/static.json" -X POST "$NGINX_STATIC$PATH_CHAT" \
  -H 'content-type: application/json' --data-binary "@$BODY_FILE"
cmp -s "$WORK/static.json" "$WORK/answer.json" ||
  die "nginx's static answer differs from the proxy's ($WORK/static.json, $WORK/answer.json)"
# The proxy's HTTP stack alone, answering the same bytes.
${SERVE[@]+"${SERVE[@]}"} "$BIN/static-http" "$WORK/answer.json" 127.0.0.1:0 2>"$WORK/static-http.log" &
PIDS+=($!)
PID_STATIC_HTTP=$!
STATIC_HTTP="$(listening_on "$WORK/static-http.log")"
curl -sSf -o "$WORK/static-http.json" -X POST "$STATIC_HTTP$PATH_CHAT" \
  -H 'content-type: application/json' --data-binary "@$BODY_FILE"
cmp -s "$WORK/static-http.json" "$WORK/answer.json" ||
  die "static-http's answer differs from the proxy's"

# The CPU time (user + system, in clock ticks) used so far by the processes PIDS and their
# children that are still running (nginx's workers are its master's children).
CLK_TCK="$(getconf CLK_TCK)"
cpu_ticks() {
  local pid total=0 u s
  for pid in "$@" $(for pid in "$@"; do pgrep -P "$pid" || true; done); do
    read -r u s < <(awk '{ print $14, $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0 0)
    total=$((total + u + s))
  done
  echo "$total"
}

# Runs wrk against BASE, served by the processes PIDS (a list), and prints "requests/s
# p50_us p99_us errors cpu_us_per_request".
load() {
  local base="$1" connections="$2" pids="$3" threads="$THREADS" out before after
  [ "$connections" -lt "$threads" ] && threads="$connections"
  # shellcheck disable=SC2086 # a list of pids
  before="$(cpu_ticks $pids)"
  out="$(timeout $((DURATION + 30)) ${CLIENT[@]+"${CLIENT[@]}"} wrk --latency -t "$threads" -c "$connections" \
    -d "${DURATION}s" -s "$WORK/post.lua" "$base$PATH_CHAT")" || die "wrk failed: $out"
  # shellcheck disable=SC2086
  after="$(cpu_ticks $pids)"
  echo "$out" >>"$WORK/wrk.log"
  echo "$out" | awk -v ticks="$((after - before))" -v hz="$CLK_TCK" '
    function us(v) {
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return v * 1000
      if (v ~ /s$/) return v * 1000000
      return v
    }
    $1 == "50%" { p50 = us($2) }
    $1 == "99%" { p99 = us($2) }
    /^Requests\/sec:/ { rps = $2 }
    / requests in / { requests = $1 }
    /Non-2xx or 3xx responses:/ { errors += $NF }
    /Socket errors:/ { errors += $4 + $6 + $8 + $10 }
    END {
      cpu = requests > 0 ? ticks * 1000000 / hz / requests : 0
      printf "%.0f %.0f %.0f %d %.1f\n", rps, p50, p99, errors + 0, cpu
    }'
}

RESULTS="$WORK/results"
: >"$RESULTS"
run_scenario() {
  local scenario="$1" proxy="$2" proxy_pid="$3" nginx="$4" nginx_pid="$5" c p n
  for c in $CONCURRENCY; do
    say "$scenario, $c connections: proxy, then nginx (${DURATION}s each)"
    p="$(load "$proxy" "$c" "$proxy_pid")"
    n="$(load "$nginx" "$c" "$nginx_pid")"
    echo "$scenario $c $p $n" >>"$RESULTS"
  done
}

run_scenario HIT "$PROXY_HIT" "$PID_HIT" "$NGINX_HIT" "$PID_NGINX"
run_scenario HIT-vs-static "$PROXY_HIT" "$PID_HIT" "$NGINX_STATIC" "$PID_NGINX"
run_scenario HIT-vs-hyper "$PROXY_HIT" "$PID_HIT" "$STATIC_HTTP" "$PID_STATIC_HTTP"
run_scenario HIT-vs-shared "$PROXY_HIT" "$PID_HIT" "$PROXY_SHARED" "$PID_SHARED"

say "the upstream runs out of quota (429 insufficient_quota)"
sleep 1.2 # nginx's FALLBACK answer (valid 1s) is now stale: it asks the upstream each time
set_mock '{"mode":"error","fixture":"openai-429-insufficient_quota"}'
expect_marking "$PROXY_ASKING" x-fallback-cache FALLBACK
expect_marking "$PROXY_FALLBACK" x-fallback-cache FALLBACK
expect_marking "$NGINX_FALLBACK" x-cache-status STALE
# Both ask the upstream on every request and serve the stored answer on its 429.
run_scenario FALLBACK "$PROXY_ASKING" "$PID_ASKING" "$NGINX_FALLBACK" "$PID_NGINX"
# The proxy's default: after the first insufficient_quota its quota breaker stops asking
# for a cooldown and serves the stored answer at once; nginx still asks every time.
run_scenario FALLBACK-breaker "$PROXY_FALLBACK" "$PID_FALLBACK" "$NGINX_FALLBACK" "$PID_NGINX"
set_mock '{"mode":"ok"}'

# --- report -----------------------------------------------------------------------------
{
  echo
  echo "fallback-cache-proxy (--store memory) vs nginx proxy_cache, loopback, ${DURATION}s per run,"
  [ "$PIN" = 1 ] && echo "PIN=1: wrk on CPU 0, the servers on CPUs 1-$((CPUS - 1)) (nginx worker processes: $NGINX_WORKERS)."
  echo "wrk -t$THREADS, 2 KiB POST body; $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo
  echo "| scenario | connections | proxy req/s | nginx req/s | req/s proxy/nginx | proxy p50 µs | nginx p50 µs | proxy p99 µs | nginx p99 µs | p99 proxy/nginx | CPU µs/request proxy | CPU µs/request nginx | errors proxy/nginx |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  awk '{
    printf "| %s | %s | %s | %s | %.2f | %s | %s | %s | %s | %.2f | %s | %s | %s/%s |\n",
      $1, $2, $3, $8, ($8 > 0 ? $3 / $8 : 0), $4, $9, $5, $10, ($10 > 0 ? $5 / $10 : 0), $7, $12, $6, $11
  }' "$RESULTS"
  echo
  echo "req/s ratio above 1 and p99 ratio below 1: the proxy is ahead."
  echo "HIT-vs-static: the \"nginx\" columns are nginx answering the same bytes with return 200 (no cache)."
  echo "HIT-vs-hyper: the \"nginx\" columns are static-http, the proxy's HTTP stack alone (hyper, Tokio,"
  echo "mimalloc, the same worker threads) answering the same bytes."
  echo "HIT-vs-shared: the \"nginx\" columns are the same proxy with --workers shared (every"
  echo "connection on one work-stealing runtime) instead of one worker thread per CPU."
  echo "FALLBACK: the proxy with --no-quota-breaker (asks the upstream each time, as nginx does);"
  echo "FALLBACK-breaker: the proxy's default, its quota breaker open (does not ask)."
  echo "CPU µs/request: user + system time of the server's processes (nginx: master and workers)"
  echo "during the run, over the requests wrk completed."
}
