#!/usr/bin/env bash
# Three `conneqt-guard proxy` sidecars sharing one redis-server and one upstream (the shared
# verdict tier, issue 11), under a hot-token load with wrk on loopback. Not run by CI.
#
#   bash benches/replicas_sidecar.sh            # about 40 s: 2 runs of DURATION (10 s) + set-up
#   DURATION=20s CACHE_TTL=5s LATENCY_MS=50 bash benches/replicas_sidecar.sh
#
# What it does, in one run:
#   1. one redis-server of its own (no persistence) on REDIS_PORT, one Conneqt simulator in a
#      process of its own (benches/shared_simulator.rs: `conneqt-guard --simulator` embeds one
#      simulator per sidecar, so three sidecars would not share it), verify latency LATENCY_MS,
#      and one backend (an nginx `return 200` location, as sidecar_load.sh uses);
#   2. three sidecars, `--base-url`/`--api-key` pointing at that simulator, `--redis-url` at
#      that Redis, one `--cluster-key`, `--cache-ttl CACHE_TTL` (refresh-ahead on, the default);
#   3. one hot token, three wrk processes at once (one per sidecar, CONNECTIONS/3 connections
#      each) for DURATION; then the simulator's verify calls for the token, against the target
#      1 + DURATION/CACHE_TTL (one first verification, then one per TTL);
#   4. the same load on three sidecars without `--redis-url` (each its own cache);
#   5. a fresh token cached by all three tier sidecars, revoked at the simulator, then
#      `POST /invalidate` on sidecar 0's admin listener; sidecars 1 and 2 are asked (curl, in
#      turn) until they answer 410, and the time is printed (coarse: each curl is a process).
# Installs wrk, nginx-light and redis-server from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-24}
THREADS=${THREADS:-1}
CACHE_TTL=${CACHE_TTL:-2s}
LATENCY_MS=${LATENCY_MS:-20}
REDIS_PORT=${REDIS_PORT:-16390}
BACKEND=127.0.0.1:18180
SIDECARS=(127.0.0.1:18190 127.0.0.1:18191 127.0.0.1:18192)
ADMINS=(127.0.0.1:19190 127.0.0.1:19191 127.0.0.1:19192)
CLUSTER_KEY="replicas sidecar bench cluster key"
HEADER=Conneqt-Instant-Access-Token

for tool in wrk nginx redis-server; do
  if ! command -v "$tool" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$tool" ]; then
    apt-get update && apt-get install -y wrk nginx-light redis-server
  fi
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --bin conneqt-guard >&2
cargo build --release -p conneqt-guard-benches --example shared_simulator >&2
GUARD=$TARGET/release/conneqt-guard
SIMULATOR=$TARGET/release/examples/shared_simulator

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
seconds() { # 10s, 1m, 500ms -> seconds (integer or decimal)
  case $1 in
    *ms) awk -v v="${1%ms}" 'BEGIN { print v / 1000 }' ;;
    *s) echo "${1%s}" ;;
    *m) echo $(( ${1%m} * 60 )) ;;
    *) echo "$1" ;;
  esac
}

# Redis, with no persistence, as the tests start it.
redis-server --save "" --appendonly no --bind 127.0.0.1 --port "$REDIS_PORT" \
  >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 200); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.05
done
REDIS_VERSION=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')

# The one simulator, spoken to over a pipe (see benches/shared_simulator.rs).
coproc SIM { LATENCY_MS=$LATENCY_MS "$SIMULATOR"; }
PIDS+=("$SIM_PID")
read -r _ BASE_URL <&"${SIM[0]}"
read -r _ API_KEY <&"${SIM[0]}"
read -r _ <&"${SIM[0]}"
sim() { # command... -> its one-line answer, first word dropped
  local reply
  echo "$*" >&"${SIM[1]}"
  read -r reply <&"${SIM[0]}"
  echo "${reply#* }"
}

mkdir -p "$WORK/backend"
cat >"$WORK/backend/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/backend/body; proxy_temp_path $WORK/backend/proxy;
  fastcgi_temp_path $WORK/backend/fastcgi; uwsgi_temp_path $WORK/backend/uwsgi; scgi_temp_path $WORK/backend/scgi;
  server { listen $BACKEND; location / { default_type text/plain; return 200 "hello\\n"; } }
}
CONF
"$NGINX" -p "$WORK/backend" -c "$WORK/backend/nginx.conf" -e "$WORK/backend/error.log" &
PIDS+=($!)
for _ in $(seq 1 200); do
  curl -s -o /dev/null "http://$BACKEND/" && break
  sleep 0.05
done

