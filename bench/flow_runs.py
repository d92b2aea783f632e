"""What the benches that drive the Prefect flow share: the `m1 pipeline` command they start, named variants of a
profile checked before any run, running such commands side by side, the device and the versions they record
beside their numbers."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def named_overrides(flag: str, specs: list[list[str]], taken: set[str]) -> dict[str, list[str]]:
    """`flag NAME KEY=VALUE...` arguments as {name: overrides}; a ValueError naming the problem for a name already
    taken (or not of letters, digits and _) or for a variant without overrides."""
    out: dict[str, list[str]] = {}
    for name, *sets in specs:
        if name in taken or name in out or not name.replace("_", "").isalnum():
            raise ValueError(f"{flag} {name!r}: a new variant needs a new name of letters, digits and _")
        if not sets:
            raise ValueError(f"{flag} {name}: no KEY=VALUE overrides (it would repeat base)")
        out[name] = sets
    return out


def validate_settings(profile: str, override_lists: list[list[str]]) -> None:
    """Loads the profile's config with each list of KEY=VALUE overrides, so that every run's settings are checked
    before any starts; a ValueError with the config error's first line."""
    import argparse

    from components.commands.pipeline import overrides_from, parse_assignment
    from components.config import load_config
    from components.errors import M1Error

    for sets in override_lists:
        try:
            load_config(profile, overrides=overrides_from([parse_assignment(s) for s in sets]))
        except (M1Error, argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(str(e).splitlines()[0]) from None


Job = tuple[list[str], Path] | tuple[list[str], Path, dict[str, str]]


def run_many(jobs: list[Job], parallel: int = 1, on_done: Callable[[int, int], None] | None = None) -> list[int]:
    """Runs each (command, log[, extra environment]) from the repository root, at most `parallel` at a time, and
    returns their exit codes; `on_done(index, exit code)` is called as each one ends (e.g. to save partial results).
    """
    pending, running, rcs = list(enumerate(jobs)), {}, [0] * len(jobs)
    tag = Path(sys.argv[0]).stem or "bench"
    while pending or running:
        while pending and len(running) < max(1, parallel):
            i, (cmd, log, *env) = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            extra = env[0] if env else {}
            shown = " ".join(f"{k}={v}" for k, v in extra.items())
            print(f"[{tag}] {shown + ' ' if shown else ''}{' '.join(cmd[1:])} (log {log})", flush=True)
            with open(log, "w") as f:
                running[i] = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                              env={**os.environ, **extra} if extra else None)
        for i, proc in list(running.items()):
            if proc.poll() is not None:
                rcs[i] = proc.returncode
                del running[i]
                if on_done:
                    on_done(i, rcs[i])
        if running:
            time.sleep(1)
    return rcs
