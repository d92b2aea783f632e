"""A Mamba-1 layer's whole decode step between its two projections, in one Triton kernel.

The step the mixer otherwise runs between in_proj and out_proj launches about seven kernels a layer:
- the GQA repeats of x and B, copied up to d_inner width;
- the copies of the strided C and z slices;
- causal_conv1d_update;
- the dt_proj GEMV;
- mamba_ssm's selective_state_update.

At the SmolLM2 shape that is about 170 of the hybrid's ~590 kernels a step, each a few microseconds for a few
kilobytes. Here one program per (row, block of channels) does all of it:
- reads z, x, B, C and the dt input straight from the row of in_proj's output, x and B at their key/value width
  through the repeat's index map;
- shifts the conv state and convolves (+ SiLU);
- computes dt = softplus(dt_proj(dt_in) + bias);
- updates the SSM state and reads y = C.h + D.x, gated by SiLU(z).

`reference` below is the same step in torch ops (kernels.conv_step, scan.selective_state_step), which the tests
compare it with.

Rounding follows the fused CUDA path it replaces, so the two agree closely in bf16:
- the conv output and dt_proj's output are rounded to the activation dtype before use, as causal_conv1d_update's
  output and the bf16 GEMM's are;
- the state is updated in fp32 and rounded once when stored, and y reads the unrounded state, as in
  selective_state_update.

Simplifications:
- Mamba-1 only;
- d_conv must be a power of two (4 in every recipe here);
- one block size for every shape;
- the caches' tensors must be contiguous (they are).

Triton is imported when the kernel is first used; on CPU the tests run it under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BLOCK_D = 32  # channels per program


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def repeat_index(pos: torch.Tensor, unit: int, rep: int) -> torch.Tensor:
    """Position in the key/value-width tensor that position `pos` of its GQA repeat (mamba.repeat_heads) copies:
    the repeat lays each `unit`-wide block out `rep` times in a row."""
    return (pos // (rep * unit)) * unit + pos % unit


def reference(proj, conv_state, ssm, conv_w, conv_b, dt_w, dt_b_twice, dt_bias_f32, A, D, splits, unit, d_state):
    """The step in torch ops (kernels.conv_step, scan.selective_state_step), with dt as the fused CUDA path makes it:
    dt_proj without its bias in the activation dtype, then softplus of that plus the fp32 bias; in fp32 this is the
    mixer's torch path exactly. proj (b, sum(splits)) one row of in_proj's output per sequence; conv_state
    (b, d_inner, d_conv) and ssm (b, d_inner, d_state) are updated in place. Returns y (b, d_inner) before out_proj."""
    from components.model import kernels, scan

    b = proj.shape[0]
    z, x, B, C, dt = torch.split(proj, splits, dim=-1)
    di = splits[0]
    src = repeat_index(torch.arange(di, device=proj.device), unit, di // splits[1])
    x, B = x[:, src], B[:, src].reshape(b, -1, d_state)
    C = C.reshape(b, -1, d_state)
    dt = F.softplus(F.linear(dt, dt_w, dt_b_twice).float() + dt_bias_f32)
    xc = F.silu(kernels.conv_step(conv_state, x, conv_w, conv_b))
    y = scan.selective_state_step(ssm, xc, dt, A, B, C, D)
    return y * F.silu(z)


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def step_kernel(P, stride_p, CONV, W, CB, DTW, DTB2, DTB, A, Dp, S, Y,
                    di, unit, rep, R, N, x_off, b_off, c_off, dt_off,
                    K: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, RP: tl.constexpr,
                    HAS_CB: tl.constexpr, TWICE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        cm = c < di
        p = P + row * stride_p
        act = Y.dtype.element_ty
        # x at its key/value width: position c of the repeat reads (c // (rep*unit))*unit + c % unit
        x = tl.load(p + x_off + (c // (rep * unit)) * unit + c % unit, mask=cm, other=0.0)
        # conv: the window is the state shifted by one with x as its newest input; it becomes the new state
        k = tl.arange(0, K)
        base = (row * di + c[:, None]) * K + k[None, :]
        prev = tl.load(CONV + base + 1, mask=cm[:, None] & (k[None, :] < K - 1), other=0.0)
        win = tl.where(k[None, :] == K - 1, x.to(CONV.dtype.element_ty)[:, None], prev)
        w = tl.load(W + c[:, None] * K + k[None, :], mask=cm[:, None], other=0.0)
        xc = tl.sum(win.to(tl.float32) * w.to(tl.float32), 1)
        if HAS_CB:
            xc += tl.load(CB + c, mask=cm, other=0.0).to(tl.float32)
        xc = (xc * tl.sigmoid(xc)).to(act).to(tl.float32)
        tl.store(CONV + base, win, mask=cm[:, None])
        # dt = softplus(dt_proj(dt_in) [+ its bias, the reference's semantics] + bias in fp32)
        r = tl.arange(0, RP)
        dti = tl.load(p + dt_off + r, mask=r < R, other=0.0).to(tl.float32)
        dtw = tl.load(DTW + c[:, None] * R + r[None, :], mask=cm[:, None] & (r[None, :] < R), other=0.0)
        dt = tl.sum(dtw.to(tl.float32) * dti[None, :], 1)
        if TWICE:
            dt += tl.load(DTB2 + c, mask=cm, other=0.0).to(tl.float32)
        dt = dt.to(act).to(tl.float32) + tl.load(DTB + c, mask=cm, other=0.0)
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        # state update: channel c belongs to group c // N, which reads B and C's N values of that group
        n = tl.arange(0, NP)
        m2 = cm[:, None] & (n[None, :] < N)
        q = (c // N)[:, None] * N + n[None, :]
        Bv = tl.load(p + b_off + (q // (rep * unit)) * unit + q % unit, mask=m2, other=0.0).to(tl.float32)
        Cv = tl.load(p + c_off + q, mask=m2, other=0.0).to(tl.float32)
        a = tl.load(A + c[:, None] * N + n[None, :], mask=m2, other=0.0)
        s_off = (row * di + c[:, None]) * N + n[None, :]
        h = tl.load(S + s_off, mask=m2, other=0.0).to(tl.float32)
        h = h * tl.exp(a * dt[:, None]) + Bv * (dt * xc)[:, None]
        tl.store(S + s_off, h.to(S.dtype.element_ty), mask=m2)
        y = tl.sum(h * Cv, 1) + tl.load(Dp + c, mask=cm, other=0.0).to(tl.float32) * xc
        z = tl.load(p + c, mask=cm, other=0.0).to(tl.float32)  # z is the first split
        tl.store(Y + row * di + c, (y * z * tl.sigmoid(z)).to(act), mask=cm)

    return step_kernel


@torch.compiler.disable  # the compiled decode engine launches it as it is (kernels._opaque says why)
def mamba1_decode_step(proj, conv_state, ssm, conv_w, conv_b, dt_w, dt_b_twice, dt_bias_f32, A, D, splits, unit,
                       d_state):
    """`reference`'s step in one kernel launch, no host sync (CUDA-graph safe). Same arguments; dt_b_twice is
    dt_proj's bias when the reference's semantics add it twice, else None; dt_bias_f32 and A are the per-cache
    fp32 constants (Mamba1Mixer.decode_consts)."""
    di, dxb, _, _, R = splits
    b, K = proj.shape[0], conv_state.shape[-1]
    if K & (K - 1):
        raise ValueError(f"the fused Mamba-1 decode step needs a power-of-two d_conv, got {K}")
    if not (conv_state.is_contiguous() and ssm.is_contiguous() and conv_w.is_contiguous() and dt_w.is_contiguous()
            and A.is_contiguous()):
        raise ValueError("the fused Mamba-1 decode step reads its state, conv weight, dt_proj weight and A as "
                         "contiguous tensors")
    proj = proj.reshape(b, -1)
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    y = torch.empty(b, di, device=proj.device, dtype=proj.dtype)
    dummy = dt_bias_f32  # an unused pointer argument still needs a tensor
    _kernel()[(b, -(-di // BLOCK_D))](
        proj, proj.stride(0), conv_state, conv_w, conv_b if conv_b is not None else dummy, dt_w,
        dt_b_twice if dt_b_twice is not None else dummy, dt_bias_f32, A, D, ssm, y,
        di, unit, di // dxb, R, d_state, di, di + dxb, di + 2 * dxb, 2 * di + 2 * dxb,
        K=K, BD=BLOCK_D, NP=_next_pow2(d_state), RP=_next_pow2(R), HAS_CB=conv_b is not None,
        TWICE=dt_b_twice is not None)
    return y
