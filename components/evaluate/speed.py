"""Generation-speed benchmark: the hybrid against a transformer of the same shape.

Engines, all with random weights of one shape (speed does not depend on trained weights):
  * hybrid     -- HybridForCausalLM with Mamba mixers except at `attn_layers`, decoded by components.model.generate;
  * attention  -- the same shape with every layer attention, same engine (the fair "same code" transformer);
  * hf_static  -- transformers' LlamaForCausalLM.generate with cache_implementation="static", uncompiled
                  (disable_compile=True: transformers would otherwise compile per cache shape inside the timed
                  run), or with its own compilation and a full-length warm-up of the same shape (--hf-compile).
Every configuration decodes exactly `decode_len` tokens (EOS disabled) greedily after a random prompt of
`prompt_len` tokens, for each batch size. Recorded per configuration: total seconds, time to first token (our
engine: its prefill lap; transformers: a separate run with one new token), decode latency per step =
(total - ttft) / (decode_len - 1), the CUDA-graph capture time of our engine (left out of total: a serving engine
captures once at start-up),
tokens/s = batch * decode_len / total, decode tokens/s = batch * (decode_len - 1) / (total - ttft), peak GPU memory
(torch.cuda.max_memory_allocated, weights included; blank on CPU) and the analytic size of the inference cache.
A configuration that runs out of memory is recorded as "oom" and larger batches of that engine and length are
skipped ("skipped_oom"); --time-limit-s stops starting new configurations once spent ("skipped_time").

Simplifications: greedy decoding (no sampling cost in either engine); one timed repetition per configuration after
one short warm-up run of the same batch and prompt shape; prompts are unpadded (equal lengths).

This module imports only torch, transformers, numpy, matplotlib, tqdm and components.model, so bench/speed.py
runs on a bare GPU image (no pydantic, MLflow or Ray).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from components.figures import save_figure

ENGINES = ("hybrid", "attention", "hf_static")
# Attention layers kept by the reference recipes for the named random shapes.
SHAPE_ATTN = {"tiny": [1, 3], "smollm2-135m": [4, 9, 14, 19, 24, 29], "llama-3.2-3b": [3, 8, 13, 18, 23, 27]}
CSV_FIELDS = ["shape", "engine", "decode_engine", "mixer", "attn_layers", "batch", "prompt_len", "decode_len", "status",
              "total_s", "ttft_s", "capture_s", "decode_ms_per_token", "tokens_per_s", "decode_tokens_per_s", "peak_mem_gib", "cache_gib",
              "weights_gib", "device", "device_name", "dtype", "torch", "transformers", "kernel_ssm", "kernel_conv",
              "command"]


# ----------------------------------------------------------------------------- models


def hybrid_config(shape: str, attn_layers: list[int] | None = None, mixer: str = "mamba1"):
    """HybridConfig of a named random Llama shape with the given (or the recipe's) attention layers."""
    from components.model import HybridConfig
    from components.model.teacher import random_llama_config

    lcfg = random_llama_config(shape)
    layers = SHAPE_ATTN.get(shape, []) if attn_layers is None else attn_layers
    return HybridConfig.from_llama(lcfg, attn_layers=list(layers), mixer=mixer)


def with_attn_layers(cfg, attn_layers: list[int]):
    from components.model import HybridConfig

    d = cfg.to_dict()
    d.pop("architectures", None)
    d["attn_layers"] = list(attn_layers)
    return HybridConfig.from_dict(d)


def llama_config(cfg):
    """transformers LlamaConfig with the shape of a HybridConfig (for the hf_static engine)."""
    from transformers import LlamaConfig

    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                     max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                     attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias, bos_token_id=cfg.bos_token_id,
                     eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    if hasattr(lc, "rope_parameters"):
        lc.rope_parameters = rope
    else:  # pragma: no cover - transformers 4.x
        lc.rope_theta, lc.rope_scaling = cfg.rope_theta, cfg.rope_scaling
    lc._attn_implementation = "sdpa"
    return lc


def build_model(engine: str, cfg, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised model for `engine`, built directly on `device` (a 3B model never touches the host)."""
    from components.model import HybridForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        if engine == "hybrid":
            model = HybridForCausalLM(cfg)
        elif engine == "attention":
            model = HybridForCausalLM(with_attn_layers(cfg, list(range(cfg.num_hidden_layers))))
        elif engine == "hf_static":
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(llama_config(cfg))
        else:
            raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    return model.to(dtype).eval()


def cache_bytes(engine: str, cfg, batch: int, max_len: int, elt: int) -> int:
    """Bytes of the decoding cache: KV for attention layers (K and V), conv + fp32 SSM state for Mamba layers."""
    kinds = ["attention"] * cfg.num_hidden_layers if engine != "hybrid" else cfg.layer_types
    total = 0
    for kind in kinds:
        if kind == "attention":
            total += 2 * batch * cfg.num_key_value_heads * max_len * cfg.head_dim * elt
        elif kind == "mamba1":
            total += batch * cfg.d_inner * (cfg.d_conv * elt + cfg.d_state * 4)
        else:
            nh = cfg.d_inner // cfg.mamba2_headdim
            total += batch * (3 * cfg.d_inner * cfg.d_conv * elt + nh * cfg.mamba2_headdim * cfg.head_dim * 4)
    return total


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(engine: str, model, ids: torch.Tensor, decode_len: int, device: torch.device,
              decode_engine: str = "auto", hf_compile: bool = False) -> dict:
    """Seconds of one generation: {"wall": ..., and for our engine generate()'s own prefill/capture/decode laps}."""
    from components.model import generate

    _sync(device)
    t0 = time.perf_counter()
    laps: dict = {}
    if engine == "hf_static":
        eos = model.config.eos_token_id
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_len,
                       min_new_tokens=decode_len, do_sample=False, cache_implementation="static",
                       pad_token_id=0, eos_token_id=eos, disable_compile=not hf_compile)
    else:
        out = generate(model, ids.tolist(), decode_len, greedy=True, eos_token_ids=[], seed=0, engine=decode_engine)
        laps = dict(out.timings or {})
    _sync(device)
    return {"wall": time.perf_counter() - t0, **laps}


def time_generation(engine: str, model, batch: int, prompt_len: int, decode_len: int, device: torch.device,
                    seed: int = 0, warmup: bool = True, decode_engine: str = "auto", hf_compile: bool = False) -> dict:
    """Time one configuration: {total_s, ttft_s, capture_s, decode_ms_per_token, tokens_per_s, decode_tokens_per_s,
    peak_mem_gib}. Our engine reports its own prefill / graph-capture / decode laps; total_s leaves the CUDA-graph
    capture out (a serving engine captures once at start-up) and ttft_s is its prefill. For transformers, ttft_s is
    a separate run with one new token."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
    compiled = engine == "hf_static" and hf_compile
    if warmup:
        # transformers compiles per static-cache shape: the warm-up of a compiled run must be the timed shape
        _run_once(engine, model, ids, decode_len if compiled else min(decode_len, 4), device, decode_engine, compiled)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    capture = None
    if engine == "hf_static":
        ttft = _run_once(engine, model, ids, 1, device, hf_compile=compiled)["wall"]
        total = _run_once(engine, model, ids, decode_len, device, hf_compile=compiled)["wall"]
    else:
        laps = _run_once(engine, model, ids, decode_len, device, decode_engine)
        capture = laps.get("capture", 0.0)
        ttft = laps.get("prefill", 0.0)
        total = laps["wall"] - capture
    decode_s = max(total - ttft, 1e-9)
    steps = max(decode_len - 1, 1)
    return {
        "total_s": total, "ttft_s": ttft, "capture_s": capture,
        "decode_ms_per_token": 1000 * decode_s / steps,
        "tokens_per_s": batch * decode_len / total,
        "decode_tokens_per_s": batch * steps / decode_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    # CPU allocation failures are plain RuntimeErrors ("DefaultCPUAllocator: can't allocate memory")
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate" in msg)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the grid


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype, command: str | None = None) -> dict:
    import transformers

    from components.model.kernels import active_backend

    kernels = active_backend(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "transformers": transformers.__version__, "kernel_ssm": kernels["ssm"],
            "kernel_conv": kernels["conv"], "cpu_threads": torch.get_num_threads(),
            "command": command if command is not None else " ".join(sys.argv)}


def run_speed(cfg, shape: str, engines: list[str], batch_sizes: list[int], prompt_len: int, decode_lens: list[int],
              device: torch.device, dtype: torch.dtype, seed: int = 0, warmup: bool = True, hf_compile: bool = False,
              time_limit_s: float | None = None, command: str | None = None, progress: bool = True,
              decode_engine: str = "auto") -> list[dict]:
    """Rows of the speed grid (one per engine x decode length x batch size), out-of-memory configurations included."""
    from tqdm.auto import tqdm

    env = environment(device, dtype, command)
    elt = torch.tensor([], dtype=dtype).element_size()
    started = time.time()
    rows: list[dict] = []
    total = len(engines) * len(decode_lens) * len(batch_sizes)
    bar = tqdm(total=total, desc="speed", unit="config", disable=not progress)
    for engine in engines:
        model = None
        try:
            model = build_model(engine, cfg, device, dtype, seed)
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
            build_error = None
        except Exception as e:
            if not _is_oom(e):
                raise
            build_error, weights = "oom", None
        for decode_len in decode_lens:
            stop = build_error
            for batch in sorted(batch_sizes):
                row = {"shape": shape, "engine": engine,
                       "decode_engine": "hf_generate" + ("_compiled" if hf_compile else "") if engine == "hf_static"
                       else (decode_engine if decode_engine != "auto" else ("graph" if device.type == "cuda" else "eager")),
                       "mixer": cfg.mixer if engine == "hybrid" else "",
                       "attn_layers": (",".join(map(str, cfg.attn_layers)) if engine == "hybrid" else "all"),
                       "batch": batch, "prompt_len": prompt_len, "decode_len": decode_len,
                       "cache_gib": cache_bytes(engine, cfg, batch, prompt_len + decode_len, elt) / 2**30,
                       "weights_gib": weights, **env}
                if time_limit_s is not None and time.time() - started > time_limit_s:
                    row["status"] = "skipped_time"
                elif stop:
                    row["status"] = "oom" if build_error else "skipped_oom"
                else:
                    try:
                        row.update(time_generation(engine, model, batch, prompt_len, decode_len, device, seed, warmup,
                                                   decode_engine, hf_compile))
                        row["status"] = "ok"
                    except Exception as e:
                        if not _is_oom(e):
                            raise
                        row["status"] = "oom"
                        stop = "oom"
                        _free(device)
                rows.append(row)
                bar.update(1)
                bar.set_postfix_str(f"{engine} b={batch} D={decode_len} {row['status']}")
        del model
        _free(device)
    bar.close()
    return rows


# ----------------------------------------------------------------------------- outputs


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in CSV_FIELDS})
    return path


def speedups(rows: list[dict]) -> list[dict]:
    """hybrid tokens/s divided by each other engine's, per (batch, decode_len) where both ran."""
    ok = {(r["engine"], r["batch"], r["decode_len"]): r["tokens_per_s"] for r in rows if r.get("status") == "ok"}
    out = []
    for (engine, b, d), tps in sorted(ok.items()):
        if engine != "hybrid":
            continue
        for other in ENGINES[1:]:
            if (other, b, d) in ok:
                out.append({"batch": b, "decode_len": d, "vs": other, "speedup": tps / ok[(other, b, d)]})
    return out


def plot_speed(rows: list[dict], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode_lens = sorted({r["decode_len"] for r in rows})
    fig, axes = plt.subplots(2, len(decode_lens), figsize=(max(8.0, 5.2 * len(decode_lens)), 7.5), squeeze=False)
    styles = {"hybrid": ("tab:red", "o"), "attention": ("tab:blue", "s"), "hf_static": ("tab:gray", "^")}
    for col, d in enumerate(decode_lens):
        for engine in ENGINES:
            pts = sorted((r["batch"], r) for r in rows if r["engine"] == engine and r["decode_len"] == d)
            ok = [(b, r) for b, r in pts if r.get("status") == "ok"]
            oom = [b for b, r in pts if r.get("status") in ("oom", "skipped_oom")]
            if not pts:
                continue
            c, m = styles[engine]
            label = engine + (f" (OOM at b>={min(oom)})" if oom else "")
            if ok:
                axes[0][col].plot([b for b, _ in ok], [r["tokens_per_s"] for _, r in ok], marker=m, color=c, label=label)
                axes[1][col].plot([b for b, _ in ok], [r["decode_ms_per_token"] for _, r in ok], marker=m, color=c,
                                  label=engine)
            elif oom:
                axes[0][col].plot([], [], marker=m, color=c, label=label)
        for row, ylabel in ((0, "generated tokens / s"), (1, "ms per decode step")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"decode {d} tokens")
        axes[0][col].legend(fontsize=8)
    return save_figure(fig, path, title)


def write_outputs(rows: list[dict], out_dir: str | Path, meta: dict, prefix: str = "speed") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(rows, out / f"{prefix}.csv")}
    js = out / f"{prefix}.json"
    js.write_text(json.dumps({**meta, "rows": rows, "speedups": speedups(rows)}, indent=2, default=str) + "\n")
    paths["json"] = js
    first = rows[0] if rows else {}
    title = (f"{meta.get('shape', '')}  prompt {first.get('prompt_len', '')}  {first.get('device_name', '')}  "
             f"{first.get('dtype', '')}  ssm={first.get('kernel_ssm', '')}")
    paths["png"] = plot_speed(rows, out / f"{prefix}.png", title) if rows else None
    return paths


# ----------------------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _engines(text: str) -> list[str]:
    names = [x for x in text.replace(" ", "").split(",") if x]
    bad = [x for x in names if x not in ENGINES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown engines {bad}; known: {', '.join(ENGINES)}")
    return names


def add_arguments(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    d = {"device": "auto", "shape": "tiny", "batch": [1, 4], "prompt_len": 256, "decode_len": [64, 512],
         "engines": list(ENGINES), "dtype": "auto", **(defaults or {})}
    p.add_argument("--device", default=d["device"], help="cpu, cuda, cuda:N or auto")
    p.add_argument("--shape", default=d["shape"], help=f"random Llama shape: {', '.join(SHAPE_ATTN)}")
    p.add_argument("--attn-layers", type=_ints, default=None, help="hybrid's attention layers (default: the recipe's)")
    p.add_argument("--mixer", choices=["mamba1", "mamba2"], default="mamba1")
    p.add_argument("--batch", type=_ints, default=d["batch"], help="batch sizes, e.g. 1,16,64,128,256")
    p.add_argument("--prompt-len", type=int, default=d["prompt_len"])
    p.add_argument("--decode-len", type=_ints, default=d["decode_len"], help="decode lengths, e.g. 512,4096")
    p.add_argument("--engines", type=_engines, default=d["engines"], help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d["dtype"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--hf-compile", action="store_true",
                   help="let transformers compile its static-cache forward (off: disable_compile=True)")
    p.add_argument("--decode-engine", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="our generate()'s decode engine (auto = CUDA graphs on CUDA, eager on CPU)")
    p.add_argument("--time-limit-s", type=float, default=None, help="start no new configuration after this")
    p.add_argument("--out", default=None, help="output directory for speed.csv / speed.json / speed.png")


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device {device} requested but CUDA is not available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def run_from_args(args, command: str | None = None) -> tuple[list[dict], dict]:
    dev, dt = resolve(args.device, args.dtype)
    cfg = hybrid_config(args.shape, args.attn_layers, args.mixer)
    meta = {"shape": args.shape, "attn_layers": cfg.attn_layers, "mixer": cfg.mixer,
            "layers": cfg.num_hidden_layers, **environment(dev, dt, command),
            "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = run_speed(cfg, args.shape, args.engines, args.batch, args.prompt_len, args.decode_len, dev, dt,
                     seed=args.seed, warmup=not args.no_warmup, hf_compile=args.hf_compile,
                     time_limit_s=args.time_limit_s, command=meta["command"], decode_engine=args.decode_engine)
    return rows, meta


def format_table(rows: list[dict]) -> str:
    lines = [f"{'engine':<10} {'batch':>5} {'decode':>6} {'status':<12} {'tok/s':>10} {'ms/step':>9} {'peak GiB':>8}"]
    for r in rows:
        ok = r.get("status") == "ok"
        pm = r.get("peak_mem_gib")
        tps = f"{r['tokens_per_s']:.1f}" if ok else "-"
        ms = f"{r['decode_ms_per_token']:.2f}" if ok else "-"
        mem = f"{pm:.2f}" if pm else "-"
        lines.append(f"{r['engine']:<10} {r['batch']:>5} {r['decode_len']:>6} {r['status']:<12} {tps:>10} {ms:>9} {mem:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/speed.py", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    command = "python3 bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, meta = run_from_args(args, command)
    out = Path(args.out or os.path.join("bench", "results", f"speed-{args.shape}-{meta['device'].replace(':', '')}"))
    paths = write_outputs(rows, out, meta)
    print(format_table(rows))
    for s in speedups(rows):
        print(f"hybrid vs {s['vs']:<9} b={s['batch']:<4} D={s['decode_len']:<5} x{s['speedup']:.2f}")
    print(f"wrote {', '.join(str(p) for p in paths.values() if p)}")
    return 0
