#!/usr/bin/env bash
# Load figures for the `conneqt-guard` sidecar, with wrk on loopback. Not run by CI.
#
#   bash benches/sidecar_load.sh            # about 1 minute: 5 runs of DURATION (10 s) + set-up
#   DURATION=5s CONNECTIONS=64 bash benches/sidecar_load.sh
#
# Measures, in one run and against the same backend (an nginx `return 200` location, the
# cheapest backend there is, so the figures show the proxies' own cost):
#   1. the backend direct
#   2. nginx proxy_pass to the backend (kept-alive upstream connections; an nginx instance of
#      its own, separate from the backend's)
#   3. conneqt-guard proxy, cache hits (one valid token, verified once before the run)
#   4. nginx auth_request to conneqt-guard forward-auth, then proxy_pass (the shipped
#      sidecar/examples/forward-auth/nginx.conf)
#   5. for reference, nginx proxy_pass run inside the backend's own nginx (see below why that
#      is not the comparison)
# and prints requests/s, p99 latency and the ratio to the direct backend. Both guards run with
# --simulator (the embedded Conneqt simulator), so nothing leaves the machine. Installs wrk and
# nginx-light from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
BACKEND=127.0.0.1:18080
NGINX_PROXY=127.0.0.1:18081
NGINX_AUTH=127.0.0.1:18082
NGINX_SHARED=127.0.0.1:18083
GUARD_PROXY=127.0.0.1:18090
GUARD_AUTH=127.0.0.1:18091

for tool in wrk nginx; do
  if ! command -v "$tool" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$tool" ]; then
    apt-get update && apt-get install -y wrk nginx-light
  fi
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --bin conneqt-guard >&2
GUARD=target/release/conneqt-guard

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Starts a guard (not in a subshell, so cleanup knows its pid) and waits until it listens.
start_guard() { # mode listen admin extra...
  local mode=$1 listen=$2 admin=$3; shift 3
  RUST_LOG=warn "$GUARD" "$mode" --simulator --listen "$listen" --admin-listen "$admin" "$@" \
    >"$WORK/$mode.out" 2>"$WORK/$mode.err" &
  PIDS+=($!)
  for _ in $(seq 1 200); do
    grep -q '^listening on' "$WORK/$mode.out" 2>/dev/null && break
    sleep 0.05
  done
}
token_of() { grep '^simulator valid token: ' "$WORK/$1.out" | cut -d' ' -f4; }
start_guard proxy "$GUARD_PROXY" 127.0.0.1:19090 --backend "http://$BACKEND"
start_guard forward-auth "$GUARD_AUTH" 127.0.0.1:19091
PROXY_TOKEN=$(token_of proxy)
AUTH_TOKEN=$(token_of forward-auth)

sed -e "s/127.0.0.1:8000/$NGINX_AUTH/" -e "s/127.0.0.1:8081/$GUARD_AUTH/" \
    -e "s/127.0.0.1:3000/$BACKEND/" sidecar/examples/forward-auth/nginx.conf >"$WORK/auth.conf"
# Two nginx instances: the backend in processes of its own, as a real service is, and the
# proxying nginx (proxy_pass, auth_request) in another. In one instance, nginx's proxy and the
# backend would share worker processes and event loops: each request would go proxy -> backend
# -> proxy inside one process, a shortcut no separate proxy (conneqt-guard included) has.
nginx_conf() { # name body
  mkdir -p "$WORK/$1"
  cat >"$WORK/$1/nginx.conf" <<CONF
daemon off;
worker_processes auto;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1/body; proxy_temp_path $WORK/$1/proxy;
  fastcgi_temp_path $WORK/$1/fastcgi; uwsgi_temp_path $WORK/$1/uwsgi; scgi_temp_path $WORK/$1/scgi;
  $2
}
CONF
  "$NGINX" -p "$WORK/$1" -c "$WORK/$1/nginx.conf" -e "$WORK/$1/error.log" &
  PIDS+=($!)
}
nginx_conf backend "
  server { listen $BACKEND; location / { default_type text/plain; return 200 \"hello\\n\"; } }
  upstream same_process_backend { server $BACKEND; keepalive 64; }
  server {
    listen $NGINX_SHARED;
    location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://same_process_backend; }
  }"
nginx_conf front "
  upstream bench_backend { server $BACKEND; keepalive 64; }
  server {
    listen $NGINX_PROXY;
    location / { proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://bench_backend; }
  }
  include $WORK/auth.conf;"
for _ in $(seq 1 200); do
  curl -s -o /dev/null "http://$NGINX_AUTH/" && break
  sleep 0.05
done

# Each path must work before it is measured (this also puts the tokens in the guards' caches).
check() { # url token
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Conneqt-Instant-Access-Token: $2" "$1")
  [ "$code" = 200 ] || { echo "$1 answered $code" >&2; exit 1; }
}
check "http://$BACKEND/" none
check "http://$NGINX_PROXY/" none
check "http://$NGINX_SHARED/" none
check "http://$GUARD_PROXY/" "$PROXY_TOKEN"
check "http://$NGINX_AUTH/" "$AUTH_TOKEN"

measure() { # name url token
  local out rps p99
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency \
        -H "Conneqt-Instant-Access-Token: $3" "$2")
  if grep -q 'Non-2xx' <<<"$out"; then echo "$1: non-2xx answers:" >&2; echo "$out" >&2; exit 1; fi
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "$1|$rps|$p99"
}
ROWS=()
ROWS+=("$(measure 'backend direct' "http://$BACKEND/" none)")
ROWS+=("$(measure 'nginx proxy_pass' "http://$NGINX_PROXY/" none)")
ROWS+=("$(measure 'conneqt-guard proxy (cache hits)' "http://$GUARD_PROXY/" "$PROXY_TOKEN")")
ROWS+=("$(measure 'nginx auth_request + conneqt-guard forward-auth' "http://$NGINX_AUTH/" "$AUTH_TOKEN")")
ROWS+=("$(measure 'for reference: nginx proxy_pass inside the backend'"'"'s own nginx' "http://$NGINX_SHARED/" none)")

direct=$(cut -d'|' -f2 <<<"${ROWS[0]}")
echo
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, loopback, $(nproc) cores, $(date -u +%F)"
echo
echo "| path | requests/s | p99 | requests/s vs direct |"
echo "|---|---|---|---|"
for row in "${ROWS[@]}"; do
  IFS='|' read -r name rps p99 <<<"$row"
  ratio=$(awk -v a="$rps" -v b="$direct" 'BEGIN { printf "%.2f", a / b }')
  echo "| $name | $rps | $p99 | $ratio |"
done
