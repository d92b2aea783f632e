"""Model core: teacher equivalence, decode == full forward (mixed lengths, packed docs), init mapping,
save/load, gradients, generation."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from components.errors import M1Error
from components.model import HybridConfig, HybridForCausalLM, convert, generate
from components.model.generate import left_pad

MIXERS = ["mamba1", "mamba2"]


def _ids(b, L, seed=0, vocab=49152):
    return torch.randint(0, vocab, (b, L), generator=torch.Generator().manual_seed(seed))


def test_all_attention_hybrid_reproduces_tiny_teacher(tiny_teacher):
    hybrid = convert(tiny_teacher, list(range(tiny_teacher.config.num_hidden_layers)))
    ids = _ids(2, 33)
    with torch.no_grad():
        diff = (tiny_teacher(ids).logits - hybrid(ids)).abs().max().item()
    assert diff < 1e-4


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(cfg).eval()
    hybrid = convert(teacher, [0, 1])
    assert hybrid.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 512, (1, 300))
    with torch.no_grad():
        assert (teacher(ids).logits - hybrid(ids)).abs().max() < 1e-4


@pytest.mark.slow
def test_all_attention_hybrid_reproduces_smollm2(smollm2_teacher):
    n = smollm2_teacher.config.num_hidden_layers
    hybrid = convert(smollm2_teacher, list(range(n)))
    ids = _ids(2, 24)
    with torch.no_grad():
        diff = (smollm2_teacher(ids).logits - hybrid(ids)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("mixer", MIXERS)
def test_stepwise_decode_equals_full_forward(tiny_teacher, mixer):
    model = convert(tiny_teacher, [1], mixer)
    ids = _ids(2, 12)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("mixer", MIXERS)
def test_mixed_length_batch_decode_equals_each_prompt_alone(tiny_teacher, mixer):
    model = convert(tiny_teacher, [2], mixer)
    prompts = [_ids(1, 3, 1)[0].tolist(), _ids(1, 11, 2)[0].tolist(), _ids(1, 7, 3)[0].tolist()]
    nxt = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    ids, mask = left_pad(prompts, 0, "cpu")
    with torch.no_grad():
        cache = model.new_cache(3, ids.shape[1] + 3)
        steps = [model(ids, attention_mask=mask, cache=cache)[:, -1]]
        for t in range(3):
            steps.append(model(torch.tensor([[n[t]] for n in nxt]), cache=cache)[:, -1])
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + nxt[i]]))[0]
            want = alone[len(p) - 1:]
            got = torch.stack([s[i] for s in steps])
            assert (got - want).abs().max() < 1e-4, f"row {i}"


@pytest.mark.parametrize("mixer", MIXERS)
def test_packed_documents_do_not_leak(tiny_teacher, mixer):
    model = convert(tiny_teacher, [1], mixer)
    docs = [_ids(1, n, s)[0] for n, s in ((5, 1), (9, 2), (4, 3))]
    row = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(row, position_ids=pos, doc_ids=doc_ids)[0]
        start = 0
        for d in docs:
            alone = model(d[None])[0]
            assert (packed[start:start + len(d)] - alone).abs().max() < 1e-4
            start += len(d)


@pytest.mark.parametrize("mixer", MIXERS)
def test_initialisation_copies_exactly_the_attention_weights(tiny_teacher, mixer):
    model = convert(tiny_teacher, [0], mixer, seed=3)
    cfg, src = model.config, tiny_teacher.state_dict()
    di, dxb = cfg.d_inner, cfg.d_xb
    dst = model.state_dict()
    for i in range(1, cfg.num_hidden_layers):
        w = dst[f"model.layers.{i}.mamba.in_proj.weight"]
        a = f"model.layers.{i}.self_attn."
        assert torch.equal(w[di:di + dxb], src[a + "v_proj.weight"])
        assert torch.equal(w[di + dxb:di + 2 * dxb], src[a + "k_proj.weight"])
        assert torch.equal(w[di + 2 * dxb:2 * di + 2 * dxb], src[a + "q_proj.weight"])
        assert torch.equal(dst[f"model.layers.{i}.mamba.out_proj.weight"], src[a + "o_proj.weight"])
        # z and dt rows keep the default init: not a copy of any teacher projection
        for proj in ("q_proj", "k_proj", "v_proj"):
            t = src[a + proj + ".weight"]
            assert not torch.equal(w[:t.shape[0]], t)
        bound = 1 / math.sqrt(cfg.hidden_size)  # nn.Linear's default init
        assert w[:di].abs().max() <= bound and w[2 * di + 2 * dxb:].abs().max() <= bound
        m = model.model.layers[i].mamba
        assert torch.equal(m.D.data, torch.ones_like(m.D))
        if mixer == "mamba1":
            assert torch.allclose(m.A_log[0], torch.log(torch.arange(1, cfg.d_state + 1.0)))
            dt = F.softplus(m.dt_proj.bias)
        else:
            dt = F.softplus(m.dt_bias)
        assert dt.min() >= cfg.dt_init_floor - 1e-7 and dt.min() >= cfg.dt_min * 0.999
        assert dt.max() <= cfg.dt_max * 1.001
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
                  "mlp.up_proj.weight", "mlp.down_proj.weight"):
            assert torch.equal(dst[f"model.layers.{i}.{n}"], src[f"model.layers.{i}.{n}"])
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(dst[f"model.layers.0.self_attn.{k}.weight"], src[f"model.layers.0.self_attn.{k}.weight"])
    assert torch.equal(dst["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(dst["model.norm.weight"], src["model.norm.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied like the teacher


@pytest.mark.parametrize("mixer", MIXERS)
def test_save_load_round_trip_gives_identical_logits(tiny_teacher, tmp_path, mixer):
    model = convert(tiny_teacher, [1, 3], mixer)
    ids = _ids(2, 10)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size=2_000_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    with torch.no_grad():
        want = model(ids)
        for d in ("one", "sharded"):
            loaded = HybridForCausalLM.from_pretrained(tmp_path / d)
            assert torch.equal(loaded(ids), want)
            assert loaded.config == model.config


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter(tiny_teacher, mixer):
    model = convert(tiny_teacher, [1], mixer).train()
    ids = _ids(2, 20)
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    logits = model(ids, doc_ids=doc_ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(tiny_teacher):
    ids = _ids(1, 16)
    grads = []
    for ckpt in (False, True):
        model = convert(tiny_teacher, [1]).train()
        model.gradient_checkpointing_enable(ckpt)
        model(ids).logsumexp(-1).mean().backward()
        grads.append(model.model.layers[0].mamba.in_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_generation_is_seeded_and_greedy_is_topk1(tiny_teacher):
    model = convert(tiny_teacher, [1])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    a = generate(model, prompts, 6, temperature=0.8, top_p=0.9, seed=7)
    b = generate(model, prompts, 6, temperature=0.8, top_p=0.9, seed=7)
    assert a.tokens == b.tokens
    g = generate(model, prompts, 6, greedy=True)
    k1 = generate(model, prompts, 6, top_k=1, temperature=1.0, seed=3)
    assert g.tokens == k1.tokens
    assert g.finish_reasons == ["length", "length"] and all(len(t) == 6 for t in g.tokens)


def test_generation_logprobs_match_a_full_forward(tiny_teacher):
    model = convert(tiny_teacher, [1])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    out = generate(model, prompts, 5, temperature=0.7, seed=1)
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([p + toks]))[0, len(p) - 1:-1] / 0.7
        want = torch.gather(F.log_softmax(logits, -1), -1, torch.tensor(toks)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps), want, atol=1e-4)


def test_generation_stops_on_eos(tiny_teacher):
    model = convert(tiny_teacher, [1])
    g = generate(model, [[5, 6, 7]], 6, greedy=True)
    first = g.tokens[0][1]  # make the second greedy token an EOS
    out = generate(model, [[5, 6, 7], [5, 6]], 6, greedy=True, eos_token_ids=[first])
    assert out.tokens[0] == g.tokens[0][:2] and out.finish_reasons[0] == "eos"


def test_config_validation_errors_are_one_line():
    with pytest.raises(M1Error, match=r"out of range.*4 layers"):
        HybridConfig(num_hidden_layers=4, attn_layers=[0, 4])
    with pytest.raises(M1Error, match="unknown mixer"):
        HybridConfig(mixer="rwkv")


@pytest.mark.slow
def test_m1_convert_on_smollm2_writes_a_model_that_generates(smollm2_tokenizer, tmp_path):
    from components.cli import main

    assert main(["convert", "--teacher", "smollm2", "--out", str(tmp_path / "m")]) == 0
    model = HybridForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.layer_types.count("attention") == 6 and model.config.mixer == "mamba1"
    tok = smollm2_tokenizer
    msgs = [[{"role": "user", "content": q}] for q in ("What is 2+3?", "Name a colour of the sky at noon.")]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len(ids[0]) != len(ids[1])
    out = generate(model, ids, 12, temperature=0.7, seed=0, tokenizer=tok)
    assert all(len(t) > 0 for t in out.tokens) and all(isinstance(s, str) and s for s in out.texts)
    assert all(math.isfinite(x) for lp in out.logprobs for x in lp)


@pytest.mark.parametrize("mixer", MIXERS)
def test_static_decode_engine_equals_eager(tiny_teacher, mixer):
    """The fixed-shape decode step (what CUDA graphs capture) gives the eager path's tokens and logprobs,
    across several KV-length buckets and a mixed-length batch."""
    model = convert(tiny_teacher, [1], mixer)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    a = generate(model, prompts, 20, greedy=True, engine="eager")
    b = generate(model, prompts, 20, greedy=True, engine="static", bucket_size=8)
    assert a.tokens == b.tokens
    assert max(abs(x - y) for r1, r2 in zip(a.logprobs, b.logprobs) for x, y in zip(r1, r2)) < 1e-4


def test_compiled_decode_engine_equals_the_static_one(tiny_teacher):
    """The decode step through torch.compile (Inductor's CPU backend here; Triton kernels on a GPU) gives the static
    engine's tokens and logprobs over several buckets, and a second generate reuses the compiled step."""
    import torch._dynamo

    torch._dynamo.reset()
    model = convert(tiny_teacher, [1], "mamba1")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]]
    a = generate(model, prompts, 20, greedy=True, engine="static", bucket_size=8)
    b = generate(model, prompts, 20, greedy=True, engine="compiled", bucket_size=8)
    assert a.tokens == b.tokens
    assert max(abs(x - y) for r1, r2 in zip(a.logprobs, b.logprobs) for x, y in zip(r1, r2)) < 1e-4
    step = model.__dict__["_compiled_decode_step"]
    c = generate(model, prompts, 20, greedy=True, engine="compiled", bucket_size=8)
    assert c.tokens == a.tokens and model.__dict__["_compiled_decode_step"] is step
    with pytest.raises(ValueError, match="unknown engine 'cuda_graph'"):
        generate(model, prompts, 2, engine="cuda_graph")


