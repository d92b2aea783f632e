"""Mamba mixers that replace attention layers, laid out so they can be initialised from the attention they
replace (M1 / MambaInLlama): in_proj produces [z | x | B | C | dt] with x <- v_proj, B <- k_proj, C <- q_proj
and out_proj <- o_proj.

GQA repeat: x and B come out at the key/value width (n_kv * head_dim) and are repeated head by head up to
d_inner exactly as attention repeats k and v for its query heads (kv head j serves query heads j*r..j*r+r-1).
Mamba-1 then reads B and C in groups of d_state channels, so channel c of query head h uses the d_state-slice
of head h's q (as C) and of kv head h // r's k (as B) that lies at the same offset. MambaInLlama's code
repeats in d_state-sized slices instead of whole heads, which pairs q slices with k slices of other heads;
the head-wise repeat here keeps the attention pairing.

HybridConfig.reference_compat runs Mamba-1 with the reference's semantics instead, so its checkpoints compute
what they were trained to: the slice-wise repeat, and dt = softplus(dt_proj(dt_in) + dt_proj.bias), i.e. the
bias counted twice (the reference's dt_proj is a Linear with bias whose output goes to a scan that adds the same
bias again as delta_bias / dt_bias, in the prefill scan and in the decode step alike).

Simplifications: Mamba-1 convolves x only (as the reference); Mamba-2 convolves x, B and C together and
normalises with one gated RMSNorm over d_inner (no per-group norm)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from components.model import kernels
from components.model.config import HybridConfig
from components.model.layers import RMSNorm
from components.model.mamba_decode import mamba1_decode_step


def repeat_heads(t: torch.Tensor, head_dim: int, out_dim: int) -> torch.Tensor:
    """(b, L, n_kv*head_dim) -> (b, L, out_dim), repeating each head_dim block out_dim // width times in place."""
    width = t.shape[-1]
    if width == out_dim:
        return t
    b, L, _ = t.shape
    t = t.view(b, L, width // head_dim, 1, head_dim).expand(b, L, width // head_dim, out_dim // width, head_dim)
    return t.reshape(b, L, out_dim)


def causal_conv(x, weight, bias, prev=None, resets=None):
    """Depthwise causal conv over time. x: (b, L, c); weight: (c, K); prev: (b, c, K-1) earlier inputs or None.
    With resets, a tap never reaches across a document start. Returns pre-activation (b, L, c)."""
    K = weight.shape[-1]
    b, L, c = x.shape
    if resets is None and prev is None:
        return kernels.causal_conv1d(x, weight, bias)
    left = torch.zeros(b, K - 1, c, dtype=x.dtype, device=x.device) if prev is None else prev.transpose(1, 2).to(x.dtype)
    xx = torch.cat([left, x], 1)  # (b, K-1+L, c)
    out = x * weight[:, K - 1]
    if resets is not None:
        # doc index per step, so a tap j steps back is kept only inside the same document
        # the K-1 earlier inputs belong to document 0; a reset at t bumps the index from t on
        doc = torch.cat([torch.zeros(b, K - 1, dtype=torch.long, device=x.device), torch.cumsum(resets.long(), 1)], 1)
    for j in range(1, K):
        tap = xx[:, K - 1 - j : K - 1 - j + L] * weight[:, K - 1 - j]
        if resets is not None:
            same = (doc[:, K - 1 - j : K - 1 - j + L] == doc[:, K - 1 :])[..., None]
            tap = torch.where(same, tap, torch.zeros_like(tap))
        out = out + tap
    return out if bias is None else out + bias


def dt_bias_init(n: int, dt_min: float, dt_max: float, floor: float, generator=None) -> torch.Tensor:
    """Inverse softplus of dt drawn log-uniformly in [dt_min, dt_max], clamped at `floor`."""
    u = torch.rand(n, generator=generator)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def _last_inputs(x: torch.Tensor, K: int, prev: torch.Tensor | None) -> torch.Tensor:
    """Conv state for decoding: the last K inputs (b, c, K), zeros where the sequence is shorter."""
    xt = x.transpose(1, 2)
    if prev is not None:
        xt = torch.cat([prev.to(xt.dtype), xt], -1)
    return F.pad(xt, (max(0, K - xt.shape[-1]), 0))[..., -K:]


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.cfg = cfg
        di, dxb, N, R = cfg.d_inner, cfg.d_xb, cfg.d_state, cfg.dt_rank
        if di % dxb or di % N:
            raise ValueError(f"d_inner {di} must be a multiple of d_xb {dxb} and of d_state {N}")
        # width of the blocks of x and B that the GQA repeat copies
        self.repeat_unit = N if cfg.reference_compat else cfg.head_dim
        self.splits = [di, dxb, dxb, di, R]
        self.in_proj = nn.Linear(cfg.hidden_size, sum(self.splits), bias=False)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_proj = nn.Linear(R, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, cfg.hidden_size, bias=False)
        self.reset_dt_parameters()

    def reset_dt_parameters(self, generator=None):
        cfg = self.cfg
        std = cfg.dt_rank**-0.5
        with torch.no_grad():
            self.dt_proj.weight.uniform_(-std, std, generator=generator)
            self.dt_proj.bias.copy_(dt_bias_init(cfg.d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, generator))

    def decode_consts(self, state) -> dict[str, torch.Tensor]:
        """A and the fp32 dt bias, made once per inference cache instead of at every decode step (3-4 small kernels
        a layer a step, on a launch-bound small model; HybridForCausalLM.prepare_decode makes them up front)."""
        if state.consts is None:
            state.consts = {"A": -torch.exp(self.A_log.float()), "dt_bias": self.dt_proj.bias.float()}
        return state.consts

    def forward(self, h, seq, cache=None):
        cfg = self.cfg
        b, L, _ = h.shape
        proj = self.in_proj(h)
        state = cache.mamba_state(self.layer_idx) if cache is not None else None
        step = state is not None and state.started and L == 1
        if step and seq.pad_mask is None and kernels.triton_mamba_decode(h):
            consts = self.decode_consts(state)
            y = mamba1_decode_step(proj[:, 0], state.conv, state.ssm, self.conv1d.weight[:, 0], self.conv1d.bias,
                                   self.dt_proj.weight, self.dt_proj.bias if cfg.reference_compat else None,
                                   consts["dt_bias"], consts["A"], self.D, self.splits, self.repeat_unit,
                                   cfg.d_state)
            return self.out_proj(y[:, None])
        z, x, B, C, dt = torch.split(proj, self.splits, dim=-1)
        x = repeat_heads(x, self.repeat_unit, cfg.d_inner)
        B = repeat_heads(B, self.repeat_unit, cfg.d_inner).view(b, L, -1, cfg.d_state)
        C = C.reshape(b, L, -1, cfg.d_state)
        if step and seq.pad_mask is None:
            consts = self.decode_consts(state)
            y = kernels.fused_mamba1_step(state, x[:, 0], dt[:, 0], self.dt_proj.weight, self.dt_proj.bias,
                                          consts["A"], B[:, 0], C[:, 0], self.D, z[:, 0],
                                          self.conv1d.weight[:, 0], self.conv1d.bias,
                                          dt_bias_twice=cfg.reference_compat, dt_bias_f32=consts["dt_bias"])
            if y is not None:
                return self.out_proj(y[:, None])
        if cfg.reference_compat:
            # the second bias is added in fp32 before the softplus, where the reference's kernels add delta_bias
            dt = F.softplus(self.dt_proj(dt).float() + self.dt_proj.bias.float())
        else:
            dt = F.softplus(self.dt_proj(dt))
        if seq.pad_mask is not None:  # zero input and step size on padding: the state stays exactly 0
            keep = seq.pad_mask[..., None]
            x = torch.where(keep, x, torch.zeros_like(x))
            dt = torch.where(keep, dt, torch.zeros_like(dt))
        A = self.decode_consts(state)["A"] if step else -torch.exp(self.A_log.float())
        w = self.conv1d.weight[:, 0]
        if step:
            xc = kernels.conv_step(state.conv, x[:, 0], w, self.conv1d.bias)
            y = kernels.selective_state_step(state.ssm, F.silu(xc), dt[:, 0], A, B[:, 0], C[:, 0], self.D)[:, None]
        else:
            prev = state.conv[..., 1:] if state is not None and state.started else None
            xc = F.silu(causal_conv(x, w, self.conv1d.bias, prev, seq.resets))
            h0 = state.ssm if state is not None and state.started else None
            y, h_last = kernels.selective_scan(xc, dt, A, B, C, self.D, seq.resets, h0)
            if state is not None:
                state.conv.copy_(_last_inputs(x, cfg.d_conv, prev))
                state.ssm.copy_(h_last)
                state.started = True
        y = y * F.silu(z)
        return self.out_proj(y)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.cfg = cfg
        di, dxb, P = cfg.d_inner, cfg.d_xb, cfg.mamba2_headdim
        self.N = cfg.head_dim  # B and C rows are one attention head wide, so k and q map onto them exactly
        self.nheads = di // P
        if di % dxb or di % self.N or self.N % P:
            raise ValueError(f"Mamba-2 needs d_inner {di} divisible by d_xb {dxb} and head_dim {self.N}, and head_dim divisible by headdim {P}")
        self.splits = [di, dxb, dxb, di, self.nheads]
        self.conv_dim = 3 * di
        self.in_proj = nn.Linear(cfg.hidden_size, sum(self.splits), bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = RMSNorm(di, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(di, cfg.hidden_size, bias=False)
        self.reset_dt_parameters()

    def reset_dt_parameters(self, generator=None):
        cfg = self.cfg
        with torch.no_grad():
            self.dt_bias.copy_(dt_bias_init(self.nheads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, generator))
            # Mamba-2's default: A drawn uniformly in [1, 16]
            self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(1, 16, generator=generator)))

    def decode_consts(self, state) -> dict[str, torch.Tensor]:
        """A, made once per inference cache (Mamba1Mixer.decode_consts)."""
        if state.consts is None:
            state.consts = {"A": -torch.exp(self.A_log.float())}
        return state.consts

    def forward(self, h, seq, cache=None):
        cfg = self.cfg
        b, L, _ = h.shape
        di, P, N = cfg.d_inner, cfg.mamba2_headdim, self.N
        z, x, B, C, dt = torch.split(self.in_proj(h), self.splits, dim=-1)
        xBC = torch.cat([repeat_heads(x, cfg.head_dim, di), repeat_heads(B, cfg.head_dim, di), C], -1)
        dt = F.softplus(dt + self.dt_bias)
        if seq.pad_mask is not None:
            keep = seq.pad_mask[..., None]
            xBC = torch.where(keep, xBC, torch.zeros_like(xBC))
            dt = torch.where(keep, dt, torch.zeros_like(dt))
        w = self.conv1d.weight[:, 0]
        state = cache.mamba_state(self.layer_idx) if cache is not None else None
        step = state is not None and state.started and L == 1
        A = self.decode_consts(state)["A"] if step else -torch.exp(self.A_log.float())
        if step:
            xc = F.silu(kernels.conv_step(state.conv, xBC[:, 0], w, self.conv1d.bias))
            xs, Bs, Cs = torch.split(xc, [di, di, di], -1)
            y = kernels.ssd_step(state.ssm, xs.view(b, self.nheads, P), dt[:, 0], A,
                                 Bs.view(b, -1, N), Cs.view(b, -1, N), self.D)
            y = y.reshape(b, 1, di)
        else:
            prev = state.conv[..., 1:] if state is not None and state.started else None
            xc = F.silu(causal_conv(xBC, w, self.conv1d.bias, prev, seq.resets))
            xs, Bs, Cs = torch.split(xc, [di, di, di], -1)
            h0 = state.ssm if state is not None and state.started else None
            y, last = kernels.ssd(xs.reshape(b, L, self.nheads, P), dt, A, Bs.reshape(b, L, -1, N),
                                  Cs.reshape(b, L, -1, N), self.D, seq.resets, h0)
            y = y.reshape(b, L, di)
            if state is not None:
                state.conv.copy_(_last_inputs(xBC, cfg.d_conv, prev))
                state.ssm.copy_(last)
                state.started = True
        y = self.norm(y * F.silu(z))
        return self.out_proj(y)
