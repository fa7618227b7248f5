"""Termination signals unwind like Ctrl-C: SIGTERM (``timeout``, Slurm, Kubernetes, ``docker
stop``) and SIGHUP (a closed terminal) raise ``Terminated``, a ``KeyboardInterrupt``, so every
writer's cleanup (its ``.partial`` folder and its output lock) runs as it does for SIGINT."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def signal_name(e: BaseException) -> str:
    """SIGTERM / SIGHUP for a ``Terminated``, SIGINT for a plain ``KeyboardInterrupt``."""
    return signal.Signals(getattr(e, "signum", signal.SIGINT)).name


def exit_code(e: BaseException) -> int:
    """The shell's code for death by the signal: 128 + its number (130, 143, 129)."""
    return 128 + int(getattr(e, "signum", signal.SIGINT))


def _raise(signum: int, frame) -> None:
    for sig in HANDLED:  # a second signal must not cut the cleanup short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Terminated`` (main thread only; elsewhere a
    no-op); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
