"""HybridConfig: the shape of a Llama-architecture model whose layers are either attention or Mamba.

Stored as config.json in the Hugging Face layout (`model_type: "m1_hybrid"`). The Llama fields keep the
transformers names so a teacher's config maps field for field; the Mamba fields follow the M1 / MambaInLlama
recipe (expand 1, d_state 16, conv 4, dt_rank = ceil(d_model / 16))."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from components.errors import M1Error

MIXERS = ("mamba1", "mamba2")


@dataclass
class HybridConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # transformers' llama3 scaling dict ({"rope_type": "llama3", "factor": ..., ...}) or None.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # Which layers keep attention; all others are Mamba mixers of kind `mixer`.
    attn_layers: list[int] = field(default_factory=list)
    mixer: str = "mamba1"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 1
    dt_rank: int | None = None
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    # Mamba-2 head size (defaults to head_dim, so B/C/x map onto k/q/v heads one to one).
    mamba2_headdim: int | None = None
    # Run the Mamba-1 layers as MambaInLlama / M1 do, so their released checkpoints (components/model/reference.py)
    # give their logits here: dt_proj's bias is added twice (inside dt_proj and again as the scan's delta bias),
    # and x and B are repeated in d_state-wide slices instead of whole heads when n_kv < n_heads.
    reference_compat: bool = False
    initializer_range: float = 0.02
    model_type: str = "m1_hybrid"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.hidden_size / 16)
        if self.mamba2_headdim is None:
            self.mamba2_headdim = self.head_dim
        self.attn_layers = sorted(int(i) for i in self.attn_layers)
        self.validate()

    def validate(self) -> None:
        n = self.num_hidden_layers
        bad = [i for i in self.attn_layers if not 0 <= i < n]
        if bad:
            raise M1Error(f"attention layer indices {bad} out of range: the model has {n} layers (0..{n - 1})")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise M1Error(f"attention layer indices repeat: {self.attn_layers}")
        if self.mixer not in MIXERS:
            raise M1Error(f"unknown mixer {self.mixer!r}; choose one of {', '.join(MIXERS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise M1Error(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.reference_compat and self.mixer != "mamba1":
            raise M1Error("reference_compat reproduces the reference's Mamba-1 layer only; use mixer mamba1")
        if self.reference_compat and self.d_xb % self.d_state:
            raise M1Error(f"reference_compat repeats x and B in d_state slices: d_state {self.d_state} must divide "
                          f"the key/value width {self.d_xb}")
        if self.mixer == "mamba2" and self.d_inner % self.mamba2_headdim:
            raise M1Error(f"d_inner {self.d_inner} is not a multiple of mamba2_headdim {self.mamba2_headdim}")

    # Derived sizes of the Mamba mixers.
    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def d_xb(self) -> int:
        """Width of x and B before the GQA repeat: one slot per key/value channel of the teacher."""
        return self.num_key_value_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def layer_types(self) -> list[str]:
        attn = set(self.attn_layers)
        return ["attention" if i in attn else self.mixer for i in range(self.num_hidden_layers)]

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["architectures"] = ["HybridForCausalLM"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        known = {f.name for f in fields(cls)}
        if d.get("model_type", "m1_hybrid") != "m1_hybrid":
            raise M1Error(f"config.json is a {d.get('model_type')!r} model, not an m1 hybrid (model_type m1_hybrid)")
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> HybridConfig:
        p = Path(directory, "config.json")
        if not p.is_file():
            raise M1Error(f"no config.json in {directory}: not a saved hybrid model directory")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise M1Error(f"{p} is not a valid hybrid config: {e}") from e

    @classmethod
    def from_llama(cls, llama_cfg, **overrides) -> HybridConfig:
        """Copy the shape of a transformers LlamaConfig (v4 or v5 naming of the RoPE fields)."""
        rope = getattr(llama_cfg, "rope_parameters", None) or getattr(llama_cfg, "rope_scaling", None) or {}
        rope = dict(rope)
        theta = rope.pop("rope_theta", None) or getattr(llama_cfg, "rope_theta", None) or 10000.0
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "llama3"):
            raise M1Error(f"unsupported RoPE scaling {rtype!r} (supported: default, llama3)")
        head_dim = getattr(llama_cfg, "head_dim", None) or llama_cfg.hidden_size // llama_cfg.num_attention_heads
        pad = getattr(llama_cfg, "pad_token_id", None)
        kw = dict(
            vocab_size=llama_cfg.vocab_size,
            hidden_size=llama_cfg.hidden_size,
            intermediate_size=llama_cfg.intermediate_size,
            num_hidden_layers=llama_cfg.num_hidden_layers,
            num_attention_heads=llama_cfg.num_attention_heads,
            num_key_value_heads=getattr(llama_cfg, "num_key_value_heads", None) or llama_cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=llama_cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=rope if rtype == "llama3" else None,
            max_position_embeddings=llama_cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(llama_cfg, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(llama_cfg, "attention_bias", False)),
            mlp_bias=bool(getattr(llama_cfg, "mlp_bias", False)),
            bos_token_id=getattr(llama_cfg, "bos_token_id", None),
            eos_token_id=getattr(llama_cfg, "eos_token_id", None),
            pad_token_id=pad,
            initializer_range=getattr(llama_cfg, "initializer_range", 0.02),
        )
        kw.update(overrides)
        return cls(**kw)
