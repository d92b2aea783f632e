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

Its CSV, JSON and figure are written by speed_report.py, its command line is speed_cli.py (bench/speed.py). These
modules import only torch, transformers, numpy, matplotlib, tqdm and components.model, so bench/speed.py runs on a
bare GPU image (no pydantic, MLflow or Ray).
"""
from __future__ import annotations

import gc
import platform
import sys
import time

import torch
from tqdm.auto import tqdm

from components.model import HybridConfig, HybridForCausalLM, generate
from components.model.kernels import active_backend
from components.model.teacher import random_llama_config

# transformers is imported where its model or version is needed: seconds of start-up otherwise.

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
    lcfg = random_llama_config(shape)
    layers = SHAPE_ATTN.get(shape, []) if attn_layers is None else attn_layers
    return HybridConfig.from_llama(lcfg, attn_layers=list(layers), mixer=mixer)


def with_attn_layers(cfg, attn_layers: list[int]):
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
        if compiled:  # and the one-token run that times the first token has a static cache of its own length
            _run_once(engine, model, ids, 1, device, decode_engine, compiled)
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
