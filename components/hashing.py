"""Content hashes of stage outputs and of the code that produced them.

Files are hashed with MD5 and directories with DVC's directory hash (md5 of the sorted JSON listing of
{md5, relpath}, suffixed ".dir"), so the hash that keys a downstream stage's cache is the same one `dvc`
writes into dvc.lock and the one MLflow records for a dataset. Hashing a multi-GB checkpoint on every run would
defeat the cache, so each file's MD5 is remembered by (path, size, mtime_ns, inode, ctime_ns) in a small JSON
file; a file whose stat changed is read again."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import ClassVar

from components.errors import M1Error

_CHUNK = 1 << 20
_lock = threading.Lock()


class StatCache:
    """MD5 by file stat, persisted as JSON (one per cache file path; shared within the process)."""

    _instances: ClassVar[dict[str, StatCache]] = {}

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    @classmethod
    def at(cls, path: Path | None) -> StatCache:
        key = str(path)
        with _lock:
            if key not in cls._instances:
                cls._instances[key] = cls(path)
            return cls._instances[key]

    def md5(self, file: Path) -> str:
        st = file.stat()
        sig = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        key = str(file.resolve())
        hit = self.entries.get(key)
        if hit and hit[:4] == sig:
            return hit[4]
        h = hashlib.md5()
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        self.entries[key] = sig + [h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        live = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(live))
        os.replace(tmp, self.path)
        self.dirty = False


def default_stat_cache() -> StatCache:
    root = Path(os.environ.get("M1_CACHE_DIR") or Path.home() / ".cache" / "m1")
    return StatCache.at(root / "md5-by-stat.json")


def dvc_md5(path: str | Path, cache: StatCache | None = None) -> str:
    """MD5 of a file, or DVC's "<md5>.dir" hash of a directory (every file below it, symlinks followed)."""
    p = Path(path)
    cache = cache or default_stat_cache()
    if p.is_file():
        out = cache.md5(p)
    elif p.is_dir():
        entries = []
        for root, dirs, files in os.walk(p, followlinks=True):
            dirs.sort()
            for name in files:
                f = Path(root) / name
                entries.append({"md5": cache.md5(f), "relpath": f.relative_to(p).as_posix()})
        entries.sort(key=lambda e: e["relpath"])
        body = json.dumps(entries, sort_keys=True).encode("utf-8")
        out = hashlib.md5(body).hexdigest() + ".dir"
    else:
        raise FileNotFoundError(f"nothing to hash at {p}")
    cache.save()
    return out


def code_version(paths: list[str | Path], root: Path) -> str:
    """sha256 over the Python and YAML sources under `paths` (files or directories), by relative path."""
    h = hashlib.sha256()
    files: set[Path] = set()
    for rel in paths:
        p = (root / rel).resolve()
        if p.is_file():
            files.add(p)
        elif p.is_dir():
            files.update(f for f in p.rglob("*") if f.is_file() and f.suffix in (".py", ".yaml", ".yml", ".json",
                                                                                   ".jinja", ".txt")
                         and "__pycache__" not in f.parts)
        else:
            raise FileNotFoundError(f"code path {rel} of a stage does not exist under {root}")
    for f in sorted(files):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


_IMPORTS: dict[tuple, frozenset[str]] = {}  # (file, mtime_ns, size) -> names it imports


def _imports(file: Path, module: str) -> frozenset[str]:
    st = file.stat()
    memo = (str(file), st.st_mtime_ns, st.st_size)
    if memo not in _IMPORTS:
        try:
            tree = ast.parse(file.read_bytes(), str(file))
        except SyntaxError as e:
            raise M1Error(f"cannot parse {file}: {e}") from None
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        names: set[str] = set()
        for node in ast.walk(tree):  # imports inside functions count: they run when the stage does
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                # `from pkg import name`: name may be a submodule (then it is imported too) or an attribute
                names.update([base, *(f"{base}.{a.name}" for a in node.names)])
        _IMPORTS[memo] = frozenset(names)
    return _IMPORTS[memo]


def imported_files(module: str, root: Path) -> set[Path]:
    """The source files under `root` that importing `module` runs: its own, those of every repo module it imports
    (statically, transitively, imports inside functions included) and their parent packages' __init__.py.
    Modules that do not resolve to a file under `root` (libraries, attributes) are not followed."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found or not name:
            continue
        file = _module_file(name, root)
        if file is None:
            continue
        found[name] = file
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _imports(file, name)
    if module not in found:
        raise M1Error(f"module {module} has no source file under {root}")
    return set(found.values())


# Libraries whose version changes what a stage computes: numerics and kernels, tokenisation, answer checking.
RESULT_LIBRARIES = ("torch", "transformers", "tokenizers", "math-verify", "mamba-ssm")


def library_versions(names: tuple[str, ...] = RESULT_LIBRARIES) -> dict[str, str | None]:
    """Public version of each library (None when not installed). The local build tag is dropped: a driver with
    torch 2.9.0+cpu and GPU workers with 2.9.0+cu130 run one release and must agree on the keys."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name).split("+")[0]
        except PackageNotFoundError:
            out[name] = None
    return out


def canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
