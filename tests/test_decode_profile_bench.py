"""bench/decode_profile.py's op census: bytes counted as the rules say, the LM head read once per step, and the
decode step free of the per-cache constants' ops (A = -exp(A_log) is made before the step, not in it)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import decode_profile as dp


def test_census_counts_bytes_by_hand():
    a, b = torch.ones(4, 8), torch.ones(8, 2)
    table, idx = torch.zeros(100, 8), torch.tensor([3, 5])
    cache, src, slot = torch.zeros(2, 10, 8), torch.ones(2, 1, 8), torch.tensor([4])
    with dp.OpCensus() as census:
        torch.mm(a, b)
        torch.nn.functional.embedding(idx, table)
        cache.index_copy_(1, slot, src)
    mm, emb, icopy = [op for op in census.ops if op[0] not in dp.VIEW_OPS]
    assert mm == ("mm", (32 + 16) * 4, 8 * 4)
    assert emb == ("embedding", 2 * 8 + 2 * 8 * 4, 2 * 8 * 4)  # the two rows looked up, not the 100-row table
    assert icopy == ("index_copy_", 8 + 16 * 4, 8 + 16 * 4)  # the written slot, not the whole cache


def test_decode_step_census_of_the_tiny_hybrid():
    model = dp.build("tiny", dp.SHAPES["tiny"], "cpu", torch.float32)
    c = dp.op_census(model, 2, 8)
    head = model.lm_head.weight
    assert c["by_op"]["mm"]["read_bytes"] >= head.numel() * head.element_size()
    assert c["read_bytes"] >= c["weight_bytes"] - model.model.embed_tokens.weight.numel() * 4
    # the constants are made once per cache: no neg of A in the step (the attention layer's RoPE has its own 2)
    assert c["by_op"]["neg"]["count"] == 2 * c["attention_layers"]
    assert c["ops_per_step"] == sum(v["count"] for v in c["by_op"].values())
