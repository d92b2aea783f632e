"""Rollout workers: each holds its own copy of the policy and generates with the model core's cached batched
generation (all prompts x G in one batch), recording token logprobs. The same class runs in-process or as a
Ray actor (`ray.remote(...)(RolloutWorker)`); weights arrive through `set_weights` after every learner step."""
from __future__ import annotations

import time

import torch

from components.model import HybridForCausalLM, generate

# Imported where used: transformers (the tokenizer; seconds of start-up) and ray (rollout actors only; a heavy
# optional dependency).


class RolloutWorker:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        from transformers import AutoTokenizer

        self.device = device
        self.model = HybridForCausalLM.from_pretrained(model_dir, device=device, dtype=getattr(torch, dtype)).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.version = 0

    def set_weights(self, state: dict, version: int) -> int:
        self.model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=True)
        self.version = version
        return version

    def get_version(self) -> int:
        return self.version

    def encode(self, prompts: list[str]) -> list[list[int]]:
        return [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]

    def generate(self, prompts: list[str], group_size: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> dict:
        ids = self.encode(prompts)
        batch = [p for p in ids for _ in range(group_size)]
        t0 = time.time()
        out = generate(self.model, batch, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       tokenizer=self.tok)
        dt = time.time() - t0
        return {"prompt_ids": batch, "tokens": out.tokens, "logprobs": out.logprobs, "finish": out.finish_reasons,
                "texts": out.texts, "seconds": dt, "version": self.version}


class RolloutPool:
    """Splits prompts over workers (local objects or Ray actors) and pushes weights to all of them."""

    def __init__(self, model_dir: str, n_actors: int, resources: dict, device: str, dtype: str = "float32"):
        self.remote = n_actors > 0
        if self.remote:
            import ray

            opts = {"num_cpus": resources.get("CPU", 1), "num_gpus": resources.get("GPU", 0)}
            dev = "cuda" if opts["num_gpus"] else "cpu"
            actor = ray.remote(**opts)(RolloutWorker)
            threads = max(1, int(opts["num_cpus"]))
            self.workers = [actor.remote(model_dir, dev, dtype, threads) for _ in range(n_actors)]
        else:
            self.workers = [RolloutWorker(model_dir, device, dtype)]

    def _call(self, method: str, *args_per_worker):
        if self.remote:
            import ray

            return ray.get([getattr(w, method).remote(*a) for w, a in zip(self.workers, args_per_worker)])
        return [getattr(w, method)(*a) for w, a in zip(self.workers, args_per_worker)]

    def set_weights(self, state: dict, version: int) -> float:
        t0 = time.time()
        if self.remote:
            import ray

            # one copy in the object store, read by every actor
            ref = ray.put({k: v.detach().to("cpu") for k, v in state.items()})
            self._call("set_weights", *[(ref, version)] * len(self.workers))
        else:
            # in-process: copied device to device by load_state_dict (on a GPU a host round trip of the fp32
            # weights took 0.5-1.6 s a step); the worker's parameters stay its own
            self._call("set_weights", *[({k: v.detach() for k, v in state.items()}, version)] * len(self.workers))
        return time.time() - t0

    def generate(self, prompts: list[str], group_size: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> dict:
        n = len(self.workers)
        shards = [prompts[i::n] for i in range(n)]
        args = [(s, group_size, max_new_tokens, temperature, top_p, seed + i) for i, s in enumerate(shards) if s]
        outs = self._call("generate", *args) if args else []
        merged = {"prompt_ids": [], "tokens": [], "logprobs": [], "finish": [], "texts": [], "seconds": 0.0,
                  "versions": []}
        order = []  # restore the caller's prompt order from the round-robin shards
        for i, (s, o) in enumerate(zip([s for s in shards if s], outs)):
            for j in range(len(s)):
                order.append((i + j * n, o, j))
        for _, o, j in sorted(order, key=lambda x: x[0]):
            sl = slice(j * group_size, (j + 1) * group_size)
            for k in ("prompt_ids", "tokens", "logprobs", "finish", "texts"):
                merged[k].extend(o[k][sl])
        merged["seconds"] = max((o["seconds"] for o in outs), default=0.0)
        merged["versions"] = [o["version"] for o in outs]
        return merged

    def versions(self) -> list[int]:
        return self._call("get_version", *[()] * len(self.workers))
