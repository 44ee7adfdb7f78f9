# Loopback ports for the scripts that start gemgate and the fake upstream (sourced, not run).

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
