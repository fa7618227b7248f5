"""Detectors: judge generated images. Each returns raw per-image scores plus a declared protocol
(labels, threshold or rule) that turns them into a yes/no; both travel into every result."""

from erasekit.registry import Registry

DETECTORS: Registry[type] = Registry("detector")
DETECTORS.register_lazy("world", "erasekit.detectors.world:WorldDetector")

__all__ = ["DETECTORS"]
