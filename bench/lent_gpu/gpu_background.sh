#!/usr/bin/env bash
# A lent GPU machine runs one command for at most 10 minutes, but keeps a process that started its own session
# until the machine goes back: the `gpu` pipeline (~25 min) runs detached, and later calls wait on it.
#   bench/lent_gpu/gpu_background.sh start CMD ...   run CMD detached (log: runs/gpu/background.log, exit status: .rc)
#   bench/lent_gpu/gpu_background.sh wait SECONDS    wait until CMD ends or SECONDS pass, print the log's tail and put
#                                           the runs' logs, metrics, samples and plots in $OUT/gpu_results.tgz
set -euo pipefail
cd "$(dirname "$0")/../.."
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
  tail -n 12 "$log" || true
  for f in runs/gpu/seed*/grpo.log runs/gpu/grpo-variants/*/grpo.log; do
    [ -f "$f" ] && { echo "== $f"; grep -E '^\[grpo\] (step|before|after)' "$f" | tail -n 2 || true; }
  done
  if [ -f "$rc" ]; then echo "finished with exit status $(cat "$rc")"; else echo "still running"; fi
  if [ -n "${OUT:-}" ]; then
    # Everything small a run writes (logs, metrics, samples, plots); models, checkpoints and data stay there.
    find runs/gpu \( -name model -o -name checkpoints -o -name data \) -prune -o -type f \( -name '*.log' -o -name '*.jsonl' \
      -o -name '*metrics*.json' -o -name 'grpo_variants*.json' -o -name '*.png' -o -path '*/metrics/*' -o -path '*/samples/*' \) -print0 \
      | tar czf "$OUT/gpu_results.tgz" --null -T - || true
  fi ;;
*) echo "usage: bench/lent_gpu/gpu_background.sh start CMD ... | wait SECONDS" >&2; exit 2 ;;
esac
