#!/usr/bin/env bash
# Benchmark: requests/s and p50/p99 latency of native generateContent and SSE
# streamGenerateContent calls, at concurrency 1 and 64, measured
#   - directly against the fake Gemini upstream,
#   - through gemgate,
#   - through nginx proxy_pass (when nginx is installed), the bar gemgate aims for,
#   - through gemgate with no plugins ("bare"), for the cost of the shipped policy plugins,
#   - through a fleet of one ("fleet"): gemgate sharing its state through a local redis-server,
#   - through gemgate with metrics off ("nometrics"), for the cost of counting them,
# and, at the end, the same question as an OpenAI chat, an Anthropic message and an OpenAI
# response through gemgate (translation's cost, against the native path), and that response
# kept (the Responses API's default); last, the
# side-by-side table: the fake, gemgate and nginx at 1, 32, 256 and 1,024 connections
# ($MATRIX_CONNS), with peak RSS and CPU per request, $MATRIX_RUNS rounds (default 5) in turn,
# and the translated protocols at the same connections; then the cost of a request against
# the pool's size ($POOL_SIZES keys: 10, 1,000 and 100,000); then a fresh gemgate's memory
# idle, under load and 10 seconds after it ($AFTER_LOAD_SECONDS of load); then $HELD_STREAMS
# open streams (SSE answers the fake holds) through gemgate and nginx, for memory per open
# stream. All on loopback, in one run. Bounded:
# each measurement lasts $DURATION seconds (default 5); at concurrency 64 (and 32 for the
# translated protocols) each target is measured $RUNS times (default 3), in turn, and keeps its
# median. The whole run takes about (44 + 35 × $MATRIX_RUNS + 3 × $POOL_RUNS) × $DURATION
# seconds plus a minute of policy-layer runs, half a minute of memory after load, and the
# build (MATRIX_RUNS=1 MATRIX_CONNS="32 256" for a quick look).
#
#   scripts/bench.sh            # DURATION=10 scripts/bench.sh for steadier figures
#   BIN_DIR=/some/dir scripts/bench.sh   # measure binaries built elsewhere (no build)
#   BASELINE_DIR=/older/build scripts/bench.sh   # also an older gemgate, in turn with this one
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
FAKE_PORT=${FAKE_PORT:-19100}
GATE_PORT=${GATE_PORT:-18100}
BARE_PORT=${BARE_PORT:-18101}
BASELINE_PORT=${BASELINE_PORT:-18102}
FLEET_PORT=${FLEET_PORT:-18103}
NOMETRICS_PORT=${NOMETRICS_PORT:-18104}
REDIS_PORT=${REDIS_PORT:-16400}
BASELINE_DIR=${BASELINE_DIR:-}
NGINX_PORT=${NGINX_PORT:-18200}
TOKEN=bench-token

scripts/bootstrap.sh
if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk >/dev/null
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "bench: installing redis-server" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
if ! command -v nginx >/dev/null 2>&1 && [ -z "${NO_NGINX:-}" ]; then
  echo "bench: installing nginx (the reference the side-by-side table compares with)" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx-light >/dev/null ||
    echo "bench: nginx could not be installed; its rows are left out" >&2
fi
# 1,024 connections need more descriptors than a shell's usual 1,024: the bench raises its own
# limit (and its children's) to the hard limit; gemgate's defaults are left as they are.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
BIN_DIR=${BIN_DIR:-}
if [ -z "$BIN_DIR" ]; then
  cargo build --release --locked --workspace --bins -q
  BIN_DIR=$(cargo metadata --format-version 1 --no-deps | sed 's/.*"target_directory":"\([^"]*\)".*/\1/')/release
fi
BIN_DIR=$(cd "$BIN_DIR" && pwd)

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
. scripts/ports.sh


