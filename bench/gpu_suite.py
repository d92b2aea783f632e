"""GPU suite for one H100/H200: decode throughput, decode-step floors, training MFU (issue: GPU performance).

    python3 bench/gpu_suite.py anchors  --out DIR   # prompt 256 / decode 512: ours vs HF static cache (uncompiled
                                                    # and compiled) vs mamba_ssm engine, warm-ups reported apart
    python3 bench/gpu_suite.py decode   --out DIR   # prompt 256 / decode 4096 grid + floors (3B shape)
    python3 bench/gpu_suite.py train    --out DIR   # training tokens/s and MFU (SmolLM2 and 3B shapes; micro-batch,
                                                    # checkpointing, chunked LM-head CE, compiled MLPs: --train-runs)
    python3 bench/gpu_suite.py smollm2  --out DIR   # SmolLM2-sized pair, decode grid
    python3 bench/gpu_suite.py long --batches 64 --out DIR   # decode 1k/4k/16k at batch 64 and the largest batch
                                                          # (plots: bench/plot_gpu_results.py DIR)
    python3 bench/gpu_suite.py smollm2 --engine compiled --tag _compiled --out DIR   # our step via torch.compile
    python3 bench/gpu_suite.py decode --decode-attention triton --tag _triton --out DIR  # split-KV Triton attention
    python3 bench/gpu_suite.py smollm2 --state-dtype bf16 --tag _bf16state --out DIR     # SSM state stored in bf16

Imports only torch, transformers, numpy, matplotlib and components.model (the GPU image has no pydantic/Ray).
Weights are random (bf16): speed does not depend on their values. Throughput = batch * decoded tokens /
(prefill + decode seconds); CUDA-graph capture is a one-time cost, reported separately."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from components.model import HybridConfig, HybridForCausalLM, generate
from components.model.kernels import active_backend
from components.model.teacher import RANDOM_SHAPES, random_llama_config

SHAPES = {"llama-3.2-3b": [3, 8, 13, 18, 23, 27], "smollm2-135m": [4, 9, 14, 19, 24, 29]}


def ours(shape: str, attn: list[int], warm: bool = True) -> HybridForCausalLM:
    cfg = HybridConfig.from_llama(random_llama_config(shape), attn_layers=attn)
    with torch.device("cuda"):
        m = HybridForCausalLM(cfg)
    m = m.to(torch.bfloat16).eval()
    if warm:  # first calls JIT-compile Triton kernels and initialise cuBLAS: keep that out of the timings
        run_ours(m, 2, 256, 8)
    return m


# Our decode engine (--engine): "graph" (CUDA graphs of the eager step) or "compiled" (the step through
# torch.compile first; its compilation lands in the capture seconds, which tokens/s leaves out, as for graphs).
ENGINE = {"name": "graph", "state_dtype": "fp32"}  # --engine, --state-dtype
STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_ours(model, batch: int, prompt: int, decode: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(100, 1000, (batch, prompt), generator=g).tolist()
    out = generate(model, prompts, decode, greedy=True, eos_token_ids=[], engine=ENGINE["name"],
                   state_dtype=STATE_DTYPES[ENGINE["state_dtype"]])
    t = out.timings
    return {"prefill_s": t["prefill"], "capture_s": t["capture"], "decode_s": t["decode"],
            "tokens_per_s": batch * decode / (t["prefill"] + t["decode"]),
            "decode_tokens_per_s": batch * decode / t["decode"], "ms_per_step": 1e3 * t["decode"] / decode}


def hf_model(shape: str):
    from transformers import LlamaForCausalLM

    with torch.device("cuda"):
        m = LlamaForCausalLM(random_llama_config(shape))
    return m.to(torch.bfloat16).eval()


def run_hf(model, batch: int, prompt: int, decode: int, compile: bool = False) -> dict:
    """HF generate with a static cache, uncompiled or with torch.compile (what a careful transformers user runs).
    Compiled, the warm-up is a full-length call of the same shape, so compilation (and any recompilation for the
    cache's length) happens there; its seconds are reported apart, not in tokens/s."""
    ids = torch.randint(100, 1000, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=decode, min_new_tokens=decode, do_sample=False, cache_implementation="static",
              disable_compile=not compile, pad_token_id=0, attention_mask=torch.ones_like(ids))
    warm = kw if compile else {**kw, "max_new_tokens": 4, "min_new_tokens": 4}
    t = time.perf_counter()
    model.generate(ids, **warm)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens_per_s": batch * decode / dt, "warmup_s": warmup_s}


def mamba_ssm_model(shape: str, attn: list[int]):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    s = RANDOM_SHAPES[shape]
    hd = s.get("head_dim") or s["hidden_size"] // s["num_attention_heads"]
    cfg = MambaConfig(d_model=s["hidden_size"], d_intermediate=s["intermediate_size"], n_layer=s["num_hidden_layers"],
                      vocab_size=s["vocab_size"], ssm_cfg={"layer": "Mamba1", "expand": 1, "d_state": 16},
                      attn_layer_idx=attn, attn_cfg={"num_heads": s["num_attention_heads"], "num_heads_kv":
                                                     s["num_key_value_heads"], "head_dim": hd, "causal": True},
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, tie_embeddings=True)
    return MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()


def run_mamba_ssm(model, batch: int, prompt: int, decode: int) -> dict:
    ids = torch.randint(100, 1000, (batch, prompt), device="cuda")
    # warm-up at the max length it is timed at: its CUDA-graph cache is keyed by (batch, max length), and a shorter
    # warm-up left the capture inside the timed call
    t = time.perf_counter()
    model.generate(ids, max_length=prompt + decode, cg=True, top_k=1)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_length=prompt + decode, cg=True, top_k=1)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens_per_s": batch * decode / dt, "warmup_s": warmup_s}


