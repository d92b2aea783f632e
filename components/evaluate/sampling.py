"""Prompts and sampled completions: n samples per problem through components.model.generate, in batches.

The (problem, sample) pairs are sorted by prompt length (longest first) before batching so that rows of a batch
need little left padding; each batch gets its own seed derived from the run seed and the batch index, so the same
seed, problems and batch size give the same completions. A batch that runs out of GPU memory is split in halves
(each with a seed derived from its parent's) and retried.

Statistics: wall seconds, generate()'s own prefill / CUDA-graph capture / decode laps, and the decode throughput
(batch rows x decode steps per decode second, what the time-budget analysis uses by default).

Simplification: a batch runs until its longest row stops, so short rows wait for long ones, as in any static
batching engine.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from components.data.templating import Formatter
from components.evaluate.benchmarks import Problem
from components.evaluate.config import EvalConfig
from components.model import generate


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # eos | stop_string | length


def derived_seed(seed: int, *parts) -> int:
    h = hashlib.blake2b("/".join(str(p) for p in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % (2**63 - 1)


def prompt_texts(problems: list[Problem], tokenizer, cfg: EvalConfig, instruction: str,
                 system_prompt: str | None) -> tuple[list[str], list[bool]]:
    """Prompt text per problem and whether it is chat-templated."""
    pc = cfg.prompt
    fmt = Formatter(tokenizer, instruction, system_prompt) if pc.chat_template else None
    texts, templated = [], []
    for p in problems:
        if pc.use_dataset_prompt and p.prompt:
            texts.append(p.prompt)
            templated.append(True)
        elif fmt is not None:
            texts.append(fmt.prompt(p.problem))
            templated.append(True)
        else:
            texts.append(f"{p.problem}\n{instruction}" if instruction else p.problem)
            templated.append(False)
    return texts, templated


def tokenize_prompts(texts: list[str], tokenizer, templated: list[bool]) -> list[list[int]]:
    # A chat template writes its own BOS (Llama 3) or none (SmolLM2): adding one would change the prompt.
    return [tokenizer(t, add_special_tokens=not c)["input_ids"] for t, c in zip(texts, templated)]


def sample_completions(em, prompt_ids: list[list[int]], cfg: EvalConfig, seed: int, desc: str = "",
                       batch_size: int | None = None) -> tuple[list[list[Completion]], dict]:
    """n_samples completions per prompt (in sample order) and generation statistics."""

    batch_size = batch_size or cfg.batch_size

    n = cfg.n_samples
    jobs = sorted(((i, j) for i in range(len(prompt_ids)) for j in range(n)), key=lambda x: (-len(prompt_ids[x[0]]), x))
    out: list[list[Completion | None]] = [[None] * n for _ in prompt_ids]
    tok = em.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (em.eos_ids[0] if em.eos_ids else 0)
    gen_s, tokens = 0.0, 0
    laps = {"prefill": 0.0, "capture": 0.0, "decode": 0.0}
    decode_steps = 0  # rows x decode steps: every row of a batch costs a step until the batch's last row stops
    bar = tqdm(total=len(jobs), desc=f"generate {desc}".strip(), unit="sample", leave=False)
    splits = 0

    def run(chunk, key):
        nonlocal gen_s, tokens, decode_steps, splits
        t0 = time.perf_counter()
        try:
            res = generate(em.model, [prompt_ids[i] for i, _ in chunk], cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                           greedy=cfg.temperature <= 0, seed=derived_seed(seed, *key), eos_token_ids=em.eos_ids,
                           stop_strings=cfg.stop_strings or None, tokenizer=tok, pad_token_id=pad,
                           engine=cfg.decode_engine)
        except torch.cuda.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            torch.cuda.empty_cache()
            splits += 1
            half = len(chunk) // 2
            run(chunk[:half], (*key, 0))
            run(chunk[half:], (*key, 1))
            return
        gen_s += time.perf_counter() - t0
        for k in laps:
            laps[k] += (res.timings or {}).get(k, 0.0)
        decode_steps += len(chunk) * max(max((len(t) for t in res.tokens), default=0) - 1, 0)
        for (i, j), toks, text, reason in zip(chunk, res.tokens, res.texts, res.finish_reasons):
            out[i][j] = Completion(text, len(toks), reason)
            tokens += len(toks)
        bar.update(len(chunk))

    for b, start in enumerate(range(0, len(jobs), batch_size)):
        run(jobs[start:start + batch_size], (b,))
    bar.close()
    stats = {"generate_s": gen_s, "generated_tokens": float(tokens),
             "effective_tokens_per_s": tokens / gen_s if gen_s > 0 else 0.0,
             "prefill_s": laps["prefill"], "capture_s": laps["capture"], "decode_s": laps["decode"],
             "decode_tokens_per_s": decode_steps / laps["decode"] if laps["decode"] > 0 else 0.0,
             "decode_row_steps": float(decode_steps),
             "prompt_tokens_mean": sum(len(p) for p in prompt_ids) / max(1, len(prompt_ids)),
             "batch_size": float(batch_size), "oom_splits": float(splits)}
    return out, stats