"$BIN_DIR/gemgate-fake-upstream" --listen "127.0.0.1:$FAKE_PORT" --threads 2 >"$work/fake.log" 2>&1 &
pids+=($!)
echo $! >"$work/fake.pid"
start_gemgate "$work/gemgate" "$BIN_DIR" "$GATE_PORT" "$FAKE_PORT" "$TOKEN"
pids+=($!)
echo $! >"$work/gemgate.pid"
# The same gateway with an empty plugins folder: the built-in behaviour, no Lua at all.
mkdir -p "$work/no-plugins"
start_gemgate "$work/bare" "$BIN_DIR" "$BARE_PORT" "$FAKE_PORT" "$TOKEN" \
  GEMGATE_PLUGINS_DIR="$work/no-plugins"
pids+=($!)
# The same gateway counting no metrics.
start_gemgate "$work/nometrics" "$BIN_DIR" "$NOMETRICS_PORT" "$FAKE_PORT" "$TOKEN" \
  GEMGATE_METRICS_ENABLED=false
pids+=($!)
# A fleet of one: the same gateway, its state shared through a local Redis (persistence off).
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  >"$work/redis.log" 2>&1 &
pids+=($!)
wait_port "$REDIS_PORT" redis-server "$work/redis.log"
start_gemgate "$work/fleet" "$BIN_DIR" "$FLEET_PORT" "$FAKE_PORT" "$TOKEN" \
  GEMGATE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" GEMGATE_CLUSTER_SECRET=bench-fleet-secret-0123 \
  GEMGATE_INSTANCE=bench-fleet
pids+=($!)
# An older build of gemgate (BASELINE_DIR), measured in turn with this one: the same defaults.
if [ -n "$BASELINE_DIR" ]; then
  start_gemgate "$work/baseline" "$BASELINE_DIR" "$BASELINE_PORT" "$FAKE_PORT" "$TOKEN"
  pids+=($!)
fi

