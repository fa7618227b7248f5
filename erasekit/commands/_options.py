"""Options shared by subcommands that load a model."""

from __future__ import annotations

import argparse


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


def add_censor_options(p: argparse.ArgumentParser) -> None:
    """--censor / --uncensored (default: blur flagged images when the concept is sensitive)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--censor", dest="censor", action="store_const", const=True, default=None,
                   help="blur every flagged image in the report")  # fmt: skip
    g.add_argument("--uncensored", dest="censor", action="store_const", const=False,
                   help="show flagged images as rendered")  # fmt: skip
