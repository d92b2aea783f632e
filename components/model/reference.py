"""Load a hybrid released by the reference work (MambaInLlama / M1, Mamba-1 layers) into HybridForCausalLM.

The reference's checkpoint directory is what its trainer writes with LlamaForCausalLM.save_pretrained after
swapping Mamba decoder layers in:
  config.json          the Llama teacher's transformers config (model_type "llama"): every shape but the Mamba ones
  mamba_config.json    its MambaConfig: d_model, d_inner, d_xb, n_layer, attn_layers, rms_norm_eps,
                       intermediate_size, hidden_act, ssm_cfg (Mamba kwargs: d_state 16, d_conv 4, dt_rank "auto",
                       conv_bias, repeat_kv_before_conv, expand when d_inner is absent, init-only dt_* options)
  *.safetensors        the full state dict (one file or shards; pytorch_model.bin is read too)

Key mapping (i = layer index; identical names are copied as they are):
  model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)          -> same
  model.layers.i.{input_layernorm,post_attention_layernorm}.weight, .mlp.{gate,up,down}_proj -> same
  attention layer i: model.layers.i.self_attn.{q,k,v,o}_proj.*                                -> same
  Mamba layer i, prefix m = model.layers.i.mamba.:
    m.in_proj_z | m.in_proj_x | m.B_proj | m.C_proj | m.dt_proj_down  (.weight, stacked on rows in this order)
        -> m.in_proj.weight, rows [z | x | B | C | dt]; the reference's inference layout already holds this
           stack as m.in_proj.weight and is taken as it is
    m.conv1d.{weight,bias}, m.dt_proj.{weight,bias}, m.A_log, m.D, m.out_proj.weight          -> same
    with repeat_kv_before_conv false the conv has d_xb channels (it runs before the GQA repeat): its weights are
    repeated in d_state slices to d_inner channels, which computes the same thing because the conv is depthwise
The model gets reference_compat=True (HybridConfig), so its Mamba layers add dt_proj's bias twice and repeat x
and B in d_state slices, as the reference's layer does.

Simplifications: only the Mamba-1 layer is read (the reference's Mamba-2 layer, with per-group gated norm and
d_state-wide heads, is refused with a message); in_proj_x/z and out_proj biases (off in every reference
recipe) are refused; all tensors are cast to one dtype (the embedding's, unless given), as the reference does
when it moves the model to its dtype; the reference lets left padding into the Mamba state, this model keeps
the state zero on padding, so the two agree on unpadded rows only; its RMSNorm kernel multiplies by the weight
in fp32 where this model (as transformers' Llama) casts first, a bf16-rounding difference only."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from components.errors import M1Error
from components.model.config import HybridConfig
from components.model.hybrid import HybridForCausalLM
from components.model.layers import RotaryEmbedding

# transformers is imported where it is used (reference_config): seconds of start-up otherwise.

MAMBA_CONFIG = "mamba_config.json"
SPLIT_PROJECTIONS = ("in_proj_z", "in_proj_x", "B_proj", "C_proj", "dt_proj_down")  # the order of in_proj's rows
# ssm_cfg keys that only shape the initialisation or pick kernels: they do not change what loaded weights compute
INIT_ONLY = {"dt_init", "dt_scale", "use_fast_path", "dt_min", "dt_max", "dt_init_floor"}
BIASES = ("proj_x_bias", "proj_z_bias", "out_proj_bias")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise M1Error(f"no {path.name} in {path.parent}: not a MambaInLlama / M1 hybrid checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise M1Error(f"{path} is not valid JSON: {e}") from e


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise M1Error(f"no *.safetensors (or pytorch_model.bin) in {d}")


def reference_config(llama: dict, mamba: dict) -> HybridConfig:
    """HybridConfig (reference_compat=True) from the reference's config.json and mamba_config.json."""
    from transformers import LlamaConfig

    if llama.get("model_type") != "llama":
        raise M1Error(f"config.json is a {llama.get('model_type')!r} model; the reference's hybrids are built on Llama")
    lcfg = LlamaConfig.from_dict(llama)
    ssm = dict(mamba.get("ssm_cfg") or {})
    mamba2 = {"headdim", "ngroups", "d_ssm", "rmsnorm", "norm_before_gate", "chunk_size"} & set(ssm)
    if mamba2:
        raise M1Error(f"{MAMBA_CONFIG} describes Mamba-2 layers (ssm_cfg has {sorted(mamba2)}): only the reference's "
                      "Mamba-1 layer can be loaded")
    if any(ssm.get(k) for k in BIASES):
        raise M1Error(f"ssm_cfg turns on {[k for k in BIASES if ssm.get(k)]}: this model's in_proj and out_proj have no bias")
    known = INIT_ONLY | set(BIASES) | {"d_state", "d_conv", "dt_rank", "conv_bias", "repeat_kv_before_conv", "expand"}
    unknown = sorted(set(ssm) - known)
    if unknown:
        raise M1Error(f"ssm_cfg in {MAMBA_CONFIG} has options this loader does not know: {unknown}")
    hidden = lcfg.hidden_size
    d_model = mamba.get("d_model", hidden)
    d_inner = mamba.get("d_inner") or int(ssm.get("expand", 2) * d_model)
    checks = [("d_model", d_model, hidden), ("n_layer", mamba.get("n_layer", lcfg.num_hidden_layers), lcfg.num_hidden_layers),
              ("intermediate_size", mamba.get("intermediate_size", lcfg.intermediate_size), lcfg.intermediate_size),
              ("rms_norm_eps", mamba.get("rms_norm_eps", lcfg.rms_norm_eps), lcfg.rms_norm_eps)]
    for name, got, want in checks:
        if got != want:
            raise M1Error(f"{MAMBA_CONFIG} {name}={got} differs from config.json's {want}: this model shares one value")
    if mamba.get("hidden_act", "silu") != "silu":
        raise M1Error(f"hidden_act {mamba.get('hidden_act')!r}: this model's MLP is SwiGLU (silu)")
    if d_inner % hidden:
        raise M1Error(f"d_inner {d_inner} is not a multiple of the hidden size {hidden}")
    dt_rank = ssm.get("dt_rank", "auto")
    cfg = HybridConfig.from_llama(
        lcfg, attn_layers=list(mamba.get("attn_layers") or []), mixer="mamba1", d_state=int(ssm.get("d_state", 16)),
        d_conv=int(ssm.get("d_conv", 4)), expand=d_inner // hidden,
        dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank),
        dt_min=float(ssm.get("dt_min", 1e-3)), dt_max=float(ssm.get("dt_max", 0.1)),
        dt_init_floor=float(ssm.get("dt_init_floor", 1e-4)), conv_bias=bool(ssm.get("conv_bias", True)),
        reference_compat=True)
    d_xb = mamba.get("d_xb", cfg.d_xb)
    if d_xb != cfg.d_xb:
        raise M1Error(f"d_xb {d_xb} is not the key/value width {cfg.d_xb} of config.json's attention")
    return cfg