have_nginx=0
if command -v nginx >/dev/null 2>&1; then
  have_nginx=1
  cat >"$work/nginx.conf" <<NGINX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx-body;
  proxy_temp_path $work/nginx-proxy;
  upstream fake { server 127.0.0.1:$FAKE_PORT; keepalive 128; }
  server {
    # An accept queue as deep as gemgate's and the fake's: nginx's default (511) overflows
    # at 1,024 connections, and every connect the kernel drops waits a second.
    listen 127.0.0.1:$NGINX_PORT backlog=4096;
    location / {
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
NGINX
  nginx -c "$work/nginx.conf" -p "$work" -g 'daemon on;' 2>/dev/null || have_nginx=0
fi

wait_port "$FAKE_PORT" "the fake upstream"
wait_port "$GATE_PORT" gemgate
wait_port "$BARE_PORT" "gemgate without plugins"
wait_port "$FLEET_PORT" "gemgate in a fleet of one" "$work/fleet.log"
wait_port "$NOMETRICS_PORT" "gemgate without metrics" "$work/nometrics.log"
[ -n "$BASELINE_DIR" ] && wait_port "$BASELINE_PORT" "the baseline gemgate"
[ "$have_nginx" = 1 ] && wait_port "$NGINX_PORT" nginx

body='{"contents":[{"role":"user","parts":[{"text":"Say hello to the benchmark"}]}]}'
for mode in generate sse; do
  for who in direct gemgate; do
    key=bench-1; [ "$who" = gemgate ] && key=$TOKEN
    path=/v1beta/models/gemini-2.5-flash:generateContent
    [ "$mode" = sse ] && path="/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    cat >"$work/$mode-$who.lua" <<LUA
wrk.method = "POST"
wrk.path = "$path"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-goog-api-key"] = "$key"
LUA
  done
done

# Prints "req/s p50_ms p99_ms" for one wrk run.
measure() { # port script connections
  local threads=1; [ "$3" -gt 1 ] && threads=2
  wrk -t"$threads" -c"$3" -d"${DURATION}s" --latency -s "$2" "http://127.0.0.1:$1" 2>&1 | awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 }
    /Non-2xx/ { bad = $NF }
    END { if (bad) printf "ERROR: %s non-2xx answers\n", bad; printf "%.0f %.3f %.3f\n", rps, p50, p99 }'
}

# The median of a list of "req/s p50 p99" lines, by req/s.
median_run() { sort -n | awk '{ v[NR] = $0 } END { print v[int((NR + 1) / 2)] }'; }

# A shared 2-core machine's speed drifts by 10-20% over a minute, so at concurrency 64 (where
# the figures are compared as ratios) every target runs $RUNS times, in turn: the table shows
# each target's median run, and a ratio is the median of the ratios of runs made side by side.
RUNS=${RUNS:-3}
declare -A R EACH
printf '\n%-9s %-8s %4s %10s %9s %9s   %s\n' target call conc 'req/s' 'p50 ms' 'p99 ms' 'req/s of each run'
for mode in generate sse; do
  for conc in 1 64; do
    targets="direct gemgate bare fleet nometrics"; [ "$have_nginx" = 1 ] && targets="$targets nginx"
    [ -n "$BASELINE_DIR" ] && targets="$targets baseline"
    runs=1; [ "$conc" -gt 1 ] && runs=$RUNS
    declare -A ALL=()
    for _ in $(seq "$runs"); do
      for who in $targets; do
        case $who in
          direct) port=$FAKE_PORT; script="$work/$mode-direct.lua" ;;
          gemgate) port=$GATE_PORT; script="$work/$mode-gemgate.lua" ;;
          bare) port=$BARE_PORT; script="$work/$mode-gemgate.lua" ;;
          fleet) port=$FLEET_PORT; script="$work/$mode-gemgate.lua" ;;
          nometrics) port=$NOMETRICS_PORT; script="$work/$mode-gemgate.lua" ;;
          baseline) port=$BASELINE_PORT; script="$work/$mode-gemgate.lua" ;;
          nginx) port=$NGINX_PORT; script="$work/$mode-direct.lua" ;;
        esac
        out=$(measure "$port" "$script" "$conc")
        case $out in ERROR*)
          echo "$who $mode c=$conc: $out" >&2
          grep -h -v -e 'status=200' -e 'starting' -e 'plugins loaded' "$work/gemgate.log" "$work/bare.log" 2>/dev/null | tail -5 >&2
          exit 1 ;;
        esac
        ALL[$who]+="$out"$'\n'
      done
    done
    for who in $targets; do
      EACH[$who-$mode-$conc]=${ALL[$who]}
      R[$who-$mode-$conc]=$(printf '%s' "${ALL[$who]}" | median_run)
      read -r rps p50 p99 <<<"${R[$who-$mode-$conc]}"
      each=""; [ "$runs" -gt 1 ] && each=$(printf '%s' "${ALL[$who]}" | awk '{ printf "%s ", $1 }')
      printf '%-9s %-8s %4s %10s %9s %9s   %s\n' "$who" "$mode" "$conc" "$rps" "$p50" "$p99" "$each"
    done
  done
done

# The median, over the rounds, of $1's req/s over $2's in the same round, in percent.
ratio() { # who base mode
  paste -d' ' <(printf '%s' "${EACH[$1-$3-64]}" | awk '{ print $1 }') \
    <(printf '%s' "${EACH[$2-$3-64]}" | awk '{ print $1 }') |
    awk '{ print 100 * $1 / $2 }' | sort -n | awk '{ v[NR] = $1 } END { printf "%.0f", v[int((NR + 1) / 2)] }'
}

