"""The process state of a (possibly multi-process) run, under `accelerate launch` or torchrun."""

from __future__ import annotations


def process_state(device: str | None = None):
    """accelerate's PartialState, initialised once per process.

    accelerate recognises several CPU processes (gloo) only when asked for the CPU, so a run on a
    machine without CUDA, or with ``--device cpu``, initialises it with ``cpu=True``.
    """
    import torch
    from accelerate import PartialState

    if PartialState._shared_state:  # already initialised in this process
        return PartialState()
    cpu = not torch.cuda.is_available() or (device is not None and device.startswith("cpu"))
    return PartialState(cpu=cpu)


def resolve_device(name: str | None) -> str:
    """The requested device, or under accelerate the process's own device, or cpu."""
    import torch

    from erasekit.errors import ErasekitError

    if name is not None and name.startswith("cuda") and not torch.cuda.is_available():
        raise ErasekitError(f"--device {name}: no CUDA device is available")
    state = process_state(name)
    return name if name is not None else str(state.device)
