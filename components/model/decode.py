"""Decode engines for generate(): eager (any device) and CUDA-graph (one graph per batch size and KV-length
bucket, replayed every token: no per-token kernel launches from Python and no host syncs).

Attention slots are read up to the bucket edge (a multiple of `bucket_size`), so each step reads at most
bucket_size - 1 more KV slots than it needs; Mamba layers read and write only their fixed-size state."""
from __future__ import annotations

import torch


class EagerDecoder:
    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self.model(tok, cache=self.cache)[:, -1]


class StaticDecoder:
    """Fixed-shape decode steps over the cache's static buffers; with `graphs` each bucket is captured once."""

    def __init__(self, model, cache, bucket_size: int = 256, graphs: bool = True):
        self.model, self.cache, self.bucket_size = model, cache, bucket_size
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
                self.model.decode_step(self.tok, self.cache, b)
                self.cache.restore(snap)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = self.model.decode_step(self.tok, self.cache, b)
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
        b = self.bucket()
        self.tok.copy_(tok)
        if self.graphs_on:
            if b not in self.graphs:
                self._capture(b)
            g, out = self.graphs[b]
            g.replay()
        else:
            out = self.model.decode_step(self.tok, self.cache, b)
        self.cache.seqlen += 1
        return out[:, -1]
