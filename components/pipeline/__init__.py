"""Pipeline plumbing beside the stages: stage registry, caching keys, MLflow runs and registry, storage."""
from pathlib import Path


def pyfunc_entry_path() -> str:
    return str(Path(__file__).with_name("pyfunc_entry.py"))
