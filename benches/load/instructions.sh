#!/usr/bin/env bash
# Instructions per request on loopback: fallback-cache-proxy serving a HIT (--store memory,
# --mode cache-first) against static-http (the proxy's HTTP stack alone: hyper on the same
# worker thread, answering the same bytes), each run under valgrind's callgrind with one
# worker. The counters are zeroed once the answer is stored and read when wrk stops, so the
# figure is the server's user-space work for the requests wrk completed and nothing else:
# unlike requests/s on a shared loopback, it does not move with the machine's load.
#
#   benches/load/instructions.sh
#
# Settings (environment): DURATION seconds of load per server (10), CONNECTIONS of wrk (4),
# TOP functions of the proxy listed with their inclusive instructions per request (25, 0
# for none), DUMP a file to keep the proxy's callgrind profile in (for `callgrind_annotate
# --tree=calling`: every function's callees), HEADERS=sdk to send the headers of the OpenAI
# Python SDK beside the request's own (plain: content-type and authorization alone). Needs valgrind and wrk (installed with
# apt-get when missing, as root); builds the release binaries; stops every process it
# started, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"

DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-4}"
TOP="${TOP:-25}"
BODY_FILE="$ROOT/benches/load/request.json"

SCRIPT=instructions.sh
# shellcheck source=benches/load/common.sh
. "$ROOT/benches/load/common.sh"

missing=()
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
install_missing ${missing[@]+"${missing[@]}"}
build_servers

write_post_lua "$BODY_FILE"

# measure NAME URL PID: zeroes the counters of the callgrind run PID, loads URL, dumps them;
# prints "requests instructions dump-file".
measure() {
  local name="$1" url="$2" pid="$3" requests
  callgrind_control --zero "$pid" >/dev/null 2>&1
  requests="$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/post.lua" \
    "$url/v1/chat/completions" | awk '/requests in/ { print $1 }')"
  [ -n "$requests" ] && [ "$requests" -gt 0 ] || die "$name: wrk completed no request"
  callgrind_control --dump "$pid" >/dev/null 2>&1
  local dump
  for _ in $(seq 100); do
    dump="$(ls "$WORK/$name".cg.* 2>/dev/null | tail -1 || true)"
    [ -n "$dump" ] && grep -q '^totals:' "$dump" 2>/dev/null && break
    sleep 0.2
  done
  [ -n "$dump" ] || die "$name: no callgrind dump"
  echo "$requests $(awk '/^totals:/ { print $2 }' "$dump") $dump"
}

say "starting the mock upstream, the proxy and static-http (under callgrind) on 127.0.0.1"
"$BIN/mock-upstream" --listen 127.0.0.1:0 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
MOCK="$(listening_on "$WORK/mock.log")"

valgrind --tool=callgrind --callgrind-out-file="$WORK/proxy.cg.%p" \
  "$BIN/fallback-cache-proxy" --listen 127.0.0.1:0 --upstream "$MOCK" --store memory \
  --mode cache-first --fresh-for 1h --workers 1 2>"$WORK/proxy.log" &
PID_PROXY=$!
PIDS+=($PID_PROXY)
PROXY="$(listening_on "$WORK/proxy.log" 60)"
post_chat "$WORK/answer.json" "$PROXY"
post_chat /dev/null "$PROXY" # a HIT, so that every measured request is one

valgrind --tool=callgrind --callgrind-out-file="$WORK/static.cg.%p" \
  "$BIN/static-http" "$WORK/answer.json" 127.0.0.1:0 >"$WORK/static.log" 2>&1 &
PID_STATIC=$!
PIDS+=($PID_STATIC)
STATIC="$(listening_on "$WORK/static.log" 60)"
post_chat /dev/null "$STATIC"

say "proxy HIT: wrk -t1 -c$CONNECTIONS for ${DURATION}s under callgrind"
result="$(measure proxy "$PROXY" "$PID_PROXY")"
read -r proxy_requests proxy_instructions proxy_dump <<<"$result"
say "static-http: wrk -t1 -c$CONNECTIONS for ${DURATION}s under callgrind"
result="$(measure static "$STATIC" "$PID_STATIC")"
read -r static_requests static_instructions _ <<<"$result"

if [ -n "${DUMP:-}" ]; then cp "$proxy_dump" "$DUMP"; fi

per_proxy=$((proxy_instructions / proxy_requests))
per_static=$((static_instructions / static_requests))
echo
echo "Instructions per request (callgrind, one worker thread, wrk -t1 -c$CONNECTIONS, ${DURATION}s each)"
echo
echo "| server | requests | instructions per request | × static-http |"
echo "| --- | ---: | ---: | ---: |"
awk -v r="$proxy_requests" -v p="$per_proxy" -v s="$per_static" \
  'BEGIN { printf "| fallback-cache-proxy, HIT | %d | %d | %.2f |\n", r, p, p / s }'
awk -v r="$static_requests" -v s="$per_static" \
  'BEGIN { printf "| static-http | %d | %d | 1.00 |\n", r, s }'
if [ "$TOP" -gt 0 ]; then
  echo
  echo "The proxy's functions with their callees, per request (inclusive; the largest $TOP):"
  echo
  callgrind_annotate --inclusive=yes "$proxy_dump" 2>/dev/null |
    awk -v n="$proxy_requests" -v top="$TOP" '
      /^ *[0-9,]+ +\(/ {
        count = $1; gsub(",", "", count)
        name = $0; sub(/^[^)]*\) +/, "", name); sub(/ \[.*$/, "", name); sub(/^\?\?\?:/, "", name); sub(/^\.\/.*:/, "", name)
        if (name ~ /PROGRAM TOTALS|^std::|^core::ops|^tokio::runtime::|^clone|start_thread|thread_start|call_once|LocalKey|0x0000/) next
        # Read to the end (no early exit: callgrind_annotate would get a SIGPIPE).
        if (shown++ < top) printf "%8d  %s\n", count / n, substr(name, 1, 140)
      }'
fi