def test_convert_clears_a_crashed_runs_partial_folder_first(tmp_path):
    """Leftovers of a crashed convert in model.partial (a stray file, a stale chat template) are not published:
    the model equals a clean convert's, file for file."""
    from components.config import load_config
    from components.hashing import dvc_md5
    from components.model.convert import run

    clean = run(load_config("tiny", overrides={"run_dir": str(tmp_path / "clean")})).model_dir
    partial = tmp_path / "crashed" / "convert" / "model.partial"
    partial.mkdir(parents=True)
    (partial / "stray.txt").write_text("left by a crashed run")
    (partial / "chat_template.json").write_text('{"chat_template": "stale"}')
    out = run(load_config("tiny", overrides={"run_dir": str(tmp_path / "crashed")})).model_dir
    assert sorted(p.name for p in Path(out).iterdir()) == sorted(p.name for p in Path(clean).iterdir())
    assert dvc_md5(out) == dvc_md5(clean)


def test_transformer_arm_start_is_the_teacher(tmp_path):
    """The transformer arm starts from the teacher itself: every layer attention, the teacher's logits."""
    from components.config import load_config
    from components.model.convert import run_transformer
    from components.model.teacher import load_any_teacher

    cfg = load_config("tiny", overrides={"run_dir": str(tmp_path)})
    out = run_transformer(cfg)
    assert Path(out.model_dir) == tmp_path / "transformer_init" / "model"
    teacher = load_any_teacher(cfg.teacher.source, cfg.teacher.dtype, seed=cfg.seed)
    assert out.attn_layers == list(range(teacher.config.num_hidden_layers))
    model = HybridForCausalLM.from_pretrained(out.model_dir)
    ids = _ids(2, 17)
    with torch.no_grad():
        assert (teacher(ids).logits - model(ids)).abs().max().item() < 1e-4