echo
echo "gemgate compared with calling the fake upstream directly:"
for mode in generate sse; do
  read -r _ d50 d99 <<<"${R[direct-$mode-1]}"
  read -r _ g50 g99 <<<"${R[gemgate-$mode-1]}"
  awk -v m="$mode" -v d50="$d50" -v d99="$d99" -v g50="$g50" -v g99="$g99" -v r="$(ratio gemgate direct "$mode")" 'BEGIN {
    printf "  %-8s added latency at c=1: p50 %+.3f ms, p99 %+.3f ms; throughput at c=64: %s%% of direct\n",
      m, g50 - d50, g99 - d99, r }'
  if [ "$have_nginx" = 1 ]; then
    read -r n50 n99 <<<"$(echo "${R[nginx-$mode-1]}" | awk '{print $2, $3}')"
    awk -v m="$mode" -v n50="$n50" -v n99="$n99" -v d50="$d50" -v d99="$d99" -v r="$(ratio nginx direct "$mode")" 'BEGIN {
      printf "  %-8s nginx proxy_pass:       p50 %+.3f ms, p99 %+.3f ms; throughput at c=64: %s%% of direct\n",
        m, n50 - d50, n99 - d99, r }'
  fi
  if [ -n "$BASELINE_DIR" ]; then
    read -r b50 b99 <<<"$(echo "${R[baseline-$mode-1]}" | awk '{print $2, $3}')"
    awk -v m="$mode" -v b50="$b50" -v b99="$b99" -v d50="$d50" -v d99="$d99" -v r="$(ratio baseline direct "$mode")" -v q="$(ratio gemgate baseline "$mode")" 'BEGIN {
      printf "  %-8s the baseline build:     p50 %+.3f ms, p99 %+.3f ms; throughput at c=64: %s%% of direct (this build: %s%% of the baseline)\n",
        m, b50 - d50, b99 - d99, r, q }'
  fi
done

echo
echo "a fleet of one (gemgate sharing its state through a local Redis), compared with one instance alone:"
for mode in generate sse; do
  read -r _ f50 f99 <<<"${R[fleet-$mode-1]}"
  read -r _ g50 g99 <<<"${R[gemgate-$mode-1]}"
  awk -v m="$mode" -v f50="$f50" -v f99="$f99" -v g50="$g50" -v g99="$g99" -v r="$(ratio fleet gemgate "$mode")" 'BEGIN {
    printf "  %-8s added latency at c=1: p50 %+.3f ms, p99 %+.3f ms; throughput at c=64: %s%% of one instance\n",
      m, f50 - g50, f99 - g99, r }'
done

echo
echo "metrics (gemgate counting them, compared with the same gateway with metrics.enabled = false):"
for mode in generate sse; do
  read -r _ m50 m99 <<<"${R[gemgate-$mode-1]}"
  read -r _ n50 n99 <<<"${R[nometrics-$mode-1]}"
  awk -v m="$mode" -v m50="$m50" -v m99="$m99" -v n50="$n50" -v n99="$n99" -v r="$(ratio gemgate nometrics "$mode")" 'BEGIN {
    printf "  %-8s added latency at c=1: p50 %+.3f ms, p99 %+.3f ms; throughput at c=64: %s%% of metrics off\n",
      m, m50 - n50, m99 - n99, r }'
done

echo
# The policy layer's cost is a few microseconds, below the noise of one run on a shared
# machine: alternate short runs of both gateways and compare the medians.
ROUNDS=${ROUNDS:-5}
echo "the policy layer (gemgate with the shipped plugins, compared with no plugins; median p50 of $ROUNDS alternating 3 s runs at c=1):"
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for mode in generate sse; do
  g=(); b=()
  for _ in $(seq "$ROUNDS"); do
    g+=("$(DURATION=3 measure "$GATE_PORT" "$work/$mode-gemgate.lua" 1 | awk '{ print $2 }')")
    b+=("$(DURATION=3 measure "$BARE_PORT" "$work/$mode-gemgate.lua" 1 | awk '{ print $2 }')")
  done
  gm=$(printf '%s\n' "${g[@]}" | median)
  bm=$(printf '%s\n' "${b[@]}" | median)
  awk -v m="$mode" -v b50="$bm" -v g50="$gm" -v r="$(ratio gemgate bare "$mode")" 'BEGIN {
    printf "  %-8s p50 %.3f ms with plugins, %.3f ms without: %+.0f us per request; throughput at c=64: %s%% of no plugins\n",
      m, g50, b50, (g50 - b50) * 1000, r }'
