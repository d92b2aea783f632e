"""Cache keys cover what a stage really runs: the sources of every repo module its target imports (found by
parsing imports, transitively), the versions of the libraries that shape results, and for `register` the
registry it writes to (without credentials)."""
import json
import shutil
from importlib import metadata
from importlib.metadata import PackageNotFoundError

import pytest

from components import hashing
from components.config import load_config
from components.pipeline import keys
from components.pipeline.keys import cache_key, key_material
from components.pipeline.stages import ROOT, get_stage

UP = {"curate": "data-hash", "grpo": "model-hash"}


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config("tiny", overrides={"run_dir": str(tmp_path / "run")})


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """A copy of the sources that the keys are computed from, for the test to edit."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(keys, "ROOT", root)
    return root


def _append(path, text="\n# edited\n"):
    with path.open("a") as f:
        f.write(text)


def test_a_module_evaluate_imports_indirectly_keys_it(cfg, repo_copy):
    evaluate, convert = get_stage("evaluate"), get_stage("convert")
    before, convert_before = cache_key(cfg, evaluate, UP), cache_key(cfg, convert, {})
    assert cache_key(cfg, evaluate, UP) == before
    # evaluate/run.py never names components.data: evaluate/sampling.py imports data.templating in a function
    _append(repo_copy / "components/data/templating.py")
    edited = cache_key(cfg, evaluate, UP)
    assert edited != before
    assert "components/data/templating.py" in evaluate.code_paths(repo_copy)
    assert cache_key(cfg, convert, {}) == convert_before  # convert imports nothing from components/data
    _append(repo_copy / "components/data/curate.py")  # curate's own module: evaluate does not import it
    assert cache_key(cfg, evaluate, UP) == edited


def test_library_versions_key_every_stage(cfg, monkeypatch):
    convert = get_stage("convert")

    def installed(**fake):
        """Pretend these versions are installed (None: not installed), the rest as they are."""
        def lookup(name):
            if name not in fake:
                return metadata.version(name)
            if fake[name] is None:
                raise PackageNotFoundError(name)
            return fake[name]
        # raising=False: without a version lookup in hashing, the key assertions below are what fail
        monkeypatch.setattr(hashing, "version", lookup, raising=False)

    installed(transformers="4.99.0", torch="2.9.0+cpu")
    base = cache_key(cfg, convert, {})
    installed(transformers="4.99.1", torch="2.9.0+cpu")
    assert cache_key(cfg, convert, {}) != base
    # the local build tag is no version: a +cpu driver and +cu130 GPU workers agree on the key
    installed(transformers="4.99.0", torch="2.9.0+cu130")
    assert cache_key(cfg, convert, {}) == base
    assert key_material(cfg, convert, {})["libraries"]["torch"] == "2.9.0"
    installed(transformers="4.99.0", torch="2.9.0", **{"math-verify": "0.9"})
    assert cache_key(cfg, convert, {}) != base
    # mamba-ssm's kernels replace the reference scan: installed or not is another key
    installed(transformers="4.99.0", torch="2.9.0", **{"mamba-ssm": None})
    without = cache_key(cfg, convert, {})
    installed(transformers="4.99.0", torch="2.9.0", **{"mamba-ssm": "2.2.4"})
    assert cache_key(cfg, convert, {}) != without


def test_register_key_follows_the_registry_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    register, convert = get_stage("register"), get_stage("convert")
    up = {"evaluate": "eval-hash"}

    def config(store: str):
        return load_config("tiny", overrides={"run_dir": str(tmp_path / "run"), "tracking": {"uri": store}})

    a, b = config(f"sqlite:///{tmp_path}/a.db"), config(f"sqlite:///{tmp_path}/b.db")
    assert cache_key(a, register, up) != cache_key(b, register, up)
    assert cache_key(a, convert, {}) == cache_key(b, convert, {})  # only register writes to the registry
    # the store actually used: MLFLOW_TRACKING_URI wins over tracking.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/b.db")
    assert cache_key(a, register, up) == cache_key(b, register, up)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cret@mlflow.example:5000/?token=t0ken")
    material = key_material(a, register, up)
    assert material["extra"] == {"registry": "https://mlflow.example:5000/", "model_name": "m1-hybrid-tiny"}
    assert "s3cret" not in json.dumps(material) and "t0ken" not in json.dumps(material)
