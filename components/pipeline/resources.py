"""What each stage asks of the machine or cluster, for `m1 pipeline --dry-run` and for sizing Ray clusters.

A stage asks for two things: what the driver (the process running `m1 pipeline`, a Ray job's entrypoint) needs
while the stage runs (curate, convert, evaluate and register run in it, as do in-process learners), and the Ray
workers and actors the stage starts (Ray Train workers for distill/sft, learner workers plus rollout actors for
GRPO). The Ray part is computed from the stage's config section; the driver part is the stage's own estimate
(its registry `resources(config)`, for stages that do not use Ray) plus the GPU its in-process work takes,
overridden key by key by `pipeline.resources.<stage>` in params. Teacher sizes come from the teacher's config;
hub teachers that cannot be reached (this machine is offline) fall back to the known shapes below, so a cluster
recipe can be validated and sized anywhere."""
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


def _gpu(flag: str) -> bool | None:
    """use_gpu "yes"/"no"; "auto" (GPU when the driver sees CUDA) is None: counted without one, and shown."""
    return {"yes": True, "no": False}.get(flag)


def _worker(use_gpu: bool | None) -> dict:
    # Ray Train's ScalingConfig default with resources_per_worker unset (how train/stage.py and grpo/stage.py
    # build it): a GPU worker reserves one GPU and no CPU, a CPU worker one CPU (Ray 2.60; the Train V2
    # controller reserves nothing). The registry's own estimate counts a CPU per GPU worker: this one wins.
    return {"cpus": 0, "gpus": 1} if use_gpu else {"cpus": 1, "gpus": 0}


def _ray_and_driver(config, stage) -> tuple[list[dict], dict] | None:
    """The Ray groups a stage starts ({"what", "count", "cpus", "gpus"}) and the GPU its driver-side work takes;
    None for a stage whose own estimate stands (one that runs in the driver, or a Ray stage not known here)."""
    from components.grpo.config import GRPOConfig
    from components.train.config import TrainConfig

    section = stage.settings(config)
    if stage.uses_ray and isinstance(section, TrainConfig):
        gpu = _gpu(section.use_gpu)
        auto = {"gpu_auto": True} if gpu is None else {}
        # num_workers 0 trains in the driver; a teacher top-k store is computed in the driver before workers start
        in_driver = section.num_workers == 0 or section.teacher_topk > 0
        groups = [{"what": "workers", "count": section.num_workers, **_worker(gpu)}] if section.num_workers else []
        return groups, {**auto, **({"gpus": 1} if in_driver and gpu else {})}
    if stage.uses_ray and isinstance(section, GRPOConfig):
        gpu = _gpu(section.use_gpu)
        auto = {"gpu_auto": True} if gpu is None else {}
        groups = []
        if section.learner_workers:
            groups.append({"what": "learners", "count": section.learner_workers, **_worker(gpu)})
        if section.rollout_workers:  # components.grpo.rollout.RolloutPool reads CPU and GPU only
            r = section.rollout_resources
            groups.append({"what": "rollout actors", "count": section.rollout_workers,
                           "cpus": r.get("CPU", 1), "gpus": r.get("GPU", 0)})
        # learner_workers 0: the learner (and, without actors, the rollouts) run in the driver
        return groups, {**auto, **({"gpus": 1} if section.learner_workers == 0 and gpu else {})}
    if stage.name == "evaluate":
        ev = config.evaluate
        devices = [ev.device] + ([ev.speed.device] if ev.speed.enabled else [])
        if any(d.startswith("cuda") for d in devices):
            return [], {"gpus": 1}
        return [], {"gpu_auto": True} if "auto" in devices else {}
    return None


def stage_resources(config, stage) -> dict:
    """{"driver": {...}, "ray": [groups], and the stage's totals: nodes, cpus, gpus, memory_gb, gpu_type}."""
    known = _ray_and_driver(config, stage)
    if known is None:
        groups, est = [], dict(stage.resources(config)) if stage.resources else {}
    else:  # the registry's estimate of a Ray stage describes its workers, recomputed above
        groups, est = known
    driver = {"nodes": 1, "cpus": 1, "gpus": 0, **est}
    ask = config.pipeline.resources.get(stage.name)
    if ask is not None:
        driver.update(ask.model_dump(exclude_unset=True))
    total = {k: driver[k] for k in ("nodes", "memory_gb", "gpu_type", "gpu_auto") if driver.get(k)}
    total["cpus"] = driver["cpus"] + sum(g["count"] * g["cpus"] for g in groups)
    total["gpus"] = driver["gpus"] + sum(g["count"] * g["gpus"] for g in groups)
    return {"nodes": 1, **total, "driver": driver, "ray": groups}


def _amounts(r: dict) -> list[str]:
    parts = [f"{r.get('cpus', 1):g} CPU"]
    if r.get("gpus"):
        parts.append(f"{r['gpus']:g} GPU" + (f" ({r['gpu_type']})" if r.get("gpu_type") else ""))
    if r.get("memory_gb"):
        parts.append(f"{r['memory_gb']:g} GB")
    return parts


def format_resources(r: dict) -> str:
    """'33 CPU, 8 GPU: driver 1 CPU + Ray 4 learners x (0 CPU, 1 GPU) + 4 rollout actors x (8 CPU, 1 GPU)'."""
    text = (f"{r['nodes']} nodes x " if r.get("nodes", 1) > 1 else "") + ", ".join(_amounts(r))
    if r.get("ray"):
        text += ": driver " + ", ".join(_amounts(r["driver"])) + " + Ray " + " + ".join(
            f"{g['count']} {g['what']} x ({g['cpus']:g} CPU, {g['gpus']:g} GPU)" for g in r["ray"])
    if r.get("gpu_auto"):
        text += " (auto: + GPU where CUDA is visible)"
    return text
