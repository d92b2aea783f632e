"""dvc.yaml stages generated from the stage registry, so DVC and Prefect run the same stages with the same
dependencies: code (the paths that version a stage's cache), params (the config sections that key it, as far
as params.yaml and the profile's overlay files hold them; the overlay files are dependencies too), upstream outputs,
outputs and metrics.
Each stage's command is `m1 stage <name>`, which runs the stage without Prefect.

    m1 pipeline --dvc-yaml                 # the embedded default (params.yaml, runs/default)
    m1 pipeline --dvc-yaml --profile tiny  # another profile's run_dir, with its overlay as a dependency
"""
from __future__ import annotations

from pathlib import Path

import yaml

from components.pipeline.stages import ROOT, Stage, registered_stages
from components.profiles import profile_files


def _in_params(params: dict, dotted: str) -> bool:
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def dvc_stages(config, stages: list[Stage] | None = None, params_file: Path | None = None) -> dict:
    stages = stages or registered_stages(config)
    by_name = {s.name: s for s in registered_stages(config)}
    params = yaml.safe_load((params_file or ROOT / "params.yaml").read_text()) or {}
    run_dir = config.run_dir.rstrip("/")
    profile = "" if config.profile == "default" else f" --profile {config.profile}"
    # the profile and those it extends: dependencies (any key may matter), and params files for the keys a stage is
    # cached on, so that `dvc params diff` shows them and `dvc exp run -S configs/profiles/<p>.yaml:grpo.lr=...`
    # sweeps a profile's own settings (params.yaml alone would be overridden by the overlay)
    overlays = [(path.relative_to(ROOT).as_posix(), data) for path, data in profile_files(config.profile)] \
        if profile else []
    out: dict = {}
    for s in stages:
        if not s.dvc_outs:
            continue
        deps = list(s.code_paths())
        deps += [f"{run_dir}/{o}" for u in s.upstream for o in by_name[u].dvc_outs]
        deps += [name for name, _ in overlays]
        entry: dict = {"cmd": f"m1 stage {s.name}{profile}", "deps": deps}
        keys: list = [k for k in s.config_keys if _in_params(params, k)]
        keys += [{name: own} for name, data in overlays if (own := [k for k in s.config_keys if _in_params(data, k)])]
        if keys:
            entry["params"] = keys
        entry["outs"] = [f"{run_dir}/{o}" for o in s.dvc_outs]
        entry["metrics"] = [{f"{run_dir}/{s.dvc_metrics or f'metrics/{s.name}.json'}": {"cache": False}}]
        if s.dvc_plots:
            entry["plots"] = [{f"{run_dir}/{p}": {"cache": False}} for p in s.dvc_plots]
        out[s.name] = entry
    return {"stages": out}


def dvc_yaml_text(config) -> str:
    head = ("# Generated from components/pipeline/stages.py by `m1 pipeline --dvc-yaml"
            + ("" if config.profile == "default" else f" --profile {config.profile}") + "`.\n"
            "# Run with the venv active so that `m1` is the project CLI; a second `dvc repro` does nothing.\n")
    return head + yaml.safe_dump(dvc_stages(config), sort_keys=False, width=120)
