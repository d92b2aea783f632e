"""Attention -> Mamba conversion (M1 / MambaInLlama initialisation).

For every layer not in `attn_layers` the attention block is replaced by a Mamba mixer whose in_proj rows
[z | x | B | C | dt] are filled as x <- v_proj, B <- k_proj, C <- q_proj, and out_proj <- o_proj; the z and dt
rows keep their default (PyTorch Linear) init, dt_proj's bias is the inverse softplus of a log-uniform dt in
[dt_min, dt_max] floored at dt_init_floor, A_log = log(1..d_state), D = 1. Kept attention layers, MLPs, norms,
embeddings and lm_head are copied. Nothing is frozen. Attention biases (absent in Llama) would be dropped:
in_proj has none, as in the reference."""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.errors import M1Error
from components.model.config import HybridConfig
from components.model.hybrid import HybridForCausalLM
from components.model.teacher import (
    load_any_teacher,
    load_any_tokenizer,
    load_teacher_config,
    random_llama_config,
)


def _llama_config_of(teacher):
    cfg = getattr(teacher, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama":
        kind = getattr(cfg, "model_type", type(teacher).__name__)
        raise M1Error(f"teacher is a {kind!r} model; only Llama-architecture teachers can be converted")
    return cfg


def convert(teacher: Any, attn_layers: list[int] | tuple[int, ...], mixer: str = "mamba1", *, d_state: int = 16,
            d_conv: int = 4, expand: int = 1, dt_min: float = 1e-3, dt_max: float = 0.1,
            dt_init_floor: float = 1e-4, conv_bias: bool = True, mamba2_headdim: int | None = None,
            seed: int = 0, dtype: torch.dtype | None = None) -> HybridForCausalLM:
    """Build a HybridForCausalLM from a transformers Llama model (or a source `load_teacher` accepts)."""
    if isinstance(teacher, (str, Path)):
        teacher = load_any_teacher(str(teacher))
    lcfg = _llama_config_of(teacher)
    cfg = HybridConfig.from_llama(
        lcfg, attn_layers=list(attn_layers), mixer=mixer, d_state=d_state, d_conv=d_conv, expand=expand,
        dt_rank=math.ceil(lcfg.hidden_size / 16), dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
        conv_bias=conv_bias, mamba2_headdim=mamba2_headdim)
    if cfg.d_inner != cfg.q_dim:
        raise M1Error(f"Mamba d_inner ({cfg.d_inner} = expand {expand} x hidden {cfg.hidden_size}) must equal the "
                      f"teacher's query width {cfg.q_dim} so C can be initialised from q_proj; use expand=1")
    if mixer == "mamba1" and cfg.head_dim % d_state:
        raise M1Error(f"d_state {d_state} must divide head_dim {cfg.head_dim}")
    src = teacher.state_dict()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HybridForCausalLM(cfg)
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.layers:
            if layer.kind != "attention":
                layer.mamba.reset_dt_parameters(gen)
    dst = model.state_dict()
    copied = init_from_teacher(cfg, src, dst)
    model.load_state_dict(dst)
    model._converted_keys = copied  # for inspection in tests
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def init_from_teacher(cfg: HybridConfig, src: dict, dst: dict) -> dict[str, str]:
    """Copy teacher tensors into the hybrid's state dict in place; returns {hybrid key/slice: teacher key}."""
    copied: dict[str, str] = {}

    def put(dkey: str, skey: str, rows: slice | None = None):
        t = src[skey]
        target = dst[dkey] if rows is None else dst[dkey][rows]
        if target.shape != t.shape:
            raise M1Error(f"shape mismatch copying {skey} {tuple(t.shape)} into {dkey} {tuple(target.shape)}")
        target.copy_(t.to(target.dtype))
        copied[dkey if rows is None else f"{dkey}[{rows.start}:{rows.stop}]"] = skey

    put("model.embed_tokens.weight", "model.embed_tokens.weight")
    put("model.norm.weight", "model.norm.weight")
    if not cfg.tie_word_embeddings:
        put("lm_head.weight", "lm_head.weight" if "lm_head.weight" in src else "model.embed_tokens.weight")
    di, dxb = cfg.d_inner, cfg.d_xb
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                     "mlp.up_proj.weight", "mlp.down_proj.weight"):
            put(p + name, p + name)
        if kind == "attention":
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                for suffix in ("weight", "bias"):
                    if p + f"self_attn.{proj}.{suffix}" in dst:
                        put(p + f"self_attn.{proj}.{suffix}", p + f"self_attn.{proj}.{suffix}")
            continue
        m = p + "mamba."
        put(m + "in_proj.weight", p + "self_attn.v_proj.weight", slice(di, di + dxb))
        put(m + "in_proj.weight", p + "self_attn.k_proj.weight", slice(di + dxb, di + 2 * dxb))
        put(m + "in_proj.weight", p + "self_attn.q_proj.weight", slice(di + 2 * dxb, 2 * di + 2 * dxb))
        put(m + "out_proj.weight", p + "self_attn.o_proj.weight")
    return copied


def check_attn_layers(source: str, attn_layers: list[int]) -> int:
    """Validate layer indices against the teacher's config alone; returns its layer count."""
    src = str(source)
    lcfg = random_llama_config(src.split(":", 1)[1]) if src.startswith("random:") else load_teacher_config(src)
    n = lcfg.num_hidden_layers
    bad = [i for i in attn_layers if not 0 <= i < n]
    if bad:
        raise M1Error(f"attention layer indices {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    return n


@dataclass
class ConvertOutputs:
    model_dir: str
    num_parameters: int
    attn_layers: list[int]
    mixer: str


def run(config, inputs: dict | None = None) -> ConvertOutputs:
    """Stage entry point: convert config.teacher into <run_dir>/convert/model (model + tokenizer)."""
    c = config.convert
    out = Path((inputs or {}).get("out_dir") or Path(config.run_dir) / "convert" / "model")
    return _publish(config, out, c.attn_layers)


def run_transformer(config, inputs: dict | None = None) -> ConvertOutputs:
    """Stage entry point of the transformer arm: the teacher in the hybrid's model class with every layer attention
    (its weights as they are, its logits the teacher's), into <run_dir>/transformer_init/model. Both arms then train,
    generate and are timed through the same code."""
    n = check_attn_layers(config.teacher.source, [])
    out = Path((inputs or {}).get("out_dir") or Path(config.run_dir) / "transformer_init" / "model")
    return _publish(config, out, list(range(n)))


def _publish(config, out: Path, attn_layers: list[int]) -> ConvertOutputs:
    c = config.convert
    check_attn_layers(config.teacher.source, attn_layers)  # fail before loading any weights
    teacher = load_any_teacher(config.teacher.source, config.teacher.dtype, seed=config.seed)
    model = convert(teacher, attn_layers, c.mixer, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand,
                    dt_min=c.dt_min, dt_max=c.dt_max, dt_init_floor=c.dt_init_floor, conv_bias=c.conv_bias,
                    mamba2_headdim=c.mamba2_headdim, seed=c.seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed convert's leftovers must not be published with this model
    model.save_pretrained(tmp, tokenizer=load_any_tokenizer(config.teacher.source))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return ConvertOutputs(str(out), model.num_parameters(), list(attn_layers), c.mixer)
