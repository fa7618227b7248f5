"""(I + γH)⁻¹ g by fixed-point (Richardson) iterations, Hessian-vector products, and the
attention settings double backward needs."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch


def norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


def proximal_solve(
    g: list[torch.Tensor],
    hvp,
    *,
    gamma: float,
    iterations: int,
    alpha: float,
    max_retries: int,
    max_norm: float,
) -> tuple[list[torch.Tensor] | None, dict[str, Any]]:
    """α·v_K ≈ (I + γH)⁻¹ g with v_0 = 0, v ← (1 − α)v − αγ·hvp(v) + g, K = ``iterations``.

    Retries with α/2 when an iteration grows the iterate (‖Jv‖ > ‖v‖) or ‖α·v_K‖ > max_norm or
    a value is not finite; returns (None, stats) when every retry failed (the caller falls
    back). stats: alpha (last tried), retries, hvps, reason of the last failure.
    """
    a = alpha
    stats: dict[str, Any] = {"alpha": a, "retries": 0, "hvps": 0, "reason": None}
    for attempt in range(max_retries + 1):
        stats["alpha"] = a
        v = [x.clone() for x in g]  # v_1 = g (H·v_0 = 0)
        failed = None
        for _ in range(iterations - 1):
            hv = hvp(v)
            stats["hvps"] += 1
            jv = [(1 - a) * x - a * gamma * h for x, h in zip(v, hv, strict=True)]
            n_jv, n_v = norm(jv), norm(v)
            if not math.isfinite(n_jv):
                failed = "not finite"
                break
            if n_jv > n_v:
                failed = f"diverging (|Jv|/|v| = {n_jv / max(n_v, 1e-30):.3g})"
                break
            v = [j + x for j, x in zip(jv, g, strict=True)]
        if failed is None:
            term = [a * x for x in v]
            n = norm(term)
            if not math.isfinite(n):
                failed = "not finite"
            elif n > max_norm:
                failed = f"norm {n:.3g} > {max_norm}"
            else:
                stats["norm"] = n
                return term, stats
        stats["reason"] = failed
        if attempt < max_retries:
            a /= 2
            stats["retries"] += 1
    return None, stats


def make_hvp(loss: torch.Tensor, params: list[torch.Tensor]):
    """v -> H·v for H the Hessian of ``loss`` w.r.t. ``params`` (one double-backward each)."""
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        dot = sum((g * x.to(g.dtype)).sum() for g, x in zip(grads, v, strict=True))
        out = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
        pairs = zip(out, params, strict=True)
        return [torch.zeros_like(p) if o is None else o.detach() for o, p in pairs]

    return hvp


@contextlib.contextmanager
def double_backward_ready(unet, device: torch.device):
    """Attention kernels that support double backward (math SDPA) and no gradient
    checkpointing (re-entrant checkpoints cannot be differentiated twice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if checkpointing:
            unet.enable_gradient_checkpointing()
