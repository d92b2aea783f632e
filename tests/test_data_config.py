"""DataConfig: defaults are the embedded default, the params.yaml block matches them, bad input is refused."""
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from components.config import load_config
from components.data.config import DataConfig
from components.errors import M1Error

BLOCK = Path(__file__).parent / "fixtures" / "data" / "params_data_section.yaml"


def test_params_block_equals_defaults():
    block = yaml.safe_load(BLOCK.read_text())["data"]
    assert DataConfig.model_validate(block) == DataConfig()
    assert load_config().data == DataConfig()  # params.yaml (with or without the block) gives the defaults


def test_default_is_offline_only():
    kinds = {s.kind for s in DataConfig().sources}
    assert kinds == {"champ", "mathgenerator", "synthetic"}


@pytest.mark.parametrize(
    "override,message",
    [
        ({"data": {"bogus": 1}}, "data.bogus: unknown key"),
        ({"data": {"sources": [{"kind": "synthetic", "name": "a", "splits": ["sft1"]},
                               {"kind": "synthetic", "name": "a", "splits": ["rl"]}]}}, "duplicate source names"),
        ({"data": {"sources": [{"kind": "nope", "name": "a", "splits": ["sft1"]}]}}, "data.sources.0"),
        ({"data": {"sources": [{"kind": "synthetic", "name": "a", "splits": ["sft3"]}]}}, "data.sources.0.synthetic.splits"),
        ({"data": {"sources": [{"kind": "hub", "name": "m", "dataset": "math500", "splits": ["eval"],
                                "holdout_fraction": 0.5}]}}, "holdout_fraction"),
        ({"data": {"packing": {"overlong": "drop"}}}, "data.packing.overlong"),
    ],
)
def test_bad_config_is_one_line(override, message):
    with pytest.raises(M1Error) as e:
        load_config(overrides=override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_eval_set_names_must_be_unique():
    with pytest.raises(ValidationError, match="same evaluation set"):
        DataConfig.model_validate({"sources": [
            {"kind": "synthetic", "name": "a", "splits": ["sft1"], "holdout_fraction": 0.1, "holdout_set": "x"},
            {"kind": "synthetic", "name": "b", "splits": ["sft1"], "holdout_fraction": 0.1, "holdout_set": "x"}]})
