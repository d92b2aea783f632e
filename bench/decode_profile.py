"""What one decode step runs (issue 20, item 1: "profile the decode step: which kernels, how many, bytes moved
each"), for the hybrid and the all-attention model of one shape at given batches.

    python bench/decode_profile.py --shape smollm2-135m --batches 1,64 --out docs/results/speed/decode_ops_cpu.json
    python3 bench/decode_profile.py --shape llama-3.2-3b --batches 1,128 --out DIR/decode_profile_h200.json  # on a GPU

Two views of the same fixed-shape step (`HybridForCausalLM.decode_step`, the one CUDA graphs capture), after a
prompt of --prompt random tokens, weights random (bf16 on a GPU, fp32 on CPU):
- op census, on any device: every aten op the step dispatches (a TorchDispatchMode), with the bytes of its tensor
  inputs (read) and outputs (written): how many ops a step issues, per layer kind, and where the bytes go. On CPU
  the Mamba layers take the torch path (conv_step, scan.selective_state_step); on a GPU mamba_ssm's and
  causal_conv1d's kernels (and the Triton attention) replace those ops and do not pass through aten, so the census
  does not see them: the timeline does.
- kernel timeline, on CUDA only: torch.profiler over --steps eager steps: CUDA kernels per step by name (count,
  microseconds), the GPU's busy time against the step's wall time (the gap is launch overhead, which CUDA graphs
  remove but which still shows as one kernel after another).
The floor of a step is its bytes at full memory bandwidth (bench/gpu_suite.py step_bytes); the census gives the
same bytes op by op.

Simplifications: bytes are tensor sizes (a view counts its own elements; an op that reads a tensor twice counts it
once; an in-place op reads and writes its whole first argument, except the row ops of ROW_OPS); the external
kernels' bytes are not counted; one step at the first KV bucket.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.model import HybridConfig, HybridForCausalLM
from components.model.decode import StaticDecoder
from components.model.teacher import RANDOM_SHAPES, random_llama_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import SHAPES as SUITE_SHAPES

SHAPES = {**SUITE_SHAPES, "tiny": [1]}  # the suite's attention layers per shape; tiny for the tests
# ops that move no data (metadata, views) are listed apart from the ones that launch work
VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "split", "split_with_sizes", "t",
            "transpose", "permute", "unsqueeze", "squeeze", "as_strided", "detach", "alias", "unbind", "lift_fresh",
            "_reshape_alias", "view_as"}


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.data_ptr(), t.numel(), t.dtype) not in seen:
            seen.add((t.data_ptr(), t.numel(), t.dtype))
            total += t.numel() * t.element_size()
    return total


# ops that touch only some rows of their first argument: an embedding lookup reads the rows it returns, a
# KV-cache or mask write (index_copy_, index_fill_) reads and writes only the slots it is given
ROW_OPS = {"embedding", "index_copy_", "index_fill_", "index_put_", "index_select"}


class OpCensus(TorchDispatchMode):
    """Records (op, bytes read, bytes written) for every aten op dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = tree_flatten((args, kwargs))[0]
        if name in ROW_OPS:
            rest = _bytes(tensors[1:])
            moved = _bytes(tree_flatten(out)[0]) if name in ("embedding", "index_select") else rest
            self.ops.append((name, rest + (moved if name in ("embedding", "index_select") else 0), moved))
        else:
            self.ops.append((name, _bytes(tensors), _bytes(tree_flatten(out)[0])))
        return out


def build(shape: str, attn: list[int], device: str, dtype) -> HybridForCausalLM:
    cfg = HybridConfig.from_llama(random_llama_config(shape), attn_layers=attn)
    torch.manual_seed(0)
    with torch.device(device):
        m = HybridForCausalLM(cfg)
    return m.to(dtype).eval()


