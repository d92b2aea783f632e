"""The committed dvc.lock: what `dvc repro` of the default profile (params.yaml) recorded, kept in step with the
generated dvc.yaml and with params.yaml, so that `dvc status` on a fresh clone is meaningful: it names the outputs
to pull or reproduce and the code that changed since the lock, never a stage or a parameter the lock does not know.

Code dependencies are not compared: editing components/ makes `dvc status` list those paths as changed until the
next `dvc repro` refreshes the lock, which is what DVC is for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _value(params: dict, dotted: str):
    for part in dotted.split("."):
        params = params[part]
    return params


def _number_aware(v):
    """PyYAML reads 5e-05 (no dot) as a string where DVC's YAML reads a float: compare numbers as numbers."""
    if isinstance(v, dict):
        return {k: _number_aware(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_number_aware(x) for x in v]
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _paths(entries) -> set[str]:
    """dvc.yaml outs / metrics / plots entries: a path, or {path: {options}}."""
    out = set()
    for e in entries or []:
        out.update([e] if isinstance(e, str) else e.keys())
    return out


def test_lock_has_every_stage_of_dvc_yaml_with_its_command_deps_outs_and_current_params():
    lock, spec, params = _load("dvc.lock")["stages"], _load("dvc.yaml")["stages"], _load("params.yaml")
    assert set(lock) == set(spec), "dvc.lock and dvc.yaml name different stages: run `dvc repro` and commit dvc.lock"
    for name, stage in spec.items():
        locked = lock[name]
        assert locked["cmd"] == stage["cmd"], name
        assert {d["path"] for d in locked["deps"]} == set(stage["deps"]), name
        assert all(d.get("md5") for d in locked["deps"] + locked["outs"]), name
        declared = _paths(stage.get("outs")) | _paths(stage.get("metrics")) | _paths(stage.get("plots"))
        assert {o["path"] for o in locked["outs"]} == declared, name
        recorded = locked.get("params", {}).get("params.yaml", {})
        for key in stage.get("params", []):
            assert _number_aware(recorded[key]) == _number_aware(_value(params, key)), \
                f"{name}: params.yaml {key} changed since dvc.lock"


def test_dvc_status_knows_every_stage_and_finds_no_changed_params():
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = Path(sys.executable).with_name("dvc")
    r = subprocess.run([str(dvc), "status", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout or "{}")
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, dict):  # DVC reports parameters among the deps: {"params.yaml": {key: "modified"}}
                changed = change.get("changed deps", {}).get("params.yaml")
                assert not changed, f"{stage}: params.yaml {changed} since dvc.lock"
            else:  # a plain string: "changed command", "always changed", ...
                assert change != "changed command", f"{stage}: {change}"
