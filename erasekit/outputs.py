"""Output folders that appear complete or not at all: written aside, then renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError


def partial_path(out: str | Path) -> Path:
    """The temporary sibling folder an output is assembled in."""
    out = Path(out)
    # A deterministic name, so every process of a multi-process run agrees on it.
    return out.parent / f".{out.name}.partial"


def prepare_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Check that `out` may be written and create its temporary sibling; return the latter.

    Refuses a non-empty `out` unless `overwrite`; removes a stale partial folder left by an
    interrupted earlier run.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ErasekitError(f"output folder is not empty: {out} (pass --overwrite to replace it)")
    tmp = partial_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_output_dir(tmp: str | Path, out: str | Path) -> Path:
    """Move the finished temporary folder to `out`, replacing what `out` held."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def discard_output_dir(tmp: str | Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only when the block finishes without error."""
    tmp = prepare_output_dir(out, overwrite)
    try:
        yield tmp
    except BaseException:
        discard_output_dir(tmp)
        raise
    commit_output_dir(tmp, out)


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
