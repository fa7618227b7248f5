"""Adversarial prefixes: k free vectors after the start token, [SOT, adv_1..k, prompt, EOT].

What the prompt attacks and the adversarial defences share: the token layout (``prompt_ids``),
the splice of free vectors into the text encoder's input embeddings (``free_token_embeddings``)
and the continuous prefix attack (``prefix_attack``): k vectors in the token-embedding space
optimised to minimise a loss of the encoded prompt, by Adam steps (PGD) or by Adam on the
gradient's sign (fast AT). UnlearnDiffAtk (``attacks.unlearndiffatk``) optimises relaxed
one-hot tokens through the same layout and splice; AdvUnlearn (``methods.advunlearn``) runs
``prefix_attack`` as its inner attack.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

ATTACK_METHODS = ("pgd", "fast_at")


def prompt_ids(tokenizer, prompt: str, prefix: int = 0) -> torch.Tensor:
    """[SOT, ``prefix`` slots, the prompt's tokens, EOT, padding] (77 ids), the prompt
    truncated as the tokenizer would truncate ``prefix`` words + the prompt; slots hold EOT
    until filled."""
    n = tokenizer.model_max_length
    body = tokenizer(prompt, add_special_tokens=False).input_ids[: n - 2 - prefix]
    ids = [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * prefix + body
    ids += [tokenizer.eos_token_id]
    return torch.tensor(ids + [tokenizer.pad_token_id] * (n - len(ids)))


@contextmanager
def free_token_embeddings(text_encoder, embeds: dict[str, torch.Tensor | None]):
    """While active, positions 1..k of every encoded sequence take ``embeds["value"]``
    (batch x k x d) instead of their token embeddings (gradients flow into it). Free tokens
    elsewhere (inserted between a prompt's tokens): ``embeds["positions"]`` (batch x 77 bool)
    marks the positions and ``embeds["slots"]`` (batch x k bool) the vectors that fill them,
    row by row in order."""

    def hook(_module, _inputs, output):
        value = embeds.get("value")
        if value is None:
            return output
        out = output.clone()
        positions = embeds.get("positions")
        if positions is None:
            out[:, 1 : 1 + value.shape[1]] = value.to(out.dtype)
        else:
            out[positions] = value[embeds["slots"]].to(out.dtype)
        return out

    handle = text_encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def prefix_attack(
    text_encoder,
    ids: torch.Tensor,
    start: torch.Tensor,
    loss_of: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    method: str = "pgd",
) -> tuple[torch.Tensor, list[float]]:
    """The continuous prefix attack: ``steps`` optimiser steps on the prefix vectors (b x k x d,
    from ``start``) minimising ``loss_of(cond, step)``, cond = the encoder's hidden states of
    ``ids`` (prefixed layout) with the vectors spliced in. Only the vectors receive gradients
    (the encoder's parameters are left alone); the optimiser's gradient is fresh every step
    (``fast_at``: Adam on its sign). Returns the vectors and the loss before each step."""
    adv = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([adv], lr=lr)
    embeds: dict[str, torch.Tensor | None] = {}
    losses = []
    with free_token_embeddings(text_encoder, embeds):
        for step in range(steps):
            embeds["value"] = adv
            loss = loss_of(text_encoder(ids)[0], step)
            (grad,) = torch.autograd.grad(loss, [adv])
            adv.grad = grad.sign() if method == "fast_at" else grad
            opt.step()
            losses.append(float(loss.detach()))
    return adv.detach(), losses
