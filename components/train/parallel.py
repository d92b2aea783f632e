"""Data parallelism for the training loops, kept beside them so the model code knows nothing of it.

ddp: every worker holds the whole model; gradients are averaged by DistributedDataParallel.
fsdp2: every decoder layer (and then the rest of the model) is sharded with `fully_shard`, so each worker holds
1/world of the parameters, gradients and optimizer state; for models that do not fit one device.

Checkpoints are always written in the full (unsharded) layout by rank 0, so a checkpoint of either strategy, or of
any world size, loads anywhere: gathering the full state is a collective every rank joins."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

# fully_shard is imported in wrap, for fsdp2 only: torch.distributed.fsdp has it from torch 2.6, and DDP runs on older
# torch need none of it.


def wrap(model, strategy: str, world: int, device):
    """-> the module to call for forward/backward (the model itself, sharded in place, for fsdp2)."""
    if world == 1:
        return model
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _sharded(strategy: str, world: int) -> bool:
    return strategy == "fsdp2" and world > 1


def full_model_state(model, strategy: str, world: int) -> dict | None:
    """The unsharded state dict on CPU (every rank must call this; ranks > 0 of a sharded model get it too)."""
    if not _sharded(strategy, world):
        return None  # the model's own state_dict() is already full

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model, optimizer, strategy: str, world: int) -> dict:
    if not _sharded(strategy, world):
        return optimizer.state_dict()

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, strategy: str, world: int) -> None:
    if not _sharded(strategy, world):
        optimizer.load_state_dict(state)
        return

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def scalar(t) -> float:
    """A norm returned by clip_grad_norm_ (a DTensor under fsdp2) as a Python float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)
