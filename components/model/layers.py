"""Llama building blocks in plain PyTorch: RMSNorm, rotary embeddings (default and llama3 scaling),
grouped-query attention through SDPA with an optional KV cache, and the SwiGLU MLP. Numerics follow
transformers' Llama so a hybrid that keeps attention everywhere reproduces the teacher's logits."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.model.config import HybridConfig
from components.model.flash_decode import flash_decode
from components.model.kernels import rms_norm, triton_decode_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = rms_norm(x, self.weight, self.eps)
            if y is not None:
                return y
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: HybridConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if not rs:
        return inv
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (b, L, hd/2), fp32 as in transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (b, heads, L, hd); cos/sin: (b, L, hd)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def build_attention_mask(
    q_len: int,
    k_len: int,
    device: torch.device,
    key_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    q_offset: int = 0,
) -> torch.Tensor | None:
    """Boolean (b|1, 1, q, k) mask: causal, keys restricted to real tokens and, for packed rows, to the query's
    own document. Every query may see itself, so a padding query never has an all-masked row (NaN)."""
    if key_mask is None and doc_ids is None and q_offset == 0 and q_len == k_len:
        return None  # plain causal: SDPA's is_causal path
    qi = torch.arange(q_len, device=device)[:, None] + q_offset
    ki = torch.arange(k_len, device=device)[None, :]
    mask = (ki <= qi)[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :k_len].bool()
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask | (ki == qi)[None, None]


class Attention(nn.Module):
    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=b)

    def forward(self, x, rope, mask, cache=None, cache_pos: int = 0):
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, L, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, L, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v, cache_pos)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, self.n_heads * self.hd))


def _cat(*ts):
    return None if ts[0] is None else torch.cat(ts)


def pack_decode_weights(layer) -> dict[str, torch.Tensor | None]:
    """The weights (and biases) that a decode step multiplies by the same input, stacked so that one GEMM does
    what two or three would: the MLP's gate and up projections, and an attention layer's q, k and v. At 135M
    parameters a decode step is bound by its number of kernels, not its bytes (docs/gpu-performance.md), and each
    output element is the same dot product either way. The copies cost one pass over those weights per cache."""
    mlp = layer.mlp
    out = {"gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
           "gate_up_bias": _cat(mlp.gate_proj.bias, mlp.up_proj.bias)}
    if layer.kind == "attention":
        a = layer.self_attn
        out["qkv"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        out["qkv_bias"] = _cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
    return out


def decode_mlp(mlp: MLP, x, packed: dict) -> torch.Tensor:
    """MLP.forward with the gate and up projections as one GEMM (pack_decode_weights)."""
    gate, up = F.linear(x, packed["gate_up"], packed["gate_up_bias"]).chunk(2, dim=-1)
    return mlp.down_proj(F.silu(gate) * up)


def decode_attention(attn: Attention, x, rope, cache, bucket: int, packed: dict):
    """One-token attention over a static KV cache, free of host syncs and of shapes that change per step (so it
    can be captured in a CUDA graph): the new key/value go to cache.write_pos and the query attends to the first
    `bucket` cache slots, masked to the slots written so far. Query heads are grouped by their key/value head
    (b, n_kv, rep, hd), so keys and values are read once, not repeated per query head. q, k and v come from one
    GEMM (pack_decode_weights)."""
    b = x.shape[0]
    qd, kvd = attn.n_heads * attn.hd, attn.n_kv * attn.hd
    q, k, v = F.linear(x, packed["qkv"], packed["qkv_bias"]).split([qd, kvd, kvd], dim=-1)
    q = q.view(b, 1, attn.n_heads, attn.hd).transpose(1, 2)
    k = k.view(b, 1, attn.n_kv, attn.hd).transpose(1, 2)
    v = v.view(b, 1, attn.n_kv, attn.hd).transpose(1, 2)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kc, vc = cache.kv[attn.layer_idx]
    kc.index_copy_(2, cache.write_pos, k.to(kc.dtype))
    vc.index_copy_(2, cache.write_pos, v.to(vc.dtype))
    rep = attn.n_heads // attn.n_kv
    if triton_decode_attention(x):  # exactly the written slots, whatever the bucket
        out = flash_decode(q.reshape(b, attn.n_kv, rep, attn.hd), kc, vc, cache.key_mask, cache.write_pos)
        return attn.o_proj(out.reshape(b, 1, attn.n_heads * attn.hd))
    mask = cache.key_mask[:, None, None, :bucket] & (cache.slot_index[:bucket] <= cache.write_pos)
    out = F.scaled_dot_product_attention(q.reshape(b, attn.n_kv, rep, attn.hd), kc[:, :, :bucket], vc[:, :, :bucket],
                                         attn_mask=mask)
    return attn.o_proj(out.reshape(b, 1, attn.n_heads * attn.hd))


class MLP(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