done

echo
# Translation's cost: the same question asked natively, as an OpenAI chat, an Anthropic
# message and an OpenAI response (not kept), through gemgate at 32 connections, each protocol in turn ($RUNS rounds). Target:
# each translated protocol keeps at least 80% of the native path's throughput.
cat >"$work/t-native.lua" <<LUA
wrk.method = "POST"
wrk.path = "/v1beta/models/gemini-2.5-flash:generateContent"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-goog-api-key"] = "$TOKEN"
LUA
cat >"$work/t-chat.lua" <<LUA
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '{"model":"gemini-2.5-flash","messages":[{"role":"user","content":"Say hello to the benchmark"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
cat >"$work/t-messages.lua" <<LUA
wrk.method = "POST"
wrk.path = "/v1/messages"
wrk.body = '{"model":"gemini-2.5-flash","max_tokens":256,"messages":[{"role":"user","content":"Say hello to the benchmark"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "$TOKEN"
wrk.headers["anthropic-version"] = "2023-06-01"
LUA
cat >"$work/t-responses.lua" <<LUA
wrk.method = "POST"
wrk.path = "/v1/responses"
wrk.body = '{"model":"gemini-2.5-flash","store":false,"input":"Say hello to the benchmark"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
# The same call kept (the API's default, with `store` left out): translation plus keeping it.
sed 's/"store":false,//' "$work/t-responses.lua" >"$work/t-kept.lua"
echo "translated protocols through gemgate at c=32 (median of $RUNS rounds, in turn):"
declare -A T=()
for _ in $(seq "$RUNS"); do
  for proto in native chat messages responses kept; do
    out=$(measure "$GATE_PORT" "$work/t-$proto.lua" 32)
    case $out in ERROR*) echo "$proto: $out" >&2; exit 1 ;; esac
    T[$proto]+="$out"$'\n'
  done
done
read -r native_rps _ <<<"$(printf '%s' "${T[native]}" | median_run)"
for proto in native chat messages responses kept; do
  read -r rps p50 p99 <<<"$(printf '%s' "${T[$proto]}" | median_run)"
  awk -v p="$proto" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v n="$native_rps" 'BEGIN {
    r = 100 * rps / n
    printf "  %-9s %8.0f req/s  p50 %.3f ms  p99 %.3f ms  %3.0f%% of native%s\n", p, rps, p50, p99, r,
      (p == "native" ? "" : p == "kept" ? " (responses, kept)" : (r >= 80 ? " (target 80%: ok)" : " (target 80%: MISSED)")) }'
done

