"""Greedy choice of attention layers (components/train/layer_choice.py) on the tiny random teacher."""
import copy

import pytest
import torch
import torch.nn.functional as F

from components.model import convert
from components.train.layer_choice import (
    full_logits,
    greedy_attention_layers,
    kl_without_attention,
)


@pytest.fixture(scope="module")
def engine_and_batches(tiny_teacher):
    model = convert(tiny_teacher, list(range(tiny_teacher.config.num_hidden_layers)))
    g = torch.Generator().manual_seed(3)
    batches = []
    for L in (17, 9):
        ids = torch.randint(0, 49152, (2, L), generator=g)
        mask = torch.rand((2, L), generator=g) > 0.3
        batches.append({"input_ids": ids, "mask": mask})
    return model, batches


def _logits(model, batches):
    with torch.no_grad():
        return [model(b["input_ids"]).float() for b in batches]


def _kl_by_hand(model, batches, keep):
    """The same KL with attention removed by zeroing o_proj in a copy: no hooks involved."""
    ablated = copy.deepcopy(model)
    for i, layer in enumerate(ablated.model.layers):
        if i not in keep:
            layer.self_attn.o_proj.weight.data.zero_()
    total = n = 0.0
    for b, t, s in zip(batches, _logits(model, batches), _logits(ablated, batches)):
        ls, lt = F.log_softmax(s[b["mask"]], -1), F.log_softmax(t[b["mask"]], -1)
        total += float((ls.exp() * (ls - lt)).sum())
        n += int(b["mask"].sum())
    return total / n


def test_kl_is_zero_with_every_layer_kept(engine_and_batches):
    model, batches = engine_and_batches
    assert kl_without_attention(model, batches, _logits(model, batches), range(4)) < 1e-6


@pytest.mark.parametrize("keep", [[], [2], [0, 3]])
def test_kl_matches_zeroed_o_proj(engine_and_batches, keep):
    model, batches = engine_and_batches
    got = kl_without_attention(model, batches, _logits(model, batches), keep)
    assert got == pytest.approx(_kl_by_hand(model, batches, keep), rel=1e-4, abs=1e-6)
    assert got > 0


def test_greedy_takes_the_best_layer_each_round_and_leaves_the_model_as_it_was(engine_and_batches):
    model, batches = engine_and_batches
    before = _logits(model, batches)
    chosen = greedy_attention_layers(model, batches, k=2)
    singles = {i: _kl_by_hand(model, batches, [i]) for i in range(4)}
    first = min(singles, key=singles.get)
    assert chosen[0][0] == first and chosen[0][1] == pytest.approx(singles[first], rel=1e-4)
    pairs = {j: _kl_by_hand(model, batches, [first, j]) for j in range(4) if j != first}
    second = min(pairs, key=pairs.get)
    assert chosen[1][0] == second and chosen[1][1] == pytest.approx(pairs[second], rel=1e-4)
    for a, b in zip(before, _logits(model, batches)):
        assert torch.equal(a, b)  # hooks removed
    assert greedy_attention_layers(model, batches, k=2, teacher_logits=full_logits(model, batches)) == chosen


def test_greedy_rejects_a_hybrid_and_a_bad_k(tiny_teacher, engine_and_batches):
    model, batches = engine_and_batches
    with pytest.raises(ValueError, match="k=5"):
        greedy_attention_layers(model, batches, k=5)
    with pytest.raises(ValueError, match="all-attention"):
        greedy_attention_layers(convert(tiny_teacher, [0]), batches, k=1)