def hbm_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    return bw


def step_bytes(cfg: HybridConfig, batch: int, kv_len: int, weight_bytes: int) -> float:
    """Bytes one decode step must move: every weight once, the attention layers' KV up to kv_len, and each Mamba
    layer's conv (bf16) and SSM (fp32, or bf16 with --state-dtype bf16) state read and written."""
    n_attn = len(cfg.attn_layers)
    n_mamba = cfg.num_hidden_layers - n_attn
    kv = n_attn * batch * kv_len * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    ssm_bytes = STATE_DTYPES[ENGINE["state_dtype"]].itemsize
    state = n_mamba * batch * 2 * (cfg.d_inner * cfg.d_conv * 2 + cfg.d_inner * cfg.d_state * ssm_bytes)
    return weight_bytes + kv + state


def floor_ms(model, batch: int, prompt: int, decode: int, bw: float) -> float:
    cfg = model.config
    wb = sum(p.numel() * p.element_size() for p in model.parameters())  # tied embeddings counted once
    mean_bytes = sum(step_bytes(cfg, batch, prompt + i + 1, wb) for i in range(0, decode, 16)) / len(range(0, decode, 16))
    return 1e3 * mean_bytes / bw


def max_batch(model, prompt: int, decode: int, budget_frac: float = 0.9) -> int:
    cfg = model.config
    free, _ = torch.cuda.mem_get_info()
    # cache + logit rows + the prefill's largest activations (in_proj/MLP outputs of one layer, bf16)
    act = prompt * 2 * (2 * cfg.d_inner + 2 * cfg.d_xb + 3 * cfg.intermediate_size + 4 * cfg.hidden_size)
    per_seq = step_bytes(cfg, 1, prompt + decode, 0) + 4 * cfg.vocab_size * 4 + act
    return int(free * budget_frac // per_seq)


def meta() -> dict:
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "kernels": active_backend("cuda"), "engine": ENGINE["name"],
            "state_dtype": ENGINE["state_dtype"], "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M")}