echo
# Side by side: the fake directly, gemgate (defaults: plugins, metrics, request log) and nginx
# (proxy_pass, upstream keep-alive, buffering off), at each of $MATRIX_CONNS connections, each
# target in turn, $MATRIX_RUNS rounds; and the translated protocols through gemgate. Each cell
# is the median round: req/s, p50, p99, the target's peak RSS during the run (nginx: master
# and workers together) and its CPU per request (user + system).
MATRIX_CONNS=${MATRIX_CONNS:-1 32 256 1024}
MATRIX_RUNS=${MATRIX_RUNS:-5}
tick=$(getconf CLK_TCK)
gate_pid=$(cat "$work/gemgate.pid" 2>/dev/null || true)
fake_pid=$(cat "$work/fake.pid" 2>/dev/null || true)
pids_of() { # target
  case $1 in
    direct) echo "$fake_pid" ;;
    gemgate) echo "$gate_pid" ;;
    nginx) local m; m=$(cat "$work/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')" ;;
  esac
}
rss_kb() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/^VmRSS/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo "$t"; }
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
# Prints "req/s p50_ms p99_ms peak_rss_kB cpu_us_per_request" for one wrk run against PIDS.
measure_full() { # port script connections pids...
  local port=$1 script=$2 conc=$3; shift 3
  local threads=1; [ "$conc" -gt 1 ] && threads=2
  local before; before=$(cpu_ticks "$@")
  wrk -t"$threads" -c"$conc" -d"${DURATION}s" --latency -s "$script" "http://127.0.0.1:$port" >"$work/wrk.out" 2>&1 &
  local wrk_pid=$! peak=0 r
  while kill -0 "$wrk_pid" 2>/dev/null; do
    r=$(rss_kb "$@"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.2
  done
  wait "$wrk_pid" || true
  local after; after=$(cpu_ticks "$@")
  awk -v peak="$peak" -v cpu="$((after - before))" -v tick="$tick" '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 }
    / requests in / { n = $1 } /Non-2xx/ { bad = $NF } /Socket errors/ { errs = $0 }
    END {
      if (bad) printf "ERROR: %s non-2xx answers\n", bad
      if (errs ~ /(connect|read|write) [1-9]/) printf "ERROR: %s\n", errs
      printf "%.0f %.3f %.3f %d %.1f\n", rps, p50, p99, peak, (n ? cpu / tick * 1e6 / n : 0) }' "$work/wrk.out"
}
printf '%-8s %-9s %5s %9s %9s %9s %9s %9s\n' call target conc 'req/s' 'p50 ms' 'p99 ms' 'peak MiB' 'CPU us/req'
matrix() { # call targets...
  local call=$1; shift
  for conc in $MATRIX_CONNS; do
    declare -A CELL=()
    for _ in $(seq "$MATRIX_RUNS"); do
      for who in "$@"; do
        case $who in
          direct) port=$FAKE_PORT; script="$work/$call-direct.lua" ;;
          nginx) port=$NGINX_PORT; script="$work/$call-direct.lua" ;;
          *) port=$GATE_PORT; script="$work/$call-gemgate.lua" ;;
        esac
        # shellcheck disable=SC2046
        out=$(measure_full "$port" "$script" "$conc" $(pids_of "$who"))
        case $out in ERROR*) echo "$call $who c=$conc: $out" >&2; exit 1 ;; esac
        CELL[$who]+="$out"$'\n'
      done
    done
    for who in "$@"; do
      read -r rps p50 p99 peak cpu <<<"$(printf '%s' "${CELL[$who]}" | median_run)"
      awk -v c="$call" -v w="$who" -v n="$conc" -v r="$rps" -v a="$p50" -v b="$p99" -v m="$peak" -v u="$cpu" \
        'BEGIN { printf "%-8s %-9s %5s %9.0f %9.3f %9.3f %9.1f %9.1f\n", c, w, n, r, a, b, m / 1024, u }'
    done
  done
}
targets="direct gemgate"; [ "$have_nginx" = 1 ] && targets="direct gemgate nginx"
for call in generate sse; do
  # shellcheck disable=SC2086
  matrix "$call" $targets
done
for proto in chat messages responses; do
  cp "$work/t-$proto.lua" "$work/$proto-gemgate.lua"
  matrix "$proto" gemgate
done

