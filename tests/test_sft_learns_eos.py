"""Fine-tuned models learn to stop. On the H200 image (transformers 5.17) SmolLM2's GGUF tokenizer loaded with EOS =
<|im_start|> (id 1), pad unset, so <|im_end|> (id 2) was no named special token: curation left it out of the loss in
every document (the gpu2-arms manifest: loss_tokens exactly one per document short, pad/eos 1) and both SFT'd arms
wrote on to max_new_tokens. Here: a GGUF tokenizer takes BOS/EOS/pad from the file, the end-of-turn token carries
loss whatever the tokenizer names EOS, curation refuses data that never teaches stopping, and SFT through the
trainer on such documents raises log p(<|im_end|>) at their ends from ~-11 to near 0."""
import copy

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from components.data.config import DEFAULT_INSTRUCTION
from components.data.packing import PACKED_SCHEMA, Packer
from components.data.record import Record
from components.data.templating import Formatter

IM_START, IM_END, NL = 1, 2, 198


@pytest.fixture(scope="module")
def tok():
    from components.data.tokenizer_cache import cached_tokenizer

    return cached_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tok_517(tok):
    """The tokenizer as transformers 5.17 builds it from SmolLM2's GGUF: EOS and pad are <|im_start|>."""
    t = copy.deepcopy(tok)
    t.eos_token = "<|im_start|>"
    t.pad_token = "<|im_start|>"
    assert IM_END not in t.all_special_ids  # what the curation's old special-token set was built from
    return t


def _records(n: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(2, 60, 2))
        out.append(Record(f"t/{i}", "t", f"What is {a} + {b}?", f"{a} + {b} = {a + b}. The answer is $\\boxed{{{a + b}}}$.",
                          str(a + b), "sft1"))
    return out


def test_gguf_tokenizer_takes_bos_eos_pad_from_the_file(tok, tok_517, monkeypatch):
    from transformers import AutoTokenizer

    from components.model import teacher

    assert teacher.gguf_special_ids(teacher.embedded_gguf_path()) == {"bos": 1, "eos": 2, "pad": 2}
    loaded = copy.deepcopy(tok_517)
    loaded.pad_token = None  # 5.17 sets none; load_tokenizer used to fill it with its EOS, <|im_start|>
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loaded)
    t = teacher.load_tokenizer("smollm2")
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (IM_START, IM_END, IM_END)
    assert IM_END in t.all_special_ids


def test_end_of_turn_carries_loss_whatever_the_tokenizer_names_eos(tok, tok_517):
    for t in (tok, tok_517):
        enc = Formatter(t, DEFAULT_INSTRUCTION).encode(_records(1))[0]
        assert enc.input_ids[-2:] == [IM_END, NL] and enc.loss_mask[-2:] == [1, 0]
        assert enc.end_of_turn


def test_curation_refuses_data_that_never_teaches_stopping(tok, tmp_path, monkeypatch):
    from components.config import load_config
    from components.data import curate
    from components.errors import M1Error

    init = Formatter.__init__

    def old_special_set(self, tokenizer, *a, **k):  # the set the 5.17 tokenizer gave before the fix
        init(self, tokenizer, *a, **k)
        self.special_ids = {IM_START, 0}

    monkeypatch.setattr(Formatter, "__init__", old_special_set)
    cfg = load_config(overrides={"run_dir": str(tmp_path), "teacher": {"source": "random:tiny"},
                                 "tracking": {"enabled": False},
                                 "data": {"num_proc": 1, "sources": [
                                     {"kind": "synthetic", "name": "s1", "splits": ["sft1"], "n": 12, "seed": 1},
                                     {"kind": "synthetic", "name": "s2", "splits": ["sft2"], "n": 6, "seed": 2},
                                     {"kind": "synthetic", "name": "rl", "splits": ["rl"], "n": 4, "seed": 3}]}})
    with pytest.raises(M1Error, match="end-of-turn token carries loss"):
        curate.run(cfg, {"tokenizer": tok})


def _write_split(directory, encs, seq_len: int, pad_id: int) -> None:
    rows = []
    packer = Packer(seq_len, pad_id, 8, rows.append)
    for e in encs:
        packer.add(e.input_ids, e.loss_mask)
    packer.flush()
    directory.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PACKED_SCHEMA), directory / "part-00000.parquet")


@torch.no_grad()
def _eos_logp(model_dir, encs) -> float:
    """Mean log p(<|im_end|> | the document up to it) over the documents."""
    from components.model import HybridForCausalLM

    model = HybridForCausalLM.from_pretrained(model_dir).float().eval()
    out = []
    for e in encs:
        ids = torch.tensor([e.input_ids])
        lp = torch.log_softmax(model(ids).float(), -1)
        out.append(float(lp[0, len(e.input_ids) - 3, IM_END]))  # the position before <|im_end|>, "\n"
    return float(np.mean(out))


@pytest.mark.slow
def test_sft_learns_to_emit_eos_at_document_ends(tiny_teacher, tok_517, tmp_path):
    """Documents curated with the 5.17 tokenizer, packed (padded with its pad id, 1), fine-tuned in-process for 40
    steps: -10.82 -> -0.38 (with the old mask, <|im_end|> loss_mask 0, the same run ends at -9.17)."""
    from components.config import load_config
    from components.model import convert
    from components.train.stage import run

    fmt = Formatter(tok_517, DEFAULT_INSTRUCTION)
    train, heldout = fmt.encode(_records(16, seed=1)), fmt.encode(_records(4, seed=2))
    assert all(e.input_ids[-2] == IM_END and e.loss_mask[-2] == 1 for e in train)
    data = tmp_path / "data"
    _write_split(data / "sft1", train, 256, tok_517.pad_token_id)
    (data / "manifest.json").write_text("{}")
    convert(tiny_teacher, [1, 3]).save_pretrained(tmp_path / "conv")
    before = _eos_logp(tmp_path / "conv", heldout)
    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "teacher": {"source": "random:tiny"},
                                 "tracking": {"enabled": False},
                                 "sft1": {"max_steps": 40, "global_batch_size": 2, "micro_batch_size": 2,
                                          "warmup_steps": 1, "lr": 1e-2, "checkpoint_every": 40, "heldout": None,
                                          "num_workers": 0, "use_gpu": "no"}})
    out = run(cfg, {"model_dir": tmp_path / "conv", "data_dir": data}, "sft1")
    after = _eos_logp(out.model_dir, heldout)
    print(f"mean log p(<|im_end|>) at held-out document ends: {before:.2f} before SFT, {after:.2f} after")
    assert before < -8.0  # the random tiny teacher: ~log(1 / 49152)
    assert after > -1.0, (before, after)
