"""Chat templating, loss masks and packing with the real teacher tokenizer (SmolLM2's chat template)."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.data.config import DEFAULT_INSTRUCTION
from components.data.packing import PACKED_SCHEMA, Packer, ShardWriter, real_tokens
from components.data.record import Record
from components.data.templating import Formatter


@pytest.fixture(scope="session")
def tok():
    from components.data.tokenizer_cache import cached_tokenizer

    return cached_tokenizer("smollm2")


def rec(split="sft1", solution="6 \\times 7 = 42, so the answer is $\\boxed{42}$.", **meta):
    return Record("s/1", "s", "What is six times seven?", solution, "42", split, meta)


def test_loss_mask_covers_exactly_the_assistant_reply(tok):
    fmt = Formatter(tok, DEFAULT_INSTRUCTION)
    r = rec()
    enc = fmt.encode([r])[0]
    ids, mask = enc.input_ids, enc.loss_mask
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    start = mask.index(1)
    # The last <|im_start|> opens the assistant turn; it and the role header are prompt tokens.
    assert max(i for i, t in enumerate(ids) if t == im_start) < start
    assert tok.decode(ids[max(i for i, t in enumerate(ids) if t == im_start) : start]) == "<|im_start|>assistant\n"
    assert enc.prompt_tokens == start
    assert all(m == 0 for m in mask[:start])  # no label on any prompt token
    assert all(m == 1 for m in mask[start:-1])
    assert ids[-2] == im_end and mask[-2] == 1  # end-of-turn is learned
    assert tok.decode(ids[-1:]) == "\n" and mask[-1] == 0  # the template's trailing newline is not
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == r.solution + "<|im_end|>"
    prompt_text = tok.decode(ids[:start])
    assert "What is six times seven?\n" + DEFAULT_INSTRUCTION in prompt_text
    assert prompt_text == fmt.prompt(r.problem)


def test_sft2_wraps_trace_in_think_and_ends_with_boxed_answer(tok):
    fmt = Formatter(tok, DEFAULT_INSTRUCTION, system_prompt="You are a careful mathematician.")
    r = rec("sft2", solution="Six sevens... 42.", final="So $\\boxed{42}$.")
    enc = fmt.encode([r])[0]
    learned = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert learned == "<think>\nSix sevens... 42.\n</think>\nSo $\\boxed{42}$.<|im_end|>"
    assert "careful mathematician" in tok.decode(enc.input_ids[: enc.prompt_tokens])
    r2 = rec("sft2", solution="Six sevens.")  # no final part: a boxed line is added
    assert Formatter.assistant_text(r2).endswith("</think>\nThe final answer is $\\boxed{42}$.")


def test_prompt_ends_with_generation_prompt(tok):
    p = Formatter(tok, DEFAULT_INSTRUCTION).prompt("Compute 2+2.")
    assert p.endswith("<|im_start|>assistant\n") and "Compute 2+2.\n" + DEFAULT_INSTRUCTION in p


def test_packer_keeps_document_boundaries():
    rows = []
    p = Packer(seq_len=10, pad_id=2, window=2, emit=rows.append)
    docs = [([11, 12, 13, 14], [0, 0, 1, 1]), ([21, 22, 23], [0, 1, 1]), ([31, 32, 33, 34, 35, 36], [0, 0, 0, 1, 1, 1]),
            ([41, 42], [0, 1]), ([51, 52, 53, 54, 55, 56, 57, 58, 59, 60], [0] * 5 + [1] * 5)]
    for ids, mask in docs:
        p.add(ids, mask)
    p.flush()
    assert all(len(r[k]) == 10 for r in rows for k in r)
    seen = []
    for r in rows:
        ids, pos, dids, mask = r["input_ids"], r["position_ids"], r["doc_ids"], r["loss_mask"]
        n_docs = max(dids) + 1
        assert sorted(set(d for d in dids if d >= 0)) == list(range(n_docs))
        for d in range(n_docs):
            idx = [i for i, x in enumerate(dids) if x == d]
            assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
            assert [pos[i] for i in idx] == list(range(len(idx)))  # positions restart at 0
            seen.append(([ids[i] for i in idx], [mask[i] for i in idx]))
        pad = [i for i, x in enumerate(dids) if x == -1]
        assert all(ids[i] == 2 and mask[i] == 0 and pos[i] == 0 for i in pad)
        assert pad == list(range(10 - len(pad), 10))  # padding only at the end
    assert sorted(seen) == sorted(docs)  # every document exactly once, intact, with its own mask
    assert len(rows) == 3  # 4+3+2 | 6 | 10 (first-fit fills gaps left by earlier rows)
    with pytest.raises(ValueError):
        p.add(list(range(11)), [1] * 11)


def test_shard_writer_schema_and_counts(tmp_path):
    rows = []
    p = Packer(seq_len=8, pad_id=0, window=4, emit=rows.append)
    for n in [3, 5, 2, 7, 4]:
        p.add(list(range(1, n + 1)), [1] * n)
    p.flush()
    w = ShardWriter(str(tmp_path), PACKED_SCHEMA, rows_per_shard=2, count_tokens=real_tokens)
    for r in rows:
        w.write(r)
    files = w.close()
    assert [f["rows"] for f in files] == [2, 1] and sum(f["tokens"] for f in files) == 21
    t = pq.read_table(tmp_path / files[0]["file"])
    assert t.schema == PACKED_SCHEMA
    assert t.schema.field("loss_mask").type == pa.list_(pa.int8())
    assert t.schema.field("input_ids").type == pa.list_(pa.int32())
