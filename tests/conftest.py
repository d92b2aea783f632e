import os
import sys

import pytest

# pytest-xdist workers (make test runs two) share the machine's cores: each worker, and the processes it starts
# (stage subprocesses inherit OMP_NUM_THREADS), gets its share instead of every one of them spinning a thread per
# core. Set before torch is imported.
_THREADS = max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)))
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests that call the flow function directly get Prefect's own ephemeral server, whose 20 s start-up limit a busy
# 2-core machine can miss on a fresh database (`m1 pipeline` starts it with at least 60 s itself)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
for k, v in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
             "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(k, v)
torch.set_num_threads(_THREADS)


# Under pytest-xdist with --dist loadfile --no-loadscope-reorder (make test) a worker takes the next file in
# collection order whenever it runs short. The longest files go first, so that the two workers end together instead
# of one running the longest file alone at the end; the rest keep their order. Ranked by the time each file took in
# a 2-core run of `make test` (the order of the short ones hardly matters).
LONGEST_FIRST = ["test_pipeline_s3", "test_pipeline_interrupts", "test_node_pipeline", "test_pipeline_flow",
                 "test_infra_stack", "test_pipeline_dvc", "test_train_loop", "test_model", "test_grpo_loop",
                 "test_cli_errors", "test_grpo_learning", "test_checkpoint_models", "test_registry_promotion",
                 "test_serving", "test_data_curate", "test_sft_learns_eos", "test_prefect_artifacts", "test_eval_run"]


# What a 2-core `make test` run held at most under the temp dir: 3.4 GB (models, checkpoints, Ray and MLflow folders;
# passed tests' tmp_path are removed as they end, pyproject.toml). With less free than this, tests fail one after
# another on writes that cannot complete (CI once reported 130 errors that way): stop first, with one line.
MIN_FREE_GB = 4.0


def pytest_sessionstart(session):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import shutil
    import tempfile

    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free / 1e9
    if free < MIN_FREE_GB:
        pytest.exit(f"only {free:.1f} GB free under {where}; the suite writes up to {MIN_FREE_GB:.0f} GB there "
                    f"(models, checkpoints, Ray): free some disk space first", returncode=3)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's tests keep their order


# MLflow keeps process-wide state that a test can leave behind for every later test of its process (with
# pytest-xdist, whichever file runs next in that worker): the fluent tracking and registry URIs (a client made
# without a registry_uri then reads another test's database), the active experiment (set_experiment also writes
# MLFLOW_EXPERIMENT_ID), MLFLOW_RUN_ID and open runs. Each module and each test gets them back as it found them.
_MLFLOW_GLOBALS = (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                   ("mlflow.tracking._model_registry.utils", "_registry_uri"),
                   ("mlflow.tracking.fluent", "_active_experiment_id"))


def _mlflow_state():
    fluent = sys.modules.get("mlflow.tracking.fluent")
    return ({k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")},
            {(m, n): getattr(sys.modules[m], n) for m, n in _MLFLOW_GLOBALS if m in sys.modules},
            len(fluent._active_run_stack.get()) if fluent is not None else 0)


def _restore_mlflow(state) -> None:
    env, globs, open_runs = state
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:
        stack = fluent._active_run_stack.get()
        while len(stack) > open_runs:  # a run the test left open (on its own store)
            try:
                fluent.end_run()
            except Exception:  # noqa: BLE001  (its store may be gone with the test's tmp_path)
                if len(stack) > open_runs:
                    stack.pop()
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k not in env]:
        del os.environ[k]
    os.environ.update(env)
    for m, n in _MLFLOW_GLOBALS:
        if m in sys.modules:  # None: mlflow was imported during the test (its default: nothing set)
            setattr(sys.modules[m], n, globs.get((m, n)))


@pytest.fixture(autouse=True, scope="module")
def _mlflow_state_per_module():
    state = _mlflow_state()
    yield
    _restore_mlflow(state)


@pytest.fixture(autouse=True)
def _mlflow_state_per_test():
    state = _mlflow_state()
    yield
    _restore_mlflow(state)


@pytest.fixture(scope="session")
def tiny_teacher():
    from components.model.teacher import load_any_teacher

    return load_any_teacher("random:tiny", seed=0)


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, tiny_teacher):
    """(root, data dir): the tiny teacher converted with attention at layers 1 and 3 (root / "conv") and small
    packed splits (tests/packed_fixture.py), for the trainer's tests."""
    from packed_fixture import write_data_dir

    from components.model import convert

    root = tmp_path_factory.mktemp("train")
    data = write_data_dir(root / "data", n_rows=12, seq_len=32)
    convert(tiny_teacher, [1, 3]).save_pretrained(root / "conv")
    return root, data


@pytest.fixture(scope="session")
def smollm2_teacher():
    """The real embedded teacher (SmolLM2-135M-Instruct, dequantised from GGUF): loading takes ~30 s."""
    from components.model.teacher import load_teacher

    return load_teacher("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from components.model.teacher import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def rl_setup(tmp_path_factory, tiny_teacher, smollm2_tokenizer):
    """The tiny teacher converted with attention at layers 1 and 3 (root / "policy") and 12 RL prompts plus one
    without an answer (root / "data" / "rl"), for the GRPO tests."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.model import convert

    root = tmp_path_factory.mktemp("grpo")
    convert(tiny_teacher, [1, 3]).save_pretrained(root / "policy", tokenizer=smollm2_tokenizer)
    rows = []
    for i in range(12):
        q = f"What is {i} + {i + 1}?"
        prompt = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True)
        rows.append({"id": f"p{i}", "source": "t", "problem": q, "prompt": prompt, "answer": str(2 * i + 1)})
    rows.append({"id": "bad", "source": "t", "problem": "?", "prompt": "?", "answer": ""})
    (root / "data" / "rl").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "rl" / "part-00000.parquet")
    (root / "data" / "manifest.json").write_text("{}")
    return root


@pytest.fixture
def count_ray_reports(monkeypatch):
    """patch(loop_module) -> calls: the module's loops then run as a Ray Train worker would (ctx.ray, no resume
    lookup) and each report is recorded as (step, with a checkpoint) instead of reaching Ray."""
    def patch(module):
        calls = []

        class RayLikeContext(module.Context):
            def __init__(self, use_ray, use_gpu):
                super().__init__(False, use_gpu)
                self.ray = True

            def resume_dir(self, root, fingerprint, mirror=None):
                return None

            def report(self, metrics, local_ckpt, root, step, keep, mirror=None):
                calls.append((step, local_ckpt is not None))

        monkeypatch.setattr(module, "Context", RayLikeContext)
        return calls

    return patch
