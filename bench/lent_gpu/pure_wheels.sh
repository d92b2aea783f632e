#!/usr/bin/env bash
# Sourced: pure_wheels DEST downloads into DEST the cp312 manylinux wheels of the project's dependencies that the
# lent GPU image lacks, at the versions resolved in .venv (for its Python 3.12).
pure_wheels() {
  local pins
  pins=$(.venv/bin/python - <<'PY'
import importlib.metadata as m
for d in ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "math-verify",
          "latex2sympy2_extended", "antlr4-python3-runtime", "gguf", "datasketch"]:
    print(f"{d}=={m.version(d)}")
PY
)
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" $pins
}