def _repeat_slices(t: torch.Tensor, width: int, out_rows: int) -> torch.Tensor:
    """Rows in blocks of `width`, each block repeated in place up to out_rows rows (the reference's repeat_kv)."""
    blocks = t.shape[0] // width
    return t.reshape(blocks, 1, width, *t.shape[1:]).expand(blocks, out_rows // t.shape[0], width, *t.shape[1:]) \
        .reshape(out_rows, *t.shape[1:])


def map_reference_state(cfg: HybridConfig, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's state dict renamed (and stacked) into this model's keys; see the table at the top."""
    if any(k.endswith((".mamba.dt_bias", ".mamba.norm.weight")) for k in src):
        raise M1Error("the checkpoint holds Mamba-2 layers (mamba.dt_bias / mamba.norm): only the reference's Mamba-1 "
                      "layer can be loaded")
    with torch.device("meta"):
        expected = list(HybridForCausalLM(cfg).state_dict())
    src = dict(src)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise M1Error(f"the checkpoint has no {key} (layer types {cfg.layer_types})")
        return src.pop(key)

    if cfg.tie_word_embeddings:
        expected.remove("lm_head.weight")
        src.pop("lm_head.weight", None)
    for key in expected:  # everything but the Mamba mixers keeps its name
        if ".mamba." not in key:
            out[key] = take(key)
    for i, kind in enumerate(cfg.layer_types):
        if kind == "attention":
            continue
        m = f"model.layers.{i}.mamba."
        if m + "in_proj.weight" in src:
            out[m + "in_proj.weight"] = take(m + "in_proj.weight")
        else:
            out[m + "in_proj.weight"] = torch.cat([take(f"{m}{n}.weight") for n in SPLIT_PROJECTIONS], 0)
        for s in ("weight", "bias") if cfg.conv_bias else ("weight",):
            t = take(f"{m}conv1d.{s}")
            if t.shape[0] == cfg.d_xb != cfg.d_inner:
                t = _repeat_slices(t, cfg.d_state, cfg.d_inner)
            out[f"{m}conv1d.{s}"] = t
        for n in ("dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight"):
            out[m + n] = take(m + n)
    if src:
        raise M1Error(f"the checkpoint has weights this model has no place for: {sorted(src)[:5]}")
    return out


def load_reference_hybrid(path: str | Path, dtype: torch.dtype | str | None = None, device=None) -> HybridForCausalLM:
    """HybridForCausalLM (reference_compat=True) from a MambaInLlama / M1 checkpoint directory (HF layout)."""
    d = Path(path)
    if not d.is_dir():
        raise M1Error(f"reference checkpoint directory not found: {d}")
    cfg = reference_config(_read_json(d / "config.json"), _read_json(d / MAMBA_CONFIG))
    state = map_reference_state(cfg, _read_weights(d))
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or state["model.embed_tokens.weight"].dtype)
    state = {k: v.to(device=device or "cpu", dtype=dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = HybridForCausalLM(cfg)
    want = model.state_dict()
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    bad = [f"{k} {tuple(v.shape)} (expected {tuple(want[k].shape)})" for k, v in state.items() if v.shape != want[k].shape]
    if bad:
        raise M1Error(f"checkpoint shapes do not match its configs: {bad[:3]}")
    model.load_state_dict(state, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = RotaryEmbedding(cfg).inv_freq.to(device or "cpu")
    return model.eval()
