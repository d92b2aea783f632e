"""The fused Mamba-1 decode step (components/model/mamba_decode.py) against its torch reference, and a converted
model decoding with it against the same model without it. Triton's CPU interpreter runs the kernel in a child
process: TRITON_INTERPRET must be set before Triton compiles anything (tests/test_flash_decode.py says why)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.model.mamba import repeat_heads
from components.model.mamba_decode import mamba1_decode_step, repeat_index

ROOT = Path(__file__).resolve().parents[1]

KERNEL_VS_REFERENCE = """
import json, torch
from components.model.mamba_decode import mamba1_decode_step, reference
torch.manual_seed(0)
b, di, dxb, N, R, K = 3, 192, 64, 16, 12, 4
out = {}
for dtype in (torch.float32, torch.bfloat16):
    for state_dtype in (torch.float32, torch.bfloat16):
        for unit, twice, conv_bias in ((32, False, True), (16, True, False)):
            splits = [di, dxb, dxb, di, R]
            conv_w, dt_w = torch.randn(di, K, dtype=dtype) * 0.5, torch.randn(di, R, dtype=dtype) * 0.3
            conv_b = torch.randn(di, dtype=dtype) * 0.1 if conv_bias else None
            dt_b = torch.randn(di, dtype=dtype) * 0.5 - 2
            A = -torch.exp(torch.randn(di, N)).contiguous()
            D = torch.randn(di, dtype=dtype)
            first = (torch.randn(b, di, K, dtype=dtype), torch.randn(b, di, N).to(state_dtype))
            states = [first, (first[0].clone(), first[1].clone())]  # the reference's and the kernel's
            worst = {"y": 0.0, "conv": 0.0, "ssm": 0.0}
            for step in range(4):
                proj = torch.randn(b, sum(splits), dtype=dtype)
                args = (conv_w, conv_b, dt_w, dt_b if twice else None, dt_b.float(), A, D, splits, unit, N)
                ref = reference(proj, *states[0], *args).float()
                got = mamba1_decode_step(proj, *states[1], *args).float()
                worst["y"] = max(worst["y"], (got - ref).abs().max().item() / ref.abs().max().item())
                worst["conv"] = max(worst["conv"], (states[0][0].float() - states[1][0].float()).abs().max().item())
                worst["ssm"] = max(worst["ssm"], ((states[0][1].float() - states[1][1].float()).abs().max()
                                                  / states[0][1].float().abs().max()).item())
            out[f"{str(dtype)[6:]}/state_{str(state_dtype)[6:]}/unit{unit}/twice{int(twice)}"] = worst
print(json.dumps(out))
"""

MODEL_DECODE = """
import json, os, torch
from components.model import convert
from components.model.decode import StaticDecoder
from components.model.generate import left_pad
from components.model.teacher import load_any_teacher

def logits(model, fused):
    os.environ["M1_MAMBA_DECODE"] = "triton" if fused else "kernels"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (9, 5)]
    forced = torch.randint(0, 49152, (2, 6), generator=g)
    with torch.no_grad():
        ids, mask = left_pad(prompts, 0, "cpu")
        cache = model.new_cache(2, ids.shape[1] + 7)
        out = [model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]]
        dec = StaticDecoder(model, cache, 8, graphs=False)
        out += [dec.step(forced[:, t:t + 1]).clone() for t in range(6)]
    return torch.stack(out, 1), [s.ssm.clone() for s in cache.mamba.values()]

res = {}
teacher = load_any_teacher("random:tiny", seed=0)
for compat in (False, True):
    model = convert(teacher, [1, 3], "mamba1")
    model.config.reference_compat = compat
    for layer in model.model.layers:
        if layer.kind != "attention":
            layer.mamba.repeat_unit = model.config.d_state if compat else model.config.head_dim
    plain, s_plain = logits(model, False)
    fused, s_fused = logits(model, True)
    res[f"compat{int(compat)}"] = {"logits": (plain - fused).abs().max().item(), "scale": plain.abs().max().item(),
                                   "ssm": max((a - b).abs().max().item() for a, b in zip(s_plain, s_fused))}
print(json.dumps(res))
"""


def _interpret(code: str) -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_repeat_index_is_the_gqa_repeat():
    kv = torch.arange(64.0)[None, None]
    for unit in (16, 32):
        rep = repeat_heads(kv, unit, 192)[0, 0]
        assert torch.equal(rep, kv[0, 0][repeat_index(torch.arange(192), unit, 3)])


def test_fused_step_equals_the_reference_under_the_interpreter():
    """Four steps in a row: y (relative to its largest value), the conv state and the SSM state (relative) agree
    to fp32 rounding in fp32, and in bf16 to the roundings the two place differently (conv products, the output
    before the gate)."""
    diffs = _interpret(KERNEL_VS_REFERENCE)
    assert len(diffs) == 8
    for key, d in diffs.items():
        if key.startswith("float32/state_float32"):
            assert d["y"] < 1e-5 and d["conv"] == 0.0 and d["ssm"] < 1e-5, (key, d)
        else:
            assert d["y"] < 4e-2 and d["conv"] == 0.0 and d["ssm"] < 3e-2, (key, d)  # a few bf16 steps (2**-8)


def test_a_converted_model_decodes_the_same_with_the_fused_step():
    """The tiny teacher converted (attention at layers 1 and 3), fp32: six forced decode steps with the fused step
    give the same logits and SSM states as the mixer's own path, with the head-wise repeat and with the
    reference's semantics (slice-wise repeat, dt bias counted twice)."""
    res = _interpret(MODEL_DECODE)
    for key, d in res.items():
        assert d["logits"] < 1e-4 * d["scale"] and d["ssm"] < 1e-4, (key, d)


def test_refuses_what_it_cannot_tile():
    splits = [8, 4, 4, 8, 2]
    args = (torch.zeros(8, 3), None, torch.zeros(8, 2), None, torch.zeros(8), torch.zeros(8, 4), torch.ones(8),
            splits, 4, 4)
    with pytest.raises(ValueError, match="power-of-two d_conv, got 3"):
        mamba1_decode_step(torch.zeros(1, 26), torch.zeros(1, 8, 3), torch.zeros(1, 8, 4), *args)
    args = (torch.zeros(8, 4), None, torch.zeros(8, 2), None, torch.zeros(8), torch.zeros(8, 4), torch.ones(8),
            splits, 4, 4)
    with pytest.raises(ValueError, match="contiguous"):
        mamba1_decode_step(torch.zeros(1, 26), torch.zeros(1, 4, 8).transpose(1, 2), torch.zeros(1, 8, 4), *args)
