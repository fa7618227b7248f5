"""Options shared by subcommands that load a model."""

from __future__ import annotations

import argparse

from erasekit.errors import ErasekitError


def add_model_options(
    p: argparse.ArgumentParser, config_flag: str = "--config", dtype: bool = True
) -> None:
    """--model, the single-file architecture folder (``config_flag``), --allow-pickle, --device
    and (unless ``dtype`` is False) --dtype."""
    p.add_argument(
        "--model",
        required=True,
        help=f"diffusers folder, or a .safetensors file with {config_flag}",
    )
    p.add_argument(
        config_flag,
        dest="model_config",
        metavar="DIR",
        help="local diffusers folder giving the architecture of a single-file checkpoint",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle weights (.ckpt/.bin/.pt): only for files you trust",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the best there is)")
    if dtype:
        p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def resolve_device(name: str | None) -> str:
    """The requested device, or under accelerate the process's own device, or cpu."""
    import torch

    from erasekit.distributed import process_state

    if name is not None and name.startswith("cuda") and not torch.cuda.is_available():
        raise ErasekitError(f"--device {name}: no CUDA device is available")
    state = process_state(name)
    return name if name is not None else str(state.device)


def load_model_from_args(args: argparse.Namespace):
    from erasekit.models import load_pipeline

    return load_pipeline(
        args.model,
        dtype=getattr(args, "dtype", "fp32"),
        device=resolve_device(args.device),
        config=args.model_config,
        allow_pickle=args.allow_pickle,
    )
