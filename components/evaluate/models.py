"""Models to evaluate, all in the same engine: a saved hybrid directory loads as HybridForCausalLM; anything else
is a teacher source (hub id, HF directory, .gguf, "smollm2", "random:<shape>") converted with every layer kept as
attention, which reproduces the teacher's logits, so teacher and hybrid share the generation code and their speeds
compare fairly. A model that does not load is reported in one line (M1Error)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.data.tokenizer_cache import cached_tokenizer
from components.errors import M1Error
from components.model import HybridForCausalLM, convert
from components.model.teacher import EMBEDDED_TEACHER, load_any_teacher

# transformers is imported where a tokenizer directory is read (_tokenizer_for_dir): seconds of start-up otherwise.


@dataclass
class EvalModel:
    name: str
    source: str
    kind: str  # "hybrid" | "teacher"
    model: object
    tokenizer: object
    load_s: float
    eos_ids: list[int] = field(default_factory=list)

    def describe(self) -> dict:
        cfg = self.model.config
        return {"name": self.name, "source": self.source, "kind": self.kind, "layers": cfg.num_hidden_layers,
                "attn_layers": list(cfg.attn_layers), "mixer": cfg.mixer,
                "parameters": sum(p.numel() for p in self.model.parameters()), "load_s": round(self.load_s, 2)}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise M1Error(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise M1Error(f"device {device} requested but CUDA is not available")
    return dev


def is_hybrid_dir(source: str) -> bool:
    p = Path(source) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("model_type") == "m1_hybrid"
    except (OSError, json.JSONDecodeError):
        return True  # a hybrid directory with a broken config: let the hybrid loader say what is wrong


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _tokenizer_for_dir(d: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json first and warns that m1_hybrid is no transformers model type: expected here
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(d)
    except Exception as e:
        raise M1Error(f"no usable tokenizer in {d}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(level)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _teacher_tokenizer(source: str):
    # random teachers share the embedded teacher's vocabulary (components.model.teacher.load_any_tokenizer)
    return cached_tokenizer(EMBEDDED_TEACHER if source.startswith("random:") else source)


def load_eval_model(name: str, source: str, device: str | torch.device = "cpu", dtype: str = "float32",
                    seed: int = 0) -> EvalModel:
    t0 = time.time()
    source = str(source)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    try:
        if is_hybrid_dir(source):
            kind = "hybrid"
            model = HybridForCausalLM.from_pretrained(source)
            tok = _tokenizer_for_dir(source)
        else:
            kind = "teacher"
            if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
                raise M1Error(f"{source} is neither a saved hybrid nor a Hugging Face model directory (no config.json)")
            teacher = load_any_teacher(source, "float32", seed=seed)
            model = convert(teacher, list(range(teacher.config.num_hidden_layers)))
            del teacher
            tok = _teacher_tokenizer(source)
        model = model.to(device=dev, dtype=getattr(torch, dtype)).eval()
    except M1Error as e:
        raise M1Error(f"model {name} ({source}) does not load: {e}") from None
    except Exception as e:  # corrupt safetensors, wrong shapes, a truncated file: one line, not a traceback
        raise M1Error(f"model {name} ({source}) does not load: {_first_line(e)}") from None
    eos = list(model.config.eos_ids)
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    return EvalModel(name, source, kind, model, tok, time.time() - t0, eos)
