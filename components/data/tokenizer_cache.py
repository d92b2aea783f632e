"""The teacher's tokenizer for curation, cached on disk.

Loading SmolLM2's tokenizer from its GGUF file takes ~10 s (the vocabulary is rebuilt from GGUF
metadata); the saved Hugging Face form loads in well under a second, and a process loads it once. The cache key is the resolved
source (path, size and mtime for files), so a changed GGUF or a different teacher gets its own entry.
The cache lives in $M1_CACHE_DIR (default ~/.cache/m1)/tokenizers.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from components.model.teacher import load_tokenizer, resolve_source

# transformers is imported where a tokenizer is loaded: seconds of start-up otherwise.


# Part of the key: entries written by an older load_tokenizer are not reused. 2: a GGUF tokenizer's BOS / EOS / pad come
# from the file's ids (entries of 1 written under transformers 5.17 name <|im_start|> as SmolLM2's EOS).
FORMAT = 2


def cache_root() -> str:
    return os.path.join(os.environ.get("M1_CACHE_DIR") or os.path.expanduser("~/.cache/m1"), "tokenizers")


def _key(source: str) -> str | None:
    src = resolve_source(source)
    if src.kind == "hub":
        return None  # the hub client has its own cache
    path = os.path.join(src.location, src.gguf_file) if src.gguf_file else os.path.join(src.location, "config.json")
    st = os.stat(path)
    return hashlib.sha256(f"{FORMAT}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


_LOADED: dict[str, object] = {}


def cached_tokenizer(source: str):
    """The tokenizer for `source`, loaded once per process and from the disk cache when possible."""
    key = _key(source)
    memo = key or f"hub:{source}"
    if memo not in _LOADED:
        _LOADED[memo] = _load(source, key)
    return _LOADED[memo]


def _load(source: str, key: str | None):
    from transformers import AutoTokenizer

    if key is None:
        return load_tokenizer(source)
    path = os.path.join(cache_root(), key)
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        try:
            tok = AutoTokenizer.from_pretrained(path)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return tok
        except Exception:
            shutil.rmtree(path, ignore_errors=True)  # a damaged cache entry is rebuilt below
    tok = load_tokenizer(source)
    tmp = None
    try:
        os.makedirs(cache_root(), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache_root())
        tok.save_pretrained(tmp)
        os.replace(tmp, path)
    except OSError:
        # A read-only home, or another run that saved the same entry first: only costs time.
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok
