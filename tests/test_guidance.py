"""Guidance a model folder carries (negative prompt, SLD): the SLD update on hand-made tensors,
the sampler loop against diffusers' own, the generate path honouring the folder's config, and
bad configs as one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_one_line_error, run_main


def test_sld_update_matches_the_equations():
    from erasekit.guidance import SLDParams, sld_step

    f64 = torch.float64
    e_u = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=f64)
    e_t = torch.tensor([1.0, 1.0, 0.5, 0.2], dtype=f64)
    e_s = torch.tensor([0.9995, 0.5, 1.5, 0.2], dtype=f64)  # e_t - e_S: 0.0005, 0.5, -1, 0
    p = SLDParams(warmup=2, edit_scale=100.0, threshold=0.01, momentum=0.5, momentum_beta=0.4)
    nu = torch.zeros(4, dtype=f64)
    # step 0 (warm-up): plain CFG, the momentum still accumulates
    eps, nu1 = sld_step(e_u, e_t, e_s, nu, p, step=0, scale=2.0)
    assert torch.allclose(eps, 2.0 * e_t)
    # mu: diff >= threshold -> 0 (entry 1); else clamp(|diff| * 100, max 1): 0.05, -, 1, 0
    mu = torch.tensor([0.05, 0.0, 1.0, 0.0], dtype=f64)
    gamma = mu * (e_s - e_u)
    assert torch.allclose(nu1, 0.6 * gamma)
    # step 2 (after warm-up): e_u + s_g * ((e_t - e_u) - gamma'), gamma' with momentum
    eps, nu2 = sld_step(e_u, e_t, e_s, nu1, p, step=2, scale=2.0)
    gamma2 = gamma + 0.5 * nu1
    assert torch.allclose(eps, 2.0 * (e_t - gamma2))
    assert torch.allclose(nu2, 0.4 * nu1 + 0.6 * gamma2)


def _plan(prompt: str, seed: int = 3):
    return [{"prompt": prompt, "negative_prompt": None, "seed": seed, "steps": 4,
             "guidance": 5.0, "eta": 0.0}]  # fmt: skip


def test_sld_sampler_without_edit_equals_plain_cfg(tiny_pipe):
    """Edit scale 0 -> no safety term: our three-way loop must give diffusers' CFG images."""
    from erasekit.guidance import Guidance, SLDParams
    from erasekit.sampling import render_batch

    plain = np.asarray(render_batch(tiny_pipe, _plan("a red circle"), 32, 32)[0], dtype=float)
    tiny_pipe.erasekit_guidance = Guidance("sld", "nudity", SLDParams(0, 0.0, 0.0, 0.0, 0.0))
    try:
        same = np.asarray(render_batch(tiny_pipe, _plan("a red circle"), 32, 32)[0], dtype=float)
        tiny_pipe.erasekit_guidance = Guidance("sld", "nudity", SLDParams(0, 5000, 1.0, 0.5, 0.7))
        edited = np.asarray(render_batch(tiny_pipe, _plan("a red circle"), 32, 32)[0], dtype=float)
        tiny_pipe.erasekit_guidance = Guidance("negative-prompt", "a red circle")
        negative = np.asarray(render_batch(tiny_pipe, _plan("a red circle"), 32, 32)[0],
                              dtype=float)  # fmt: skip
    finally:
        del tiny_pipe.erasekit_guidance
    assert np.abs(plain - same).max() <= 1.0  # rounding to 8 bits only
    assert np.abs(plain - edited).mean() > 1.0
    assert np.abs(plain - negative).mean() > 1.0


def test_guided_folder_renders_through_generate(tmp_path, tiny_model_dir, capsys):
    """A folder with guidance.json (+ an embedding) loads with it and `erasekit generate`
    renders differently from the plain folder; the embedding loads in plain diffusers too."""
    from erasekit.models import load_pipeline
    from tests.conftest import sld_folder

    guided = sld_folder(tiny_model_dir, tmp_path / "guided")
    pipe = load_pipeline(guided)
    assert pipe.erasekit_guidance.sld.edit_scale == 5000
    assert "<neg>" in pipe.tokenizer.get_vocab()
    outs = {}
    for name, folder in (("plain", tiny_model_dir), ("guided", guided)):
        r = run_main(capsys, "generate", "--model", str(folder), "--prompts", "a red circle",
                     "--out", str(tmp_path / f"out-{name}"), "--no-progress")  # fmt: skip
        assert r.returncode == 0, r.stderr
        image = next((tmp_path / f"out-{name}" / "images").glob("*.png"))
        outs[name] = np.asarray(Image.open(image), dtype=float)
    assert np.abs(outs["plain"] - outs["guided"]).mean() > 1.0


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"mode": "sld", "concept": "x", "sld": "extreme"}, "unknown SLD preset"),
        ({"mode": "steer", "concept": "x"}, "guidance mode must be one of"),
        ({"mode": "negative-prompt", "concept": ""}, "non-empty 'concept'"),
        ({"mode": "sld", "concept": "x", "sld": {"warmup": 1}}, "custom SLD settings need"),
        ({"mode": "sld", "concept": "x", "embedding": "missing.safetensors"}, "not found"),
    ],
)
def test_bad_guidance_configs_are_clean_errors(tmp_path, tiny_model_dir, config, fragment,
                                               capsys):  # fmt: skip
    folder = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "guidance.json").write_text(json.dumps(config))
    r = run_main(capsys, "generate", "--model", str(folder), "--prompts", "a red circle",
                 "--out", str(tmp_path / "out"), "--no-progress")  # fmt: skip
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "out").exists()
