"""HybridForCausalLM: a Llama decoder whose layers are attention or Mamba mixers (see HybridConfig), saved and
loaded in the Hugging Face layout (config.json + safetensors, sharded when large)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from components.errors import M1Error
from components.model.cache import InferenceCache
from components.model.config import HybridConfig
from components.model.layers import (
    MLP,
    Attention,
    RMSNorm,
    RotaryEmbedding,
    build_attention_mask,
    decode_attention,
    decode_mlp,
    pack_decode_weights,
)
from components.model.linear_ce import IGNORE_INDEX, linear_ce_sum
from components.model.mamba import Mamba1Mixer, Mamba2Mixer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class SeqInfo:
    """Per-batch facts every mixer needs: RoPE tables, the attention mask, the padding mask (True = real token)
    and document resets (True where a new packed document starts)."""
    rope: tuple[torch.Tensor, torch.Tensor]
    attn_mask: torch.Tensor | None
    pad_mask: torch.Tensor | None
    resets: torch.Tensor | None
    cache_pos: int = 0


class HybridBlock(nn.Module):
    def __init__(self, cfg: HybridConfig, idx: int):
        super().__init__()
        kind = cfg.layer_types[idx]
        self.kind = kind
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if kind == "attention":
            self.self_attn = Attention(cfg, idx)
        else:
            self.mamba = (Mamba1Mixer if kind == "mamba1" else Mamba2Mixer)(cfg, idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, seq: SeqInfo, cache=None):
        x = self.input_layernorm(h)
        if self.kind == "attention":
            x = self.self_attn(x, seq.rope, seq.attn_mask, cache, seq.cache_pos)
        else:
            x = self.mamba(x, seq, cache)
        h = h + x
        return h + self.mlp(self.post_attention_layernorm(h))


class HybridModel(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList(HybridBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class HybridForCausalLM(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.model.embed_tokens.weight, std=config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ forward
    def _seq_info(self, input_ids, attention_mask, position_ids, doc_ids, cache, dtype) -> SeqInfo:
        b, L = input_ids.shape
        dev = input_ids.device
        start = cache.seqlen if cache is not None else 0
        am = attention_mask.bool() if attention_mask is not None else None
        if position_ids is None:
            if am is not None:
                position_ids = (torch.cumsum(am.long(), 1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(L, device=dev)[None].expand(b, L)
            if cache is not None:
                position_ids = position_ids + cache.next_pos[:, None]
        resets = None
        if doc_ids is not None:
            resets = torch.zeros(b, L, dtype=torch.bool, device=dev)
            resets[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        if cache is not None:
            cache.key_mask[:, start : start + L] = True if am is None else am
            if am is not None and start == 0:
                cache.has_padding = not bool(am.all())  # one host sync per prompt, none per decoded token
            if cache.has_padding or am is not None:
                mask = build_attention_mask(L, start + L, dev, cache.key_mask, None, start)
            elif L == 1:
                mask = None  # one query over all cached keys: nothing to hide
            else:
                mask = build_attention_mask(L, start + L, dev, None, None, start)
        else:
            mask = build_attention_mask(L, L, dev, am, doc_ids)
        rope = self.model.rotary_emb(position_ids, dtype)
        return SeqInfo(rope, mask, am, resets, start)

    def forward(self, input_ids, attention_mask=None, position_ids=None, doc_ids=None,
                cache: InferenceCache | None = None, logits_to_keep: int = 0, return_hidden: bool = False,
                targets: torch.Tensor | None = None):
        """Logits (b, L, vocab) in fp32 math for the last `logits_to_keep` positions (0 = all).
        attention_mask: (b, L) 1 for real tokens, 0 for (left) padding. doc_ids: (b, L) document index of each
        token in a packed row (attention and Mamba state never cross documents). cache: continue from and
        update an InferenceCache. targets: (b, L) the token each position predicts, IGNORE_INDEX where none counts;
        then the return value is the summed cross-entropy over the counted positions instead of logits, computed
        through the LM head in chunks of those positions only (linear_ce.py: no (b, L, vocab) logits)."""
        h = self.model.embed_tokens(input_ids)
        seq = self._seq_info(input_ids, attention_mask, position_ids, doc_ids, cache, h.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, seq, use_reentrant=False)
            else:
                h = layer(h, seq, cache)
        if cache is not None:
            cache.seqlen += input_ids.shape[1]
            cache.write_pos.fill_(cache.seqlen)
            cache.next_pos += input_ids.shape[1] if attention_mask is None else attention_mask.long().sum(1)
        h = self.model.norm(h)
        if targets is not None:
            keep = targets != IGNORE_INDEX
            # the LM head's matmuls in autocast's dtype when it is on, as self.lm_head(h) would run them
            dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
            return linear_ce_sum(h[keep], self.lm_head.weight, targets[keep], dtype=dtype)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if return_hidden:
            return h
        return self.lm_head(h)

    def decode_step(self, tok: torch.Tensor, cache: InferenceCache, bucket: int) -> torch.Tensor:
        """One token per row (tok: (b, 1)) after a prefill, with no host sync and fixed shapes: attention reads the
        first `bucket` cache slots (bucket >= tokens so far + 1). Updates the cache's device-side counters; the
        caller advances cache.seqlen. Returns logits (b, 1, vocab)."""
        h = self.model.embed_tokens(tok)
        cache.key_mask.index_fill_(1, cache.write_pos, True)
        rope = self.model.rotary_emb(cache.next_pos[:, None], h.dtype)
        seq = SeqInfo(rope, None, None, None, 0)
        for i, layer in enumerate(self.model.layers):
            packed = cache.packed[i]  # made by prepare_decode
            x = layer.input_layernorm(h)
            x = decode_attention(layer.self_attn, x, rope, cache, bucket, packed) if layer.kind == "attention" \
                else layer.mamba(x, seq, cache)
            h = h + x
            h = h + decode_mlp(layer.mlp, layer.post_attention_layernorm(h), packed)
        cache.next_pos.add_(1)
        cache.write_pos.add_(1)
        return self.lm_head(self.model.norm(h))

    @torch.no_grad()
    def prepare_decode(self, cache: InferenceCache) -> None:
        """Make what decode_step reads per cache now, before decode steps are compiled or captured, so that every
        step only reads it: each Mamba layer's constants (decode_consts) and each layer's packed projections
        (layers.pack_decode_weights)."""
        for i, layer in enumerate(self.model.layers):
            if layer.kind != "attention":
                layer.mamba.decode_consts(cache.mamba_state(i))
            if i not in cache.packed:
                cache.packed[i] = pack_decode_weights(layer)

    def new_cache(self, batch: int, max_len: int, state_dtype=torch.float32) -> InferenceCache:
        p = next(self.parameters())
        return InferenceCache(self.config, batch, max_len, p.device, p.dtype, state_dtype)

    def gradient_checkpointing_enable(self, on: bool = True):
        self.gradient_checkpointing = on

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, max_shard_size: int = 2 * 1024**3, tokenizer=None,
                        state_dict: dict | None = None) -> Path:
        """state_dict: weights to write instead of this module's own (a full state gathered from shards)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.save(d)
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors stores no aliases; tied on load
        for old in list(d.glob("model*.safetensors")) + [d / INDEX]:
            old.unlink(missing_ok=True)
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            nb = v.numel() * v.element_size()
            if cur and size + nb > max_shard_size:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + nb
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(d / WEIGHTS), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(d / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(d))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | str | None = None, device=None) -> HybridForCausalLM:
        d = Path(directory)
        if not d.is_dir():
            raise M1Error(f"model directory not found: {d}")
        cfg = HybridConfig.load(d)
        if (d / INDEX).is_file():
            files = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
        elif (d / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            raise M1Error(f"no {WEIGHTS} (or {INDEX}) in {d}")
        with torch.device("meta"):
            model = cls(cfg)
        state = {}
        for f in files:
            state.update(load_file(str(d / f), device=str(device or "cpu")))
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing = set(model.state_dict()) - set(state)
        unexpected = set(state) - set(model.state_dict())
        if missing or unexpected:
            raise M1Error(f"weights in {d} do not match its config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        model.load_state_dict(state, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb.inv_freq = RotaryEmbedding(cfg).inv_freq.to(device or "cpu")
        if dtype is not None:
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position, computed in fp32."""
    return torch.gather(F.log_softmax(logits.float(), -1), -1, targets[..., None])[..., 0]
