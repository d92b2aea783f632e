"""Training checkpoints on a local directory or S3, through pyarrow filesystems (the same ones Ray Train uses).

A checkpoint is a directory: the model in the Hugging Face layout (loadable by HybridForCausalLM.from_pretrained)
plus trainer_state.pt (optimizer, scheduler, RNG states: tensors and plain data only, loaded with
weights_only=True) and trainer_state.json (step, data position, fingerprint). A run's latest checkpoint is the one
with the highest step among the `<root>/checkpoint_*` of its fingerprint: checkpoints of other settings in the same
root are neither resumed nor pruned. Ray Train writes its own checkpoint_<timestamp> folders into the same root, so
the scan works for both paths."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from components.errors import M1Error

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it). s3:// honours AWS_ENDPOINT_URL (MinIO, moto) and AWS_* credentials."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw = {"endpoint_override": endpoint} if endpoint else {}
        if endpoint and endpoint.startswith("http://"):
            kw["scheme"] = "http"
        fs = pafs.S3FileSystem(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **kw)
        return fs, uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def rng_state() -> dict:
    # numpy's key array as a list of ints: the state then loads with weights_only=True, no numpy globals allowed
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def copy_tokenizer(src_dir: str | Path, dst_dir: Path) -> None:
    """The tokenizer files of a model directory travel with every checkpoint, so each one loads on its own."""
    for f in Path(src_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy2(f, dst_dir / f.name)


def publish_model(model, out_dir: Path, tokenizer_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write <out_dir>/model atomically: saved beside it, then renamed, so a crash never leaves half a model.
    state_dict: the full weights when the model itself is sharded."""
    tmp = out_dir / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    copy_tokenizer(tokenizer_dir, tmp)
    shutil.rmtree(out_dir / "model", ignore_errors=True)
    tmp.rename(out_dir / "model")
    return out_dir / "model"


def write_local(directory: Path, model, optimizer, scheduler, step: int, samples: int, extra: dict | None = None,
                tokenizer_dir: str | None = None, model_state: dict | None = None,
                optimizer_state: dict | None = None) -> Path:
    """model_state / optimizer_state: full states gathered from a sharded model (else the objects' own)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, state_dict=model_state)
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, directory)
    optim = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state()},
               directory / STATE_PT)
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "samples_consumed": samples, **(extra or {})}))
    return directory


def upload(local_dir: Path, root_uri: str, name: str) -> str:
    import pyarrow.fs as pafs

    fs, root = filesystem(root_uri)
    dest = f"{root}/{name}"
    tmp = f"{root}/.{name}.partial"
    fs.create_dir(tmp, recursive=True)
    pafs.copy_files(str(local_dir), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    try:
        fs.delete_dir(dest)
    except (FileNotFoundError, OSError):
        pass
    fs.move(tmp, dest)  # a half-written checkpoint is never named checkpoint_*
    return dest


def list_checkpoints(root_uri: str, fingerprint: str | None = None) -> list[tuple[int, str]]:
    """[(step, path)] of complete checkpoints under root (only those of `fingerprint` when given), oldest first."""
    import pyarrow.fs as pafs

    fs, root = filesystem(root_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (FileNotFoundError, OSError):
        return []
    out = []
    for info in infos:
        name = info.path.rstrip("/").split("/")[-1]
        if info.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_JSON}") as f:
                meta = json.loads(f.read())
            step = meta["step"]
        except (FileNotFoundError, OSError, KeyError, json.JSONDecodeError):
            continue  # incomplete
        if fingerprint is None or meta.get("fingerprint") == fingerprint:
            out.append((step, info.path))
    return sorted(out)


def latest_checkpoint(root_uri: str, fingerprint: str) -> str | None:
    """The newest checkpoint of this fingerprint: a newer one of other settings must not hide it."""
    cks = list_checkpoints(root_uri, fingerprint)
    return cks[-1][1] if cks else None


def download(root_uri: str, path: str) -> Path:
    """Copy a checkpoint to a local temp dir (no copy when it is local already)."""
    import pyarrow.fs as pafs

    fs, _ = filesystem(root_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    local = Path(tempfile.mkdtemp(prefix="m1-ckpt-"))
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def prune(root_uri: str, keep: int, fingerprint: str) -> None:
    """Keep the newest `keep` checkpoints of this fingerprint; those of other settings are not this run's to count
    or remove (higher-numbered ones would otherwise push out the run's own)."""
    fs, _ = filesystem(root_uri)
    for _, path in list_checkpoints(root_uri, fingerprint)[:-keep]:
        fs.delete_dir(path)


def read_state(local_dir: Path) -> tuple[dict, dict]:
    meta = json.loads((local_dir / STATE_JSON).read_text())
    path = local_dir / STATE_PT
    try:  # checkpoints may come from shared storage: unpickling anything but tensors and plain data could run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise M1Error(f"{path}: refusing to resume from trainer state that holds more than tensors and plain data "
                      f"(loading it could run code); delete this checkpoint to start over") from e
    return meta, state
