"""bench/lent_gpu/grpo_carry.sh puts what GRPO runs from a brought-back model need (wheels, curated data, the model
tarball) on a bare lent GPU machine in as few carries as fit: each carry folder beside the working tree within
64 MiB, and the unpacked data and model equal to what was packed, whichever order the calls come in. Run on a
throwaway git repo holding the scripts and a tracked file standing for the tree."""
import hashlib
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _repo(tmp_path: Path, tree_bytes: int) -> Path:
    repo = tmp_path / "repo"
    (repo / "bench" / "lent_gpu").mkdir(parents=True)
    for script in ("grpo_carry.sh", "carry_room.sh", "pure_wheels.sh"):
        shutil.copy(ROOT / "bench" / "lent_gpu" / script, repo / "bench" / "lent_gpu")
    (repo / "tree.bin").write_bytes(b"\0" * tree_bytes)
    for cmd in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _inputs(tmp_path: Path, model_mib: int) -> tuple[Path, Path]:
    data = tmp_path / "data"
    (data / "rl").mkdir(parents=True)
    (data / "rl" / "part-00000.parquet").write_bytes(os.urandom(200_000))
    (data / "manifest.json").write_text('{"rows": 3}')
    model = tmp_path / "model_src" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(random.Random(0).randbytes(model_mib * MIB))  # incompressible
    parts = tmp_path / "parts"
    parts.mkdir()
    with tarfile.open(tmp_path / "model.tar", "w") as t:
        t.add(model, arcname="model")
    subprocess.run(["split", "-b", "15M", "-d", "-a", "2", str(tmp_path / "model.tar"), str(parts / "model.tar.")],
                   check=True)
    (parts / "model.parts").write_text(f"{len(list(parts.glob('model.tar.*')))}\n")
    return data, parts


def _pack(repo: Path, data: Path, parts: Path, tmp_path: Path) -> list[Path]:
    """The carry folders of data + model parts (no wheels), in order."""
    wheels = tmp_path / "no_wheels"
    wheels.mkdir()
    subprocess.run(["bash", "bench/lent_gpu/grpo_carry.sh", "pack", str(data), str(parts), str(wheels)], cwd=repo,
                   check=True, capture_output=True)
    return sorted(repo.glob(".gpu_c*"), key=lambda p: int(p.name[6:]))


@pytest.mark.parametrize("tree_mb", [2, 12])
def test_the_stream_fits_each_carry_and_comes_back_whole(tmp_path, tree_mb):
    repo = _repo(tmp_path, tree_mb * 1000 * 1000)
    data, parts = _inputs(tmp_path, 130)
    folders = _pack(repo, data, parts, tmp_path)
    tree = tree_mb * 1000 * 1000 + sum(f.stat().st_size for f in (repo / "bench" / "lent_gpu").iterdir())
    assert len(folders) >= 3
    for d in folders:
        assert tree + sum(f.stat().st_size for f in d.iterdir()) <= 64 * MIB, d.name
    # a fresh machine: the calls may come in any order; only the one that completes the stream restores
    machine = tmp_path / "machine"
    shutil.copytree(repo, machine, ignore=shutil.ignore_patterns(".gpu_c*"))
    env = {"PATH": "/usr/bin:/bin", "M1_CARRY_DIR": str(tmp_path / "carry")}
    for d in reversed(folders):
        r = subprocess.run(["bash", "bench/lent_gpu/grpo_carry.sh", "unpack", str(d)], cwd=machine, env=env,
                           check=True, capture_output=True, text=True)
        assert ("restored" in r.stdout) == (d == folders[0])
    assert _digest(machine / "runs" / "gpu" / "data") == _digest(data)
    assert _digest(machine / "runs" / "gpu" / "sft2" / "model") == _digest(tmp_path / "model_src" / "model")
    assert not (tmp_path / "carry").exists()  # the parts are removed once restored


def test_a_damaged_part_is_refused_and_nothing_is_restored(tmp_path):
    repo = _repo(tmp_path, 1000)
    data, parts = _inputs(tmp_path, 70)
    folders = _pack(repo, data, parts, tmp_path)
    with open(folders[1] / "part", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 8)
    env = {"PATH": "/usr/bin:/bin", "M1_CARRY_DIR": str(tmp_path / "carry")}
    rs = [subprocess.run(["bash", "bench/lent_gpu/grpo_carry.sh", "unpack", str(d)], cwd=repo, env=env,
                         check=False, capture_output=True, text=True) for d in folders]
    assert rs[-1].returncode == 1 and "does not match its md5" in rs[-1].stderr
    assert not (repo / "runs").exists()


def test_pack_refuses_missing_model_parts(tmp_path):
    repo = _repo(tmp_path, 1000)
    data, parts = _inputs(tmp_path, 40)
    (parts / "model.tar.01").unlink()
    r = subprocess.run(["bash", "bench/lent_gpu/grpo_carry.sh", "pack", str(data), str(parts), str(data)], cwd=repo,
                       check=False, capture_output=True, text=True)
    assert r.returncode == 1 and "holds 2 of 3 model parts" in r.stderr
