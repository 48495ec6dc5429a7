#!/usr/bin/env bash
# Interleaved A/B runs of two (or more) builds of the daemon, run for run, on
# one e2e scenario: each build is copied in turn to target/release/aom-terminator
# (the binary the e2e bench drives) and the scenario runs once per build per
# round. One line per run: the rate and the daemon's CPU µs per termination.
#
#   cargo bench --bench e2e --no-run      # builds the bench (and the binary)
#   cp target/release/aom-terminator /tmp/a     # ... change, rebuild ...
#   cargo build --release && cp target/release/aom-terminator /tmp/b
#   benches/ab.sh 5 /tmp/a /tmp/b -- --requests 40000 --concurrency 64
#
# A build may carry daemon settings after a colon: /tmp/a:TOKIO_WORKER_THREADS=1.
# AMQP_URL and DATABASE_URL as for the bench. The binary cargo built is put
# back at the end (each copy replaces the file, never writes through cargo's
# hard link, so cargo's own build stays as it was).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=$1
shift
builds=()
while [[ $# -gt 0 && $1 != "--" ]]; do
  builds+=("$1")
  shift
done
[[ ${1:-} == "--" ]] && shift
e2e=$(ls -t target/release/deps/e2e-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
if [[ -z $e2e ]]; then
  echo "ab.sh: no e2e bench built: run cargo bench --bench e2e --no-run first" >&2
  exit 2
fi
built=$(mktemp)
cp target/release/aom-terminator "$built"
trap 'cp --remove-destination "$built" target/release/aom-terminator; rm -f "$built"' EXIT
for round in $(seq 1 "$rounds"); do
  for build in "${builds[@]}"; do
    binary=${build%%:*}
    extra=()
    [[ $build == *:* ]] && extra=(--extra-env "${build#*:}")
    cp --remove-destination "$binary" target/release/aom-terminator
    out=$("$e2e" "$@" --no-ceiling "${extra[@]}" 2>&1) || true
    rate=$(grep -oP 'terminations/s end to end:\s+\K[0-9,]+' <<<"$out" || echo '?')
    cpu=$(grep -oP '= \K[0-9.]+(?= µs per termination)' <<<"$out" || echo '?')
    correct=$(grep -c '^correct' <<<"$out" || true)
    echo "round $round  $build  terminations/s $rate  daemon CPU µs/termination $cpu  correct $correct"
  done
done
