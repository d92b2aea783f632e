"""Decode engines for generate(): eager (any device) and CUDA-graph (one graph per batch size and KV-length
bucket, replayed every token: no per-token kernel launches from Python and no host syncs). The compiled variant
puts the fixed-shape step through torch.compile before capture, so that Inductor fuses its small element-wise
kernels (norms, residual adds, RoPE, the gate, head repeats) into fewer launches: at 135M parameters a decode step
is bound by launches, not bytes (docs/gpu-performance.md).

Attention slots are read up to the bucket edge (a multiple of `bucket_size`), so each step reads at most
bucket_size - 1 more KV slots than it needs; Mamba layers read and write only their fixed-size state."""
from __future__ import annotations

import torch


class EagerDecoder:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self.model(tok, cache=self.cache)[:, -1]


def compiled_decode_step(model):
    """model.decode_step through torch.compile, made once per model and kept on it, so later generate() calls reuse
    the compiled code. The bucket (the KV slots attention reads) is an int argument: the first bucket compiles with
    it fixed, the second recompiles it as a symbolic size (dynamo's automatic dynamic shapes), and no later bucket
    compiles again."""
    fn = model.__dict__.get("_compiled_decode_step")
    if fn is None:
        # Dynamo keeps one cache per code object, shared by every model in the process: each model takes ~3 entries
        # (first bucket, symbolic bucket, the bucket that spans the whole cache), so an evaluation with three models
        # would pass the default limit of 8 and fall back to eager without a word.
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        fn = torch.compile(model.decode_step, dynamic=None)
        model.__dict__["_compiled_decode_step"] = fn
    return fn


class StaticDecoder:
    """Fixed-shape decode steps over the cache's static buffers; with `graphs` each bucket is captured once; with
    `compiled` the step is compiled first (compilation happens in the warm-up runs before capture)."""

    def __init__(self, model, cache, bucket_size: int = 256, graphs: bool = True, compiled: bool = False):
        self.model, self.cache, self.bucket_size = model, cache, bucket_size
        model.prepare_decode(cache)
        self.step_fn = compiled_decode_step(model) if compiled else model.decode_step
        self.graphs_on = graphs and cache.key_mask.is_cuda
        self.tok = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.key_mask.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self) -> int:
        need = self.cache.seqlen + 1
        return min(self.cache.max_len, -(-need // self.bucket_size) * self.bucket_size)

    def _capture(self, b: int):
        snap = self.cache.snapshot()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up runs allocate workspaces and compile kernels outside the graph
            for _ in range(2):
                self.step_fn(self.tok, self.cache, b)
                self.cache.restore(snap)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self.step_fn(self.tok, self.cache, b)
        self.pool = g.pool()
        self.cache.restore(snap)  # capture does not run the kernels, but be exact about state
        self.graphs[b] = (g, out)

    @torch.no_grad()
    def capture_all(self, total_len: int) -> None:
        """Capture the graphs of every bucket a generation up to total_len tokens will use, before timing starts."""
        if not self.graphs_on:
            return
        b = self.bucket()
        while True:
            if b not in self.graphs:
                self._capture(b)
            if b >= min(total_len, self.cache.max_len):
                break
            b = min(self.cache.max_len, b + self.bucket_size)

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """The next logits (b, V). With graphs they are a view of the captured output buffer: valid until the next
        step, which overwrites them (clone to keep them)."""
        b = self.bucket()
        self.tok.copy_(tok)
        if self.graphs_on:
            if b not in self.graphs:
                self._capture(b)
            g, out = self.graphs[b]
            g.replay()
        else:
            out = self.step_fn(self.tok, self.cache, b)
        self.cache.seqlen += 1
        return out[:, -1]
