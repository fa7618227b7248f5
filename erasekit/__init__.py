"""erasekit: erase concepts from text-to-image diffusion models and audit that they stay erased."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("erasekit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
