"""Inference state for cached generation: a preallocated KV cache for each attention layer and the conv and
SSM states of each Mamba layer, all in fixed-size buffers (so a decode step can be captured in a CUDA graph).
SSM states are kept in fp32 whatever the model dtype, unless `state_dtype` asks for bf16: each step then still
updates the state in fp32 and rounds it once when storing it (as mamba_ssm's selective_state_update does), which
halves the state's bytes per step. At the SmolLM2 shape and batch 256 those bytes, not the weights, dominate a
decode step's traffic; the rounding's effect on the logits is measured by bench/state_dtype_drift.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from components.model.config import HybridConfig


@dataclass
class MambaState:
    conv: torch.Tensor  # (b, channels, d_conv): the last d_conv inputs of the convolution
    ssm: torch.Tensor  # (b, d_inner, d_state) for Mamba-1, (b, heads, headdim, d_state) for Mamba-2
    started: bool = False
    # what the layer's decode step derives from its weights (A = -exp(A_log), the fp32 dt bias), made once per cache:
    # a cache lives for one generate() call, during which the weights do not change
    consts: dict[str, torch.Tensor] | None = None


class InferenceCache:
    def __init__(self, cfg: HybridConfig, batch: int, max_len: int, device, dtype=torch.float32,
                 state_dtype=torch.float32):
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        self.cfg, self.batch, self.max_len, self.state_dtype = cfg, batch, max_len, state_dtype
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mamba: dict[int, MambaState] = {}
        for i, kind in enumerate(cfg.layer_types):
            if kind == "attention":
                shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
                self.kv[i] = (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            elif kind == "mamba1":
                self.mamba[i] = MambaState(
                    torch.zeros(batch, cfg.d_inner, cfg.d_conv, device=device, dtype=dtype),
                    torch.zeros(batch, cfg.d_inner, cfg.d_state, device=device, dtype=state_dtype))
            else:
                nh = cfg.d_inner // cfg.mamba2_headdim
                self.mamba[i] = MambaState(
                    torch.zeros(batch, 3 * cfg.d_inner, cfg.d_conv, device=device, dtype=dtype),
                    torch.zeros(batch, nh, cfg.mamba2_headdim, cfg.head_dim, device=device, dtype=state_dtype))
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        # Device-side mirrors of the write position, for decode steps without host syncs (CUDA graphs).
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slot_index = torch.arange(max_len, device=device)
        # per layer, the weights a decode step reads packed into one GEMM's (layers.pack_decode_weights), made once
        # per cache by HybridForCausalLM.prepare_decode for the same reason as MambaState.consts
        self.packed: dict[int, dict[str, torch.Tensor | None]] = {}
        self.has_padding = False
        self.seqlen = 0  # tokens written per row so far (left-padded rows all advance together)

    def mamba_state(self, layer: int) -> MambaState:
        return self.mamba[layer]

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int):
        kc, vc = self.kv[layer]
        L = k.shape[2]
        if pos + L > self.max_len:
            raise ValueError(f"KV cache full: {pos + L} tokens > max_len {self.max_len}")
        kc[:, :, pos : pos + L] = k
        vc[:, :, pos : pos + L] = v
        return kc[:, :, : pos + L], vc[:, :, : pos + L]

    def snapshot(self) -> dict:
        """Copies of everything a decode step mutates except KV slots past write_pos (rewritten before use)."""
        return {"states": [(s.conv.clone(), s.ssm.clone()) for s in self.mamba.values()],
                "key_mask": self.key_mask.clone(), "next_pos": self.next_pos.clone(), "write_pos": self.write_pos.clone()}

    def restore(self, snap: dict) -> None:
        for s, (conv, ssm) in zip(self.mamba.values(), snap["states"]):
            s.conv.copy_(conv)
            s.ssm.copy_(ssm)
        self.key_mask.copy_(snap["key_mask"])
        self.next_pos.copy_(snap["next_pos"])
        self.write_pos.copy_(snap["write_pos"])

    def nbytes(self) -> int:
        tensors = [t for kv in self.kv.values() for t in kv] + [t for s in self.mamba.values() for t in (s.conv, s.ssm)]
        return sum(t.numel() * t.element_size() for t in tensors)