# Cost against the pool's size: a gemgate for each of $POOL_SIZES keys (default 10, 1,000 and
# 100,000; empty to skip), the shipped plugins' round robin taking every key in turn, generate
# at 32 connections, each pool in turn for $POOL_RUNS rounds (default 3): req/s, p99, CPU per
# request, and resident memory idle (after a warm-up) and at its peak. Each gateway holds its
# keys in its own conf/gemgate.toml, and only those.
POOL_SIZES=${POOL_SIZES-10 1000 100000}
POOL_RUNS=${POOL_RUNS:-3}
if [ -n "$POOL_SIZES" ]; then
  echo
  echo "cost against the pool's size (round robin over every key, generate at 32 connections, median of $POOL_RUNS rounds in turn):"
  declare -A POOL_PORT_OF=() POOL_PID_OF=() POOL_IDLE=() POOL_CELL=()
  port=${POOL_PORT:-18110}
  for n in $POOL_SIZES; do
    mkdir -p "$work/pool-$n/conf"
    python3 -c 'import sys; n = int(sys.argv[1]); print("[keys]\napi_keys = [" + ",".join("\"bench-pool-%07d\"" % i for i in range(n)) + "]")' \
      "$n" >"$work/pool-$n/conf/gemgate.toml"
    start_gemgate "$work/pool-$n" "$BIN_DIR" "$port" "$FAKE_PORT" "$TOKEN" API_KEYS=
    pids+=($!)
    POOL_PID_OF[$n]=$!
    POOL_PORT_OF[$n]=$port
    port=$((port + 1))
  done
  for n in $POOL_SIZES; do
    wait_port "${POOL_PORT_OF[$n]}" "gemgate with $n keys" "$work/pool-$n.log"
    DURATION=2 measure "${POOL_PORT_OF[$n]}" "$work/generate-gemgate.lua" 32 >/dev/null
  done
  sleep 2
  for n in $POOL_SIZES; do POOL_IDLE[$n]=$(rss_kb "${POOL_PID_OF[$n]}"); done
  for _ in $(seq "$POOL_RUNS"); do
    for n in $POOL_SIZES; do
      out=$(measure_full "${POOL_PORT_OF[$n]}" "$work/generate-gemgate.lua" 32 "${POOL_PID_OF[$n]}")
      case $out in ERROR*) echo "pool of $n keys: $out" >&2; exit 1 ;; esac
      POOL_CELL[$n]+="$out"$'\n'
    done
  done
  printf '  %7s %9s %9s %11s %9s %9s\n' keys 'req/s' 'p99 ms' 'CPU us/req' 'idle MiB' 'peak MiB'
  for n in $POOL_SIZES; do
    read -r rps _ p99 peak cpu <<<"$(printf '%s' "${POOL_CELL[$n]}" | median_run)"
    awk -v n="$n" -v r="$rps" -v b="$p99" -v u="$cpu" -v i="${POOL_IDLE[$n]}" -v m="$peak" \
      'BEGIN { printf "  %7d %9.0f %9.3f %11.1f %9.1f %9.1f\n", n, r, b, u, i / 1024, m / 1024 }'
  done
  # Out of the way of what follows (the largest holds a few hundred MiB).
  for n in $POOL_SIZES; do kill "${POOL_PID_OF[$n]}" 2>/dev/null || true; done
fi

# Memory idle and after load: a fresh gemgate (the defaults) idle for 3 seconds, then generate
# at 256 connections for $AFTER_LOAD_SECONDS (default 10; 0 to skip), then idle for 10 seconds:
# its resident memory at each point. What the load took should go back to the system once the
# load ends, not stay with the process.
AFTER_LOAD_SECONDS=${AFTER_LOAD_SECONDS:-10}
if [ "$AFTER_LOAD_SECONDS" -gt 0 ]; then
  echo
  AFTER_PORT=${AFTER_PORT:-18107}
  start_gemgate "$work/after" "$BIN_DIR" "$AFTER_PORT" "$FAKE_PORT" "$TOKEN"
  pids+=($!)
  after_pid=$!
  wait_port "$AFTER_PORT" gemgate "$work/after.log"
  sleep 3
  idle=$(rss_kb "$after_pid")
  wrk -t2 -c256 -d"${AFTER_LOAD_SECONDS}s" -s "$work/generate-gemgate.lua" \
    "http://127.0.0.1:$AFTER_PORT" >"$work/after-wrk.out" 2>&1
  loaded=$(rss_kb "$after_pid")
  if grep -q "Non-2xx" "$work/after-wrk.out"; then
    echo "memory after load: $(grep Non-2xx "$work/after-wrk.out")" >&2
    exit 1
  fi
  sleep 10
  rested=$(rss_kb "$after_pid")
  peak=$(awk '/^VmHWM/ { print $2 }' "/proc/$after_pid/status")
  rps=$(awk '/^Requests\/sec/ { print $2 }' "$work/after-wrk.out")
  awk -v i="$idle" -v p="$peak" -v l="$loaded" -v r="$rested" -v rps="$rps" -v d="$AFTER_LOAD_SECONDS" 'BEGIN {
    printf "memory (a fresh gemgate, generate at 256 connections for %d s, %.0f req/s): idle %.1f MiB, peak %.1f, at the end of the load %.1f, 10 s after %.1f (%+.1f over idle)\n",
      d, rps, i / 1024, p / 1024, l / 1024, r / 1024, (r - i) / 1024 }'
  kill "$after_pid" 2>/dev/null || true
