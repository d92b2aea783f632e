"""bench/lent_gpu/gpu_stash.sh moves a trained model off a lent GPU machine and back onto a fresh one, within the
device tool's limits: a call brings back at most 8 files of 16 MiB, 64 MiB together, and carries at most 64 MiB, the working tree
included. Run on a throwaway git repo holding the script, a tracked file standing for the tree, and sparse
15 MiB parts (no real bytes written)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
CARRY = 64 * MIB


def _repo(tmp_path: Path, tree_bytes: int) -> Path:
    repo = tmp_path / "repo"
    (repo / "bench" / "lent_gpu").mkdir(parents=True)
    for script in ("gpu_stash.sh", "carry_room.sh"):
        shutil.copy(ROOT / "bench" / "lent_gpu" / script, repo / "bench" / "lent_gpu")
    (repo / "tree.bin").write_bytes(b"\0" * tree_bytes)
    for cmd in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


def _tree_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts)


@pytest.mark.parametrize("tree_mb", [2, 10, 30])
def test_model_parts_come_back_in_calls_and_carries_that_fit(tmp_path, tree_mb):
    repo = _repo(tmp_path, tree_mb * 1000 * 1000)
    n = 19  # the converted SmolLM2 in bf16: 275 MiB in 15 MiB parts
    src = tmp_path / "from_calls"
    src.mkdir()
    for i in range(n):  # as model-out leaves them in the calls' files_at folders
        with open(src / f"model.tar.{i:02d}", "wb") as f:
            f.truncate(15 * MIB)
    (src / "model.parts").write_text(f"{n}\n")
    subprocess.run(["bash", "bench/lent_gpu/gpu_stash.sh", "model-collect", str(src)], cwd=repo, check=True,
                   capture_output=True)
    folders = sorted((p for p in repo.glob(".gpu_m*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    tree = _tree_bytes(repo) - sum(f.stat().st_size for d in folders + [repo / ".gpu_model"] for f in d.iterdir())
    got = []
    for d in folders:
        size = sum(f.stat().st_size for f in d.iterdir())
        assert tree + size <= CARRY, (d.name, tree, size)
        got += sorted(f.name for f in d.iterdir() if f.name.startswith("model.tar."))
    assert got == [f"model.tar.{i:02d}" for i in range(n)]  # every part once, in order across the folders
    assert (folders[0] / "model.parts").read_text().strip() == str(n)


def test_model_collect_refuses_a_tree_that_leaves_no_room(tmp_path):
    repo = _repo(tmp_path, 55 * MIB)
    src = tmp_path / "from_calls"
    src.mkdir()
    with open(src / "model.tar.00", "wb") as f:
        f.truncate(15 * MIB)
    (src / "model.parts").write_text("1\n")
    r = subprocess.run(["bash", "bench/lent_gpu/gpu_stash.sh", "model-collect", str(src)], check=False, cwd=repo,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "leaves no room" in r.stderr


def test_model_out_sends_what_one_call_brings_back(tmp_path):
    repo = _repo(tmp_path, 1000)
    stash = tmp_path / "stash"
    parts = stash / "model_parts"
    parts.mkdir(parents=True)
    n = 19
    for i in range(n):  # a stash model-out has already cut: it sends these without loading any model
        with open(parts / f"model.tar.{i:02d}", "wb") as f:  # sparse, as split -b 15M cuts them
            f.truncate(15 * MIB)
    (parts / "model.parts").write_text(f"{n}\n")
    sent = []
    for k in range(5):
        out = tmp_path / f"out{k}"
        out.mkdir()
        subprocess.run(["bash", "bench/lent_gpu/gpu_stash.sh", "model-out", "unused", str(k)], cwd=repo, check=True,
                       capture_output=True, env={"PATH": "/usr/bin:/bin", "M1_STASH": str(stash), "OUT": str(out)})
        files = sorted(f.name for f in out.iterdir())
        assert len(files) <= 8 and sum((out / f).stat().st_size for f in files) <= 64 * MIB, files
        sent += [f for f in files if f.startswith("model.tar.")]
    assert sent == [f"model.tar.{i:02d}" for i in range(n)]
