#!/usr/bin/env bash
# Soak test: a bounded, mixed load on gemgate for $SOAK_MINUTES minutes (default 10), on
# loopback only, printing gemgate's resident memory and open file descriptors once a minute;
# at the end, a verdict: RSS at every later minute within ±5% of minute 1, and the descriptor
# count within ±2 of minute 1 (PASS), or not (FAIL, exit 1). Each minute's figure is the
# median of its one-second samples (SOAK_MEASURE=mark: the one sample at the minute mark).
#
#   SOAK_MINUTES=10 scripts/soak.sh
#
# The load (scripts/soak.py, standard-library Python, 23 keep-alive connections, about 250
# calls a second on a 2-core machine, each loop bounded in time and count) runs all at once:
#   - native generateContent, and streamGenerateContent?alt=sse with 20 chunks 50 ms apart,
#   - OpenAI /v1/chat/completions, streaming and not,
#   - failovers: the pool mixes good keys with the fake upstream's failing ones (flaky-…: 503
#     half the time; minute-…: 429 with a 2 s RetryInfo, so cooldowns end and recur; cut-…:
#     streams break half-way),
#   - a config reload every 10 s (the file rewritten as editors do: a temporary file renamed
#     over it; [upstream] max_retries toggles between 3 and 4), a plugin edit every 30 s,
#   - admin edits every 15 s: add a key, find it, delete it; reset a cooling key; read the
#     request log.
# Upstream is gemgate-fake-upstream; everything listens on 127.0.0.1, on ports free at start,
# and everything started here is stopped on exit. SOAK_KEEP=1 keeps the work folder (logs,
# config, data); it is also kept when the verdict is FAIL. SOAK_LOAD_ARGS passes options to
# soak.py (scripts/soak.py --help: threads per kind, pauses, reload and admin periods).
# SOAK_BUILD=0 skips the release build and runs the binaries already built.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