# Rows measured so far, rewritten to <out>/<name>.partial.json after each one, so that a run stopped by its time
# limit keeps what it measured; the complete file replaces it at the end. "rows": those of finished sub-runs (long).
PARTIAL: dict = {"path": None, "rows": []}


def emit(rows: list[dict]) -> None:
    print(rows[-1], flush=True)
    if PARTIAL["path"]:
        Path(PARTIAL["path"]).write_text(json.dumps({"meta": meta(), "complete": False,
                                                     "rows": PARTIAL["rows"] + rows}, indent=1))


def free(*objs):
    for o in objs:
        del o
    gc.collect()
    torch.cuda.empty_cache()


def cmd_anchors(a) -> dict:
    rows, shape, P, D = [], "llama-3.2-3b", 256, 512
    models = (("hybrid", SHAPES[shape]), ("attention", list(range(28))))

    def sweep(engine, name, m, run):
        for b in a.batches:
            rows.append({"engine": engine, "model": name, "batch": b, **run(m, b, P, D)})
            emit(rows)
        free(m)

    for name, attn in models:
        sweep("m1", name, ours(shape, attn), run_ours)
    m = hf_model(shape)
    for b in a.batches:
        d = 128 if b == 1 else D  # batch 1 runs at ~10 tokens/s: fewer tokens, same rate
        rows.append({"engine": "hf_static", "model": "attention", "batch": b, **run_hf(m, b, P, d)})
        emit(rows)
    for b in a.batches:
        try:
            rows.append({"engine": "hf_compiled", "model": "attention", "batch": b,
                         **run_hf(m, b, P, D, compile=True)})
        except Exception as e:  # recorded, not hidden: the row says why it is missing
            rows.append({"engine": "hf_compiled", "model": "attention", "batch": b, "error": repr(e)[:300]})
        emit(rows)
    free(m)
    try:
        for name, attn in models:
            sweep("mamba_ssm", name, mamba_ssm_model(shape, attn), run_mamba_ssm)
    except Exception as e:  # recorded, not hidden: the comparison row is then missing
        rows.append({"engine": "mamba_ssm", "error": repr(e)[:300]})
    return {"meta": meta(), "prompt": P, "decode": D, "rows": rows}


def cmd_decode(a) -> dict:
    shape, P, D = a.shape, 256, a.decode
    bw = hbm_bandwidth()
    rows = []
    for name, attn in (("hybrid", SHAPES[shape]), ("attention", list(range(RANDOM_SHAPES[shape]["num_hidden_layers"])))):
        if name not in a.models:
            continue
        m = ours(shape, attn)
        top = max_batch(m, P, D)
        for b in sorted(set([x for x in a.batches if x <= top] + ([] if a.no_largest else [top]))):
            try:
                r = run_ours(m, b, P, D)
            except torch.OutOfMemoryError:
                rows.append({"model": name, "batch": b, "oom": True})
                emit(rows)
                free()
                continue
            fl = floor_ms(m, b, P, D, bw)
            rows.append({"model": name, "batch": b, "decode": D, "largest": b == top, **r, "floor_ms_per_step": fl,
                         "step_over_floor": r["ms_per_step"] / fl, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9})
            torch.cuda.reset_peak_memory_stats()
            emit(rows)
        free(m)
    return {"meta": meta(), "shape": shape, "prompt": P, "decode": D, "hbm_bytes_per_s": bw, "rows": rows}


def length_ratios(rows: list[dict], batch: int) -> list[dict]:
    """Per decode length, the hybrid's tokens/s over the all-attention model's, at `batch` and at each model's
    largest batch (rows of cmd_long; OOM rows and missing pairs left out)."""
    out = []
    for length in sorted({r["decode"] for r in rows}):
        at = [r for r in rows if r["decode"] == length and "oom" not in r]
        for kind, pick in ((f"batch {batch}", lambda r: r["batch"] == batch), ("largest", lambda r: r.get("largest"))):
            pair = {r["model"]: r for r in at if pick(r)}
            if "hybrid" in pair and "attention" in pair:
                h, a = pair["hybrid"], pair["attention"]
                out.append({"decode": length, "at": kind, "hybrid_batch": h["batch"], "attention_batch": a["batch"],
                            "hybrid_tokens_per_s": h["tokens_per_s"], "attention_tokens_per_s": a["tokens_per_s"],
                            "ratio": h["tokens_per_s"] / a["tokens_per_s"]})
    return out


