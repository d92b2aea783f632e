"""Training checkpoints on a local directory or S3, through pyarrow filesystems (the same ones Ray Train uses).

A checkpoint is a directory: the model in the Hugging Face layout (loadable by HybridForCausalLM.from_pretrained)
plus trainer_state.pt (optimizer, scheduler, RNG states: tensors and plain data only, loaded with
weights_only=True) and trainer_state.json (step, data position, fingerprint). A run's latest checkpoint is the one
with the highest step among the `<root>/checkpoint_*` of its fingerprint: checkpoints of other settings in the same
root are neither resumed nor pruned. Ray Train writes its own checkpoint_<timestamp> folders into the same root, so
the scan works for both paths.

A local root <run_dir>/<stage>/checkpoints is mirrored to S3 when the pipeline has a checkpoint_uri
(checkpoint_mirror): the loop copies every checkpoint there too, and a root that lost its checkpoints (a new
machine, a wiped disk) gets the mirror's newest one back before a run resumes."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch

from components.errors import M1Error

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it). s3:// honours AWS_ENDPOINT_URL (MinIO, moto) and AWS_* credentials."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw = {"endpoint_override": endpoint} if endpoint else {}
        if endpoint and endpoint.startswith("http://"):
            kw["scheme"] = "http"
        # more attempts than pyarrow's 3: a listing that fails would be taken for "no checkpoint"
        fs = pafs.S3FileSystem(region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=8), **kw)
        return fs, uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def is_local(root_uri: str) -> bool:
    return "://" not in root_uri


def checkpoint_mirror(root: str, base: str | None) -> str | None:
    """The S3 mirror of a local checkpoint root <run_dir>/<stage>/checkpoints under `base` (the pipeline's
    checkpoint_uri): <base>/<run_dir name>/<stage>/checkpoints. None without a base, or for a root on S3 already (a
    stage's checkpoint_storage). The run harness computes it once and hands it to the loop
    (LoopContext.checkpoint_mirror): nothing is read from the environment, which a Ray worker started for an earlier
    run would still carry."""
    if not base or not is_local(root):
        return None
    return mirror_of(base, Path(root))


def mirror_of(base: str, root: Path) -> str:
    return f"{base.rstrip('/')}/{root.parent.parent.name}/{root.parent.name}/{root.name}"


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
                optimizer_state: dict | None = None, trainer_extra: dict | None = None) -> Path:
    """model_state / optimizer_state: full states gathered from a sharded model (else the objects' own);
    trainer_extra: more trainer state beside the optimizer's (tensors and plain data only: read_state refuses
    anything else)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, state_dict=model_state)
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, directory)
    optim = optimizer_state if optimizer_state is not None else optimizer.state_dict()
    torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng_state(), **(trainer_extra or {})},
               directory / STATE_PT)
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "samples_consumed": samples, **(extra or {})}))
    return directory


def staging_dir(root_uri: str, prefix: str) -> Path:
    """An empty folder to write a new checkpoint into: beside a local root (same disk, so `upload` renames it into
    place instead of copying: a 3B checkpoint is 39 GB), a temporary one for S3. Its hidden name is no
    checkpoint_* to list_checkpoints, and one left by a killed run is removed here."""
    if is_local(root_uri):
        root = Path(filesystem(root_uri)[1])
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".{prefix}*"):  # a run killed while writing: one writer per root, so none is live
            shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".{prefix}", dir=root))
    return Path(tempfile.mkdtemp(prefix=prefix))


def upload(local_dir: Path, root_uri: str, name: str) -> str:
    """<root>/<name> from a written checkpoint: renamed there when it was staged on the root's own disk
    (staging_dir), else copied."""
    fs, root = filesystem(root_uri)
    src = Path(local_dir).resolve()
    if isinstance(fs, pafs.LocalFileSystem) and src.parent.parent == Path(root):
        dest = f"{root}/{name}"
        _delete_dir(fs, dest)
        src.rename(dest)  # one rename: never seen half-written under a checkpoint_* name
        return dest
    return _copy_checkpoint(str(local_dir), pafs.LocalFileSystem(), root_uri, name)


