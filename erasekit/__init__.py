"""erasekit: erase concepts from text-to-image diffusion models and audit that they stay erased.

The Python API (``erasekit.api``) mirrors the command line::

    import erasekit
    erased = erasekit.erase(erasekit.world_path(), "red", "salun", "erased-red")
    result = erasekit.audit(erased, "red", "audit-red")
"""

from importlib.metadata import PackageNotFoundError, version

from erasekit.api import AuditResult, audit, erase, evaluate, export, generate, report
from erasekit.attacks import ATTACKS
from erasekit.concepts import load_concept
from erasekit.detectors import DETECTORS
from erasekit.errors import ErasekitError, UsageError
from erasekit.methods import METHODS
from erasekit.results import ErasedModel, Metric, MetricTable
from erasekit.world import world_path

try:
    __version__ = version("erasekit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


def load_pipeline(*args, **kwargs):
    """A Stable Diffusion pipeline from local files (``erasekit.models.load_pipeline``)."""
    from erasekit.models import load_pipeline as load

    return load(*args, **kwargs)


__all__ = [
    "ATTACKS",
    "DETECTORS",
    "METHODS",
    "AuditResult",
    "ErasedModel",
    "Metric",
    "MetricTable",
    "ErasekitError",
    "UsageError",
    "__version__",
    "audit",
    "erase",
    "evaluate",
    "export",
    "generate",
    "load_concept",
    "load_pipeline",
    "report",
    "world_path",
]
