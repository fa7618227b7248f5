"""L-CODEC parameter selection: the conditional-dependence statistic and its masks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.errors import ErasekitError
from erasekit.methods.lcodec import codec_statistic
from erasekit.methods.salun import MASK_FILE, load_mask
from tests.conftest import assert_one_line_error, run_main

FAST = {"steps": 3, "images_per_prompt": 1, "batch_size": 2, "mask_batch_size": 4,
        "lcodec_samples": 16}  # fmt: skip


def synthetic(n: int = 800, seed: int = 0):
    """Y depends on unit 0 and on X; unit 1 is noise; unit 2 is a copy of X (dependent on Y
    only through X); unit 3 is unit 0 cubed (a
    monotone map, which distorts nearest neighbours in Z: a weaker but clear signal)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g)
    dep, noise = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y = 3 * x + torch.sin(3 * dep) + 0.05 * torch.randn(n, generator=g)
    z = torch.stack([dep, noise, x + 0.01 * torch.randn(n, generator=g), dep**3])
    return y, z, x


def test_codec_statistic_selects_the_dependent_units_given_x():
    y, z, x = synthetic()
    t = codec_statistic(y, z, x)
    assert t[0] > 0.7 and t[3] > 0.5  # Y is a function of (X, Z_u)
    assert abs(t[1]) < 0.1 and abs(t[2]) < 0.1  # independent, or dependent only through X
    assert set(torch.topk(t, 2).indices.tolist()) == {0, 3}
    free = codec_statistic(y, z, None)  # without conditioning, the copy of X looks the most
    assert int(free.argmax()) == 2  # dependent unit


def test_codec_statistic_is_invariant_to_monotone_maps_of_y_affine_maps_and_chunking():
    y, z, x = synthetic(n=120, seed=1)
    a = codec_statistic(y, z, x, chunk=1)
    b = codec_statistic(torch.exp(y), z * 5 + 2, x * 100, chunk=256)
    assert torch.allclose(a, b)
    with pytest.raises(ErasekitError):
        codec_statistic(y[:2], z[:, :2], x[:2])


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_salun_with_lcodec_mask_trains_whole_units_at_the_density(
    fraction, tiny_model_dir, tmp_path
):
    out = erasekit.erase(tiny_model_dir, "circle", "salun", tmp_path / "out", progress=False,
                         settings={**FAST, "mask_source": "lcodec", "mask_fraction": fraction,
                                   "lr": 1e-3})  # fmt: skip
    masks, info = load_mask(out / MASK_FILE)
    assert info["source"] == "lcodec" and info["samples"] == 16
    n = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert fraction <= kept / n < fraction + 0.05 and info["density"] == pytest.approx(kept / n)
    for name, m in masks.items():  # whole output units: a row is all in or all out
        rows = m.reshape(m.shape[0], -1)
        assert torch.equal(rows.all(1), rows.any(1)), name
    before = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, m in masks.items():
        assert torch.equal(before[name][~m], after[name][~m]), name
    assert any(not torch.equal(before[k][m], after[k][m]) for k, m in masks.items())


def test_lcodec_and_saliency_masks_differ_and_resalign_takes_lcodec(tiny_model_dir, tmp_path):
    common = {**FAST, "mask_fraction": 0.2, "steps": 1}
    a = erasekit.erase(tiny_model_dir, "circle", "salun", tmp_path / "a", progress=False,
                       settings={**common, "mask_source": "lcodec"})  # fmt: skip
    b = erasekit.erase(tiny_model_dir, "circle", "salun", tmp_path / "b", progress=False,
                       settings=common)  # fmt: skip
    ma, _ = load_mask(a / MASK_FILE)
    mb, info = load_mask(b / MASK_FILE)
    assert info["source"] == "saliency"
    assert any(not torch.equal(ma[k], mb[k]) for k in ma)
    r = erasekit.erase(tiny_model_dir, "circle", "resalign", tmp_path / "r", progress=False,
                       settings={**common, "trainable": "mask", "weight_decay": 0.0,
                                 "mask_source": "lcodec", "lam": 0.0})  # fmt: skip
    _, info = load_mask(r / MASK_FILE)  # (lam 0: no simulated fine-tuning, a quick step)
    assert info["source"] == "lcodec" and info["density"] >= 0.2


@pytest.mark.parametrize(
    ("setting", "needle"),
    [("mask_source=gradient", "mask_source must be one of"),
     ("lcodec_samples=2", "lcodec_samples must be at least 3")],
)  # fmt: skip
def test_bad_lcodec_settings_exit_2(setting, needle, tiny_model_dir, tmp_path, capsys):
    result = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "circle",
                    "--method", "salun", "--out", str(tmp_path / "o"), "--set", setting,
                    "--no-progress")  # fmt: skip
    assert_one_line_error(result, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_lcodec_mask_on_two_processes_is_the_one_process_mask(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes: the noise-perturbed batches are shared out and gathered
    in order, so the statistic and the mask are those of one process."""
    from tests.conftest import one_and_two_processes

    args = ["erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method",
            "salun", "--no-progress", "--set", "steps=1", "--set", "images_per_prompt=1",
            "--set", "mask_source=lcodec", "--set", "lcodec_samples=16",
            "--set", "mask_batch_size=4"]  # fmt: skip
    one, two = one_and_two_processes(args, [], [], tmp_path)
    (m1, i1), (m2, i2) = load_mask(one / MASK_FILE), load_mask(two / MASK_FILE)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert i1["density"] == i2["density"] and i1["samples"] == i2["samples"] == 16
