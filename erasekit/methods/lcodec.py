"""L-CODEC parameter selection: the U-Net's units whose activation the concept's output
depends on, given the noise level, as the trainable set of an erasure method.

The seed paper (deep unlearning via randomised conditionally independent Hessians) picks a
small Markov blanket of units with the CODEC/FOCI conditional-dependence statistic of
Azadkia & Chatterjee over many noise-perturbed inputs and updates only those. A public SD
checkpoint has no stored training gradients for its Newton step, so erasekit uses the selection
as a mask source for SalUn and ResAlign (``mask_source=lcodec``), in place of gradient saliency.

Over n noise-perturbed forget inputs (forget image latents noised at t ~ U{0..T-1}):
- Y_i = mean((ε_θ(x_t, c_f) − ε_θ(x_t, ""))²): how much the concept's prompt moves the output;
- Z_i(u) = the activation of unit u under c_f, averaged over positions (tokens or pixels);
- X_i = t, the confounder (activations and the output's scale both follow the noise level).
Each unit's statistic is T_n(Y, Z_u | X) = Σ_i [min(R_i, R_M(i)) − min(R_i, R_N(i))] /
Σ_i [R_i − min(R_i, R_N(i))], R_i the rank of Y_i, N(i) the nearest neighbour of X_i and M(i)
that of (X_i, Z_i(u)) (both standardised; ties broken at random). T is near 0 when Y is
independent of Z given X and near 1 when Y is a function of (X, Z).

Granularity: a unit is one output channel of a module with its own weights (a Linear's output
feature, a convolution's output channel, a norm's channel); selecting it selects its weight row
(or filter), its bias and its norm scale. Units are taken in order of T until the requested share
of all U-Net weights is reached, and the mask is saved in SalUn's bit-packed format.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from erasekit.distributed import gather_shares, my_share
from erasekit.errors import ErasekitError


def codec_statistic(
    y: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None, *, seed: int = 0,
    chunk: int = 256,
) -> torch.Tensor:  # fmt: skip
    """Azadkia & Chatterjee's T_n(Y, Z_u | X) for every row u of ``z`` (units × n).

    ``y``: (n,) response; ``x``: (n,) or (n, p) conditioning variables, or None for the
    unconditional statistic T_n(Y, Z_u). Nearest neighbours are Euclidean on standardised
    variables; ties in Y and in the distances are broken at random (seeded)."""
    n = y.numel()
    if n < 3:
        raise ErasekitError("the CODEC statistic needs at least 3 samples")
    gen = torch.Generator().manual_seed(seed)
    y = y.double().flatten()
    z = z.double().reshape(-1, n)
    jitter = torch.rand(n, generator=gen, dtype=torch.float64) * 1e-9 * (y.std() + 1e-30)
    y = y + jitter  # ranks without ties
    rank = (y[None, :] <= y[:, None]).sum(1).double()  # R_i = #{j : Y_j <= Y_i}
    at_least = (y[None, :] >= y[:, None]).sum(1).double()  # L_i = #{j : Y_j >= Y_i}

    def standard(v: torch.Tensor) -> torch.Tensor:
        return (v - v.mean(-1, keepdim=True)) / v.std(-1, keepdim=True).clamp_min(1e-12)

    tie_break = torch.rand(n, n, generator=gen, dtype=torch.float64) * 1e-9
    eye = torch.eye(n, dtype=torch.bool)
    base = torch.zeros(n, n, dtype=torch.float64)
    if x is not None:
        xs = standard(x.double().reshape(n, -1).T)  # (p, n)
        base = ((xs[:, :, None] - xs[:, None, :]) ** 2).sum(0)
        d = (base + tie_break).masked_fill(eye, math.inf)
        near_x = rank[d.argmin(1)]
        denominator = (rank - torch.minimum(rank, near_x)).sum()
    else:
        denominator = (at_least * (n - at_least)).sum()
    zs = standard(z)
    out = torch.empty(z.shape[0], dtype=torch.float64)
    for start in range(0, z.shape[0], chunk):
        block = zs[start : start + chunk]
        d = base + (block[:, :, None] - block[:, None, :]) ** 2 + tie_break
        near = rank[d.masked_fill(eye, math.inf).argmin(2)]  # (units, n): R_M(i)
        both = torch.minimum(rank[None, :], near)
        if x is not None:
            numerator = (both - torch.minimum(rank, near_x)[None, :]).sum(1)
        else:
            numerator = (n * both - at_least[None, :] ** 2).sum(1)
        out[start : start + chunk] = numerator
    if denominator <= 0:  # Y is a function of X alone (or constant): nothing left to explain
        return torch.zeros_like(out)
    return out / denominator


def _unit_axis(module: torch.nn.Module) -> int:
    """The output's channel axis: 1 for convolutions and group norms, else the last."""
    return 1 if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.GroupNorm)) else -1


