#!/usr/bin/env bash
# The whole GPU suite in one command on a bare lent H100/H200 (wheels carried in .whl/, see bench/lent_gpu/gpu_setup.sh).
# Results land in $OUT when it is set, else by topic: decode speed in docs/results/speed, training in
# docs/results/train, the kernel check in docs/results/kernels. Parts run in order of what they prove, each bounded
# by its own limit, so a lease that ends early has the most important results: the correctness tests first, then
# the measurements no earlier run has (the compiled engine, long generations, the training sweep), then re-runs.
# Each part's start, end and exit status go to stdout with the clock time. M1_SUITE_PARTS (comma-separated part
# names) runs only those parts. On a bare lent machine: bench/lent_gpu/suite_carry.sh (what to carry) and
# bench/lent_gpu/suite_lease.sh (start detached, poll, bring the results back).
set -u
cd "$(dirname "$0")/../.."
source bench/lent_gpu/gpu_setup.sh
out=${OUT:-docs/results/speed}
part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ -n "${M1_SUITE_PARTS:-}" ] && [[ ",$M1_SUITE_PARTS," != *",$name,"* ]]; then
    return 0
  fi
  echo "== $(date +%T) $name: start (limit ${limit}s)"
  local rc=0
  timeout "$limit" "$@" || rc=$?
  echo "== $(date +%T) $name: exit $rc"
}
part gpu-tests 540 env M1_GPU_REPORT="${OUT:-docs/results/kernels}/gpu_kernels.json" \
  python3 -m pytest -q -rfE -p no:cacheprovider tests/test_gpu_kernels.py
part smollm2-compiled 300 python3 bench/gpu_suite.py smollm2 --batches 1,64,256 --decode 1024 --engine compiled \
  --tag _compiled --out "$out"
part smollm2-fused 200 python3 bench/gpu_suite.py smollm2 --batches 1,64,256 --no-largest --decode 1024 --mamba-decode triton \
  --tag _fused --out "$out"
part smollm2-all 300 python3 bench/gpu_suite.py smollm2 --batches 1,64,256 --decode 1024 --engine compiled \
  --mamba-decode triton --decode-attention triton --tag _all --out "$out"
part long 300 python3 bench/gpu_suite.py long --shape smollm2-135m --batches 64 --no-largest --out "$out"
part train 300 python3 bench/gpu_suite.py train --out "${OUT:-docs/results/train}"
part smollm2-bf16state 150 python3 bench/gpu_suite.py smollm2 --models hybrid --batches 1,64,256 --no-largest \
  --decode 1024 --state-dtype bf16 --tag _bf16state --out "$out"
part smollm2-triton 150 python3 bench/gpu_suite.py smollm2 --batches 1,64,256 --no-largest --decode 1024 \
  --decode-attention triton --tag _triton --out "$out"
part decode-3b 420 python3 bench/gpu_suite.py decode --batches 1,128 --out "$out"
part decode-3b-all 300 python3 bench/gpu_suite.py decode --batches 1,128 --no-largest --engine compiled \
  --mamba-decode triton --decode-attention triton --tag _all --out "$out"
part anchors 400 python3 bench/gpu_suite.py anchors --batches 1,128 --out "$out"
part smollm2 150 python3 bench/gpu_suite.py smollm2 --batches 1,64,256 --decode 1024 --out "$out"
part profile-smollm2 150 python3 bench/decode_profile.py --shape smollm2-135m --batches 1,256 \
  --out "$out/decode_profile_smollm2-135m.json"
part profile-3b 200 python3 bench/decode_profile.py --shape llama-3.2-3b --batches 1,128 \
  --out "$out/decode_profile_llama-3.2-3b.json"
