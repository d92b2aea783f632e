"""Small packed datasets in the curate stage's shard layout, for trainer tests (no tokenizer needed)."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_packed(directory: Path, n_rows: int, seq_len: int, vocab: int = 49152, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "position_ids": [], "doc_ids": [], "loss_mask": []}
    for _ in range(n_rows):
        ids, pos, doc, mask = [], [], [], []
        d = 0
        while len(ids) < seq_len:
            n = int(rng.integers(6, seq_len // 2 + 2))
            n = min(n, seq_len - len(ids))
            prompt = max(1, n // 3)
            ids += rng.integers(3, vocab, n).tolist()
            pos += list(range(n))
            doc += [d] * n
            mask += [0] * prompt + [1] * (n - prompt)
            d += 1
        rows["input_ids"].append(ids)
        rows["position_ids"].append(pos)
        rows["doc_ids"].append(doc)
        rows["loss_mask"].append(mask)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=pa.list_(pa.int32() if k != "loss_mask" else pa.int8()))
                             for k, v in rows.items()}), directory / "part-00000.parquet")
    return directory


def write_data_dir(root: Path, n_rows: int = 12, seq_len: int = 32) -> Path:
    write_packed(root / "sft1", n_rows, seq_len, seed=1)
    write_packed(root / "sft1_heldout", 4, seq_len, seed=2)
    write_packed(root / "sft2", n_rows, seq_len, seed=3)
    (root / "manifest.json").write_text(json.dumps({"fixture": True, "rows": n_rows}))
    return root
