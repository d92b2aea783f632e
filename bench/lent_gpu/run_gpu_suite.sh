#!/usr/bin/env bash
# The whole GPU suite in one command on a bare lent H100/H200 (wheels carried in .whl/, see bench/lent_gpu/gpu_setup.sh).
# Results land in $OUT when it is set, else by topic: decode speed in docs/results/speed, training in
# docs/results/train, the kernel check in docs/results/kernels. Each part is bounded so one slow part cannot
# starve the others.
set -u
cd "$(dirname "$0")/../.."
source bench/lent_gpu/gpu_setup.sh
out=${OUT:-docs/results/speed}
timeout 400 python3 bench/gpu_suite.py anchors --batches 1,64,128,256 --out "$out"
timeout 560 python3 bench/gpu_suite.py decode --batches 1,16,64,128,256 --out "$out"
timeout 200 python3 bench/gpu_suite.py decode --models hybrid --batches 512 --tag _largest --out "$out"
timeout 150 python3 bench/gpu_suite.py train --out "${OUT:-docs/results/train}"
timeout 150 python3 bench/gpu_suite.py smollm2 --batches 1,64,256 --decode 1024 --out "$out"
for variant in "--engine compiled --tag _compiled" "--decode-attention triton --tag _triton" "--state-dtype bf16 --tag _bf16state"; do
  # shellcheck disable=SC2086
  timeout 200 python3 bench/gpu_suite.py smollm2 --batches 1,64,256 --decode 1024 $variant --out "$out"
done
timeout 150 python3 bench/decode_profile.py --shape smollm2-135m --batches 1,256 --out "$out/decode_profile_smollm2-135m.json"
timeout 200 python3 bench/decode_profile.py --shape llama-3.2-3b --batches 1,128 --out "$out/decode_profile_llama-3.2-3b.json"
M1_GPU_REPORT="${OUT:-docs/results/kernels}/gpu_kernels.json" timeout 420 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_gpu_kernels.py
