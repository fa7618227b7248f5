"""ResAlign: erasure meant to survive downstream fine-tuning.

Outer objective over the trainable parameters θ, with φ_c(θ) the parameters after simulated
fine-tuning under a configuration c drawn from a meta-distribution:

    F(θ) = (1 − λ)·L_h(θ) + λ·mean_c L_h(φ_c) + w_r·R(θ)

L_h is the base method's harmful loss (``base``: ``ga`` gradient ascent on forget images,
``esd`` ESD's negatively guided target, ``salun`` SalUn's remap to the surrogate prompt), R the
distillation to the frozen original on retain images, MSE(ε_θ(x_t, c), ε_0(x_t, c)), and w_r
``retain_weight`` (``retain_weight_late`` from the second half of training on).

Hypergradient (fine-tuning modelled as a proximal step, γ = ``gamma``):
    ĝ = g_θ + (I + γH)⁻¹ g_φ,   g_θ = ∂_θF,  g_φ = ∂_φF,  H = ∇²(fine-tuning loss) at φ.
(I + γH)⁻¹ g_φ is applied by ``fixed_point_iterations`` = K Richardson iterations from v_0 = 0,
v ← (1 − α)v − αγHv + g_φ, result α·v_K; every iteration after the first costs one
Hessian-vector product (double backprop; H·v_0 = 0 needs none). Safeguards: when an iteration
grows the iterate (‖Jv‖ > ‖v‖, J = (1 − α)I − αγH) or the resilience term ‖α·v_K‖ exceeds
``max_resilience_norm``, α is halved and the solve retried (up to ``max_retries`` times); after
that the configuration's term is dropped (the step uses g_θ for it) and the log records it.

Simulated fine-tuning acts on the merged U-Net as an attacker would (``mode: full``: every
weight; ``mode: lora``: a fresh LoRA on the attention projections) with GD or Adam on benign
data; its update is then projected onto the trainable set (a LoRA: per layer, the rank-r SVD of
B·A·s + ΔW; a subset or SalUn mask: ΔW restricted to it). g_φ and H are taken at the projected φ.
"""

from erasekit.methods.resalign.config import BASES, TRAINABLE, ResAlignConfig
from erasekit.methods.resalign.meta import (
    META_SD,
    META_WORLD,
    PRESETS,
    MetaDistribution,
    SimConfig,
    load_meta_distribution,
)
from erasekit.methods.resalign.method import ResAlign
from erasekit.methods.resalign.solver import (
    double_backward_ready,
    make_hvp,
    norm,
    proximal_solve,
)

__all__ = [
    "BASES",
    "META_SD",
    "META_WORLD",
    "PRESETS",
    "TRAINABLE",
    "MetaDistribution",
    "ResAlign",
    "ResAlignConfig",
    "SimConfig",
    "double_backward_ready",
    "load_meta_distribution",
    "make_hvp",
    "norm",
    "proximal_solve",
]