@torch.no_grad()
def unit_samples(ctx, *, samples: int, batch_size: int, seed: int):
    """(Y, Z, X, modules) over ``samples`` noise-perturbed forget inputs: Y (n,), X = t (n,),
    Z {module name: (channels, n)} for every U-Net module holding weights of its own."""
    from erasekit.training import step_generator

    unet, split = ctx.unet, ctx.data["forget"]
    if split.latents is None:
        raise ErasekitError("mask_source=lcodec needs forget images (noise-perturbed inputs)")
    modules = {n: m for n, m in unet.named_modules()
               if any(True for _ in m.parameters(recurse=False))}  # fmt: skip
    recording: list[dict[str, list[torch.Tensor]] | None] = [None]  # this batch's activations

    def hook(name, module):
        axis = _unit_axis(module)

        def record(_m, _inputs, output):
            if recording[0] is not None and isinstance(output, torch.Tensor):
                o = output.float().movedim(axis, 1)
                recording[0].setdefault(name, []).append(
                    o.reshape(o.shape[0], o.shape[1], -1).mean(2).cpu())  # fmt: skip

        return record

    handles = [m.register_forward_hook(hook(n, m)) for n, m in modules.items()]
    batches = []  # (start, Y, t, activations by module) of this process's batches
    try:
        gen = step_generator(seed, 5150)
        order = torch.randint(0, len(split), (samples,), generator=gen)
        starts = range(0, samples, batch_size)
        for start in [starts[i] for i in my_share(len(starts))]:  # processes share batches
            idx = order[start : start + batch_size]
            latents, cond = split.latents[idx].to(ctx.device), split.cond[idx].to(ctx.device)
            x_t, t, _ = ctx.noisy(latents, step_generator(seed, 5151, start))
            with ctx.accelerator.autocast():
                recording[0] = {}
                e_c = unet(x_t, t, cond).sample.float()
                acts, recording[0] = recording[0], None
                e_u = unet(x_t, t, ctx.empty_cond.expand_as(cond)).sample.float()
            y = (e_c - e_u).pow(2).flatten(1).mean(1).cpu()
            batches.append((start, y, t.float().cpu(), {n: torch.cat(a) for n, a in
                                                         acts.items()}))  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    batches = sorted(gather_shares(batches), key=lambda b: b[0])
    ys, ts = [b[1] for b in batches], [b[2] for b in batches]
    acts = {n: [b[3][n] for b in batches if n in b[3]] for n in modules}
    z = {n: torch.cat(a).T for n, a in acts.items() if a}
    for name, values in z.items():
        if values.shape[1] != samples:
            raise ErasekitError(f"lcodec: {name} runs more than once a forward pass")
    return torch.cat(ys), z, torch.cat(ts), modules


def lcodec_masks(
    ctx, fraction: float, *, samples: int = 128, batch_size: int = 8, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Boolean masks over the U-Net's weights: the units of highest T_n(Y, Z_u | t) until
    ``fraction`` of all weights is selected. Info: density, units, the statistic's range, cost."""
    started = time.perf_counter()
    y, z, t, modules = unit_samples(ctx, samples=samples, batch_size=batch_size, seed=seed)
    sampled = time.perf_counter()
    params = dict(ctx.unet.named_parameters())
    total = sum(p.numel() for p in params.values())
    # every unit: (statistic, module, channel, weights it selects)
    names, channels, stats, sizes = [], [], [], []
    for mi, (name, module) in enumerate(modules.items()):
        if name not in z:
            continue
        own = [p for p in module.parameters(recurse=False)]
        c = z[name].shape[0]
        if any(p.shape[0] != c for p in own):
            raise ErasekitError(f"lcodec: {name}'s weights are not per output channel")
        per_unit = sum(p[0].numel() for p in own)
        stats.append(codec_statistic(y, z[name], t, seed=seed + mi))
        names += [name] * c
        channels.append(torch.arange(c))
        sizes.append(torch.full((c,), per_unit))
    if not stats:
        raise ErasekitError("lcodec: no U-Net unit was active on the forget inputs")
    stat, channel, size = torch.cat(stats), torch.cat(channels), torch.cat(sizes)
    order = torch.argsort(stat, descending=True, stable=True)
    need = max(1, math.ceil(fraction * total))
    take = min(int(torch.searchsorted(size[order].cumsum(0), torch.tensor(need))) + 1, len(order))
    chosen = order[:take].tolist()
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params.items()}
    module_of = {id(p): (m, pn) for m, mod in modules.items()
                 for pn, p in mod.named_parameters(recurse=False)}  # fmt: skip
    rows: dict[str, list[int]] = {}
    for i in chosen:
        rows.setdefault(names[i], []).append(int(channel[i]))
    for pname, p in params.items():
        m, _ = module_of[id(p)]
        if m in rows:
            masks[pname][rows[m]] = True
    kept = sum(int(m.sum()) for m in masks.values())
    return masks, {
        "source": "lcodec",
        "statistic": "T_n(Y, Z_u | t), Azadkia & Chatterjee",
        "granularity": "output unit (weight row / filter, bias, norm channel)",
        "density": kept / total, "n_weights": total, "units": len(chosen),
        "units_total": int(stat.numel()), "samples": samples,
        "statistic_selected_min": float(stat[order[take - 1]]),
        "statistic_max": float(stat.max()), "statistic_median": float(stat.median()),
        "seconds_sampling": round(sampled - started, 3),
        "seconds_statistic": round(time.perf_counter() - sampled, 3),
    }  # fmt: skip
