# The two commands the README opens with: `make run` (whole pipeline, embedded default) and `make test`.
SHELL := /bin/bash
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 \
       PREFECT_SERVER_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_DISABLE_TELEMETRY=1 \
       HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The embedded default on CPU; the `gpu` profile (larger budgets) when the venv's torch sees CUDA. Evaluated in the
# recipe, after `env` has made the venv. PROFILE=... overrides.
PROFILE ?= $(shell .venv/bin/python -c "import torch; print('gpu' if torch.cuda.is_available() else 'default')" 2>/dev/null || echo default)
PYTEST_ARGS ?=

.PHONY: env run test test-fast
env:
	@bash scripts/setup-env.sh

run: env
	.venv/bin/m1 pipeline --profile $(PROFILE)

# Two test processes, a test file each at a time (module fixtures stay in one process): the slow end-to-end tests
# spend much of their time waiting on servers and subprocesses, so two at once fit 2 cores (`make test XDIST=`:
# one process). Files are handed out in the order tests/conftest.py gives them (longest first), not re-sorted by
# their number of tests.
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
test: env
	.venv/bin/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: env
	.venv/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)
