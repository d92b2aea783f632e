#!/usr/bin/env bash
# Sourced at the start of every command on a lent GPU machine (Python 3.12 image without mamba-ssm): installs
# the prebuilt mamba-ssm / causal-conv1d wheels carried in .whl/ (copied from ../shared/gpu-wheels) into /tmp/site.
# On a user's own GPU machine use `pip install -e .[gpu]` instead.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
