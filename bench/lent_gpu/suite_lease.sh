#!/usr/bin/env bash
# run_gpu_suite.sh across the calls of one lease: a call lasts at most 10 minutes and brings back 8 files, the suite
# longer and more. After the three suite_carry.sh unpack calls:
#   start [PARTS]  copy the working tree to /var/tmp/m1-repo (the next call replaces the carried tree) and start the
#                  suite there, detached, results in /var/tmp/m1-out; PARTS (comma-separated part names, as the
#                  suite prints them) runs only those parts
#   wait SECONDS   until the suite ends or SECONDS pass: the parts' start and end lines and the rows measured so
#                  far, then every result so far as $OUT/results.tgz (one file, whatever the suite has written)
# Poll with `wait` in back-to-back calls: a machine left idle for ~30 s goes back, and the suite with it.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=/var/tmp/m1-repo out=/var/tmp/m1-out
case "${1:-}" in
start)
  rm -rf "$repo" && mkdir -p "$repo" "$out"
  tar -c --exclude=./.whl --exclude=./.whl1 --exclude=./.gg --exclude=./runs --exclude=./.venv . | tar -x -C "$repo"
  cd "$repo"
  setsid nohup env OUT="$out" M1_SUITE_PARTS="${2:-}" bash bench/lent_gpu/run_gpu_suite.sh > "$out/suite.log" 2>&1 &
  echo $! > /var/tmp/m1-suite.pid
  echo "suite started, pid $(cat /var/tmp/m1-suite.pid), log $out/suite.log" ;;
wait)
  limit=${2:?usage: suite_lease.sh wait SECONDS}
  pid=$(cat /var/tmp/m1-suite.pid)
  for _ in $(seq 1 $((limit / 5))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 5
  done
  kill -0 "$pid" 2>/dev/null && echo "suite running" || echo "suite finished"
  grep -E "^== |^\{|passed|failed" "$out/suite.log" | cut -c1-300 | tail -40
  tar czf "${OUT:?}/results.tgz" -C "$out" . ;;
*)
  echo "usage: suite_lease.sh start [PARTS] | wait SECONDS" >&2
  exit 2 ;;
esac
