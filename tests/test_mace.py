"""MACE: the closed-form solves against an explicit float64 solve, the attention probe against
diffusers' own attention, and several concepts erased in one run."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.methods.mace import AttentionProbe, importance_timesteps, world_images_and_masks
from erasekit.methods.uce import aligned_token_pairs, least_squares_edit

UNET = "unet/diffusion_pytorch_model.safetensors"


def test_least_squares_edit_is_the_explicit_minimiser():
    """λ‖W' − A‖² + Σ s‖W' K − W_t G‖²: numpy's lstsq on the stacked system, row by row."""
    rng = np.random.default_rng(3)
    anchor = rng.normal(size=(4, 6))
    n = rng.normal
    terms = [(n(size=(4, 6)), n(size=(5, 6)), n(size=(5, 6)), 1.0),
             (n(size=(4, 6)), n(size=(3, 6)), n(size=(3, 6)), 0.3)]  # fmt: skip
    lam = 0.7
    t = torch.from_numpy
    got = least_squares_edit(t(anchor), lam, [(t(w), t(k), t(g), s) for w, k, g, s in terms])
    design = np.vstack([np.sqrt(lam) * np.eye(6), *(np.sqrt(s) * k for _, k, _, s in terms)])
    for o in range(4):
        rhs = np.concatenate([np.sqrt(lam) * anchor[o],
                              *(np.sqrt(s) * (g @ w[o]) for w, _, g, s in terms)])  # fmt: skip
        assert np.abs(np.linalg.lstsq(design, rhs, rcond=None)[0] - got[o].numpy()).max() < 1e-9


def test_refinement_rows_leave_the_concept_word_out(tiny_pipe):
    """MACE's refinement maps the words around the concept (after it, EOT, padding), not the
    word itself: one row fewer per prompt than UCE's aligned rows for a one-token word."""
    prompts = ["a red circle", "a picture of a red square"]
    with_word, _ = aligned_token_pairs(tiny_pipe, prompts, ["red"], [""], padded=True)
    around, _ = aligned_token_pairs(tiny_pipe, prompts, ["red"], [""], padded=True,
                                    skip_word=True)  # fmt: skip
    assert len(with_word) - len(around) == len(prompts)


def test_probe_with_a_zero_lora_is_diffusers_attention(tiny_pipe):
    unet = tiny_pipe.unet
    x = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(x, 10, cond).sample
        saved = dict(unet.attn_processors)
        probes = {}
        for name in saved:
            if ".attn2." in name:
                k = unet.get_submodule(name.removesuffix(".processor")).to_k
                lora = {"A": torch.randn(1, k.in_features), "B": torch.zeros(k.out_features, 1)}
                probes[name] = AttentionProbe(lora, {})
        unet.set_attn_processor({n: probes.get(n, p) for n, p in saved.items()})
        try:
            probed = unet(x, 10, cond).sample
        finally:
            unet.set_attn_processor(saved)
    assert probes and torch.allclose(plain, probed, atol=1e-5)


def test_world_masks_are_the_shape_pixels_and_timesteps_favour_200_to_400():
    images, masks = world_images_and_masks(["a red circle", "an outlined blue square"], 2, 0)
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    red = images[0].permute(1, 2, 0)[masks[0]]
    assert 0.05 < masks[0].float().mean() < 0.9 and red[:, 0].mean() > red[:, 1:].mean() + 0.5
    assert masks[1].float().mean() < masks[0].float().mean()  # an outline: fewer pixels
    t = importance_timesteps(1000, 4000, torch.Generator().manual_seed(0))
    assert ((t >= 150) & (t <= 450)).float().mean() > 0.9


def test_mace_erases_several_concepts_in_one_run(tiny_model_dir, tmp_path):
    out = erasekit.erase(tiny_model_dir, "circle,square", "mace", tmp_path / "m",
                         settings={"steps_per_concept": 3, "images_per_concept": 2, "lam": 1.0,
                                   "lr": 1e-2}, progress=False)  # fmt: skip
    before, after = load_file(str(tiny_model_dir / UNET)), load_file(str(out / UNET))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    info = json.loads((out / "erasekit.json").read_text())["training"]["outputs"]
    assert info["n_concepts"] == 2 and [c["concept"] for c in info["lora_loss"]] == [
        "circle", "square"]  # fmt: skip


def test_a_word_no_forget_prompt_holds_gets_the_templates():
    from erasekit.methods.mace import TEMPLATES, word_prompts

    assert word_prompts("red", ["a red circle", "a blue square", "Red cross"]) == [
        "a red circle", "Red cross"]  # fmt: skip
    assert word_prompts("nudity", ["a nude person"]) == [t.format("nudity") for t in TEMPLATES]
