"""A bf16 SSM state between decode steps: each step updates in fp32 and rounds once when storing (mamba_ssm's
selective_state_update does the same), the output reads the unrounded state, and generation runs with it."""
import pytest
import torch

from components.model import convert, generate, scan
from components.model.cache import InferenceCache


def _inputs(seed=0, b=2, d=8, n=4, G=2):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return r(b, d, n), r(b, d), r(b, d).abs() * 0.5, -r(d, n).abs(), r(b, G, n), r(b, G, n), r(d)


def test_mamba1_step_rounds_the_stored_state_once_and_reads_the_unrounded_one():
    h, u, dt, A, B, C, D = _inputs()
    h16 = h.to(torch.bfloat16)
    ref = h16.float().clone()
    y_ref = scan.selective_state_step(ref, u, dt, A, B, C, D)  # fp32 state from the same (rounded) start
    y = scan.selective_state_step(h16, u, dt, A, B, C, D)
    assert h16.dtype == torch.bfloat16
    assert torch.equal(h16, ref.to(torch.bfloat16))
    assert torch.allclose(y, y_ref, atol=1e-6)


def test_mamba2_step_rounds_the_stored_state_once():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 3, 5, generator=g)
    x, dt = torch.randn(2, 4, 3, generator=g), torch.rand(2, 4, generator=g)
    A, B, C, D = -torch.rand(4, generator=g), torch.randn(2, 2, 5, generator=g), torch.randn(2, 2, 5, generator=g), \
        torch.randn(4, generator=g)
    s16 = s.to(torch.bfloat16)
    ref = s16.float().clone()
    y_ref = scan.ssd_step(ref, x, dt, A, B, C, D)
    y = scan.ssd_step(s16, x, dt, A, B, C, D)
    assert torch.equal(s16, ref.to(torch.bfloat16)) and torch.allclose(y, y_ref, atol=1e-6)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_generation_with_a_bf16_state_stays_close_to_fp32(tiny_teacher, mixer):
    model = convert(tiny_teacher, [1], mixer)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    a = generate(model, prompts, 12, greedy=True, engine="static", bucket_size=8)
    b = generate(model, prompts, 12, greedy=True, engine="static", bucket_size=8, state_dtype=torch.bfloat16)
    c = generate(model, prompts, 12, greedy=True, engine="eager", state_dtype=torch.bfloat16)
    assert b.tokens == c.tokens  # both engines round the same state the same way
    gap = max(abs(x - y) for r1, r2 in zip(a.logprobs, b.logprobs) for x, y in zip(r1, r2))
    assert 0 < gap < 0.05  # the rounding shows, and stays small on this tiny model


def test_bad_state_dtype_is_refused(tiny_teacher):
    model = convert(tiny_teacher, [1], "mamba1")
    with pytest.raises(ValueError, match="state_dtype must be torch.float32 or torch.bfloat16"):
        InferenceCache(model.config, 1, 8, "cpu", state_dtype=torch.float16)
    cache = model.new_cache(2, 8, torch.bfloat16)
    assert all(s.ssm.dtype == torch.bfloat16 for s in cache.mamba.values())


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_decode_constants_are_made_per_cache_so_new_weights_are_used(tiny_teacher, engine):
    """A = -exp(A_log), the fp32 dt bias and the packed projections (q|k|v, gate|up) are made once per generate()
    call, not per step: a policy whose weights change between two calls (GRPO's sampler) must decode with the new
    ones, as a fresh copy of the model does."""
    import copy

    model = convert(tiny_teacher, [1], "mamba1")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    generate(model, prompts, 6, greedy=True, engine=engine, bucket_size=8)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.kind != "attention":
                layer.mamba.A_log.mul_(0.5)
                layer.mamba.dt_proj.bias.add_(1.0)
            else:
                layer.self_attn.k_proj.weight.mul_(1.5)
            layer.mlp.up_proj.weight.mul_(1.5)
    fresh = copy.deepcopy(model)
    a = generate(model, prompts, 12, greedy=True, engine=engine, bucket_size=8)
    b = generate(fresh, prompts, 12, greedy=True, engine=engine, bucket_size=8)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    cache = model.new_cache(2, 8)
    model.prepare_decode(cache)
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        assert torch.equal(cache.packed[i]["gate_up"], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        if layer.kind == "attention":
            a = layer.self_attn
            assert torch.equal(cache.packed[i]["qkv"], torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        else:
            consts = cache.mamba_state(i).consts
            assert torch.equal(consts["A"], -torch.exp(layer.mamba.A_log.float()))
            assert consts["dt_bias"].dtype == torch.float32