fi

# Open streams: $HELD_STREAMS (default 2,000; 0 to skip) SSE answers the fake holds open
# (`x-fake-hold`), through gemgate (calling the upstream over HTTP/1.1, its default, then over
# HTTP/2: GEMGATE_UPSTREAM_HTTP2) and through nginx: the proxy's resident memory per open
# stream, a new request's latency meanwhile, and every stream ending whole once released. Over
# HTTP/1.1 each open stream takes a client and an upstream connection at the proxy, so 10,000
# need a descriptor limit over 20,000 (`ulimit -Hn`; raising it takes root) and that row is left
# out when the limit is short; over HTTP/2 they need a little over 10,000. nginx is left out
# past 3,500 streams: its workers have 4,096 connections each, as configured above.
HELD_STREAMS=${HELD_STREAMS:-2000}
if [ "$HELD_STREAMS" -gt 0 ]; then
  echo
  echo "open streams ($HELD_STREAMS held by the upstream; descriptor limit $(ulimit -n)):"
  # Fresh processes: after the load above, each keeps memory its allocator freed, which the
  # streams would reuse, and memory per stream would read low. New gemgates with the same
  # defaults; nginx replaces its workers on SIGHUP.
  HELD_PORT=${HELD_PORT:-18105}
  HELD_H2_PORT=${HELD_H2_PORT:-18106}
  start_gemgate "$work/held" "$BIN_DIR" "$HELD_PORT" "$FAKE_PORT" "$TOKEN"
  pids+=($!)
  held_pid=$!
  start_gemgate "$work/held-h2" "$BIN_DIR" "$HELD_H2_PORT" "$FAKE_PORT" "$TOKEN" \
    GEMGATE_UPSTREAM_HTTP2=true
  pids+=($!)
  held_h2_pid=$!
  wait_port "$HELD_PORT" gemgate "$work/held.log"
  wait_port "$HELD_H2_PORT" gemgate "$work/held-h2.log"
  [ "$have_nginx" = 1 ] && kill -HUP "$(cat "$work/nginx.pid")"
  sleep 3
  for who in gemgate gemgate-h2 nginx; do
    port=$HELD_PORT key=$TOKEN watched=$held_pid
    case $who in
      gemgate)
        if [ $((2 * HELD_STREAMS + 64)) -gt "$(ulimit -n)" ]; then
          echo "  gemgate  (HTTP/1.1 upstream) left out: needs $((2 * HELD_STREAMS + 64)) descriptors"
          continue
        fi ;;
      gemgate-h2) port=$HELD_H2_PORT watched=$held_h2_pid ;;
      nginx)
        [ "$have_nginx" = 1 ] && [ "$HELD_STREAMS" -le 3500 ] || continue
        port=$NGINX_PORT key=bench-1 watched=$(pids_of nginx) ;;
    esac
    printf '  %-10s ' "$who"
    # shellcheck disable=SC2086
    python3 scripts/held_streams.py "$HELD_STREAMS" "$port" "$FAKE_PORT" "$key" "held-$who" \
      $watched || echo "  $who: streams failed" >&2
  done
fi