MINUTES=${SOAK_MINUTES:-10}
case $MINUTES in ''|*[!0-9]*|0) echo "soak: SOAK_MINUTES must be a whole number of minutes, at least 1" >&2; exit 2 ;; esac
RSS_BOUND_PCT=5
FD_BOUND=2
TOKEN=sk-soak-client
ADMIN=soak-admin-token
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
bin=$CARGO_TARGET_DIR/release
case $bin in /*) ;; *) bin=$root/$bin ;; esac

# A release build, as operators run it: a debug build's memory says little.
if [ "${SOAK_BUILD:-1}" != 0 ]; then
  scripts/bootstrap.sh
  nice -n 10 cargo build --release --locked --workspace --bins -q
fi

work=$(mktemp -d -t gemgate-soak.XXXXXX)
pids=()
verdict=""
cleanup() {
  local rc=$?
  # Stop what this script started, by pid, newest first; then wait so no port stays taken.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${SOAK_KEEP:-0}" = 1 ] || [ "$verdict" = FAIL ] || { [ "$rc" -ne 0 ] && [ -z "$verdict" ]; }; then
    echo "soak: logs, config and data kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

. scripts/ports.sh
FAKE_PORT=$(free_port)
GATE_PORT=$(free_port)
while [ "$GATE_PORT" = "$FAKE_PORT" ]; do GATE_PORT=$(free_port); done


# The fake Gemini API. --retry-delay-s 2: a minute-… key's 429 cools it for 2 s only, so its
# cooldowns keep ending and starting again through the whole run.
"$bin/gemgate-fake-upstream" --listen "127.0.0.1:$FAKE_PORT" --threads 2 --retry-delay-s 2 \
  >"$work/fake.log" 2>&1 &
pids+=($!)

# gemgate's config lives in its own folder (gemgate watches that folder and its plugins/),
# away from the logs and data, so that log writes never wake the file watcher. The setting the
# soak toggles must be present, uncommented; the key list is where the admin API adds keys.
mkdir -p "$work/conf/plugins" "$work/run" "$work/data"
cp plugins/*.lua "$work/conf/plugins/"
cat >"$work/conf/gemgate.toml" <<'TOML'
# Written by scripts/soak.sh; max_retries is toggled between 3 and 4 to force reloads.
[upstream]
max_retries = 3

[keys]
api_keys = []
TOML

# Nine keys: four good ones and five the fake fails by prefix (see Behaviour::from_key).
keys="soak-good-1,soak-good-2,soak-good-3,soak-good-4,flaky-soak-1,flaky-soak-2,minute-soak-1,minute-soak-2,cut-soak-1"
# A clean environment (env -i): a MAX_RETRIES or API_KEYS in the caller's environment would
# override the file; the working folder is empty, so no .env is read either.
(
  cd "$work/run"
  exec env -i PATH="$PATH" HOME="${HOME:-/tmp}" $(env | grep -E '^MIMALLOC_[A-Z_]+=[0-9a-z-]*$' || true) \
    GEMGATE_LISTEN="127.0.0.1:$GATE_PORT" GEMGATE_DATA_DIR="$work/data" \
    BASE_URL="http://127.0.0.1:$FAKE_PORT/v1beta" API_KEYS="$keys" \
    ALLOWED_TOKENS="$TOKEN" AUTH_TOKEN="$ADMIN" LOG_LEVEL=info \
    "$bin/gemgate" --config "$work/conf/gemgate.toml"
) >"$work/gemgate.log" 2>&1 &
gate_pid=$!
pids+=("$gate_pid")

wait_port "$FAKE_PORT" "the fake upstream" "$work/fake.log"
wait_port "$GATE_PORT" gemgate "$work/gemgate.log"

# Fail fast when the load cannot work at all (wrong token, upstream unreachable).
probe=$(curl -s -o /dev/null -w '%{http_code}' -H "x-goog-api-key: $TOKEN" \
  "http://127.0.0.1:$GATE_PORT/v1beta/models/gemini-2.5-flash:generateContent" \
  -d '{"contents":[{"parts":[{"text":"hello"}]}]}' || true)
case $probe in 200|429|503) ;; *)
  echo "soak: a first generateContent call answered $probe; gemgate's log:" >&2
  tail -20 "$work/gemgate.log" >&2
  exit 1 ;;
esac

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$gate_pid/status"; }
fd_count() { find "/proc/$gate_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

echo "soak: gemgate pid $gate_pid on 127.0.0.1:$GATE_PORT, fake upstream on 127.0.0.1:$FAKE_PORT, $MINUTES min"
echo "soak: at start RSS $(awk -v k="$(rss_kib)" 'BEGIN { printf "%.1f", k / 1024 }') MiB, $(fd_count) fds"

# The load runs a few seconds past the last sample, so the last minute is measured under load.
seconds=$((MINUTES * 60 + 5))
python3 scripts/soak.py --port "$GATE_PORT" --token "$TOKEN" --admin-token "$ADMIN" \
  --config "$work/conf/gemgate.toml" --plugin "$work/conf/plugins/round_robin.lua" \
  --seconds "$seconds" --stats "$work/stats" ${SOAK_LOAD_ARGS:-} >"$work/load.log" 2>&1 &
load_pid=$!
pids+=("$load_pid")

# Every second gemgate's RSS and open descriptors are sampled; each minute's line shows the
# sample at the minute mark, the median of that minute's 60 samples and their range. A single
# sample moves with what is in flight (connections to the upstream open and close with the
# requests; buffers come and go; a reload builds a new generation while the old one serves),
# so the verdict compares medians unless SOAK_MEASURE=mark asks for the samples at the minute
# marks. Every minute after the first is held to the bounds, not only the last. The size of gemgate's data folder follows (the request
# log grows it, and redb's page cache, part of the RSS, fills with it up to its 4 MiB), then
# the load's running totals: requests done; errors (answers other than 2xx, 429 and 503, 2xx
# answers that are not what was asked, streams that end without finishing); 429/503 (expected:
# every attempt met a cooling or overloaded key); cut (streams ended by an error event after a
# cut-… key broke them: expected); saves (config and plugin files saved to make gemgate
# reload); key+- (keys added through the admin API and deleted again).
MEASURE=${SOAK_MEASURE:-median}
case $MEASURE in median|mark) ;; *) echo "soak: SOAK_MEASURE is median or mark" >&2; exit 2 ;; esac
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
printf '%6s  %-26s  %-20s  %s\n' '' '---------- RSS MiB ---------' '------- fds -------' 'data'
printf '%6s  %6s %6s %13s  %5s %5s %8s  %5s %9s %6s %7s %5s %5s %5s\n' \
  minute mark median min-max mark med min-max MiB requests errors 429/503 cut saves key+-
start=$(date +%s)
rss=() fds=()
for m in $(seq 1 "$MINUTES"); do
  rs=() fs=()
  # Sample up to the minute mark, measured from the start so the marks do not drift.
  while :; do
    left=$((start + 60 * m - $(date +%s)))
    [ "$left" -gt 0 ] && sleep 1
    if ! kill -0 "$gate_pid" 2>/dev/null; then
      echo "soak: gemgate exited; its log:" >&2
      tail -20 "$work/gemgate.log" >&2
      verdict=FAIL
      exit 1
    fi
    rs+=("$(rss_kib)")
    fs+=("$(fd_count)")
    [ "$left" -le 1 ] && break
  done
  r_mark=${rs[-1]} f_mark=${fs[-1]}
  r_med=$(printf '%s\n' "${rs[@]}" | median)
  f_med=$(printf '%s\n' "${fs[@]}" | median)
  read -r r_lo r_hi < <(printf '%s\n' "${rs[@]}" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo, hi }')
  read -r f_lo f_hi < <(printf '%s\n' "${fs[@]}" | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo, hi }')
  if [ "$MEASURE" = median ]; then rss[m]=$r_med fds[m]=$f_med; else rss[m]=$r_mark fds[m]=$f_mark; fi
  read -r req err exp cut rel adm _ <"$work/stats" 2>/dev/null || { req=0 err=0 exp=0 cut=0 rel=0 adm=0; }
  printf '%6d  %6s %6s %13s  %5d %5d %8s  %5.0f %9d %6d %7d %5d %5d %5d\n' "$m" \
    "$(mib "$r_mark")" "$(mib "$r_med")" "$(mib "$r_lo")-$(mib "$r_hi")" "$f_mark" "$f_med" "$f_lo-$f_hi" \
    "$(du -sk "$work/data" | awk '{ print $1 / 1024 }')" "$req" "$err" "$exp" "$cut" "$rel" "$adm"
done

wait "$load_pid" || true
echo
cat "$work/load.log"
reloaded=$(grep -c ' reloaded generation=' "$work/gemgate.log" || true)
rejected=$(grep -c 'reload rejected' "$work/gemgate.log" || true)
echo "gemgate's log: $reloaded reloads, $rejected rejected; warnings and errors other than request lines, by message:"
# Access lines name a status; the rest of WARN/ERROR lines are gemgate's own complaints.
grep -E ' (WARN|ERROR) ' "$work/gemgate.log" | grep -v 'status=' |
  sed -E 's/^[^ ]+ +//; s/[0-9a-f]{8,}/…/g; s/[0-9]+(\.[0-9]+)?(ms|s)\b/N\2/g' |
  sort | uniq -c | sort -rn | head -10 || true

echo
# Every minute after the first against minute 1; the line names the farthest.
printf '%s\n' "${rss[@]}" >"$work/rss.txt"
printf '%s\n' "${fds[@]}" >"$work/fds.txt"
awk -v n="$MINUTES" -v rb="$RSS_BOUND_PCT" -v fb="$FD_BOUND" -v m="$MEASURE" '
  FNR == 1 { file++ }
  file == 1 && NF { r[++nr] = $1 }
  file == 2 && NF { f[++nf] = $1 }
  END {
    worst = 0; wm = 1; dworst = 0; dm = 1
    for (i = 2; i <= nr; i++) {
      p = 100 * (r[i] - r[1]) / r[1]
      if ((p < 0 ? -p : p) > (worst < 0 ? -worst : worst)) { worst = p; wm = i }
      d = f[i] - f[1]
      if ((d < 0 ? -d : d) > (dworst < 0 ? -dworst : dworst)) { dworst = d; dm = i }
    }
    printf "verdict (%s): RSS %.1f MiB at minute 1, %.1f MiB at minute %d, the farthest (%+.2f%%, bound ±%d%%); fds %d at minute 1, %d at minute %d (%+d, bound ±%d)\n",
      m, r[1] / 1024, r[wm] / 1024, wm, worst, rb, f[1], f[dm], dm, dworst, fb
    exit !((worst <= rb && worst >= -rb) && (dworst <= fb && dworst >= -fb))
  }' "$work/rss.txt" "$work/fds.txt" && verdict=PASS || verdict=FAIL
[ "$MINUTES" -eq 1 ] && echo "soak: with one minute there is nothing to compare minute 1 with" >&2
echo "$verdict"
[ "$verdict" = PASS ]
