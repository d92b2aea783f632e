"""Profile files: configs/profiles/<name>.yaml overlays of params.yaml, and the chain a profile stacks on
(`extends: <profile>`). Read by the config loader and by the dvc.yaml generator (which declares every file of the
chain), so it sits below both."""
from __future__ import annotations

from pathlib import Path

import yaml

from components.errors import M1Error

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "configs" / "profiles"


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise M1Error(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise M1Error(f"{path} must hold a mapping at the top level")
    return data


def available_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    return ["default"] + sorted(p.stem for p in directory.glob("*.yaml"))


def profile_files(profile: str, directory: Path = PROFILES_DIR, seen: tuple[str, ...] = ()) -> list[tuple[Path, dict]]:
    """A profile's file and data, after those of the profiles it extends: `extends: <profile>` at its top stacks it
    on another profile (a node profile such as gpu2 changes only what differs from gpu)."""
    path = directory / f"{profile}.yaml"
    if not path.is_file():
        raise M1Error(f"unknown profile {profile!r}; available: {', '.join(available_profiles(directory))}")
    if profile in seen:
        raise M1Error(f"profile {profile!r} extends itself through {' -> '.join(seen + (profile,))}")
    data = read_yaml(path)
    base = data.pop("extends", None)
    if base is None or base == "default":
        return [(path, data)]
    if not isinstance(base, str):
        raise M1Error(f"{path}: extends must name one profile, not {base!r}")
    return profile_files(base, directory, seen + (profile,)) + [(path, data)]