def _copy_checkpoint(src: str, src_fs, root_uri: str, name: str) -> str:
    """Copy the checkpoint directory `src` to <root>/<name>, never seen half-written under a checkpoint_* name: a
    local copy is written beside and renamed; object stores have no rename, so there trainer_state.json, without
    which list_checkpoints skips a directory, is written last."""
    fs, root = filesystem(root_uri)
    dest = f"{root}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{root}/.{name}.partial"
        _delete_dir(fs, tmp)
        fs.create_dir(tmp, recursive=True)
        pafs.copy_files(src, tmp, source_filesystem=src_fs, destination_filesystem=fs)
        _delete_dir(fs, dest)
        fs.move(tmp, dest)
        return dest
    _delete_dir(fs, dest)
    src = src.rstrip("/")
    files = sorted((i.path for i in src_fs.get_file_info(pafs.FileSelector(src, recursive=True))
                    if i.type == pafs.FileType.File), key=lambda f: f == f"{src}/{STATE_JSON}")
    for f in files:
        pafs.copy_files(f, f"{dest}/{f[len(src) + 1:]}", source_filesystem=src_fs, destination_filesystem=fs)
    return dest


def _delete_dir(fs, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def list_checkpoints(root_uri: str, fingerprint: str | None = None) -> list[tuple[int, str]]:
    """[(step, path)] of complete checkpoints under root (only those of `fingerprint` when given), oldest first."""
    fs, root = filesystem(root_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except FileNotFoundError:
        return []
    except OSError as e:  # an unreadable store must not pass for an empty one: the run would start afresh
        raise M1Error(f"cannot list checkpoints in {root_uri}: {str(e).splitlines()[0]}") from e
    out = []
    for info in infos:
        name = info.path.rstrip("/").split("/")[-1]
        if info.type != pafs.FileType.Directory or not name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_JSON}") as f:
                meta = json.loads(f.read())
            step = meta["step"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            continue  # incomplete (no state written yet)
        except OSError as e:
            raise M1Error(f"cannot read {info.path}/{STATE_JSON}: {str(e).splitlines()[0]}") from e
        if fingerprint is None or meta.get("fingerprint") == fingerprint:
            out.append((step, info.path))
    return sorted(out)


def newest_checkpoint(root_uri: str, fingerprint: str, mirror: str | None = None) -> tuple[str, str] | None:
    """(root or its S3 mirror, path) of the newest checkpoint of this fingerprint in either: a newer one of other
    settings must not hide it, and the mirror's counts only when newer than every one in the root."""
    cks = list_checkpoints(root_uri, fingerprint)
    mirrored = list_checkpoints(mirror, fingerprint) if mirror else []
    if mirrored and (not cks or mirrored[-1][0] > cks[-1][0]):
        return mirror, mirrored[-1][1]
    return (root_uri, cks[-1][1]) if cks else None


def latest_checkpoint(root_uri: str, fingerprint: str, mirror: str | None = None) -> str | None:
    """The path of newest_checkpoint in the root: one found only in the mirror is copied into the root first."""
    found = newest_checkpoint(root_uri, fingerprint, mirror)
    if found is None:
        return None
    where, path = found
    if where == root_uri:
        return path
    return _copy_checkpoint(path, filesystem(where)[0], root_uri, path.rstrip("/").rsplit("/", 1)[-1])


DOWNLOAD_PREFIX = "m1-ckpt-"


def download(root_uri: str, path: str) -> Path:
    """Copy a checkpoint to a local temp dir (no copy when it is local already)."""
    fs, _ = filesystem(root_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(path)
    local = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX))
    try:
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    return local


def release(local_dir: Path) -> None:
    """Remove a copy that `download` made once it has been read (a checkpoint already local stays where it is):
    each resume from S3 would otherwise leave a full model and optimizer state in the temp dir."""
    local_dir = Path(local_dir)
    if local_dir.parent == Path(tempfile.gettempdir()) and local_dir.name.startswith(DOWNLOAD_PREFIX):
        shutil.rmtree(local_dir, ignore_errors=True)


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