@torch.no_grad()
def ready_step(model, batch: int, prompt: int):
    """A cache after a prompt of random tokens, and the fixed-shape step over it (no graphs: every op visible)."""
    dev = next(model.parameters()).device
    ids = torch.randint(100, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(dev)
    cache = model.new_cache(batch, prompt + 64)
    model(ids, cache=cache, logits_to_keep=1)
    dec = StaticDecoder(model, cache, bucket_size=64, graphs=False)
    tok = ids[:, -1:].clone()
    return dec, tok


@torch.no_grad()
def op_census(model, batch: int, prompt: int) -> dict:
    dec, tok = ready_step(model, batch, prompt)
    b = dec.bucket()
    dec.step_fn(tok, dec.cache, b)  # warm: lazily made workspaces stay out of the census
    with OpCensus() as census:
        dec.step_fn(tok, dec.cache, b)
    work = [(n, r, w) for n, r, w in census.ops if n not in VIEW_OPS]
    by_op: dict[str, dict] = defaultdict(lambda: {"count": 0, "read_bytes": 0, "written_bytes": 0})
    for n, r, w in work:
        e = by_op[n]
        e["count"] += 1
        e["read_bytes"] += r
        e["written_bytes"] += w
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    n_attn = len(cfg.attn_layers)
    return {"ops_per_step": len(work), "view_ops_per_step": len(census.ops) - len(work),
            "ops_per_layer": len(work) / cfg.num_hidden_layers,
            "read_bytes": sum(r for _, r, _ in work), "written_bytes": sum(w for _, _, w in work),
            "weight_bytes": weights, "attention_layers": n_attn, "mamba_layers": cfg.num_hidden_layers - n_attn,
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["read_bytes"] - kv[1]["written_bytes"]))}


def kernel_timeline(model, batch: int, prompt: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    dec, tok = ready_step(model, batch, prompt)
    b = dec.bucket()
    snap = dec.cache.snapshot()
    with torch.no_grad():
        for _ in range(3):
            dec.step_fn(tok, dec.cache, b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                dec.step_fn(tok, dec.cache, b)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
    dec.cache.restore(snap)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.name and not e.name.startswith("Memcpy")]
    count, micros = Counter(), Counter()
    for e in kernels:
        count[e.name] += 1
        micros[e.name] += e.time_range.elapsed_us()
    busy = sum(micros.values()) / steps
    return {"kernels_per_step": len(kernels) / steps, "gpu_busy_us_per_step": busy,
            "wall_us_per_step_eager": wall * 1e6, "busy_share": busy / (wall * 1e6),
            "kernels": [{"name": n[:160], "per_step": count[n] / steps, "us_per_step": micros[n] / steps}
                        for n, _ in micros.most_common(40)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="profiled eager steps (CUDA only)")
    ap.add_argument("--models", default="hybrid,attention")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    layers = RANDOM_SHAPES[a.shape]["num_hidden_layers"]
    rows = []
    for name, attn in (("hybrid", SHAPES[a.shape]), ("attention", list(range(layers)))):
        if name not in a.models.split(","):
            continue
        model = build(a.shape, attn, dev, dtype)
        for batch in (int(x) for x in a.batches.split(",")):
            row = {"model": name, "batch": batch, "census": op_census(model, batch, a.prompt)}
            if cuda:
                row["timeline"] = kernel_timeline(model, batch, a.prompt, a.steps)
            rows.append(row)
            c = row["census"]
            print(f"{name} b{batch}: {c['ops_per_step']} ops/step ({c['ops_per_layer']:.1f}/layer), "
                  f"{(c['read_bytes'] + c['written_bytes']) / 1e6:.1f} MB moved, weights {c['weight_bytes'] / 1e6:.1f} MB"
                  + (f", {row['timeline']['kernels_per_step']:.0f} kernels/step" if cuda else ""), flush=True)
        del model
    out = {"command": " ".join(["python bench/decode_profile.py", *(argv or sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
           "dtype": str(dtype), "torch": torch.__version__, "shape": a.shape, "prompt": a.prompt, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
