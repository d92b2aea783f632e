"""bench/state_dtype_drift.py: the lockstep comparison is exactly zero for identical set-ups and positive for a
bf16 state; divergence positions and windows by hand."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import state_dtype_drift as drift

from components.model import convert


def test_first_divergence_and_windows_by_hand():
    assert drift.first_divergence([[1, 2, 3], [1, 2, 3], [4, 5]], [[1, 2, 3], [1, 9, 3], [4, 5, 6]]) == [None, 1, 2]
    w = drift.windows([1.0, 3.0, 2.0, 6.0, 5.0], 2)
    assert [(x["from"], x["to"], x["mean"], x["max"]) for x in w] == [(0, 2, 2.0, 3.0), (2, 4, 4.0, 6.0), (4, 5, 5.0, 5.0)]


def test_lockstep_is_zero_for_identical_setups_and_positive_for_a_bf16_state(tiny_teacher):
    model = convert(tiny_teacher, [1], "mamba1").eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    traj = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    same = {"reference": (model, torch.float32), "bf16_state": (model, torch.float32),
            "bf16_weights": (model, torch.float32)}
    per = drift.lockstep(same, prompts, traj, 0)
    for s in drift.SETUPS:
        assert len(per[s]["kl"]) == 10
        assert max(per[s]["max_abs"]) == 0 and min(per[s]["top1"]) == 1.0
    per = drift.lockstep({**same, "bf16_state": (model, torch.bfloat16)}, prompts, traj, 0)
    assert max(per["bf16_state"]["max_abs"]) > 0 and max(per["bf16_weights"]["max_abs"]) == 0
    assert all(k >= -1e-7 for k in per["bf16_state"]["kl"])
