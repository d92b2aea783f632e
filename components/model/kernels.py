"""Kernel dispatch: the fused CUDA kernels of mamba_ssm / causal_conv1d when the tensors live on a GPU and the
packages import, else the pure-PyTorch path in components.model.scan (always the reference).

mamba_ssm's package __init__ imports its CUDA extension, so it cannot even be imported on a machine without
CUDA: the import happens lazily, once, on the first CUDA call. Set M1_KERNELS=torch to force the torch path
(used by the GPU tests that compare both paths on the same weights); M1_DECODE_ATTENTION=triton switches the
decode step's attention from SDPA to the split-KV Triton kernel (flash_decode.py)."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from components.model import scan


@functools.cache
def _mamba_ops():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or no CUDA extension for this machine
        return None
    return {"selective_scan_fn": selective_scan_fn, "selective_state_update": _opaque(selective_state_update),
            "mamba_chunk_scan_combined": mamba_chunk_scan_combined}


@functools.cache
def _conv_ops():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


@functools.cache
def _conv_update():
    try:
        from causal_conv1d import causal_conv1d_update
    except Exception:
        return None
    return _opaque(causal_conv1d_update)


def _opaque(fn):
    """The compiled decode engine (decode.compiled_decode_step) calls the packages' decode kernels as they are:
    dynamo does not trace into their Python launch code (device guards, heuristics, a C++ extension) but breaks
    the graph around them, and the CUDA graph captured afterwards replays both sides. Outside torch.compile the
    wrapper only calls fn."""
    return torch.compiler.disable(fn)


def _cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("M1_KERNELS", "auto") != "torch"


def _triton_attention_asked() -> bool:
    return os.environ.get("M1_DECODE_ATTENTION", "sdpa") == "triton"


def triton_decode_attention(t: torch.Tensor) -> bool:
    """Whether the decode step's attention runs the split-KV Triton kernel (components/model/flash_decode.py)
    instead of SDPA: opt-in with M1_DECODE_ATTENTION=triton on CUDA until it is measured there."""
    return _cuda(t) and _triton_attention_asked()


def triton_mamba_decode(t: torch.Tensor) -> bool:
    """Whether a Mamba-1 decode step runs as one Triton kernel between its projections
    (components/model/mamba_decode.py): opt-in with M1_MAMBA_DECODE=triton, on CUDA, or anywhere under Triton's CPU
    interpreter (TRITON_INTERPRET=1, for the tests), until it is measured on a GPU."""
    if os.environ.get("M1_MAMBA_DECODE", "kernels") != "triton":
        return False
    return _cuda(t) or os.environ.get("TRITON_INTERPRET") == "1"


def active_backend(device: torch.device | str) -> dict[str, str]:
    """Which implementation each op uses on `device` (for logs and benchmark records)."""
    cuda = torch.device(device).type == "cuda" and os.environ.get("M1_KERNELS", "auto") != "torch"
    m, c = cuda and _mamba_ops() is not None, cuda and _conv_ops() is not None
    flash = cuda and _triton_attention_asked()
    fused = cuda and os.environ.get("M1_MAMBA_DECODE", "kernels") == "triton"
    return {"ssm": "mamba_ssm" if m else "torch", "conv": "causal_conv1d" if c else "torch",
            "decode_attention": "triton" if flash else "sdpa", "mamba_decode": "triton" if fused else "kernels"}


def causal_conv1d(x, weight, bias):
    """x: (b, L, c) -> (b, L, c), zero history."""
    K = weight.shape[-1]
    if _cuda(x) and _conv_ops() is not None:
        return _conv_ops()(x.transpose(1, 2), weight, bias).transpose(1, 2)
    return F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=K - 1, groups=x.shape[-1])[..., : x.shape[1]].transpose(1, 2)


def conv_step(conv_state, x, weight, bias):
    """conv_state: (b, c, K) last inputs, updated in place; x: (b, c). Returns the pre-activation (b, c)."""
    conv_state.copy_(torch.roll(conv_state, -1, -1))
    conv_state[..., -1] = x.to(conv_state.dtype)
    out = (conv_state * weight).sum(-1)
    return (out if bias is None else out + bias).to(x.dtype)


def fused_mamba1_step(state, x, dt_in, dt_weight, dt_bias, A, B, C, D, z, conv_w, conv_b, dt_bias_twice=False,
                      dt_bias_f32=None):
    """Mamba-1 decode step with the fused CUDA kernels (conv update + SiLU in one kernel; softplus(dt + bias),
    the D skip and the SiLU(z) gate inside selective_state_update). dt_bias_twice: the reference's semantics
    (HybridConfig.reference_compat), dt_proj applied with its bias and the kernel adding dt_bias once more.
    dt_bias_f32: dt_bias already in fp32 (made once per cache), so that no cast runs each step.
    Returns y (b, d), or None when the kernels are not available for these tensors (the caller then takes the
    unfused path)."""
    ops, upd = (_mamba_ops(), _conv_update()) if _cuda(x) else (None, None)
    if ops is None or upd is None:
        return None
    b, d = x.shape
    G, N = B.shape[1], B.shape[2]
    xc = upd(x, state.conv, conv_w, conv_b, activation="silu")
    dt_raw = F.linear(dt_in, dt_weight, dt_bias if dt_bias_twice else None)
    y = ops["selective_state_update"](state.ssm.view(b, G, d // G, N), xc.view(b, G, d // G), dt_raw.view(b, G, d // G),
                                      A.view(G, d // G, N), B, C, D.view(G, d // G), z=z.reshape(b, G, d // G),
                                      dt_bias=(dt_bias.float() if dt_bias_f32 is None else dt_bias_f32).view(G, d // G),
                                      dt_softplus=True)
    return y.reshape(b, d)


def rms_norm(x, weight, eps):
    """Fused RMSNorm on CUDA (torch's kernel); None elsewhere, where the caller keeps transformers' exact numerics."""
    if _cuda(x) and hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    return None


def selective_scan(u, dt, A, B, C, D, resets=None, h0=None):
    ops = _mamba_ops() if _cuda(u) else None
    if ops is not None and h0 is None:
        def fused(u, dt, A, B, C, D):
            # the kernel wants delta, B and C in u's dtype (under autocast softplus comes out fp32 while u is bf16,
            # and the masked conv of packed rows returns fp32 while B and C are bf16)
            y, last = ops["selective_scan_fn"](
                u.transpose(1, 2).contiguous(), dt.to(u.dtype).transpose(1, 2).contiguous(), A.float().contiguous(),
                B.to(u.dtype).permute(0, 2, 3, 1).contiguous(), C.to(u.dtype).permute(0, 2, 3, 1).contiguous(), D.float(),
                delta_softplus=False, return_last_state=True)
            return y.transpose(1, 2), last.float()

        if resets is None:
            return fused(u, dt, A, B, C, D)
        out = scan_by_document(fused, u, dt, A, B, C, D, resets)
        if out is not None:
            return out
    if not (torch.is_grad_enabled() and u.requires_grad):
        # inference (prefill, evaluation): one cached (b, d, n) state updated in place beats the parallel scan's
        # (b, chunk, d, n) passes on a CPU (bench/cpu_prefill.py)
        return scan.selective_scan_steps(u, dt, A, B, C, D, resets, h0)
    # training: the parallel scan, differentiable; chunk 64 suits its backward (2 CPU cores, d=576, n=16)
    return scan.selective_scan(u, dt, A, B, C, D, resets, h0, chunk=64)


def scan_by_document(scan_fn, u, dt, A, B, C, D, resets, max_blowup: float = 16.0):
    """Packed rows through a scan without reset support (mamba_ssm's selective_scan_fn): every document becomes
    its own zero-state row of a right-padded batch, is scanned, and is put back in place. Padding gets u = dt = 0,
    and its outputs are dropped. Returns (y, last state of each row's final document), or None when padding would
    cost more than max_blowup x the packed size (many short documents beside a long one)."""
    b, L = resets.shape
    starts_mask = resets.clone()
    starts_mask[:, 0] = True
    starts = starts_mask.reshape(-1).nonzero().squeeze(1)  # documents never cross rows: each row starts one
    lengths = torch.diff(starts, append=starts.new_tensor([b * L]))
    n, width = len(starts), int(lengths.max())
    if n * width > max_blowup * b * L:
        return None
    offs = torch.arange(width, device=u.device)
    valid = offs[None] < lengths[:, None]
    index = (starts[:, None] + offs[None]).clamp(max=b * L - 1)

    def docs(t):  # (b, L, ...) -> (n, width, ...), zero on padding
        g = t.reshape(b * L, *t.shape[2:])[index]
        return g * valid.view(n, width, *([1] * (t.dim() - 2))).to(g.dtype)

    y, last = scan_fn(docs(u), docs(dt), A, docs(B), docs(C), D)
    y = y[valid].view(b, L, *y.shape[2:])  # documents are in flattened order, so the valid part is the packed layout
    row_end = torch.ones(n, dtype=torch.bool, device=u.device)
    row_end[:-1] = (starts[1:] // L) != (starts[:-1] // L)
    return y, last[row_end]


def selective_state_step(h, u, dt, A, B, C, D):
    ops = _mamba_ops() if _cuda(u) else None
    if ops is not None:
        b, d = u.shape
        G, N = B.shape[1], B.shape[2]
        hv = h.view(b, G, d // G, N)
        # mamba_ssm 2.3's launcher cannot take dt_bias=None (it unpacks its strides): pass a zero bias
        zero = torch.zeros(1, device=u.device, dtype=torch.float32).expand(G, d // G)
        y = ops["selective_state_update"](hv, u.view(b, G, d // G), dt.view(b, G, d // G),
                                          A.view(G, d // G, N), B, C, D.view(G, d // G), dt_bias=zero)
        return y.reshape(b, d)
    return scan.selective_state_step(h, u, dt, A, B, C, D)


def ssd(x, dt, A, B, C, D, resets=None, h0=None, chunk: int = 64):
    ops = _mamba_ops() if _cuda(x) else None
    if ops is not None:
        seq_idx = None if resets is None else torch.cumsum(resets.int(), 1).int()
        y, last = ops["mamba_chunk_scan_combined"](
            x, dt, A, B, C, chunk_size=chunk, D=D.float(), initial_states=None if h0 is None else h0.float(),
            seq_idx=seq_idx, return_final_states=True)
        return y, last.float()
    return scan.ssd_chunked(x, dt, A, B, C, D, resets, h0, chunk)


def ssd_step(s, x, dt, A, B, C, D):
    ops = _mamba_ops() if _cuda(x) else None
    if ops is not None:
        b, nh, p = x.shape
        N = B.shape[-1]
        zero = torch.zeros(1, device=x.device, dtype=torch.float32).expand(nh, p)
        y = ops["selective_state_update"](s, x, dt[..., None].expand(b, nh, p), A[:, None, None].expand(nh, p, N),
                                          B, C, D[:, None].expand(nh, p), dt_bias=zero)
        return y
    return scan.ssd_step(s, x, dt, A, B, C, D)
