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
