#!/usr/bin/env bash
# Benchmark: does a crowd of slow clients slow anyone else? Measures the p99 latency of a
# plain generateContent call through a release build of gemgate, alone, then with $HALF_SENT
# (default 1,000) requests held open half-sent (a head that never ends), in $ROUNDS rounds
# (default 3), and holds each round to the target: the loaded p99 within twice the unloaded.
# Bounded: $CALLS calls (default 1,000) a measurement, one connection, on loopback only; the
# half-sent connections are closed after each round. Exits 1 when a round misses the target.
#
#   scripts/bench-half-sent.sh            # SKIP_BUILD=1 to use the release binaries as they are
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

HALF_SENT=${HALF_SENT:-1000}
CALLS=${CALLS:-1000}
ROUNDS=${ROUNDS:-3}
TOKEN=bench-token
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
bin=$CARGO_TARGET_DIR/release
case $bin in /*) ;; *) bin=$root/$bin ;; esac

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  scripts/bootstrap.sh
  cargo build --release --locked --workspace --bins -q
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

. scripts/ports.sh

FAKE_PORT=$(free_port)
"$bin/gemgate-fake-upstream" --listen "127.0.0.1:$FAKE_PORT" --threads 1 >"$work/fake.log" 2>&1 &
pids+=($!)
wait_port "$FAKE_PORT" "the fake upstream" "$work/fake.log"
GATE_PORT=$(free_port)
(
  cd "$work"
  exec env -i PATH="$PATH" HOME="${HOME:-/tmp}" \
    GEMGATE_LISTEN="127.0.0.1:$GATE_PORT" GEMGATE_DATA_DIR="$work/data" \
    BASE_URL="http://127.0.0.1:$FAKE_PORT/v1beta" API_KEYS="bench-1" ALLOWED_TOKENS="$TOKEN" \
    "$bin/gemgate"
) >"$work/gemgate.log" 2>&1 &
pids+=($!)
wait_port "$GATE_PORT" gemgate "$work/gemgate.log"

python3 - "$GATE_PORT" "$TOKEN" "$HALF_SENT" "$CALLS" "$ROUNDS" <<'PY'
import http.client, json, resource, socket, sys, time

port, token, half_sent, calls, rounds = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft != resource.RLIM_INFINITY and soft < half_sent + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(half_sent + 64, hard), hard))
body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
path = "/v1beta/models/gemini-2.5-flash:generateContent"


def p99(n):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("POST", path, body, {"x-goog-api-key": token, "content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.exit(f"bench: a call was answered {resp.status}")
        times.append(time.perf_counter() - started)
    conn.close()
    times.sort()
    return times[len(times) * 99 // 100] * 1000


missed = 0
for r in range(1, rounds + 1):
    p99(200)  # warm: connections to the upstream, caches
    alone = p99(calls)
    held = []
    for i in range(half_sent):
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=30)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-N: {i}\r\n".encode())
        held.append(s)
    time.sleep(1)  # the gateway takes them in; they stay open, unanswered
    crowded = p99(calls)
    for s in held:
        s.close()
    ok = crowded <= 2 * alone
    missed += not ok
    print(f"round {r}: p99 alone {alone:.3f} ms, with {half_sent} half-sent requests open "
          f"{crowded:.3f} ms ({crowded / alone:.2f}x, target 2x): {'ok' if ok else 'MISSED'}")
    time.sleep(1)
sys.exit(1 if missed else 0)
PY
