#!/usr/bin/env bash
# GRPO runs from a brought-back SFT-2 model need, on a bare lent GPU machine: the mamba-ssm and causal-conv1d
# wheels, the pure-Python wheels the image lacks, the curated data and the model (no teacher). This puts them in one
# tar stream cut into carry folders .gpu_c0, .gpu_c1, ..., each as large as a call carries beside the working tree:
# ~360 MB in 7 calls, where suite_carry + gpu_stash + the model's own folders take 11.
#   here:  bench/lent_gpu/grpo_carry.sh pack DATA_DIR MODEL_PARTS_DIR [WHEEL_DIR ...]
#          MODEL_PARTS_DIR holds model.tar.* as gpu_stash.sh model-out sent them (model-collect gathers them in
#          .gpu_model). WHEEL_DIRs default to ../shared/gpu-wheels and the pure-Python wheels gpu_stash.sh downloads.
#   there: bench/lent_gpu/grpo_carry.sh unpack .gpu_cK   one call per folder, back to back (a machine goes back ~30 s
#          after a call). The call that completes the stream checks its md5, installs the wheels into /tmp/site and
#          restores runs/gpu/data and runs/gpu/sft2/model.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
pack)
  data=${2:?usage: grpo_carry.sh pack DATA_DIR MODEL_PARTS_DIR [WHEEL_DIR ...]}
  parts=${3:?usage: grpo_carry.sh pack DATA_DIR MODEL_PARTS_DIR [WHEEL_DIR ...]}
  shift 3
  ls "$parts"/model.tar.* > /dev/null
  n=$(cat "$parts/model.parts" 2>/dev/null || ls "$parts"/model.tar.* | wc -l)
  [ "$(ls "$parts"/model.tar.* | wc -l)" -eq "$n" ] || { echo "grpo_carry: $parts holds $(ls "$parts"/model.tar.* | wc -l) of $n model parts" >&2; exit 1; }
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/wheels"
  if [ $# -eq 0 ]; then
    cp "${M1_GPU_WHEELS:-../shared/gpu-wheels}"/*.whl "$stage/wheels/"
    source bench/lent_gpu/pure_wheels.sh
    pure_wheels "$stage/wheels"
  else
    for d in "$@"; do cp "$d"/*.whl "$stage/wheels/" 2>/dev/null || true; done
  fi
  cp -r "$data" "$stage/data"
  cat "$parts"/model.tar.* > "$stage/model.tar"
  grep -qxF '/.gpu_c*/' .git/info/exclude 2>/dev/null || echo '/.gpu_c*/' >> .git/info/exclude
  rm -rf .gpu_c[0-9]*
  source bench/lent_gpu/carry_room.sh
  room=$(( $(carry_room) - 4096 ))  # the folder's small files beside its part
  [ "$room" -gt 0 ] || { echo "grpo_carry: the tree leaves no room for a carry" >&2; exit 1; }
  tar cf "$stage/stream.tar" -C "$stage" wheels data model.tar
  md5=$(md5sum < "$stage/stream.tar" | cut -d' ' -f1)
  split -b "$room" -d -a 2 "$stage/stream.tar" "$stage/part."
  count=$(ls "$stage"/part.* | wc -l)
  k=0
  for p in "$stage"/part.*; do
    mkdir -p ".gpu_c$k" && mv "$p" ".gpu_c$k/part"
    echo "$k" > ".gpu_c$k/index" && echo "$count" > ".gpu_c$k/count" && echo "$md5" > ".gpu_c$k/md5"
    k=$((k + 1))
  done
  du -sb .gpu_c[0-9]* ;;
unpack)
  src=${2:?usage: grpo_carry.sh unpack .gpu_cK}
  got=${M1_CARRY_DIR:-/var/tmp/m1-carry}
  mkdir -p "$got"
  cp "$src/part" "$got/part.$(printf %02d "$(cat "$src/index")")"
  cp "$src/count" "$src/md5" "$got/"
  have=$(ls "$got"/part.* | wc -l)
  if [ "$have" -lt "$(cat "$got/count")" ]; then echo "grpo_carry: $have of $(cat "$got/count") parts"; exit 0; fi
  [ "$(cat "$got"/part.* | md5sum | cut -d' ' -f1)" = "$(cat "$got/md5")" ] || { echo "grpo_carry: the stream does not match its md5" >&2; exit 1; }
  rm -rf "$got/x" && mkdir -p "$got/x"
  cat "$got"/part.* | tar xf - -C "$got/x"
  if ls "$got"/x/wheels/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$got"/x/wheels/*.whl
  fi
  rm -rf runs/gpu/data runs/gpu/sft2/model && mkdir -p runs/gpu/sft2
  mv "$got/x/data" runs/gpu/data
  tar xf "$got/x/model.tar" -C runs/gpu/sft2
  rm -rf "$got"
  echo "grpo_carry: runs/gpu/data and runs/gpu/sft2/model restored" ;;
*) echo "usage: bench/lent_gpu/grpo_carry.sh pack DATA_DIR MODEL_PARTS_DIR [WHEEL_DIR ...] | unpack .gpu_cK" >&2; exit 2 ;;
esac
