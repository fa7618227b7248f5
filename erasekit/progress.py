"""Progress as the caller wants it: ``True`` draws a bar and prints stage lines on stderr,
``False`` is silent, and a callable receives each event as a dict (a notebook's own widget, a
log, a test): ``{"stage": "erase", "done": 3, "total": 40, "unit": "step", "loss": 0.12}`` for
a counted stage, ``{"stage": "audit", "message": "..."}`` for a stage line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Union

Progress = Union[bool, Callable[[dict[str, Any]], None]]  # noqa: UP007 - a runtime alias


class _Events:
    """A tqdm stand-in that passes each update to a callback."""

    def __init__(self, callback, *, total: int, desc: str, unit: str, initial: int) -> None:
        self.callback, self.total, self.desc, self.unit = callback, total, desc, unit
        self.n = initial
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        self.callback({"stage": self.desc, "done": self.n, "total": self.total,
                       "unit": self.unit, **self.postfix})  # fmt: skip

    def close(self) -> None:
        pass


def bar(progress: Progress, *, total: int, desc: str, unit: str, initial: int = 0,
        main: bool = True):  # fmt: skip
    """A progress bar for ``total`` units: tqdm, a callback's events, or nothing (``progress``
    False, a process other than the main one, or nothing to count)."""
    from tqdm.auto import tqdm

    if callable(progress) and main and total:
        return _Events(progress, total=total, desc=desc, unit=unit, initial=initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit,
                disable=not (progress and main and total))  # fmt: skip


def say(progress: Progress, stage: str, message: str, main: bool = True) -> None:
    """A stage line: printed as ``stage: message`` on stderr, or passed to the callback."""
    if not (progress and main):
        return
    if callable(progress):
        progress({"stage": stage, "message": message})
    else:
        print(f"{stage}: {message}", file=sys.stderr)


def on_main(progress: Progress, main: bool) -> Progress:
    """``progress`` on the main process, False on the others."""
    return progress if main else False


__all__ = ["Progress", "bar", "on_main", "say"]
