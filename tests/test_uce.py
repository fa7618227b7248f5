"""UCE: the closed-form edit of the cross-attention projections."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.methods.uce import uce_edit
from tests.conftest import assert_one_line_error, run_main

UNET = "unet/diffusion_pytorch_model.safetensors"


def test_edit_equals_the_closed_form_solution():
    """W' = (λW + s_e Σ v*_i c_iᵀ + s_p Σ (W c_j) c_jᵀ)(λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹,
    computed here term by term with numpy's explicit inverse."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 5))
    erase, guide, keep = rng.normal(size=(2, 5)), rng.normal(size=(2, 5)), rng.normal(size=(3, 5))
    lam, s_e, s_p = 0.5, 2.0, 0.7
    left = lam * w
    right = lam * np.eye(5)
    for c, g in zip(erase, guide, strict=True):
        left += s_e * np.outer(w @ g, c)
        right += s_e * np.outer(c, c)
    for c in keep:
        left += s_p * np.outer(w @ c, c)
        right += s_p * np.outer(c, c)
    expected = left @ np.linalg.inv(right)
    t = torch.from_numpy
    got = uce_edit(t(w), t(erase), t(guide), t(keep), lam=lam, erase_scale=s_e,
                   preserve_scale=s_p)  # fmt: skip
    assert np.abs(got.numpy() - expected).max() < 1e-8
    # what it does: each erased embedding now projects (nearly) like its guide
    assert np.linalg.norm(got.numpy() @ erase[0] - w @ guide[0]) < np.linalg.norm(
        w @ erase[0] - w @ guide[0]
    )


@pytest.mark.parametrize("tokens", ["last", "all", "padded"])
def test_uce_edits_only_cross_attention_keys_and_values(tokens, tiny_model_dir, tmp_path):
    out = erasekit.erase(tiny_model_dir, "circle", "uce", tmp_path / "u",
                         settings={"tokens": tokens}, progress=False)  # fmt: skip
    before, after = load_file(str(tiny_model_dir / UNET)), load_file(str(out / UNET))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    edited = {k for k in before if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    assert changed == edited and edited
    for part in ("text_encoder", "vae"):
        name = next((tiny_model_dir / part).glob("*.safetensors")).name
        a, b = load_file(str(tiny_model_dir / part / name)), load_file(str(out / part / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((out / "erasekit.json").read_text())["training"]
    assert info["outputs"]["projections_edited"] == len(edited)
    assert info["data"]["tokens"] == tokens and info["data"]["erase"] == ["circle"]
    if tokens == "padded":  # every position the U-Net attends to, padding included
        from transformers import CLIPTokenizer

        length = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer").model_max_length
        assert info["data"]["n_preserve_rows"] == len(info["data"]["preserve"]) * length


@pytest.mark.parametrize(
    ("prompt", "guide", "padded", "erase_rows", "guide_rows"),
    [  # token ids: <s> a photo of a circle </s> | <s> a photo of a big square </s>
        ("a photo of a circle", "big square", False, [5, 6], [6, 7]),
        ("a photo of a circle", "big square", True, list(range(5, 77)), [*range(6, 77), 76]),
        # <s> a circle on the left </s> | <s> a on the left </s>: the word maps to the token
        # before it, what follows aligns from the end
        ("a circle on the left", "", False, [2, 3, 4, 5, 6], [1, 2, 3, 4, 5]),
        ("a circle on the left", "", True, list(range(2, 77)), [1, *range(2, 76)]),
    ],
)
def test_token_pairs_align_the_prompt_with_its_guided_text(
    prompt, guide, padded, erase_rows, guide_rows, tiny_pipe
):
    from erasekit.methods.uce import aligned_token_pairs
    from erasekit.training import encode_prompts

    replaced = " ".join(prompt.replace("circle", guide).split())
    erase, target = aligned_token_pairs(tiny_pipe, [prompt], ["circle"], [guide], padded=padded)
    h_p, h_g = encode_prompts(tiny_pipe, [prompt, replaced]).double().cpu()
    assert h_p.shape[0] == 77  # every position the U-Net attends to
    assert torch.equal(erase, h_p[erase_rows]) and torch.equal(target, h_g[guide_rows])


def test_bad_uce_settings_are_one_line(tiny_model_dir, tmp_path, capsys):
    base = ["erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method", "uce",
            "--out", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    cases = [
        (["--set", "steps=5"], "closed-form edit: steps must be 0"),
        (["--set", "lam=0"], "lam must be positive"),
        (["--set", "tokens=some"], "tokens must be one of last, all, padded"),
        (["--set", "guide=a,b,c"], "3 guide texts for 1 erased concepts"),
        (["--set", "erase=a red square", "--set", "tokens=last"], "both erased and preserved"),
        (["--set", "erase=zebra", "--set", "tokens=all"], "no forget prompt contains zebra"),
        (["--set", "erase=zebra", "--set", "tokens=padded"], "no forget prompt contains zebra"),
    ]
    for extra, fragment in cases:
        assert_one_line_error(run_main(capsys, *base, *extra), fragment)
    assert not (tmp_path / "o").exists()


def test_concept_embedding_is_the_hidden_state_of_the_last_word_token(tiny_pipe):
    """UCE's 'last' token: the position just before end-of-text (for "" the start token),
    found here from the token ids themselves, not from the lengths the code uses."""
    from erasekit.methods.uce import concept_embeddings

    texts = ["a red circle", "outlined", ""]
    got = concept_embeddings(tiny_pipe, texts)
    tok = tiny_pipe.tokenizer
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden = tiny_pipe.text_encoder(ids)[0]
    for row, text in enumerate(texts):
        eot = int((ids[row] == tok.eos_token_id).nonzero()[0])
        assert eot == len(tok(text).input_ids) - 1
        want = hidden[row, eot - 1].double()
        assert torch.allclose(got[row], want, atol=1e-5), text
