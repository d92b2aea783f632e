"""The offline install's wheelhouse (infra/offline/wheelhouse.py): slimming a wheel, splitting into parts,
collecting parts that arrive over several transfers, refusing a damaged part, and the image-provided filter."""
from __future__ import annotations

import csv
import importlib.util
import io
import os
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "infra" / "offline" / "wheelhouse.py")
wh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wh)


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    record = io.StringIO()
    w = csv.writer(record, lineterminator="\n")
    for name, data in members.items():
        w.writerow([name, wh._record_hash(data), len(data)])
    w.writerow(["ray-2.60.0.dist-info/RECORD", "", ""])
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr("ray-2.60.0.dist-info/RECORD", record.getvalue())
    return path


def test_strip_removes_the_jars_and_their_record_lines(tmp_path):
    jar = os.urandom(5000)
    w = _wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl",
               {"ray/__init__.py": b"x = 1\n", "ray/jars/ray_dist.jar": jar, "ray/jars/other.jar": b"j"})
    removed = wh.strip_from_wheel(w, "ray/jars/")
    assert removed > 4000
    with zipfile.ZipFile(w) as z:
        assert sorted(z.namelist()) == ["ray-2.60.0.dist-info/RECORD", "ray/__init__.py"]
        assert z.read("ray/__init__.py") == b"x = 1\n"
        rows = list(csv.reader(io.StringIO(z.read("ray-2.60.0.dist-info/RECORD").decode())))
    assert [r[0] for r in rows] == ["ray/__init__.py", "ray-2.60.0.dist-info/RECORD"]
    assert rows[0][1] == wh._record_hash(b"x = 1\n")


def test_parts_arrive_over_several_transfers_and_join_to_the_same_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    content = {f"pkg{i}-1.0-py3-none-any.whl": os.urandom(3000 + 1000 * i) for i in range(3)}
    for name, data in content.items():
        (wheels / name).write_bytes(data)
    manifest = wh.write_parts(wheels, tmp_path / "parts", part_size=4096, notes={"python": "3.12"})
    n = len(manifest["parts"])
    assert n == -(-manifest["tar_bytes"] // 4096) and all(p["bytes"] <= 4096 for p in manifest["parts"])
    # two transfers: the first carries the manifest and the first part only
    first, second = tmp_path / "t1", tmp_path / "t2"
    first.mkdir(), second.mkdir()
    (first / wh.MANIFEST).write_bytes((tmp_path / "parts" / wh.MANIFEST).read_bytes())
    for i, part in enumerate(manifest["parts"]):
        ((first if i == 0 else second) / part["file"]).write_bytes((tmp_path / "parts" / part["file"]).read_bytes())
    stage = tmp_path / "stage"
    _, missing = wh.collect([first], stage)
    assert missing == [p["file"] for p in manifest["parts"][1:]]
    got, missing = wh.collect([second], stage)
    assert missing == [] and got["tar_sha256"] == manifest["tar_sha256"]
    out = wh.join_and_unpack(stage, got, tmp_path / "unpacked")
    assert {p.name: p.read_bytes() for p in out} == content


def test_a_damaged_part_is_refused_by_name_and_removed(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.0-py3-none-any.whl").write_bytes(os.urandom(9000))
    manifest = wh.write_parts(wheels, tmp_path / "parts", part_size=4096, notes={})
    bad = tmp_path / "parts" / manifest["parts"][1]["file"]
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(wh.WheelhouseError, match=r"^wheelhouse.tar.part01: size or SHA-256 differs"):
        wh.collect([tmp_path / "parts"], tmp_path / "stage")
    assert not (tmp_path / "stage" / "wheelhouse.tar.part01").exists()


def test_install_reports_missing_parts_with_exit_3(tmp_path, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.0-py3-none-any.whl").write_bytes(os.urandom(9000))
    wh.write_parts(wheels, tmp_path / "parts", part_size=4096, notes={})
    (tmp_path / "parts" / "wheelhouse.tar.part02").unlink()
    rc = wh.main(["install", str(tmp_path / "parts"), "--stage", str(tmp_path / "stage"), "--no-check"])
    assert rc == 3
    assert capsys.readouterr().out.strip().endswith("still missing: wheelhouse.tar.part02")
    rc = wh.main(["install", str(tmp_path / "nowhere"), "--stage", str(tmp_path / "stage2")])
    assert rc == 2 and "is not a folder of wheelhouse parts" in capsys.readouterr().err


def test_image_provided_filter_and_lock_parsing():
    patterns = wh.read_patterns(ROOT / "infra" / "offline" / "image-provided.txt")
    assert wh.provided("torch", patterns) and wh.provided("nvidia-cublas", patterns)
    assert wh.provided("Cuda_Bindings", patterns) and wh.provided("PyYAML", patterns)
    assert not wh.provided("ray", patterns) and not wh.provided("prefect", patterns)
    assert not wh.provided("nvidia", patterns)  # the pattern is nvidia-*, a prefix with its dash
    lock = "ray[train]==2.60.0\n# via x\nmath-verify[antlr4-13-2]==0.9.0 ; python_version >= '3.10'\n  \nfoo_bar==1.2.3\n"
    assert wh.lock_lines(lock) == [("ray", "ray==2.60.0"), ("math-verify", "math-verify==0.9.0"),
                                   ("foo_bar", "foo_bar==1.2.3")]
    assert wh.size_bytes("60M") == 60 * 2**20 and wh.size_bytes("512K") == 512 * 1024
    with pytest.raises(wh.WheelhouseError, match="part size 'lots'"):
        wh.size_bytes("lots")


def test_requirements_pin_what_the_cpu_venv_runs():
    """The node gets the versions the tests run with: every pin in node-requirements.in matches this venv."""
    import importlib.metadata as md

    for name, pin in wh.lock_lines((ROOT / "infra" / "offline" / "node-requirements.in").read_text()):
        if name == "fastapi":
            continue
        assert pin.split("==")[1] == md.version(name), f"{pin} but the venv has {md.version(name)}"
