#!/usr/bin/env bash
# The proxy in one minute: starts the mock upstream and fallback-cache-proxy, asks a
# question with curl, switches the upstream to `insufficient_quota`, asks again and gets the
# last good answer (`x-fallback-cache: FALLBACK`), then stops everything it started.
#
#   scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
say() { printf '\n%s==> %s%s\n' "$BOLD" "$*" "$PLAIN"; }

say "building mock-upstream and fallback-cache-proxy"
cargo build --quiet -p mock-upstream -p fallback-cache-proxy
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Waits until FILE has a line with "listening on http://ADDR" and prints http://ADDR.
listening_on() {
  local file="$1"
  for _ in $(seq 100); do
    if grep -q 'listening on http://' "$file" 2>/dev/null; then
      grep -o 'listening on http://[0-9.:]*' "$file" | head -1 | sed 's/listening on //'
      return
    fi
    sleep 0.1
  done
  echo "did not start; its output:" >&2
  cat "$file" >&2
  exit 1
}

say "starting the mock upstream (an OpenAI-compatible fake)"
"$BIN/mock-upstream" --listen 127.0.0.1:0 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
MOCK="$(listening_on "$WORK/mock.log")"
echo "mock upstream: $MOCK"

say "starting fallback-cache-proxy in front of it"
"$BIN/fallback-cache-proxy" --listen 127.0.0.1:0 --upstream "$MOCK" \
  --store "disk:$WORK/fallback-cache.redb" 2>"$WORK/proxy.log" &
PIDS+=($!)
PROXY="$(listening_on "$WORK/proxy.log")"
cat "$WORK/proxy.log"

ask() {
  curl -sS -D "$WORK/headers" "$PROXY/v1/chat/completions" \
    -H 'authorization: Bearer sk-demo' \
    -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"What is the capital of France?"}]}' \
    -o "$WORK/body"
  grep -i -E '^(HTTP/|x-fallback-cache|age:)' "$WORK/headers"
  python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); print("id:", b.get("id")); print("answer:", b["choices"][0]["message"]["content"]) if "choices" in b else print("error:", b["error"]["code"])' "$WORK/body"
}

say "asking through the proxy: the upstream answers (MISS), and the answer is kept"
ask

say "the upstream runs out of quota"
curl -sS -X POST "$MOCK/_mock/mode" -d '{"mode":"error","fixture":"openai-429-insufficient_quota"}'
echo

say "asking again: the upstream says insufficient_quota, the proxy serves the last good answer"
ask

say "metrics"
curl -sS "$PROXY/metrics" | grep -E '^fallback_cache_(requests_total|fallbacks_total\{reason="insufficient_quota"\}|store_entries)'

say "done; stopping the proxy and the mock"
