"""What each stage asks of the machine or cluster, for `m1 pipeline --dry-run` and for Ray placement.

A stage's own estimate (its registry `resources(config)`) is overridden key by key by
`pipeline.resources.<stage>` in params. Teacher sizes come from the teacher's config; hub teachers that cannot
be reached (this machine is offline) fall back to the known shapes below, so a cluster recipe can be
validated and sized anywhere."""
from __future__ import annotations

import functools

from components.errors import M1Error

# Hub ids whose shapes are known offline (the names of components.model.teacher.RANDOM_SHAPES).
KNOWN_SHAPES = {
    "meta-llama/Llama-3.2-3B-Instruct": "llama-3.2-3b",
    "meta-llama/Llama-3.2-3B": "llama-3.2-3b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "smollm2": "smollm2-135m",
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@functools.lru_cache(maxsize=16)
def teacher_llama_config(source: str):
    """The teacher's LlamaConfig, from its files when reachable, else from a known shape; None if neither."""
    from components.model.teacher import load_teacher_config, random_llama_config

    if source.startswith("random:"):
        return random_llama_config(source.split(":", 1)[1])
    try:
        return load_teacher_config(source)
    except M1Error:
        if source in KNOWN_SHAPES:
            return random_llama_config(KNOWN_SHAPES[source])
        raise


def llama_parameters(cfg) -> int:
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    attn = h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_layer = attn + 3 * h * i + 2 * h
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return n * per_layer + emb + h


def teacher_memory_gb(config) -> float | None:
    """Memory to hold teacher and hybrid side by side while converting (weights only), in GB."""
    try:
        cfg = teacher_llama_config(config.teacher.source)
    except M1Error:
        return None
    return round(2 * llama_parameters(cfg) * _BYTES[config.teacher.dtype] / 1e9, 2)


def stage_resources(config, stage) -> dict:
    est = dict(stage.resources(config)) if stage.resources else {}
    ask = config.pipeline.resources.get(stage.name)
    if ask is not None:
        est.update(ask.model_dump(exclude_unset=True))
    return {"nodes": 1, "cpus": 1, "gpus": 0, **est}


def format_resources(r: dict) -> str:
    parts = []
    if r.get("nodes", 1) > 1:
        parts.append(f"{r['nodes']} nodes x")
    parts.append(f"{r.get('cpus', 1):g} CPU")
    if r.get("gpus"):
        parts.append(f"{r['gpus']:g} GPU" + (f" ({r['gpu_type']})" if r.get("gpu_type") else ""))
    if r.get("memory_gb"):
        parts.append(f"{r['memory_gb']:g} GB")
    return ", ".join(parts)
