"""Bad input to `m1 convert` gets one line naming the problem and exit code 2, never a traceback."""
import json
import subprocess
import sys

import pytest

from components.model.teacher import embedded_gguf_path


def _m1(*args):
    return subprocess.run([sys.executable, "-m", "components.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,expect", [
    (["--teacher", "/no/such/teacher"], "unknown teacher path: /no/such/teacher"),
    (["--teacher", "/no/such/model.gguf"], "GGUF file missing: /no/such/model.gguf"),
    (["--teacher", "random:tiny", "--attn-layers", "1,7"], "attention layer indices [7] out of range"),
    (["--teacher", "not a model"], "unknown teacher"),
])
def test_bad_teacher_input_is_one_line(args, expect, tmp_path):
    r = _m1("convert", *args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("m1: error:") and expect in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_non_llama_architecture_is_refused(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    r = _m1("convert", "--teacher", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "'gpt2' model; only Llama-architecture" in r.stderr
    assert "Traceback" not in r.stderr


def test_embedded_gguf_is_found():
    assert embedded_gguf_path().endswith(".gguf")


def test_tiny_conversion_through_the_cli(tmp_path):
    r = _m1("convert", "--teacher", "random:tiny", "--attn-layers", "1", "--mixer", "mamba2", "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["mixer"] == "mamba2" and cfg["attn_layers"] == [1] and cfg["model_type"] == "m1_hybrid"
    assert (tmp_path / "m" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_bad_input_inside_a_stage_is_one_line_and_the_flow_state_message(tmp_path):
    # An empty local data file: curate refuses it (instead of caching 0 records for distill to trip over), and the
    # M1Error raised inside the Prefect task reaches the user as the one line, the traceback only in the log file.
    import os

    (tmp_path / "empty.jsonl").write_text("")
    run_dir, home = tmp_path / "run", tmp_path / "prefect"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    source = f"{{kind: local, name: empty, splits: [sft1], path: {tmp_path}/empty.jsonl}}"
    r = subprocess.run([sys.executable, "-m", "components.cli", "pipeline", "--profile", "tiny",
                        "--set", f"run_dir={run_dir}", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                        "--set", f"data.sources=[{source}]"],
                       capture_output=True, text=True, timeout=600, env=env, check=False)
    log = run_dir / "logs" / "last_error.log"
    line = f"m1: error: source empty: no rows in {tmp_path}/empty.jsonl (traceback: {log})"
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1] == line, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert "Traceback" in log.read_text() and "no rows in" in log.read_text()
    assert not (run_dir / "data").exists()  # nothing curated, nothing cached

    # The flow run's state, read back from the API the CLI used: its message is the same line (what a deployment
    # run shows in `prefect flow-run inspect` and the UI).
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_HOME, temporary_settings

    from components.pipeline.prefect_local import stop_ephemeral_server

    with temporary_settings(updates={PREFECT_HOME: str(home)}):
        try:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs()
        finally:
            stop_ephemeral_server()
    assert [(fr.state.type.value, fr.state.message) for fr in runs] == [("FAILED", line)]
