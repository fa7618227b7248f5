"""Output folders that appear complete or not at all: written aside, then renamed into place."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError

# Locks this process holds, by output path: released by commit/discard or release_output.
_LOCKS: dict[Path, int] = {}


def partial_path(out: str | Path) -> Path:
    """The temporary sibling folder an output is assembled in."""
    out = Path(out)
    # A deterministic name, so every process of a multi-process run agrees on it.
    return out.parent / f".{out.name}.partial"


def lock_path(out: str | Path) -> Path:
    """The hidden sibling file whose OS lock marks ``out`` as being written."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _key(out: str | Path) -> Path:
    return Path(os.path.abspath(out))


def claim_output(out: str | Path) -> None:
    """Hold an exclusive OS lock on ``out`` for this process until ``release_output`` (or commit
    / discard). A second writer fails at once with one line naming the holder; a lock left by a
    dead process is free again (the kernel drops it with the process). Re-entrant."""
    key = _key(out)
    if key in _LOCKS:
        return
    path = lock_path(out)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with disk_errors(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ErasekitError(
                f"{out} is being written by another erasekit process (pid {holder}); wait for it"
                " or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and lock: retry
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = fd


def holds_output(out: str | Path) -> bool:
    """Whether this process holds the lock on ``out``."""
    return _key(out) in _LOCKS


def release_output(out: str | Path) -> None:
    """Drop this process's lock on ``out`` (no-op when it holds none)."""
    fd = _LOCKS.pop(_key(out), None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(out))
    os.close(fd)


@contextlib.contextmanager
def output_lock(out: str | Path, enabled: bool = True) -> Iterator[None]:
    """``claim_output`` for the block (``enabled=False``: e.g. a non-main process)."""
    held = holds_output(out)
    if enabled:
        claim_output(out)
    try:
        yield
    finally:
        if enabled and not held:
            release_output(out)


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the run's input folders,
    compared by real path (symbolic links resolved), and an output that is itself a link."""
    check_not_link(out)
    target = Path(os.path.realpath(out))
    for given in inputs:
        if given is None or not isinstance(given, (str, Path)):
            continue
        source = Path(os.path.realpath(given))
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise ErasekitError(f"output {out} overlaps the input {given}; choose another --out")


def check_not_link(out: str | Path) -> None:
    """Refuse an output path that is a symbolic link: the finished folder is renamed into
    place, which would replace the link, not write where it points."""
    if os.path.islink(out):
        raise ErasekitError(f"output {out} is a symbolic link (to {os.readlink(out)}); give the"
                            " real folder as --out")  # fmt: skip


_OS_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent is not a folder",
    errno.EEXIST: "a file is in the way",
    errno.ENOENT: "no such folder",
    errno.ENAMETOOLONG: "name too long",
}


def _errno_of(e: BaseException) -> int | None:
    """The OS error number of an OSError, or of a library's wrapped I/O error (safetensors'
    Rust writer says "... (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


def os_error_line(e: BaseException, path: str | Path | None = None) -> str | None:
    """A one-line account of a file-system failure a user can act on, else None."""
    what = _OS_ERRORS.get(_errno_of(e))
    if what is None:
        return None
    return f"cannot write {getattr(e, 'filename', None) or path or 'a file'}: {what}"


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Write failures as one clear line naming the path: full disk, read-only or missing
    folders, from Python's own I/O or a library's (the one helper every writer uses)."""
    try:
        yield
    except ErasekitError:
        raise
    except Exception as e:
        line = os_error_line(e, path)
        if line is None:
            raise
        raise ErasekitError(line) from None


def prepare_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Claim `out` (``claim_output``), check that it may be written and create its temporary
    sibling; return the latter.

    Refuses a non-empty `out` unless `overwrite`; removes a stale partial folder left by an
    interrupted earlier run (safe: the lock says no live run owns it).
    """
    out = Path(out)
    check_not_link(out)
    if out.exists() and not out.is_dir():
        raise ErasekitError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ErasekitError(f"output folder is not empty: {out} (pass --overwrite to replace it)")
    claim_output(out)
    tmp = partial_path(out)
    try:
        with disk_errors(tmp):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
    except BaseException:
        release_output(out)
        raise
    return tmp


def _output_of(tmp: Path) -> Path:
    """`out` for its partial sibling ``.NAME.partial``."""
    name = tmp.name
    if name.startswith(".") and name.endswith(".partial"):
        return tmp.parent / name[1 : -len(".partial")]
    return tmp


def commit_output_dir(tmp: str | Path, out: str | Path) -> Path:
    """Move the finished temporary folder to `out`, replacing what `out` held; release the lock."""
    tmp, out = Path(tmp), Path(out)
    try:
        with disk_errors(out):
            if out.exists():
                old = out.parent / f".{out.name}.old"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
    finally:
        release_output(out)
    return out


def discard_output_dir(tmp: str | Path) -> None:
    """Remove a partial folder and release the lock its run held."""
    tmp = Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    release_output(_output_of(tmp))


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, state=None) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only when the block finishes without error.

    ``state`` (an accelerate ``PartialState``): a run of several processes. The main process
    claims `out` and every process gets its answer (or its error); all write into the one
    temporary folder; the main process commits or discards it, then every process waits."""
    main = state is None or state.is_main_process
    tmp, error = partial_path(out), None
    if main:
        try:
            prepare_output_dir(out, overwrite)
        except ErasekitError as e:
            error = e
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        text = broadcast_object_list([str(error) if error else None])[0]
        error = ErasekitError(text) if text else None
    if error:
        raise error
    try:
        if state is not None:
            state.wait_for_everyone()
        with disk_errors(tmp):
            yield tmp
        if main:
            commit_output_dir(tmp, out)
    except BaseException:
        if main:
            discard_output_dir(tmp)
        raise
    if state is not None:
        state.wait_for_everyone()


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path that replaces ``path`` only when the block succeeds (one per
    process: processes writing the same file at once each replace it whole)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with disk_errors(tmp):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def strict_json(obj: Any) -> Any:
    """``obj`` with non-finite floats as None: JSON has no NaN or Infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text (non-finite floats become null; unknown objects their str)."""
    return json.dumps(strict_json(obj), allow_nan=False, default=str, **kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    with disk_errors(path):
        Path(path).write_text(dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    with disk_errors(path), open(path, "w") as f:
        for record in records:
            f.write(dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per line; a corrupt line is one clear error naming file and line."""
    records = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ErasekitError(f"{path}: line {number} is not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ErasekitError(f"{path}: line {number} is not a JSON object")
            records.append(record)
    return records
