"""Precomputed top-k teacher log-probs: the rebuilt distribution by hand, k = V equals the exact teacher, the store
holds the teacher's own numbers, distillation from it lowers held-out KL, and a second run reuses the store."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_loop import _cfg  # tests/test_train_loop.py

from components.errors import M1Error
from components.model import convert
from components.train.data import PackedRows
from components.train.losses import kl_per_token
from components.train.teacher_topk import (
    TopkStore,
    dense_logprobs,
    precompute,
    topk_logprobs,
)


def test_uniform_tail_by_hand():
    p = torch.tensor([0.6, 0.3, 0.08, 0.02])
    v, i = topk_logprobs(p.log(), 2)
    assert i.tolist() == [0, 1]
    dense = dense_logprobs(v, i, 4).exp()
    assert torch.allclose(dense, torch.tensor([0.6, 0.3, 0.05, 0.05]), atol=1e-6)
    # reverse KL of a uniform student against it: sum 0.25 * (log 0.25 - log p_t)
    q = torch.zeros(4)
    by_hand = sum(0.25 * (math.log(0.25) - math.log(t)) for t in (0.6, 0.3, 0.05, 0.05))
    assert abs(float(kl_per_token(q, dense_logprobs(v, i, 4), "reverse")) - by_hand) < 1e-6


def test_k_equal_to_vocab_is_the_exact_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 50, generator=g), torch.randn(3, 5, 50, generator=g)
    v, i = topk_logprobs(t, 50)
    for kind in ("reverse", "forward", "js"):
        exact = kl_per_token(s, t, kind)
        assert torch.allclose(kl_per_token(s, dense_logprobs(v, i, 50), kind), exact, atol=1e-5), kind
    # a smaller k still gives a normalised distribution
    v, i = topk_logprobs(t, 7)
    assert torch.allclose(dense_logprobs(v, i, 50).exp().sum(-1), torch.ones(3, 5), atol=1e-5)


def test_store_holds_the_teachers_top_k(train_setup, tiny_teacher):
    root, data = train_setup
    rows = PackedRows(data / "sft1")
    engine = convert(tiny_teacher, list(range(tiny_teacher.config.num_hidden_layers))).eval()
    info = precompute("random:tiny", rows, data / "sft1", [5, 2, 5], 16, root / "store", "cpu", teacher=engine)
    assert info == {"rows": 2, "computed": 2}
    b = rows.batch([2, 5])
    with torch.no_grad():
        ref = torch.log_softmax(engine(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"]), -1)
    store = TopkStore(root / "store")
    assert store.row_ids.tolist() == [2, 5]
    top_v, top_i = ref.topk(16, -1)
    dense = store.dense([5, 2], "cpu")
    assert torch.allclose(dense[[1, 0]].gather(-1, top_i), top_v, atol=1e-5)
    # adding rows keeps the old ones and computes only the new
    assert precompute("random:tiny", rows, data / "sft1", [2, 7], 16, root / "store", "cpu", teacher=engine) == \
        {"rows": 3, "computed": 1}
    assert np.array_equal(TopkStore(root / "store").row_ids, [2, 5, 7])
    with pytest.raises(M1Error, match="lacks packed rows"):
        TopkStore(root / "store").dense([3], "cpu")
    with pytest.raises(M1Error, match="made for k=16"):
        precompute("random:tiny", rows, data / "sft1", [3], 8, root / "store", "cpu", teacher=engine)


def test_distillation_from_precomputed_top_k(train_setup):
    from components.train.stage import run

    root, data = train_setup
    store = root / "shared_store"
    out = run(_cfg(root, "topk", teacher_topk=64, teacher_topk_dir=str(store)),
              {"model_dir": root / "conv", "data_dir": data}, "distill")
    m = out.metrics
    assert m["heldout/kl"] < m["heldout/kl_before"]
    assert m["teacher_topk/computed"] == m["teacher_topk/rows"] == 12  # 6 steps x 4 rows cover all 12 rows
    again = run(_cfg(root, "topk_again", teacher_topk=64, teacher_topk_dir=str(store), lr=5e-4),
                {"model_dir": root / "conv", "data_dir": data}, "distill")
    assert again.metrics["teacher_topk/computed"] == 0


def test_top_k_without_kl_is_refused():
    with pytest.raises(M1Error, match="distill: .*teacher_topk 8 is set but kl_weight is 0"):
        _cfg(Path("/tmp"), "x", teacher_topk=8, kl_weight=0.0, ce_weight=1.0)
