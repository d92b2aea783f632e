"""teacher.gguf_special_ids reads bos/eos/pad from a GGUF key/value header by hand because gguf.GGUFReader, which
reads the same fields, first parses every array in the file (SmolLM2's 49k-token vocabulary and merges): 9 s
against 0.06 s on this machine. The reader is the reference the hand parser is checked against."""
import gguf
import numpy as np
import pytest

from components.errors import M1Error
from components.model.teacher import embedded_gguf_path, gguf_special_ids

KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
        "pad": "tokenizer.ggml.padding_token_id"}


def reference(path) -> dict[str, int]:
    fields = gguf.GGUFReader(path).fields
    return {name: int(fields[key].contents()) for name, key in KEYS.items() if key in fields}


def test_a_written_header_reads_back_as_the_reference_reads_it(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("header test")
    w.add_context_length(2048)
    w.add_rope_freq_base(10000.0)  # a float before the ids
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(300)])  # an array of strings to step over
    w.add_token_scores([0.5] * 300)  # an array of floats
    w.add_array("test.nested", [[1, 2], [3]])  # an array of arrays
    w.add_bos_token_id(7)
    w.add_eos_token_id(300 - 1)
    w.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_special_ids(path) == reference(path) == {"bos": 7, "eos": 299}


@pytest.mark.slow
def test_the_embedded_teacher_reads_as_the_reference_reads_it():
    path = embedded_gguf_path()
    assert gguf_special_ids(path) == reference(path) == {"bos": 1, "eos": 2, "pad": 2}


def test_a_file_that_is_not_gguf_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(M1Error, match="not a GGUF"):
        gguf_special_ids(path)
