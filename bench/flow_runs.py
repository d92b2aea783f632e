"""What the benches that drive the Prefect flow share: the `m1 pipeline` command they start, the device and the
versions they record beside their numbers."""
from __future__ import annotations

import platform
from pathlib import Path


def pipeline_cmd(python: str, profile: str, stages: list[str], sets: list[str], summary: Path) -> list[str]:
    cmd = [python, "-m", "components.cli", "pipeline", "--profile", profile, "--stages", *stages,
           "--summary-json", str(summary)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine()})"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "ray", "prefect", "mlflow", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
