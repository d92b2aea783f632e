"""One-query attention over a static KV cache in Triton, split over the keys (flash decoding), for the decode step.

What it changes against the SDPA path of layers.decode_attention (the plain reference beside it, and what
`reference` below computes the same way):
- it reads exactly the written slots: the length comes from the cache's device-side write position, so the kernel
  needs no KV-length bucket and never reads the up-to-255 unused slots of a bucket;
- the keys are split into chunks of SPLIT slots, one program per (row, KV head, chunk), so one query per sequence
  still fills the GPU at batch 1, and a second kernel combines the chunks (log-sum-exp weights);
- query heads are grouped by their KV head (GQA), so each key and value is read once for the `rep` heads using it.

Simplifications: the query group is padded to 16 rows (tl.dot's smallest tile), which wastes FLOPs but not
bytes, and decoding is bound by bytes; one chunk size for every batch; the tensors must be contiguous (the cache's
are). Triton is imported when the kernel is first used: on CPU the tests run it under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
import math
import os

import torch

SPLIT = 256     # key slots per program
BLOCK_N = 64    # key slots per inner step


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
              write_pos: torch.Tensor) -> torch.Tensor:
    """q (b, n_kv, rep, hd); caches (b, n_kv, max_len, hd); key_mask (b, max_len) True for real tokens; write_pos
    (1,) the slot just written. Attention of each query over the slots <= write_pos that key_mask keeps, as the SDPA
    path computes it; returns (b, n_kv, rep, hd) in q's dtype."""
    slots = torch.arange(k_cache.shape[2], device=q.device)
    mask = key_mask[:, None, None, :] & (slots <= write_pos)
    return torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, K, V, KM, WP, M_out, L_out, ACC_out, n_kv, rep, max_len, n_splits, scale,
                     HD: tl.constexpr, REP_P: tl.constexpr, SPLIT_: tl.constexpr, BLOCK: tl.constexpr,
                     EXACT: tl.constexpr):
        # int64: at the 3B shape's largest batch the caches hold more than 2**31 elements (902 x 8 x 4352 x 128)
        bh = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        b = bh // n_kv
        length = tl.load(WP) + 1
        r = tl.arange(0, REP_P)
        d = tl.arange(0, HD)
        q = tl.load(Q + (bh * rep + r[:, None]) * HD + d[None, :], mask=r[:, None] < rep, other=0.0)
        if EXACT:
            q = q.to(tl.float32)
        m_i = tl.full([REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, HD], tl.float32)
        start = sp * SPLIT_
        if start < length:
            for n0 in range(0, SPLIT_, BLOCK):
                j = start + n0 + tl.arange(0, BLOCK)
                inside = (j < length) & (j < max_len)
                keep = tl.load(KM + b * max_len + j, mask=inside, other=0) != 0
                ok = inside & keep
                kv_off = (bh * max_len + j[:, None]) * HD + d[None, :]
                k = tl.load(K + kv_off, mask=ok[:, None], other=0.0)
                v = tl.load(V + kv_off, mask=ok[:, None], other=0.0)
                if EXACT:
                    k, v = k.to(tl.float32), v.to(tl.float32)
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                if EXACT:
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
                else:
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new
        out = (bh * n_splits + sp) * REP_P + r
        tl.store(M_out + out, m_i)
        tl.store(L_out + out, l_i)
        tl.store(ACC_out + out[:, None] * HD + d[None, :], acc)

    @triton.jit
    def combine_kernel(M_in, L_in, ACC_in, O, rep, n_splits, HD: tl.constexpr, REP_P: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        r = tl.arange(0, REP_P)
        d = tl.arange(0, HD)
        m = tl.full([REP_P], float("-inf"), tl.float32)
        for sp in range(n_splits):
            m = tl.maximum(m, tl.load(M_in + (bh * n_splits + sp) * REP_P + r))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        num = tl.zeros([REP_P, HD], tl.float32)
        den = tl.zeros([REP_P], tl.float32)
        for sp in range(n_splits):
            row = (bh * n_splits + sp) * REP_P + r
            w = tl.exp(tl.load(M_in + row) - m_safe)
            den += tl.load(L_in + row) * w
            num += tl.load(ACC_in + row[:, None] * HD + d[None, :]) * w[:, None]
        o = num / den[:, None]
        tl.store(O + (bh * rep + r[:, None]) * HD + d[None, :], o.to(O.dtype.element_ty), mask=r[:, None] < rep)

    return split_kernel, combine_kernel


@torch.compiler.disable  # the compiled decode engine launches it as it is (kernels._opaque says why)
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_mask: torch.Tensor,
                 write_pos: torch.Tensor, split: int = SPLIT, block: int = BLOCK_N) -> torch.Tensor:
    """The same attention as `reference`, by the split-KV kernels; no host sync (CUDA-graph safe)."""
    b, n_kv, rep, hd = q.shape
    max_len = k_cache.shape[2]
    if hd & (hd - 1) or hd < 16:
        raise ValueError(f"flash_decode needs a power-of-two head_dim >= 16, got {hd}")
    if split % block:
        raise ValueError(f"split {split} is not a multiple of block {block}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and key_mask.is_contiguous()):
        raise ValueError("flash_decode reads the KV cache and key mask as contiguous tensors")
    split_kernel, combine_kernel = _kernels()
    q = q.to(k_cache.dtype).contiguous()
    rep_p = max(16, 1 << (rep - 1).bit_length())
    n_splits = -(-max_len // split)
    f32 = {"device": q.device, "dtype": torch.float32}
    m = torch.empty(b * n_kv, n_splits, rep_p, **f32)
    s = torch.empty(b * n_kv, n_splits, rep_p, **f32)
    acc = torch.empty(b * n_kv, n_splits, rep_p, hd, **f32)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    # fp32 caches (the GRPO sampler's) get exact fp32 products, bf16/fp16 ones the tensor cores with fp32
    # accumulation. Triton's CPU interpreter multiplies bf16 tiles wrongly, so there every product is fp32.
    exact = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    split_kernel[(b * n_kv, n_splits)](q, k_cache, v_cache, key_mask, write_pos, m, s, acc, n_kv, rep,
                                       max_len, n_splits, 1.0 / math.sqrt(hd), HD=hd, REP_P=rep_p, SPLIT_=split,
                                       BLOCK=block, EXACT=exact)
    combine_kernel[(b * n_kv,)](m, s, acc, out, rep, n_splits, HD=hd, REP_P=rep_p)
    return out
