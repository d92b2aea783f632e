"""Reference compatibility: a MambaInLlama / M1 checkpoint (their HF layout) loaded with
components.model.reference gives the reference's logits.

The reference is written out below from scratch in plain PyTorch, module names as in its checkpoints: Llama
attention layers, and its Mamba-1 layer run one step at a time (a loop-over-time selective scan) with its two
quirks: dt_proj (a Linear with bias) feeds a scan that adds dt_proj.bias again, and x and B are repeated to
d_inner in d_state-wide slices. head_dim (32) is twice d_state (16) and there are half as many key/value heads
as query heads, so the slice-wise repeat differs from a head-wise one."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from components.errors import M1Error
from components.model import HybridConfig, HybridForCausalLM
from components.model.reference import load_reference_hybrid

H, NH, NKV, N, K, LAYERS, VOCAB, INTER = 128, 4, 2, 16, 4, 4, 97, 192
HD, DXB, R = H // NH, NKV * H // NH, math.ceil(H / 16)
ATTN = [1]
EPS, THETA = 1e-5, 10000.0


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(H))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(H, NH * HD, bias=False), nn.Linear(H, NKV * HD, bias=False)
        self.v_proj, self.o_proj = nn.Linear(H, NKV * HD, bias=False), nn.Linear(NH * HD, H, bias=False)

    def forward(self, x):
        b, L, _ = x.shape
        q = self.q_proj(x).view(b, L, NH, HD).transpose(1, 2)
        k = self.k_proj(x).view(b, L, NKV, HD).transpose(1, 2)
        v = self.v_proj(x).view(b, L, NKV, HD).transpose(1, 2)
        inv = 1.0 / THETA ** (torch.arange(0, HD, 2).float() / HD)
        ang = torch.arange(L).float()[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t):
            return t * cos + torch.cat([-t[..., HD // 2:], t[..., :HD // 2]], -1) * sin

        q, k = rope(q), rope(k).repeat_interleave(NH // NKV, 1)
        s = (q @ k.transpose(-1, -2) / math.sqrt(HD)).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
        o = s.softmax(-1) @ v.repeat_interleave(NH // NKV, 1)
        return self.o_proj(o.transpose(1, 2).reshape(b, L, NH * HD))


class Mamba(nn.Module):
    """The reference's Mamba-1 layer (training layout: one projection per part)."""

    def __init__(self, repeat_before_conv=True):
        super().__init__()
        self.repeat_before_conv = repeat_before_conv
        self.in_proj_x, self.in_proj_z = nn.Linear(H, DXB, bias=False), nn.Linear(H, H, bias=False)
        self.B_proj, self.C_proj = nn.Linear(H, DXB, bias=False), nn.Linear(H, H, bias=False)
        self.dt_proj_down, self.dt_proj = nn.Linear(H, R, bias=False), nn.Linear(R, H, bias=True)
        ch = H if repeat_before_conv else DXB
        self.conv1d = nn.Conv1d(ch, ch, K, groups=ch, padding=K - 1, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1).float()).repeat(H, 1) + 0.1 * torch.randn(H, N))
        self.D = nn.Parameter(1 + 0.1 * torch.randn(H))
        self.out_proj = nn.Linear(H, H, bias=False)
        with torch.no_grad():  # dt of order 1 even with the bias counted twice, so the state matters
            self.dt_proj.bias.uniform_(-0.5, 1.0)

    @staticmethod
    def repeat_slices(t):
        """(b, DXB) -> (b, H): d_state-wide slice j fills slots j*r .. j*r+r-1 (repeat_kv over d_state groups)."""
        b, r = t.shape[0], H // DXB
        return t.view(b, DXB // N, 1, N).expand(b, DXB // N, r, N).reshape(b, H)

    def forward(self, h):
        b, L, _ = h.shape
        conv_state = h.new_zeros(b, self.conv1d.weight.shape[0], K)
        ssm = h.new_zeros(b, H, N)
        return torch.stack([self.step(h[:, t], conv_state, ssm) for t in range(L)], 1)

    def step(self, u, conv_state, ssm):
        b = u.shape[0]
        x, z = self.in_proj_x(u), self.in_proj_z(u)
        B = self.repeat_slices(self.B_proj(u)).view(b, H // N, N).repeat_interleave(N, 1)  # channel c: group c // N
        C = self.C_proj(u).view(b, H // N, N).repeat_interleave(N, 1)
        dt = self.dt_proj(self.dt_proj_down(u))  # the bias once, inside dt_proj ...
        dt = F.softplus(dt + self.dt_proj.bias)  # ... and once more as the scan's delta_bias / dt_bias
        if self.repeat_before_conv:
            x = self.repeat_slices(x)
        conv_state.copy_(torch.roll(conv_state, -1, -1))
        conv_state[:, :, -1] = x
        x = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        if not self.repeat_before_conv:
            x = self.repeat_slices(x)
        ssm.copy_(ssm * torch.exp(dt[..., None] * -torch.exp(self.A_log)) + (dt * x)[..., None] * B)
        y = (ssm * C).sum(-1) + self.D * x
        return self.out_proj(y * F.silu(z))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, INTER, bias=False), nn.Linear(H, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, attention, repeat_before_conv):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm, self.mlp = Norm(), Norm(), MLP()
        if attention:
            self.self_attn = Attention()
        else:
            self.mamba = Mamba(repeat_before_conv)

    def forward(self, h):
        mixer = self.self_attn if hasattr(self, "self_attn") else self.mamba
        h = h + mixer(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class ReferenceHybrid(nn.Module):
    def __init__(self, repeat_before_conv=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, H)
        self.model.layers = nn.ModuleList(Layer(i in ATTN, repeat_before_conv) for i in range(LAYERS))
        self.model.norm = Norm()
        self.lm_head = nn.Linear(H, VOCAB, bias=False)

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def write_reference_dir(ref, d, layout="split", repeat_before_conv=True):
    """The reference's checkpoint directory: config.json (the Llama teacher's), mamba_config.json, safetensors.
    layout "fused": Mamba projections stacked into in_proj, as the reference's inference code keeps them."""
    from transformers import LlamaConfig

    d.mkdir(parents=True, exist_ok=True)
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                        num_attention_heads=NH, num_key_value_heads=NKV, rms_norm_eps=EPS, rope_theta=THETA,
                        max_position_embeddings=256, tie_word_embeddings=False)
    (d / "config.json").write_text(json.dumps(llama.to_dict()))
    ssm_cfg = {"expand": 1} if repeat_before_conv else {"expand": 1, "repeat_kv_before_conv": False}
    (d / "mamba_config.json").write_text(json.dumps({
        "d_model": H, "ssm_cfg": ssm_cfg, "rms_norm_eps": EPS, "vocab_size": None, "d_xb": DXB, "d_inner": H,
        "intermediate_size": INTER, "hidden_act": "silu", "n_layer": LAYERS, "attn_layers": ATTN}))
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if layout == "fused":
        for i in range(LAYERS):
            m = f"model.layers.{i}.mamba."
            if m + "in_proj_x.weight" in state:
                parts = [state.pop(f"{m}{n}.weight") for n in ("in_proj_z", "in_proj_x", "B_proj", "C_proj", "dt_proj_down")]
                state[m + "in_proj.weight"] = torch.cat(parts, 0)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _ids(b, L, seed=1):
    return torch.randint(0, VOCAB, (b, L), generator=torch.Generator().manual_seed(seed))


VARIANTS = {"split": ("split", True), "fused": ("fused", True), "conv_before_repeat": ("fused", False)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    layout, before = VARIANTS[request.param]
    ref = ReferenceHybrid(repeat_before_conv=before).eval()
    d = write_reference_dir(ref, tmp_path_factory.mktemp("ref"), layout, before)
    return ref, load_reference_hybrid(d), d


def test_full_forward_matches_the_reference(pair):
    ref, model, _ = pair
    assert model.config.reference_compat and model.config.layer_types == ["mamba1", "attention", "mamba1", "mamba1"]
    ids = _ids(2, 13)
    with torch.no_grad():
        want, got = ref(ids), model(ids)
    assert (got - want).abs().max().item() < 1e-5
    assert want.abs().max().item() > 0.1  # logits of a real size, so the tolerance means something


def test_stepwise_decode_matches_the_reference(pair):
    """Prefill 5 tokens, then one token at a time through the cache (the single-step recurrence)."""
    ref, model, _ = pair
    ids = _ids(2, 12, seed=2)
    with torch.no_grad():
        want = ref(ids)
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert (torch.cat(parts, 1) - want).abs().max().item() < 1e-5


def test_without_the_flag_the_same_weights_give_other_logits(pair):
    ref, model, _ = pair
    cfg = HybridConfig.from_dict({**model.config.to_dict(), "reference_compat": False})
    plain = HybridForCausalLM(cfg)
    plain.load_state_dict(model.state_dict())
    ids = _ids(2, 12, seed=3)
    with torch.no_grad():
        want = ref(ids)
        cache = plain.new_cache(2, 16)
        steps = torch.cat([plain(ids[:, :5], cache=cache)] + [plain(ids[:, t:t + 1], cache=cache) for t in range(5, 12)], 1)
        full = plain(ids.clone())
    assert (full - want).abs().max().item() > 1e-2
    assert (steps - want).abs().max().item() > 1e-2


def test_save_and_load_keep_the_flag(pair, tmp_path):
    _, model, _ = pair
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["reference_compat"] is True
    back = HybridForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.reference_compat is True
    ids = _ids(1, 9, seed=4)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    d.pop("reference_compat")  # a config.json written before the flag existed
    assert HybridConfig.from_dict(d).reference_compat is False


def test_mamba2_checkpoints_and_configs_are_refused(tmp_path):
    from safetensors.torch import load_file

    d = write_reference_dir(ReferenceHybrid(), tmp_path / "ref")
    state = load_file(str(d / "model.safetensors"))
    state["model.layers.0.mamba.dt_bias"] = torch.zeros(4)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(M1Error, match="Mamba-2"):
        load_reference_hybrid(d)
    with pytest.raises(M1Error, match="mamba1"):
        HybridConfig(mixer="mamba2", reference_compat=True)
