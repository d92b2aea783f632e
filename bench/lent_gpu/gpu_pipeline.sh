#!/usr/bin/env bash
# The `gpu` profile's stages after curation on a bare lent GPU machine, whose image has neither Prefect, MLflow
# nor Ray: each stage through `m1 stage NAME` (what dvc.yaml runs), tracking off; metrics land in
# runs/gpu/metrics/<stage>.json and the stages' own outputs (history.jsonl, grpo metrics.jsonl) under runs/gpu/.
# Inputs come from bench/lent_gpu/gpu_stash.sh (wheels, curated data, teacher GGUF in $M1_STASH).
# Usage: bench/lent_gpu/gpu_pipeline.sh [STAGE ...]   (default: convert align distill sft1 sft2 grpo); extra --set flags in $M1_SET.
# The `gpu` profile enables align, so distill reads runs/gpu/align/model: a list without align fails at distill.
set -euo pipefail
cd "$(dirname "$0")/../.."
stash=${M1_STASH:-/root/m1stash}
M1_EXTRA_WHEELS="$stash/wheels" source bench/lent_gpu/gpu_setup.sh
[ -f "$stash/teacher.gguf" ] || { echo "no $stash/teacher.gguf: run bench/lent_gpu/gpu_stash.sh unpack first" >&2; exit 2; }
mkdir -p runs/gpu
[ -e runs/gpu/data ] || cp -r "$stash/data" runs/gpu/data
for s in ${*:-convert align distill sft1 sft2 grpo}; do
  # shellcheck disable=SC2086
  python3 -m components.cli stage "$s" --profile gpu --set tracking.enabled=false \
    --set teacher.source="$stash/teacher.gguf" ${M1_SET:-}
done
