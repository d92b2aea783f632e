#!/usr/bin/env bash
# Several GRPO runs on one GPU take turns on it (time slices) unless NVIDIA's Multi-Process Service lets their
# kernels run side by side. Measured on an H200 without it: four runs of the `gpu` profile at once made ~1.4x the
# steps of one run alone (docs/log.md, session 19).
#   bench/lent_gpu/mps.sh start   start the MPS control daemon, then check that a CUDA client works under it (an
#                                 allocation through expandable segments, a GEMM, a CUDA graph captured and replayed,
#                                 as the runs do); if not, stop it again. Exit 0 either way: the runs go on, with or
#                                 without MPS, and the last line says which.
#   bench/lent_gpu/mps.sh stop
set -uo pipefail
export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}
case "${1:-}" in
start)
  command -v nvidia-cuda-mps-control > /dev/null || { echo "mps: off (nvidia-cuda-mps-control is not installed)"; exit 0; }
  mkdir -p "$CUDA_MPS_LOG_DIRECTORY"
  setsid nvidia-cuda-mps-control -d || { echo "mps: off (the daemon did not start)"; exit 0; }
  if PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 120 python3 - <<'PY'
import torch
x = torch.randn(8192, 8192, device="cuda")
y = x @ x
g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    z = y.relu()
torch.cuda.current_stream().wait_stream(s)
with torch.cuda.graph(g):
    z = y.relu() + 1
g.replay()
torch.cuda.synchronize()
assert torch.equal(z, y.relu() + 1)
PY
  then
    echo "mps: on"
  else
    echo quit | nvidia-cuda-mps-control
    echo "mps: off (a CUDA client failed under it; the daemon was stopped; log in $CUDA_MPS_LOG_DIRECTORY)"
  fi ;;
stop) echo quit | nvidia-cuda-mps-control ;;
*) echo "usage: bench/lent_gpu/mps.sh start | stop" >&2; exit 2 ;;
esac
