# Loopback ports, and gemgate started on one, for the scripts that run gemgate against the fake
# upstream (sourced, not run).

# A port the kernel says is free now (another program could take it before it is bound; the
# wait below then fails loudly rather than test the wrong thing).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_port PORT WHAT [LOG]: waits up to 10 s for something to listen on 127.0.0.1:PORT;
# else says WHAT does not, shows the end of LOG when given, and exits 1.
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$(basename "$0"): $2 does not listen on 127.0.0.1:$1" >&2
  if [ -n "${3:-}" ]; then tail -20 "$3" >&2 || true; fi
  exit 1
}

# start_gemgate DIR BIN PORT FAKE_PORT TOKEN [NAME=VALUE ...]: starts BIN/gemgate in the folder
# DIR (its data inside), listening on 127.0.0.1:PORT with four keys (bench-1..4) on the fake
# upstream at FAKE_PORT and the client token TOKEN, plus the settings given; its log goes to
# DIR.log. The caller keeps `$!` to stop it.
start_gemgate() {
  local dir=$1 bin=$2 port=$3 fake=$4 token=$5
  shift 5
  mkdir -p "$dir"
  (
    cd "$dir"
    exec env GEMGATE_LISTEN="127.0.0.1:$port" GEMGATE_DATA_DIR="$dir/data" \
      API_KEYS="bench-1,bench-2,bench-3,bench-4" ALLOWED_TOKENS="$token" \
      BASE_URL="http://127.0.0.1:$fake/v1beta" LOG_LEVEL=info "$@" "$bin/gemgate"
  ) >/dev/null 2>"$dir.log" &
}
