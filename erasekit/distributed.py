"""The process state of a (possibly multi-process) run, under `accelerate launch` or torchrun,
and the two ways processes split work: collectively (every process calls the same path and it
shares batches out, e.g. ``generate``) or by items (``my_share`` / ``gather_shares``: each
process does its own items alone, inside ``one_process()``, and the results are gathered)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_ALONE: list[Any] = []  # the innermost one_process() view, when active


class _Alone:
    """One process of a launch seen as a run of its own: index 0 of 1, its own main process."""

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True

    def __init__(self, device) -> None:
        self.device = device

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""


_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_TORCH_DEVICE")


@contextmanager
def one_process() -> Iterator[None]:
    """While active, ``process_state()`` describes this process alone, so collective paths
    (generate, scoring, render caches) run on this process's items with no exchange, and an
    Accelerator made inside (a training) is a one-process one on this process's device: no
    gradient exchange. For work the processes share out item by item (an attack's prompts, a
    study's cells); outputs written inside must be named per item, never per process."""
    import os

    import torch.distributed
    from accelerate.state import AcceleratorState, GradientState, PartialState

    device = process_state().device
    states = (PartialState, AcceleratorState, GradientState)
    saved = [dict(cls._shared_state) for cls in states]
    env = {k: os.environ.get(k) for k in _LAUNCH_ENV}
    for key in _LAUNCH_ENV:  # what accelerate reads to decide it is one of several processes
        os.environ.pop(key, None)
    os.environ["WORLD_SIZE"] = "1"
    if getattr(device, "type", "cpu") != "cpu":
        os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)
    for cls in states:  # accelerate's shared state, in place (see accelerate.state.SharedDict)
        cls._shared_state.clear()
    # libraries that ask torch directly (transformers writes weights on rank 0 only) see no
    # process group either: nothing inside may exchange with the other processes
    group_initialized = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: False
    _ALONE.append(_Alone(device))
    try:
        yield
    finally:
        _ALONE.pop()
        torch.distributed.is_initialized = group_initialized
        for cls, state in zip(states, saved, strict=True):
            cls._shared_state.clear()
            cls._shared_state.update(state)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def working_alone() -> bool:
    """Whether this process runs by itself inside ``one_process()``."""
    return bool(_ALONE)


def my_share(n: int) -> list[int]:
    """The indices of ``n`` items this process does: every ``num_processes``-th."""
    state = process_state()
    return list(range(state.process_index, n, state.num_processes))


def gather_shares(items: Sequence[Any]) -> list[Any]:
    """Every process's ``items``, concatenated in process order (this process's alone when it
    runs by itself)."""
    if process_state().num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def process_state(device: str | None = None):
    """accelerate's PartialState, initialised once per process.

    accelerate recognises several CPU processes (gloo) only when asked for the CPU, so a run on a
    machine without CUDA, or with ``--device cpu``, initialises it with ``cpu=True``.
    """
    import torch
    from accelerate import PartialState

    if _ALONE:
        return _ALONE[-1]
    if PartialState._shared_state:  # already initialised in this process
        return PartialState()
    cpu = not torch.cuda.is_available() or (device is not None and device.startswith("cpu"))
    return PartialState(cpu=cpu)


def available_devices() -> list[str]:
    """The devices torch offers here: cpu, each CUDA device, mps where it works."""
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(name: str) -> None:
    """Refuse a device torch does not know or this machine does not have (one line)."""
    import torch

    from erasekit.errors import ErasekitError

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    offered = available_devices()
    index = device.index if device is not None and device.index is not None else 0
    known = device is not None and (
        (device.type == "cpu" and device.index in (None, 0))
        or (device.type == "cuda" and index < torch.cuda.device_count())
        or (device.type == "mps" and "mps" in offered)
    )
    if not known:
        why = "no CUDA device is available" if name.startswith("cuda") and len(offered) == 1 \
            else f"not a device here (available: {', '.join(offered)})"  # fmt: skip
        raise ErasekitError(f"--device {name}: {why}")


def resolve_device(name: str | None) -> str:
    """The requested device, or under accelerate the process's own device, or cpu."""

    if name is not None:
        check_device(name)
    state = process_state(name)
    return name if name is not None else str(state.device)


@contextmanager
def shared_temporary_folder(prefix: str) -> Iterator[Path]:
    """A temporary folder every process of a launch sees (the main process's), for collective
    work such as evaluation; removed by the main process when all are done."""
    import shutil
    import tempfile

    state = process_state()
    folder = [tempfile.mkdtemp(prefix=prefix) if state.is_main_process else None]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        folder = broadcast_object_list(folder)
    try:
        yield Path(folder[0])
    finally:
        state.wait_for_everyone()
        if state.is_main_process:
            shutil.rmtree(folder[0], ignore_errors=True)


def close_process_group() -> None:
    """Tear down the process group of a multi-process launch (once, when the command ends)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
