"""SalUn's weight saliency against an independent computation, and the mask threshold's
boundary: a cond/uncond swap in the guided loss, |g| summed instead of |Σ g|, or > instead of
>= each fail here."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from erasekit.methods.salun import masks_from_saliency, saliency
from erasekit.training import step_generator


def _context(pipe, n: int = 6):
    """What ``saliency`` reads of a training context, with a fixed forget split and a plain
    DDPM forward process (its randomness from the generator it is given)."""
    gen = torch.Generator().manual_seed(3)
    size, channels = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    latents = torch.randn(n, channels, size, size, generator=gen)
    hidden = pipe.text_encoder.config.hidden_size
    tokens = 8
    cond = torch.randn(n, tokens, hidden, generator=gen)
    empty = torch.randn(1, tokens, hidden, generator=gen)
    alphas = torch.linspace(0.99, 0.05, 1000)

    def noisy(x0, g):
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise

    accelerator = SimpleNamespace(autocast=contextlib.nullcontext, num_processes=1)
    return SimpleNamespace(
        accelerator=accelerator, unet=pipe.unet, device="cpu", empty_cond=empty, noisy=noisy,
        data={"forget": _Split(latents, cond)},
        denoising_target=lambda x0, noise, t: noise,
    )  # fmt: skip


class _Split:
    def __init__(self, latents, cond):
        self.latents, self.cond = latents, cond

    def __len__(self) -> int:
        return len(self.latents)


def _independent(ctx, w: float, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """|Σ_batches ∇ -MSE(ε, (1+w) ε(x_t, c) - w ε(x_t, ""))|, one autograd.grad per batch."""
    params = dict(ctx.unet.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    split = ctx.data["forget"]
    for start in range(0, len(split), batch_size):
        x0 = split.latents[start : start + batch_size]
        cond = split.cond[start : start + batch_size]
        x_t, t, noise = ctx.noisy(x0, step_generator(seed, -1, start))
        e_c = ctx.unet(x_t, t, cond).sample
        e_u = ctx.unet(x_t, t, ctx.empty_cond.expand_as(cond)).sample
        loss = -F.mse_loss((1 + w) * e_c - w * e_u, noise)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                total[name] += g
    return {k: v.abs() for k, v in total.items()}


def test_saliency_matches_an_independent_computation(tiny_pipe):
    ctx = _context(tiny_pipe)
    tiny_pipe.unet.zero_grad(set_to_none=True)  # the shared pipeline: no other test's gradients
    tiny_pipe.unet.requires_grad_(True)
    try:
        got = saliency(ctx, guidance=2.0, batch_size=2, seed=7)  # three batches
        want = _independent(ctx, 2.0, 2, 7)
    finally:
        tiny_pipe.unet.requires_grad_(False)
        tiny_pipe.unet.zero_grad(set_to_none=True)
    assert got.keys() == want.keys()
    scale = max(float(v.max()) for v in want.values())
    assert scale > 0
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5 * scale, rtol=1e-4), name


def test_mask_threshold_keeps_ties_and_never_zero_saliency():
    scores = {"a": torch.tensor([3.0, 2.0, 2.0]), "b": torch.tensor([1.0, 0.0, 0.0])}
    masks, info = masks_from_saliency(dict(scores), 0.5)  # k = 3: the threshold is 2
    assert info["threshold"] == 2.0
    assert masks["a"].tolist() == [True, True, True]  # >=: both 2s are kept
    assert masks["b"].tolist() == [False, False, False]
    masks, info = masks_from_saliency(dict(scores), 1.0)  # everything asked for...
    assert masks["b"].tolist() == [True, False, False]  # ...but zero saliency is never salient
    assert info["density"] == 4 / 6
