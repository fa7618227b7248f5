"""One small generic registry: name -> object, lazy imports, duplicates refused, "did you mean"."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

from erasekit.errors import UnknownNameError

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """A ' did you mean ...?' clause for `name` among `choices`, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if not close:
        return ""
    return " did you mean " + " or ".join(repr(c) for c in close) + "?"


class Registry(Generic[T]):
    """Maps names to objects (usually classes), imported lazily from "module:attr" strings.

    Methods, attacks and detectors each have one registry; a file registers its class with the
    decorator, and the package lists "module:attr" targets so nothing heavy is imported until
    the name is asked for.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._objects: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def _check_new(self, name: str) -> None:
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._objects or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is already registered")

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register `obj` under `name`; without `obj`, return a decorator."""
        if obj is not None:
            self._check_new(name)
            self._objects[name] = obj
            return obj

        def decorator(target: T) -> T:
            # A lazy entry of the same name is the declaration of this very object.
            if self._lazy.pop(name, None) is None:
                self._check_new(name)
            self._objects[name] = target
            return target

        return decorator

    def register_lazy(self, name: str, target: str) -> None:
        """Declare `name` as "package.module:attr", imported on first use."""
        if ":" not in target:
            raise ValueError(f"lazy target must be 'module:attr', got {target!r}")
        self._check_new(name)
        self._lazy[name] = target

    def names(self) -> list[str]:
        return sorted({*self._objects, *self._lazy})

    def __contains__(self, name: object) -> bool:
        return name in self._objects or name in self._lazy

    def get(self, name: str) -> T:
        if name in self._objects:
            return self._objects[name]
        if name in self._lazy:
            module, _, attr = self._lazy[name].partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._lazy.pop(name, None)
            self._objects[name] = obj
            return obj
        known = self.names()
        available = ", ".join(known) if known else "none registered"
        hint = suggest(name, known)
        sep = ";" if hint else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{sep}{hint} (available: {available})")
