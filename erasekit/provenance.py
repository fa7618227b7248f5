"""Where a result came from: versions, git commit, content hashes, peak memory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

_LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "safetensors",
    "nudenet",
    "open_clip_torch",
)

# Files that describe a model folder rather than define it; they do not enter its content hash.
_NOT_CONTENT = {"erasekit.json", "README.md"}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("erasekit", *_LIBRARIES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["erasekit"] = versions["erasekit"] or "0.0.0+unknown"  # a source tree, not installed
    return versions


def archived_commit(text: str) -> str | None:
    """The commit ``git archive`` wrote into erasekit/COMMIT (export-subst), or None when the
    file still holds its placeholder (a checkout) or anything else."""
    text = text.strip()
    return text if len(text) == 40 and all(c in "0123456789abcdef" for c in text) else None


def git_commit() -> str | None:
    """The commit of the erasekit source tree: from a git checkout (``-dirty`` with local
    changes), else the one an exported tree (``git archive``) recorded in erasekit/COMMIT."""
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        stamp = Path(__file__).resolve().parent / "COMMIT"
        return archived_commit(stamp.read_text()) if stamp.is_file() else None
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        parts = f.relative_to(path).parts
        if f.relative_to(path).as_posix() in _NOT_CONTENT or any(p.startswith(".") for p in parts):
            continue
        files.append(f)
    return files


_HASH_CACHE: dict[tuple, str] = {}


def model_content_hash(path: str | Path) -> str:
    """SHA-256 over a model file, or over a folder's files (relative path + file hash, sorted).

    Descriptive files (erasekit.json, the model card) are left out, so a model re-saved with a
    new manifest keeps its hash. Cached per process by (file, size, mtime), so multi-GB SD
    folders are read once per run.
    """
    path = Path(path).resolve()
    files = _content_files(path)
    key = (str(path), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    if path.is_file():
        digest = sha256_file(path)
    else:
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            h.update(sha256_file(f).encode() + b"\n")
        digest = h.hexdigest()
    _HASH_CACHE[key] = digest
    return digest


def peak_memory() -> dict[str, int | None]:
    """Peak resident host memory of this process and peak CUDA memory, in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host = rss if sys.platform == "darwin" else rss * 1024
    cuda = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = int(torch.cuda.max_memory_allocated())
    except Exception:  # pragma: no cover - torch missing or broken CUDA
        cuda = None
    return {"host_peak_rss_bytes": int(host), "cuda_peak_allocated_bytes": cuda}


def machine() -> str:
    """The machine a wall time was measured on: architecture, CPU model, CPUs, GPU if used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
    except Exception:  # pragma: no cover - torch missing or broken CUDA
        pass
    return text


def run_provenance(started: float | None = None, *, memory: bool = False) -> dict[str, Any]:
    """The provenance every file erasekit writes carries: erasekit's version, the git commit
    and the library versions; with ``started`` (a ``time.time()``), the wall time; with
    ``memory``, the peak memory."""
    import time

    versions = library_versions()
    out: dict[str, Any] = {"erasekit_version": versions["erasekit"], "git_commit": git_commit(),
                           "versions": versions}  # fmt: skip
    if started is not None:
        out["wall_time_s"] = round(time.time() - started, 3)
    if memory:
        out["peak_memory"] = peak_memory()
    return out