SIDECAR_PIDS=()
# Starts the three sidecars (with the tier unless $1 is "alone") and waits until they listen.
start_sidecars() {
  local tier=() i
  [ "$1" = alone ] || tier=(--redis-url "redis://127.0.0.1:$REDIS_PORT" --cluster-key "$CLUSTER_KEY")
  SIDECAR_PIDS=()
  for i in 0 1 2; do
    RUST_LOG=warn "$GUARD" proxy --backend "http://$BACKEND" \
      --listen "${SIDECARS[$i]}" --admin-listen "${ADMINS[$i]}" --workers 1 \
      --base-url "$BASE_URL" --api-key "$API_KEY" --cache-ttl "$CACHE_TTL" "${tier[@]}" \
      >"$WORK/sidecar-$1-$i.out" 2>"$WORK/sidecar-$1-$i.err" &
    PIDS+=($!)
    SIDECAR_PIDS+=($!)
  done
  for i in 0 1 2; do
    for _ in $(seq 1 200); do
      grep -q '^listening on' "$WORK/sidecar-$1-$i.out" 2>/dev/null && break
      sleep 0.05
    done
    grep -q '^listening on' "$WORK/sidecar-$1-$i.out" ||
      { echo "sidecar $i ($1) did not start:" >&2; cat "$WORK/sidecar-$1-$i.err" >&2; exit 1; }
  done
}
stop_sidecars() {
  local pid
  for pid in "${SIDECAR_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${SIDECAR_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
status_of() { # sidecar token
  curl -s -o /dev/null -w '%{http_code}' -H "$HEADER: $2" "http://$1/"
}

# A hot token over the three sidecars: one wrk per sidecar, at once. Prints one table row.
hot_load() { # name
  local token i total=0 non2xx=0 rps=0 calls before
  token=$(sim issue)
  for i in 0 1 2; do
    [ "$(status_of "${SIDECARS[$i]}" "$token")" = 200 ] || { echo "sidecar $i refused a valid token" >&2; exit 1; }
  done
  before=$(sim calls "$token")
  local wrks=()
  for i in 0 1 2; do
    wrk -t"$THREADS" -c$(( CONNECTIONS / 3 )) -d"$DURATION" --latency \
      -H "$HEADER: $token" "http://${SIDECARS[$i]}/" >"$WORK/wrk-$i.out" &
    wrks+=($!)
  done
  for i in "${wrks[@]}"; do wait "$i"; done
  for i in 0 1 2; do
    total=$(( total + $(awk '/requests in/ {print $1}' "$WORK/wrk-$i.out") ))
    non2xx=$(( non2xx + $(awk '/Non-2xx/ {print $5}' "$WORK/wrk-$i.out" | grep . || echo 0) ))
    rps=$(awk -v a="$rps" -v b="$(awk '/^Requests\/sec:/ {print $2}' "$WORK/wrk-$i.out")" 'BEGIN { printf "%.0f", a + b }')
  done
  calls=$(sim calls "$token")
  local windows target
  windows=$(awk -v d="$(seconds "$DURATION")" -v t="$(seconds "$CACHE_TTL")" 'BEGIN { printf "%.1f", d / t }')
  target=$(awk -v w="$windows" 'BEGIN { printf "%d", 1 + w }')
  echo "| $1 | $total | $rps | $non2xx | $calls (of which $before before the load) | $(awk -v c="$calls" -v w="$windows" 'BEGIN { printf "%.2f", c / w }') | <= $target |"
}

ROWS=()
start_sidecars tier
ROWS+=("$(hot_load 'three sidecars, one Redis')")

# Invalidation through one sidecar's admin listener, enforced by the others.
TOKEN=$(sim issue)
for i in 0 1 2; do [ "$(status_of "${SIDECARS[$i]}" "$TOKEN")" = 200 ] || exit 1; done
sim revoke "$TOKEN" >/dev/null
CACHED=$(for i in 0 1 2; do status_of "${SIDECARS[$i]}" "$TOKEN"; echo -n ' '; done)
START=$(now_ms)
INVALIDATE=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "$HEADER: $TOKEN" "http://${ADMINS[0]}/invalidate")
ENFORCED=()
for i in 1 2; do
  until [ "$(status_of "${SIDECARS[$i]}" "$TOKEN")" = 410 ]; do
    [ $(( $(now_ms) - START )) -lt 5000 ] || { echo "sidecar $i still let the token through after 5 s" >&2; exit 1; }
  done
  ENFORCED+=("sidecar $i: 410 after $(( $(now_ms) - START )) ms")
done
AFTER=$(status_of "${SIDECARS[0]}" "$TOKEN")
INVALIDATION_CALLS=$(sim calls "$TOKEN")
stop_sidecars

start_sidecars alone
ROWS+=("$(hot_load 'three sidecars, no tier (separate caches)')")
stop_sidecars

echo
echo "3 x conneqt-guard proxy --workers 1, redis-server $REDIS_VERSION, simulator latency ${LATENCY_MS} ms, --cache-ttl $CACHE_TTL (refresh-ahead on)"
echo "3 x wrk -t$THREADS -c$(( CONNECTIONS / 3 )) -d$DURATION, one hot token, loopback, $(nproc) cores, $(date -u +%F)"
echo
echo "| sidecars | requests | requests/s | non-2xx | upstream calls for the token | per TTL window | target |"
echo "|---|---|---|---|---|---|---|"
for row in "${ROWS[@]}"; do echo "$row"; done
echo
echo "POST /invalidate on sidecar 0's admin listener (answered $INVALIDATE), the token revoked at the"
echo "simulator and cached by all three (they answered: $CACHED):"
for line in "${ENFORCED[@]}"; do echo "  $line (from before the POST; curl per request)"; done
echo "  sidecar 0 afterwards: $AFTER; upstream calls for the token: $INVALIDATION_CALLS (the first verification, one after the invalidation)"
