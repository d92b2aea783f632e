"""The split-KV Triton decode attention (components/model/flash_decode.py) against its plain reference (SDPA over
the written, unpadded slots), run by Triton's CPU interpreter in a child process: TRITON_INTERPRET must be set
before Triton compiles anything, and setting it in this process would also turn mamba_ssm's kernels into
interpreted ones in a GPU test session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.model.flash_decode import flash_decode

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import json, torch
from components.model.flash_decode import flash_decode, reference
torch.manual_seed(0)
b, n_kv, rep, hd, max_len = 3, 2, 3, 64, 600
out = {}
for dtype in (torch.float32, torch.bfloat16):
    q = torch.randn(b, n_kv, rep, hd, dtype=dtype)
    k, v = torch.randn(2, b, n_kv, max_len, hd, dtype=dtype)
    key_mask = torch.zeros(b, max_len, dtype=torch.bool)
    key_mask[0], key_mask[1, 40:], key_mask[2, 300:] = True, True, True  # left padding: none, 40 and 300 slots
    key_mask[:, 520:] = True  # marks past the write position (a stale cache) must not count
    for wp in (0, 45, 257, 599):
        km = key_mask.clone()
        km[:, wp] = True  # the slot the step just wrote
        ref = reference(q, k, v, km, torch.tensor([wp])).float()
        for split, block in ((256, 64), (64, 32)):
            got = flash_decode(q, k, v, km, torch.tensor([wp]), split=split, block=block).float()
            key = f"{str(dtype)[6:]}/wp{wp}/split{split}"
            out[key] = (got - ref).abs().max().item()
print(json.dumps(out))
"""


def test_flash_decode_equals_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    diffs = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(diffs) == 16
    fp32 = {k: v for k, v in diffs.items() if k.startswith("float32")}
    bf16 = {k: v for k, v in diffs.items() if k.startswith("bfloat16")}
    assert max(fp32.values()) < 1e-5, fp32
    assert max(bf16.values()) < 2e-2, bf16  # one bf16 rounding of outputs of O(1)


def test_flash_decode_refuses_shapes_it_cannot_tile():
    q = torch.zeros(1, 1, 2, 48)
    cache = torch.zeros(1, 1, 8, 48)
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16, got 48"):
        flash_decode(q, cache, cache, torch.ones(1, 8, dtype=torch.bool), torch.tensor([0]))
    q, cache = torch.zeros(1, 1, 2, 64), torch.zeros(1, 1, 8, 64)
    with pytest.raises(ValueError, match="split 100 is not a multiple of block 64"):
        flash_decode(q, cache, cache, torch.ones(1, 8, dtype=torch.bool), torch.tensor([0]), split=100)
