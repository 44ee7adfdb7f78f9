#!/usr/bin/env bash
# Two builds of gemgate head to head: native generateContent at concurrency $CONC through each,
# in $ROUNDS rounds of $DURATION seconds, the order alternating by round (a shared machine's
# speed drifts within a minute), over one fake upstream. Prints each round and the median of
# the per-round ratios. Bounded: 2 × ROUNDS × DURATION seconds, loopback only.
#
#   BEFORE=/old/release AFTER=target/release scripts/bench-ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${BEFORE:?the folder of the older build}
AFTER=${AFTER:-target/release}
ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-5}
CONC=${CONC:-64}
. scripts/ports.sh
FAKE_PORT=$(free_port); A_PORT=$(free_port); B_PORT=$(free_port)
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
"$AFTER/gemgate-fake-upstream" --listen "127.0.0.1:$FAKE_PORT" --threads 2 >/dev/null 2>&1 &
pids+=($!)
start_gemgate "$work/after" "$(cd "$AFTER" && pwd)" "$A_PORT" "$FAKE_PORT" bench-token
pids+=($!)
start_gemgate "$work/before" "$(cd "$BEFORE" && pwd)" "$B_PORT" "$FAKE_PORT" bench-token
pids+=($!)
wait_port "$FAKE_PORT" "the fake upstream"
wait_port "$A_PORT" "the new build"
wait_port "$B_PORT" "the old build"
cat >"$work/generate.lua" <<'LUA'
wrk.method = "POST"
wrk.path = "/v1beta/models/gemini-2.5-flash:generateContent"
wrk.body = '{"contents":[{"role":"user","parts":[{"text":"Say hello to the benchmark"}]}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-goog-api-key"] = "bench-token"
LUA
ratios=()
for round in $(seq "$ROUNDS"); do
  order="after before"; [ $((round % 2)) = 0 ] && order="before after"
  declare -A rps=()
  for who in $order; do
    port=$A_PORT; [ "$who" = before ] && port=$B_PORT
    rps[$who]=$(wrk -t2 -c"$CONC" -d"${DURATION}s" -s "$work/generate.lua" "http://127.0.0.1:$port" |
      awk '/^Requests\/sec/ { print $2 }')
  done
  echo "round $round: new ${rps[after]} req/s, old ${rps[before]} req/s"
  ratios+=("$(awk -v a="${rps[after]}" -v b="${rps[before]}" 'BEGIN { print a / b }')")
done
printf '%s\n' "${ratios[@]}" | sort -n |
  awk '{ v[NR] = $1 } END { printf "median of new/old over %d rounds: %.3f\n", NR, v[int((NR + 1) / 2)] }'
