"""Batched cached generation: left-pad the prompts, prefill once, then decode one token at a time from the
Mamba states and the attention KV cache. Sampling (temperature, top-k, top-p, greedy) runs on the model's
device with a seeded generator; rows stop on EOS or a stop string. Per-token logprobs are those of the
temperature-scaled distribution before top-k/top-p truncation (the policy's own probabilities, as GRPO needs).
On CUDA the end-of-batch check syncs with the host only every `sync_every` tokens."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from components.model.decode import EagerDecoder, StaticDecoder


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per row, up to and including the stop token
    logprobs: list[list[float]]
    finish_reasons: list[str]  # "eos" | "stop_string" | "length"
    texts: list[str] | None = None
    prompt_lengths: list[int] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # seconds: prefill, capture (CUDA graphs), decode


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(F.softmax(sorted_logits, -1), -1)
        drop = cum - F.softmax(sorted_logits, -1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample_next(logits, temperature: float, top_k: int, top_p: float, greedy: bool, generator):
    """logits (b, V) -> (token (b,), logprob (b,))."""
    logits = logits.float()
    if greedy or temperature <= 0:
        tok = logits.argmax(-1)
        return tok, torch.gather(F.log_softmax(logits, -1), -1, tok[:, None])[:, 0]
    scaled = logits / temperature
    probs = F.softmax(filter_logits(scaled, top_k, top_p), -1)
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, torch.gather(F.log_softmax(scaled, -1), -1, tok[:, None])[:, 0]


ENGINES = ("eager", "static", "graph", "compiled")


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int = 64, *, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, greedy: bool = False, seed: int | None = 0,
             eos_token_ids: list[int] | None = None, stop_strings: list[str] | None = None, tokenizer=None,
             pad_token_id: int | None = None, sync_every: int = 16, progress: bool = False,
             engine: str = "auto", bucket_size: int = 256, state_dtype=torch.float32) -> GenerationOutput:
    """engine: "eager" (growing masks, any device), "static" (fixed-shape steps), "graph" (static + CUDA graphs),
    "compiled" (graph with the step compiled by torch.compile first; static + compiled off CUDA);
    "auto" = graph on CUDA, eager elsewhere. state_dtype: the Mamba layers' SSM state between steps, fp32 or bf16
    (components/model/cache.py)."""
    if not prompts:
        return GenerationOutput([], [], [], [] if tokenizer else None)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    cfg = model.config
    dev = next(model.parameters()).device
    eos = list(eos_token_ids) if eos_token_ids is not None else cfg.eos_ids
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0))
    ids, mask = left_pad(prompts, pad, dev)
    b, P = ids.shape
    gen = torch.Generator(device=dev)
    gen.manual_seed(0 if seed is None else seed)
    if engine == "auto":
        engine = "graph" if dev.type == "cuda" else "eager"
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r} (choose from auto, {', '.join(ENGINES)})")
    clock = _Clock(dev)
    cache = model.new_cache(b, P + max_new_tokens, state_dtype)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    clock.lap("prefill")
    decoder = EagerDecoder(model, cache) if engine == "eager" else \
        StaticDecoder(model, cache, bucket_size, graphs=engine in ("graph", "compiled"), compiled=engine == "compiled")
    if engine in ("graph", "compiled") and max_new_tokens > 1:
        decoder.capture_all(P + max_new_tokens)
    clock.lap("capture")
    eos_t = torch.tensor(eos or [-1], device=dev)
    out_tok = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=dev)
    out_lp = torch.zeros((b, max_new_tokens), device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    n_steps = 0
    stop_reason = ["length"] * b
    sync = 1 if dev.type == "cpu" else max(1, sync_every)
    for t in tqdm(range(max_new_tokens), disable=not progress, desc="decode", leave=False):
        tok, lp = sample_next(logits, temperature, top_k, top_p, greedy, gen)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        out_tok[:, t], out_lp[:, t] = tok, lp
        n_steps = t + 1
        hit_eos = torch.isin(tok, eos_t) & ~done
        if stop_strings:
            rows = (~done & ~hit_eos).nonzero()[:, 0].tolist()
            for i in rows:
                tail = tokenizer.decode(out_tok[i, max(0, t - 15): t + 1].tolist())
                if any(s in tail for s in stop_strings):
                    stop_reason[i] = "stop_string"
                    done[i] = True
        done |= hit_eos
        if (t + 1) % sync == 0 and bool(done.all()):
            break
        if t + 1 < max_new_tokens:
            logits = decoder.step(tok[:, None])
    clock.lap("decode")
    toks = out_tok[:, :n_steps].tolist()
    lps = out_lp[:, :n_steps].tolist()
    res_tokens, res_lps = [], []
    for i in range(b):
        n = n_steps
        for j, x in enumerate(toks[i]):
            if x in eos:
                n = j + 1
                stop_reason[i] = "eos" if stop_reason[i] == "length" else stop_reason[i]
                break
        if stop_reason[i] == "stop_string":
            n = _stop_string_end(tokenizer, toks[i], stop_strings)
        res_tokens.append(toks[i][:n])
        res_lps.append(lps[i][:n])
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in res_tokens] if tokenizer is not None else None
    return GenerationOutput(res_tokens, res_lps, stop_reason, texts, mask.sum(1).tolist(), clock.laps)


class _Clock:
    """Wall-clock laps; on CUDA each lap waits for the device (three syncs per generate call, none per token)."""

    def __init__(self, dev):
        self.dev, self.time, self.laps = dev, time.perf_counter, {}
        self.t = self.time()

    def lap(self, name: str) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        now = self.time()
        self.laps[name] = now - self.t
        self.t = now


def _stop_string_end(tokenizer, toks: list[int], stop_strings: list[str]) -> int:
    """Number of tokens up to and including the one that completes the first stop string."""
    for n in range(1, len(toks) + 1):
        text = tokenizer.decode(toks[max(0, n - 16):n])
        if any(s in text for s in stop_strings):
            return n
    return len(toks)
