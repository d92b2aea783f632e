#!/usr/bin/env bash
# A lent GPU machine runs one command for at most 10 minutes, but keeps a process that started its own session
# until the machine goes back: the `gpu` pipeline (~25 min) runs detached, and later calls wait on it.
#   bench/gpu_background.sh start CMD ...   run CMD detached (log: runs/gpu/background.log, exit status: .rc)
#   bench/gpu_background.sh wait SECONDS    wait until CMD ends or SECONDS pass, print the log's tail and put
#                                           the run's logs, metrics and GRPO samples in $OUT/gpu_results.tgz
set -euo pipefail
cd "$(dirname "$0")/.."
log=runs/gpu/background.log
rc=runs/gpu/background.rc
case "${1:-}" in
start)
  shift
  [ $# -gt 0 ] || { echo "usage: gpu_background.sh start CMD ..." >&2; exit 2; }
  mkdir -p runs/gpu && rm -f "$rc"
  printf -v cmd '%q ' "$@"
  setsid nohup bash -c "$cmd; echo \$? > $rc" > "$log" 2>&1 < /dev/null &
  echo "started: $cmd (log $log)" ;;
wait)
  limit=${2:?usage: gpu_background.sh wait SECONDS}
  end=$((SECONDS + limit))
  while [ ! -f "$rc" ] && [ "$SECONDS" -lt "$end" ]; do sleep 5; done
  tail -n 40 "$log" || true
  if [ -f "$rc" ]; then echo "finished with exit status $(cat "$rc")"; else echo "still running"; fi
  if [ -n "${OUT:-}" ]; then
    # shellcheck disable=SC2046
    tar czf "$OUT/gpu_results.tgz" "$log" $(ls -d runs/gpu/metrics runs/gpu/*/history.jsonl \
      runs/gpu/*/metrics.jsonl runs/gpu/*/train_metrics.json runs/gpu/*/grpo_metrics.json runs/gpu/*/samples \
      runs/gpu/*/heldout_*.jsonl runs/gpu/*/grpo_curves.png \
      2>/dev/null) || true
  fi ;;
*) echo "usage: bench/gpu_background.sh start CMD ... | wait SECONDS" >&2; exit 2 ;;
esac
