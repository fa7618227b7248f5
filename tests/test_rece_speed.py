"""RECE and SPEED: the closed forms against explicit float64 solves, what each edits, RECE's
epoch choice and SPEED's many concepts in one solve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.methods.rece import RECE, adversarial_embedding
from erasekit.methods.speed import null_space_projector, speed_update
from tests.conftest import assert_one_line_error, run_main

UNET = "unet/diffusion_pytorch_model.safetensors"


def test_adversarial_embedding_is_the_regularised_least_squares_solution():
    """e' minimises Σ_l ‖W_l e − W⁰_l c‖² + λ‖e‖²: numpy's lstsq on the stacked system
    [W_1; …; W_L; √λ I] e = [W⁰_1 c; …; W⁰_L c; 0] gives the same rows."""
    rng = np.random.default_rng(1)
    current = [rng.normal(size=(4, 6)) for _ in range(3)]
    original = [w + 0.5 * rng.normal(size=w.shape) for w in current]
    rows, reg = rng.normal(size=(2, 6)), 0.3
    t = torch.from_numpy
    got = adversarial_embedding([t(w) for w in current], [t(w) for w in original], t(rows), reg)
    a = np.vstack([*current, np.sqrt(reg) * np.eye(6)])
    for c, e in zip(rows, got.numpy(), strict=True):
        b = np.concatenate([*(w0 @ c for w0 in original), np.zeros(6)])
        assert np.abs(np.linalg.lstsq(a, b, rcond=None)[0] - e).max() < 1e-9


def test_speed_update_is_the_constrained_minimiser():
    """ΔW minimises mean‖(W + ΔW)t − W a‖² + α‖ΔW‖² over ΔW = Z Bᵀ (B: the null-space basis)
    with ΔW K₂ = 0: solved here row by row as an explicit least-squares problem in the free
    coordinates; the retained rows and K₂ are left exactly where they were."""
    rng = np.random.default_rng(2)
    d, out = 8, 5
    w = rng.normal(size=(out, d))
    t_rows, a_rows = rng.normal(size=(3, d)), rng.normal(size=(3, d))
    retained = rng.normal(size=(4, d))  # spans 4 of the 8 dimensions
    k2 = rng.normal(size=(d, 2))
    alpha = 0.4
    c_tt, c_at = t_rows.T @ t_rows / 3, a_rows.T @ t_rows / 3
    tt = torch.from_numpy
    p = null_space_projector(tt(retained), 1e-9).numpy()
    got = speed_update(tt(w), tt(c_tt), tt(c_at), tt(p), tt(k2), alpha=alpha, lam=0.0).numpy()
    values, vectors = np.linalg.eigh(p)
    basis = vectors[:, values > 0.5]  # the null space (p's range), 4 columns
    free = np.linalg.svd((basis.T @ k2).T)[2][2:].T  # z ⟂ Bᵀ K₂: the constraint ΔW K₂ = 0
    x = (t_rows @ basis @ free) / np.sqrt(3)  # design: (t_i projected) per row of W
    a = np.vstack([x, np.sqrt(alpha) * np.eye(free.shape[1])])
    expected = np.zeros_like(w)
    for o in range(out):
        b = np.concatenate([(a_rows - t_rows) @ w[o] / np.sqrt(3), np.zeros(free.shape[1])])
        expected[o] = basis @ free @ np.linalg.lstsq(a, b, rcond=None)[0]
    assert np.abs(got - expected).max() < 1e-9
    assert np.abs(got @ retained.T).max() < 1e-9  # the retained rows are untouched
    assert np.abs(got @ k2).max() < 1e-9  # and so are the invariants
    soft = speed_update(tt(w), tt(c_tt), tt(c_at), tt(p), tt(k2), alpha=alpha, lam=10.0).numpy()
    assert np.abs(soft @ k2).max() > 1e-6  # λ > 0 softens the equality


def test_speed_edits_only_the_values_and_erases_several_concepts_in_one_solve(
    tiny_model_dir, tmp_path
):
    out = erasekit.erase(tiny_model_dir, "circle,square", "speed", tmp_path / "s",
                         settings={"tokens": "all"}, progress=False)  # fmt: skip
    before, after = load_file(str(tiny_model_dir / UNET)), load_file(str(out / UNET))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    values = {k for k in before if k.endswith("attn2.to_v.weight")}
    assert changed == values and values
    info = json.loads((out / "erasekit.json").read_text())["training"]
    assert info["data"]["erase"] == ["circle", "square"]
    outputs = info["outputs"]
    assert outputs["n_concepts"] == 2 and outputs["projections_edited"] == len(values)
    assert outputs["seconds_per_concept"] == pytest.approx(outputs["edit_seconds"] / 2, abs=1e-3)


def test_rece_keeps_the_epoch_with_the_lowest_validation_rate(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Rates 0.5, 0.25, 0.5: epoch 1 is kept — its weights, not the last epoch's."""
    rates = iter([0.5, 0.25, 0.5])
    snapshots = []

    def fake_rate(self, ctx, epoch):
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        snapshots.append({n: p.detach().clone() for n, p in unet.named_parameters()
                          if n.endswith("attn2.to_k.weight")})  # fmt: skip
        self.validation_info = {"fake": True}
        return next(rates)

    monkeypatch.setattr(RECE, "validation_rate", fake_rate)
    out = erasekit.erase(tiny_model_dir, "circle", "rece", tmp_path / "r",
                         settings={"epochs": 3}, progress=False)  # fmt: skip
    info = json.loads((out / "erasekit.json").read_text())["training"]["outputs"]
    assert info["chosen_epoch"] == 1 and [e["validation_rate"] for e in info["epochs"]] == [
        0.5, 0.25, 0.5]  # fmt: skip
    after = load_file(str(out / UNET))
    assert all(torch.equal(after[f"{n}"], snapshots[1][n]) for n in snapshots[1])
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])
    assert not (out / ".rece-validation").exists()


