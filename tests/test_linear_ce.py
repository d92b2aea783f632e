"""components.model.linear_ce.linear_ce_sum: the chunked LM-head cross-entropy equals the plain one, value and gradients."""
import pytest
import torch
import torch.nn.functional as F

from components.model.linear_ce import IGNORE_INDEX, linear_ce_sum


def _plain(h, w, t):
    return F.cross_entropy((h @ w.T).float().reshape(-1, w.shape[0]), t.reshape(-1), reduction="sum",
                           ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk", [1, 10, 37, 500])
def test_value_and_gradients_equal_the_plain_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (2, 37), generator=g)
    t[0, :5] = IGNORE_INDEX  # prompt tokens: no loss, no gradient
    ref = _plain(h, w, t)
    gh, gw = torch.autograd.grad(ref * 1.7, (h, w))
    out = linear_ce_sum(h, w, t, chunk=chunk)
    gh2, gw2 = torch.autograd.grad(out * 1.7, (h, w))
    assert torch.allclose(out, ref, rtol=1e-5)
    assert torch.allclose(gh2, gh, atol=1e-5) and torch.allclose(gw2, gw, atol=1e-5)
    assert gh2[0, :5].abs().max() == 0


def test_one_token_by_hand():
    # logits (0, ln 3) -> p = (1/4, 3/4); CE of target 0 is ln 4; d/dh = (p - onehot) @ w
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    w = torch.tensor([[0.0, 0.0], [torch.log(torch.tensor(3.0)), 0.0]], requires_grad=True)
    loss = linear_ce_sum(h, w, torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(4.0))), rel=1e-6)
    assert torch.allclose(h.grad, torch.tensor([[0.75 * float(torch.log(torch.tensor(3.0))), 0.0]]))
    assert torch.allclose(w.grad, torch.tensor([[-0.75, 0.0], [0.75, 0.0]]))


def test_tied_weights_accumulate_both_uses_and_bf16_matmuls_stay_close():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(64, 32, generator=g, requires_grad=True)
    ids = torch.randint(0, 64, (3, 20), generator=g)
    t = torch.roll(ids, -1, 1)

    def grads(loss_fn):
        h = torch.tanh(emb[ids])  # the embedding is used on the way in and as the head: both gradients add up
        loss = loss_fn(h)
        return loss, torch.autograd.grad(loss, emb)[0]

    ref, g_ref = grads(lambda h: _plain(h, emb, t))
    out, g_out = grads(lambda h: linear_ce_sum(h, emb, t, chunk=7))
    assert torch.allclose(out, ref, rtol=1e-5) and torch.allclose(g_out, g_ref, atol=1e-5)
    low, g_low = grads(lambda h: linear_ce_sum(h, emb, t, chunk=7, dtype=torch.bfloat16))
    assert low.dtype == torch.float32 and torch.allclose(low, ref, rtol=2e-2)
    assert (g_low - g_ref).norm() / g_ref.norm() < 2e-2


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        linear_ce_sum(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), chunk=0)


def test_model_forward_with_targets_equals_the_fine_tuning_loss_on_logits(tiny_teacher):
    """What the fine-tuning stages now compute (forward(targets=ce_targets(...)): CE through the LM head over the
    counted positions only) equals the CE that distill_loss_sums takes from full logits: value and gradients, on a
    packed batch with prompt tokens and a document boundary."""
    from components.model import convert
    from components.train.losses import ce_targets, distill_loss_sums

    model = convert(tiny_teacher, [1], "mamba1").train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (2, 16), generator=g)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, :5] = 0  # the prompt
    doc_ids = torch.zeros_like(ids)
    doc_ids[1, 9:] = 1  # a second document: no prediction across the boundary
    pos = torch.arange(16).repeat(2, 1)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits = model(ids, position_ids=pos, doc_ids=doc_ids)
    _, _, ce_ref, n = distill_loss_sums(logits, None, ids, loss_mask, doc_ids, 0.0, 1.0)
    g_ref = grads(distill_loss_sums(logits, None, ids, loss_mask, doc_ids, 0.0, 1.0)[0])
    targets = ce_targets(ids, loss_mask, doc_ids)
    assert int((targets != IGNORE_INDEX).sum()) == int(n) == 11 + 10  # targets 5..15; row 1 loses 8 -> 9
    ce = model(ids, position_ids=pos, doc_ids=doc_ids, targets=targets)
    assert torch.allclose(ce.detach(), ce_ref, rtol=1e-5)
    g_new = grads(ce)
    assert g_new.keys() == g_ref.keys()
    for k in g_ref:
        assert torch.allclose(g_new[k], g_ref[k], atol=1e-5, rtol=1e-4), k