def cmd_long(a) -> dict:
    """Long generations (issue 20, item 3): prompt 256, decode each of --lengths, at --batches (default 64) and at
    each model's largest batch; the hybrid/all-attention ratio per length, which should grow with length (the
    attention model's KV cache grows, the hybrid's state does not)."""
    rows = []
    for length in a.lengths:
        res = cmd_decode(argparse.Namespace(**{**vars(a), "decode": length}))
        rows += [{**r, "decode": length} for r in res["rows"]]
        PARTIAL["rows"] = list(rows)
    out = {"meta": meta(), "shape": a.shape, "prompt": 256, "lengths": a.lengths, "rows": rows,
           "ratios": length_ratios(rows, a.batches[0])}
    return out


# Training configurations (--train-runs): SHAPE:MICRO_BATCH:CKPT:LOSS[:compile], CKPT "ckpt" (gradient
# checkpointing of every layer) or "none", LOSS "plain" (full logits, F.cross_entropy) or "chunked"
# (components/model/linear_ce.py: no tokens x vocab logits kept), "compile" = each layer's MLP through torch.compile.
TRAIN_RUNS = ("smollm2-135m:8:none:plain,smollm2-135m:32:none:chunked,"
              "llama-3.2-3b:2:ckpt:plain,llama-3.2-3b:8:ckpt:chunked,llama-3.2-3b:2:none:chunked,"
              "llama-3.2-3b:4:none:chunked,llama-3.2-3b:4:none:chunked:compile")


def parse_train_runs(spec: str) -> list[dict]:
    runs = []
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) not in (4, 5) or parts[0] not in SHAPES or parts[2] not in ("ckpt", "none") \
                or parts[3] not in ("plain", "chunked") or parts[4:] not in ([], ["compile"]):
            raise SystemExit(f"--train-runs: bad entry {item!r} (SHAPE:MICRO_BATCH:ckpt|none:plain|chunked[:compile])")
        runs.append({"shape": parts[0], "batch": int(parts[1]), "grad_ckpt": parts[2] == "ckpt",
                     "loss": parts[3], "compile_mlp": parts[4:] == ["compile"]})
    return runs


