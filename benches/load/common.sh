# What the load scripts share (sourced by run.sh and instructions.sh, after `set -euo
# pipefail` and with SCRIPT set to the script's name): messages, the tools installed when
# missing, the release build of the servers, the working directory with the processes
# started in it, stopped whatever happens, the address a server announces, and the chat
# request sent with curl or by wrk's script.

say() { printf '\n==> %s\n' "$*" >&2; }
die() {
  printf '%s: %s\n' "$SCRIPT" "$*" >&2
  exit 1
}

# install_missing PACKAGE...: installs the packages with apt-get (as root); none: nothing.
install_missing() {
  [ "$#" -gt 0 ] || return 0
  [ "$(id -u)" -eq 0 ] || die "needs $*: run as root, or: sudo apt-get install -y $*"
  say "installing $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# build_servers: builds mock-upstream, fallback-cache-proxy and static-http (release) and
# sets BIN to the folder that holds them.
build_servers() {
  local target_dir bin
  say "building mock-upstream, fallback-cache-proxy and static-http (release)"
  cargo build --release --quiet -p mock-upstream -p fallback-cache-proxy
  cargo build --release --quiet -p fallback-cache-tests --bin static-http
  target_dir="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')}"
  BIN="$target_dir/release"
  for bin in fallback-cache-proxy mock-upstream static-http; do
    [ -x "$BIN/$bin" ] || die "no $BIN/$bin after the build"
  done
}

# WORK: a folder of the run's files; PIDS: the processes started, each added as it starts.
# Both go at exit, on an error or an interrupt as well.
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# listening_on FILE [SECONDS]: prints the http://ADDR a process announced in FILE ("...
# listening on http://ADDR ..."), waiting for it at most SECONDS (10).
listening_on() {
  local file="$1" tries=$((${2:-10} * 20)) lines
  for _ in $(seq "$tries"); do
    # Whole lines only: a line being written (slowly, under valgrind) could end inside
    # the address.
    lines="$(wc -l <"$file" 2>/dev/null || echo 0)"
    if head -n "$lines" "$file" 2>/dev/null | grep -q 'listening on http://'; then
      head -n "$lines" "$file" | grep -o 'listening on http://[0-9.:]*' | head -1 |
        sed 's/listening on //'
      return
    fi
    sleep 0.05
  done
  cat "$file" >&2
  die "a server did not start (its output is above)"
}

# write_post_lua BODY_FILE: writes $WORK/post.lua, wrk's script that POSTs BODY_FILE as a
# chat completion request with a bearer token; with HEADERS=sdk, with the other headers the
# official OpenAI Python SDK sends too (seventeen in all, a dozen of them x-stainless-*).
write_post_lua() {
  cat >"$WORK/post.lua" <<EOF
local file = io.open("$1", "rb")
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-load-test"
EOF
  if [ "${HEADERS:-plain}" = sdk ]; then
    cat >>"$WORK/post.lua" <<'EOF'
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["Connection"] = "keep-alive"
wrk.headers["Accept"] = "application/json"
wrk.headers["User-Agent"] = "OpenAI/Python 1.54.4"
wrk.headers["X-Stainless-Lang"] = "python"
wrk.headers["X-Stainless-Package-Version"] = "1.54.4"
wrk.headers["X-Stainless-OS"] = "Linux"
wrk.headers["X-Stainless-Arch"] = "x64"
wrk.headers["X-Stainless-Runtime"] = "CPython"
wrk.headers["X-Stainless-Runtime-Version"] = "3.11.7"
wrk.headers["X-Stainless-Async"] = "false"
wrk.headers["X-Stainless-Retry-Count"] = "0"
wrk.headers["X-Stainless-Read-Timeout"] = "600"
EOF
  fi
}

# post_chat OUT BASE: POSTs the chat request in $BODY_FILE to BASE's /v1/chat/completions
# with a bearer token, writing the answer's body to OUT.
post_chat() {
  curl -sSf -o "$1" -X POST "$2/v1/chat/completions" -H 'content-type: application/json' \
    -H 'authorization: Bearer sk-load-test' --data-binary "@$BODY_FILE"
}
