#!/usr/bin/env bash
# Sourced at the start of every command on a lent GPU machine (Python 3.12 image without mamba-ssm): installs
# the prebuilt mamba-ssm / causal-conv1d wheels carried in .whl/ (copied from ../shared/gpu-wheels) into /tmp/site.
# On a user's own GPU machine use `pip install -e .[gpu]` instead.
# M1_EXTRA_WHEELS: another folder of wheels (bench/lent_gpu/gpu_stash.sh puts the pure-Python dependencies there).
wheels=$(ls .whl/*.whl ${M1_EXTRA_WHEELS:+"$M1_EXTRA_WHEELS"/*.whl} 2>/dev/null || true)
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
elif [ -d /tmp/site ]; then  # installed by an earlier call on this machine (the wheels travel once)
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
