#!/usr/bin/env bash
# Replicates of the GRPO stage run side by side on one lent GPU from the same SFT-2 model (runs/gpu/sft2): a
# 135M policy leaves an H100 mostly idle (decoding is bound by kernel launches), so N seeds take little longer
# than one, and a gain that holds across seeds is told apart from one run's luck. Seed N's run lives in
# runs/gpu/seed<N>/ (its run_dir, with sft2/ and data/ linked to runs/gpu's), its log in grpo.log there.
# At most $M1_PARALLEL (default 2) run at once: with the gpu profile's dynamic sampling a run holds ~31 GiB of
# an H100's 79 (2048 sequences' caches in a refill round), so a third does not fit beside them.
# Usage: bench/lent_gpu/gpu_grpo_seeds.sh SEED ...   (--set flags in $M1_SET apply to every seed; $M1_PROFILE, default gpu)
# M1_GPUS=N (default 1): the seeds go round-robin over N GPUs (CUDA_VISIBLE_DEVICES), so with M1_PARALLEL=3 and
# M1_GPUS=2 three seeds run at once on a 2-GPU node. Summarise with bench/grpo_seeds_report.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || { echo "usage: bench/lent_gpu/gpu_grpo_seeds.sh SEED ..." >&2; exit 2; }
root=${M1_RUN_ROOT:-runs/gpu}
[ -d "$root/sft2/model" ] || { echo "no $root/sft2/model: run the stages up to sft2 first" >&2; exit 2; }
stash=${M1_STASH:-/root/m1stash}
# Installed once here: concurrent `pip install --target` into one folder would race.
M1_EXTRA_WHEELS="$stash/wheels" source bench/lent_gpu/gpu_setup.sh
teacher=()
[ -f "$stash/teacher.gguf" ] && teacher=(--set teacher.source="$stash/teacher.gguf")
pids=()
started=()
rc=0
for s in "$@"; do
  d=$root/seed$s
  mkdir -p "$d" && ln -sfn ../sft2 "$d/sft2" && ln -sfn ../data "$d/data"
  gpu=()
  [ "${M1_GPUS:-1}" -gt 1 ] && gpu=(env CUDA_VISIBLE_DEVICES=$(( ${#started[@]} % M1_GPUS )))
  started+=("$s")
  # shellcheck disable=SC2086
  "${gpu[@]}" python3 -m components.cli stage grpo --profile "${M1_PROFILE:-gpu}" --set tracking.enabled=false \
    --set run_dir="$d" --set seed="$s" "${teacher[@]}" ${M1_SET:-} > "$d/grpo.log" 2>&1 &
  pids+=($!)
  echo "seed $s: pid $! (log $d/grpo.log)"
  if [ "${#pids[@]}" -ge "${M1_PARALLEL:-2}" ]; then wait "${pids[0]}" || rc=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