def train_loss(m, ids: torch.Tensor, loss: str) -> torch.Tensor:
    """Token-mean next-token CE: the plain path materialises fp32 logits (batch x seq x vocab) and their gradient;
    the chunked one is what the fine-tuning stages run: forward(targets=...), the LM head 4096 tokens at a time."""
    from components.model.linear_ce import IGNORE_INDEX

    if loss == "plain":
        return torch.nn.functional.cross_entropy(m(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    return m(ids, targets=targets) / ids[:, 1:].numel()


def cmd_train(a) -> dict:
    """Training tokens/s and MFU per configuration, fp32 master weights, bf16 autocast, fused AdamW, sequence 2048,
    mean of steps 3-6. MFU = tokens/s x flops_per_token / 989e12 (H100/H200 dense bf16), flops_per_token = 6N +
    6 x attention layers x q_dim x seq (components.train.loop.flops_per_token: forward + backward of every weight
    matmul, LM head included through the tied embedding, plus causal attention scores; the selective scan's
    FLOPs are not counted). A configuration that does not fit is recorded with its error."""
    from components.train.loop import flops_per_token

    rows, seq = [], 2048
    for run in parse_train_runs(a.train_runs):
        shape, batch = run["shape"], run["batch"]
        m = opt = None
        try:
            m = ours(shape, SHAPES[shape], warm=False).float().train()
            m.gradient_checkpointing_enable(run["grad_ckpt"])
            if run["compile_mlp"]:
                for layer in m.model.layers:
                    layer.mlp = torch.compile(layer.mlp)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
            ids = torch.randint(0, 1000, (batch, seq), device="cuda")
            times = []
            for _ in range(6):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = train_loss(m, ids, run["loss"])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            dt = sum(times[2:]) / len(times[2:])
            tps = batch * seq / dt
            fpt = flops_per_token(m, seq)
            rows.append({**run, "seq_len": seq, "step_s": dt, "first_step_s": times[0], "tokens_per_s": tps,
                         "tflops": tps * fpt / 1e12, "mfu": tps * fpt / 989e12,
                         "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9})
        except torch.cuda.OutOfMemoryError as e:
            rows.append({**run, "seq_len": seq, "error": f"out of memory: {str(e).splitlines()[0][:200]}"})
        emit(rows)
        free(m, opt)
        torch.cuda.reset_peak_memory_stats()
    return {"meta": meta(), "peak_tflops_bf16": 989.0, "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["anchors", "decode", "train", "smollm2", "long"])
    ap.add_argument("--lengths", default="1024,4096,16384", help="long: decode lengths")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,16,64,128,256")
    ap.add_argument("--decode", type=int, default=4096)
    ap.add_argument("--shape", default="llama-3.2-3b")
    ap.add_argument("--models", default="hybrid,attention")
    ap.add_argument("--train-runs", default=TRAIN_RUNS,
                    help="train: SHAPE:MICRO_BATCH:ckpt|none:plain|chunked[:compile], comma-separated")
    ap.add_argument("--no-largest", action="store_true",
                    help="decode/smollm2/long: only --batches, not also the largest batch that fits (at long decode "
                         "lengths the largest batch takes minutes per model)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--engine", choices=["graph", "compiled"], default="graph",
                    help="our decode engine: CUDA graphs of the step, or of the step compiled by torch.compile first")
    ap.add_argument("--decode-attention", choices=["sdpa", "triton"],
                    default=os.environ.get("M1_DECODE_ATTENTION", "sdpa"),
                    help="the decode step's attention: SDPA, or the split-KV Triton kernel (flash_decode.py); "
                         "default: M1_DECODE_ATTENTION, else sdpa")
    ap.add_argument("--mamba-decode", choices=["kernels", "triton"],
                    default=os.environ.get("M1_MAMBA_DECODE", "kernels"),
                    help="a Mamba-1 layer's decode step: mamba_ssm/causal_conv1d kernels and the copies between them, "
                         "or one Triton kernel between the projections (mamba_decode.py); default: M1_MAMBA_DECODE")
    ap.add_argument("--state-dtype", choices=sorted(STATE_DTYPES), default="fp32",
                    help="the Mamba layers' SSM state between decode steps (its logit drift: bench/state_dtype_drift.py)")
    a = ap.parse_args()
    ENGINE["name"], ENGINE["state_dtype"] = a.engine, a.state_dtype
    os.environ["M1_DECODE_ATTENTION"] = a.decode_attention  # recorded in meta()'s kernels
    os.environ["M1_MAMBA_DECODE"] = a.mamba_decode
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.models = a.models.split(",")
    a.lengths = [int(x) for x in a.lengths.split(",") if x]
    if a.what == "smollm2":
        a.shape = "smollm2-135m"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    name = {"decode": f"decode_{a.shape}", "smollm2": f"decode_{a.shape}", "long": f"long_{a.shape}"}.get(a.what, a.what) + a.tag
    partial = Path(a.out) / f"{name}.partial.json"
    PARTIAL["path"] = str(partial)
    res = {"anchors": cmd_anchors, "decode": cmd_decode, "train": cmd_train, "smollm2": cmd_decode,
           "long": cmd_long}[a.what](a)
    (Path(a.out) / f"{name}.json").write_text(json.dumps(res, indent=1))
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