def test_rece_validates_with_the_detector_and_leaves_no_renders(tiny_model_dir, tmp_path):
    out = erasekit.erase(tiny_model_dir, "circle", "rece", tmp_path / "r",
                         settings={"epochs": 2, "validation_steps": 2}, progress=False)  # fmt: skip
    info = json.loads((out / "erasekit.json").read_text())["training"]["outputs"]
    assert [e["epoch"] for e in info["epochs"]] == [0, 1]
    assert all(0 <= e["validation_rate"] <= 1 for e in info["epochs"])
    (checked,) = info["validation"]["sets"]
    assert checked["prompts"]["name"] == "circle/tuning-concept"  # not a reported set
    assert checked["n_images"] == 8 and info["validation"]["steps"] == 2
    assert not (out / ".rece-validation").exists()


def test_bad_settings_are_one_line(tiny_model_dir, tmp_path, capsys):
    cases = [
        ("rece", "epochs=0", "epochs must be at least 1"),
        ("rece", "select=best", "select must be one of"),
        ("speed", "params=Q", "params must be one of"),
        ("speed", "retain_scale=0", "retain_scale must be positive"),
    ]
    for method, setting, fragment in cases:
        code = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "circle",
                        "--method", method, "--out", str(tmp_path / "o"), "--no-progress",
                        "--set", setting)  # fmt: skip
        assert_one_line_error(code, fragment)
    assert not (tmp_path / "o").exists()


def test_rece_validates_each_combined_concept_on_its_own_phrasings(tiny_model_dir, tmp_path):
    out = erasekit.erase(tiny_model_dir, "circle,square", "rece", tmp_path / "r",
                         settings={"epochs": 1, "validation_steps": 2}, progress=False)  # fmt: skip
    info = json.loads((out / "erasekit.json").read_text())["training"]["outputs"]
    names = [s["prompts"]["name"] for s in info["validation"]["sets"]]
    assert names == ["circle/tuning-concept", "square/tuning-concept"]
