#!/usr/bin/env bash
# Issue 18, item 6: the daemon's CPU per termination beside a competent batched
# Python worker's (worker.py), on the same machine, in one run: N singles on a
# quorum queue, the project's sandbox at 0 ms, concurrency C. The Python side
# needs aio-pika, aiohttp and asyncpg:
#
#   python3 -m venv /tmp/pyv && /tmp/pyv/bin/pip install aio-pika aiohttp asyncpg
#   PYTHON=/tmp/pyv/bin/python benches/python/run.sh [N] [C]
#
# Then the daemon's own benchmark with the same N and C (`cargo bench --bench e2e`).
# Either side prints no figure for a run that is not correct.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-20000}
C=${2:-64}
PYTHON=${PYTHON:-python3}
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
base_url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
name="aomt_bench_py_$$"
# The scratch database's URL: the same server, settings and query string.
scratch_url=$("$PYTHON" -c '
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1])
print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$base_url" "$name")
cargo bench --quiet --bench e2e --no-run  # the daemon and sandbox as the e2e bench builds them
BIN=target/release/aom-terminator

sandbox=
cleanup() {
  [ -n "$sandbox" ] && kill "$sandbox" 2>/dev/null || true
  QUEUE="$name.requests" "$PYTHON" benches/python/worker.py drop >/dev/null 2>&1 || true
  psql "$base_url" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" || true
}
trap cleanup EXIT
psql "$base_url" -qc "CREATE DATABASE $name"

# The sandbox as the e2e benchmark starts it: one runtime thread, none of the
# shell's SANDBOX_* settings (a token or failure ratios would change the run).
port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
env $(env | grep -o '^SANDBOX_[A-Z_]*' | sed 's/^/-u /') TOKIO_WORKER_THREADS=1 \
  "$BIN" sandbox --listen "127.0.0.1:$port" --latency 0 >/dev/null 2>&1 &
sandbox=$!
for _ in $(seq 1 50); do
  curl --noproxy '*' -fs "http://127.0.0.1:$port/_sandbox/stats" >/dev/null && break
  sleep 0.1
done
curl --noproxy '*' -fs "http://127.0.0.1:$port/_sandbox/stats" >/dev/null

export QUEUE="$name.requests"
DATABASE_URL="$scratch_url" "$PYTHON" benches/python/worker.py fill --requests "$N"
echo "python worker, $N singles, 0 ms, C=$C:"
DATABASE_URL="$scratch_url" "$PYTHON" benches/python/worker.py work --requests "$N" \
  --concurrency "$C" --api "http://127.0.0.1:$port"

echo "the daemon, same N and C (its own benchmark):"
DATABASE_URL="$base_url" cargo bench --quiet --bench e2e -- --requests "$N" --concurrency "$C" \
  --no-ceiling | grep -E '^correct|not correct|error|terminations/s end to end|daemon CPU:'
