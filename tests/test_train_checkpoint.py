"""Checkpoint soundness: the resume fingerprint covers the code, the library versions and every shard of the input
model; a run resumes and prunes only checkpoints of its own fingerprint; the RNG state survives a weights_only load
(tests/test_train_loop.py shows a resume refusing trainer state that would run code)."""
import json
from pathlib import Path

import pytest
import torch

from components import hashing
from components.train import checkpoint as ck
from components.train import harness as train_stage
from components.train.loop import Context


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher):
    from components.model import convert

    root = tmp_path_factory.mktemp("fp")
    convert(tiny_teacher, [1, 3]).save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "manifest.json").write_text("{}")
    return root / "model", root / "data"


def _fp(model_dir, data_dir, stage="distill", **kw):
    return train_stage.fingerprint(stage, {"lr": 1e-3}, Path(model_dir), Path(data_dir), 0, "random:tiny", **kw)


def test_fingerprint_changes_with_the_code_and_library_versions(inputs, monkeypatch):
    base = _fp(*inputs)
    assert _fp(*inputs) == base  # the same code and inputs give the same value
    real_code_version = hashing.code_version
    with monkeypatch.context() as m:
        m.setattr(hashing, "code_version", lambda paths, root: "edited" + real_code_version(paths, root))
        assert _fp(*inputs) != base
    real_version = train_stage.version
    with monkeypatch.context() as m:
        m.setattr(train_stage, "version", lambda name: "9.9" if name == "transformers" else real_version(name))
        assert _fp(*inputs) != base
    gk = {"stage": "grpo", "libraries": ("torch", "transformers", "math-verify"), "loop_module": "components.grpo.loop"}
    grpo = _fp(*inputs, **gk)
    with monkeypatch.context() as m:
        m.setattr(train_stage, "version", lambda name: "9.9" if name == "math-verify" else real_version(name))
        assert _fp(*inputs, **gk) != grpo


def test_fingerprint_hashes_every_shard_of_a_sharded_model(inputs, tmp_path):
    from components.model import HybridForCausalLM

    model = HybridForCausalLM.from_pretrained(inputs[0])
    model.save_pretrained(tmp_path / "a", max_shard_size=64 * 1024)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 2
    key = next(k for k, f in index.items() if f == shards[-1])  # a tensor of the last shard
    before = _fp(tmp_path / "a", inputs[1])
    with torch.no_grad():
        model.state_dict()[key].add_(1.0)
    model.save_pretrained(tmp_path / "a", max_shard_size=64 * 1024)
    assert json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"] == index
    assert _fp(tmp_path / "a", inputs[1]) != before


def _plant(root: Path, step: int, fp: str) -> Path:
    d = root / f"checkpoint_{step:06d}"
    d.mkdir(parents=True)
    (d / ck.STATE_JSON).write_text(json.dumps({"step": step, "samples_consumed": step, "fingerprint": fp}))
    return d


def test_resume_picks_the_newest_checkpoint_of_its_own_fingerprint(tmp_path):
    for step in (2, 4):
        _plant(tmp_path, step, "mine")
    for step in (6, 8):
        _plant(tmp_path, step, "other")
    assert Path(ck.latest_checkpoint(str(tmp_path), "mine")).name == "checkpoint_000004"
    assert Context(False, False).resume_dir(str(tmp_path), "mine").name == "checkpoint_000004"
    assert Context(False, False).resume_dir(str(tmp_path), "nobody") is None


def test_pruning_counts_and_removes_only_the_runs_own_checkpoints(tmp_path):
    root = tmp_path / "root"
    for step in (6, 8):
        _plant(root, step, "other")  # a previous configuration's, numbered higher than this run's
    for step in (2, 4):
        new = _plant(tmp_path / f"local{step}", step, "mine")
        Context(False, False).report({}, new, str(root), step, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_000004", "checkpoint_000006", "checkpoint_000008"]
    ck.prune(str(root), 1, "other")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_000004", "checkpoint_000008"]


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    def draw():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    torch.save({"rng": ck.rng_state()}, tmp_path / "s.pt")
    want = draw()
    for seed in (torch.manual_seed, np.random.seed, random.seed):
        seed(9)
    ck.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert draw() == want


def test_a_checkpoint_staged_beside_its_local_root_is_renamed_into_place_not_copied(tmp_path):
    """A 3B checkpoint is 39 GB: staged on the root's own disk it is moved (same inode, nothing left behind), and a
    hidden staging folder is never listed as a checkpoint; one written elsewhere is copied."""
    root = tmp_path / "ckpts"
    (root / ".m1-ckpt-killed" / "ckpt").mkdir(parents=True)  # left by a run killed while writing
    staged = ck.staging_dir(str(root), "m1-ckpt-") / "ckpt"
    assert not (root / ".m1-ckpt-killed").exists()
    staged.mkdir()
    (staged / ck.STATE_JSON).write_text(json.dumps({"step": 3, "fingerprint": "f"}))
    assert staged.parent.parent == root and staged.parent.name.startswith(".")
    assert ck.list_checkpoints(str(root)) == []
    inode = (staged / ck.STATE_JSON).stat().st_ino
    dest = Path(ck.upload(staged, str(root), "checkpoint_000003"))
    assert (dest / ck.STATE_JSON).stat().st_ino == inode and not staged.exists()
    assert ck.list_checkpoints(str(root)) == [(3, str(dest))]

    elsewhere = tmp_path / "tmp" / "ckpt"
    elsewhere.mkdir(parents=True)
    (elsewhere / ck.STATE_JSON).write_text(json.dumps({"step": 4, "fingerprint": "f"}))
    copied = Path(ck.upload(elsewhere, str(root), "checkpoint_000004"))
    assert (elsewhere / ck.STATE_JSON).is_file() and (copied / ck.STATE_JSON).stat().st_ino != \
        (elsewhere / ck.STATE_JSON).stat().st_ino
    assert [p.name for p in sorted(root.iterdir()) if not p.name.startswith(".")] == \
        ["checkpoint_000003", "checkpoint_000004"]
