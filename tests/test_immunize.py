"""Condition-number immunization: the linear algebra, a constructed regression, the method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import erasekit
from erasekit.errors import ErasekitError
from erasekit.methods.immunize import (
    benign_regulariser,
    check_conditioned,
    condition_number,
    feature_covariance,
    feature_span,
    harmful_regulariser,
    immunization_ratio,
)
from tests.conftest import assert_one_line_error, run_main


def test_condition_number_equals_numpy_on_random_spd_matrices():
    rng = np.random.default_rng(0)
    for k in (2, 8, 31, 64):
        a = rng.standard_normal((k, k))
        s = a @ a.T + 1e-3 * np.eye(k)
        assert condition_number(torch.from_numpy(s)) == pytest.approx(np.linalg.cond(s), rel=1e-8)
    singular = torch.zeros(3, 3, dtype=torch.float64)
    singular[0, 0] = 1.0
    assert condition_number(singular) == float("inf")
    with pytest.raises(ErasekitError, match="singular beyond tolerance"):
        check_conditioned(singular, 1e-12, "harmful")


def test_feature_span_drops_directions_without_variance():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(500, 6, generator=g, dtype=torch.float64)
    phi = phi - phi.mean(1, keepdim=True)  # a LayerNorm's constraint: no variance along 1
    basis = feature_span(feature_covariance(phi), 1e-9)
    assert basis.shape == (6, 5)
    assert condition_number(feature_covariance(phi)) > 1e12
    assert condition_number(feature_covariance(phi, basis)) < 10


def test_regularisers_are_zero_exactly_at_their_ideal():
    eye = torch.eye(4, dtype=torch.float64)
    assert float(benign_regulariser(3 * eye)) == pytest.approx(0.0, abs=1e-12)  # κ = 1
    worse = torch.diag(torch.tensor([4.0, 1, 1, 1], dtype=torch.float64))
    assert float(benign_regulariser(worse)) > 0
    # r2 falls as σ_min falls (harmful conditioning gets worse) at a fixed largest eigenvalue
    a = torch.diag(torch.tensor([1.0, 1, 1, 0.5], dtype=torch.float64))
    b = torch.diag(torch.tensor([1.0, 1, 1, 0.01], dtype=torch.float64))
    assert float(harmful_regulariser(b)) < float(harmful_regulariser(a))


def gd_iterations(phi: torch.Tensor, target: torch.Tensor, threshold: float) -> int:
    """Plain gradient descent on ½‖Φw − y‖²/m from w = 0 with the optimal constant step
    1/σ_max(S): the first iteration whose loss is below ``threshold`` (y in Φ's span). In S's
    eigenbasis the loss after i steps is ½ Σ_j λ_j (1 − λ_j/σ_max)^(2i) c_j², so the count is
    found by bisection on that exact expression (the rate is set by κ(S))."""
    s = feature_covariance(phi)
    values, vectors = torch.linalg.eigh(s)
    keep = values > values[-1] * 1e-12
    values, vectors = values[keep], vectors[:, keep]
    w_star = torch.linalg.lstsq(phi, target.unsqueeze(1)).solution.squeeze(1)
    c = vectors.T @ w_star

    def loss(i: int) -> float:
        return float(0.5 * (values * (1 - values / values[-1]) ** (2 * i) * c**2).sum())

    lo, hi = 0, 1
    while loss(hi) >= threshold:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if loss(mid) >= threshold else (lo, mid)
    return hi


def gd_iterations_by_running(phi: torch.Tensor, target: torch.Tensor, threshold: float) -> int:
    """The same count by running gradient descent (for the short runs)."""
    step = 1.0 / float(torch.linalg.eigvalsh(feature_covariance(phi))[-1])
    w = torch.zeros(phi.shape[1], dtype=torch.float64)
    for i in range(10_000):
        r = phi @ w - target
        if 0.5 * float(r @ r) / len(r) < threshold:
            return i
        w -= step * (phi.T @ r) / len(r)
    raise AssertionError("gradient descent did not converge in 10000 steps")


def test_immunization_on_a_linear_regression_slows_harmful_gd_and_keeps_benign():
    """A linear feature extractor A = X W. The benign inputs span dims 0..5, the harmful ones
    dims 2..7: immunization may shrink a harmful-only direction without touching benign
    features. Trained with the feature MSE + λ1 r1 + λ2 r2 (the method's loss), then an
    attacker fits a linear head on the harmful features by gradient descent."""
    g = torch.Generator().manual_seed(0)
    k, m = 8, 400
    x_benign = torch.randn(m, k, generator=g, dtype=torch.float64)
    x_benign[:, 6:] = 0
    x_harm = torch.randn(m, k, generator=g, dtype=torch.float64)
    x_harm[:, :2] = 0
    # the original features are full rank together; each set's own span has 6 dimensions
    basis_b = torch.eye(k, dtype=torch.float64)[:, :6]
    basis_h = torch.eye(k, dtype=torch.float64)[:, 2:]
    s0_b, s0_h = feature_covariance(x_benign, basis_b), feature_covariance(x_harm, basis_h)
    unit_b = float(s0_b.norm() / 6**0.5)
    unit_h = float(s0_h.norm() / 6**0.5)
    w = torch.eye(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(400):
        a_b, a_h = x_benign @ w, x_harm @ w
        loss = (
            torch.nn.functional.mse_loss(a_b, x_benign)
            + benign_regulariser(feature_covariance(a_b, basis_b) / unit_b)
            + harmful_regulariser(feature_covariance(a_h, basis_h) / unit_h)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a_b, a_h = x_benign @ w, x_harm @ w
    k_h0, k_b0 = condition_number(s0_h), condition_number(s0_b)
    k_h = condition_number(feature_covariance(a_h, basis_h))
    k_b = condition_number(feature_covariance(a_b, basis_b))
    assert k_h > 20 * k_h0  # harmful fine-tuning ill-conditioned
    assert k_b < 1.1 * k_b0  # benign conditioning kept (within 10%)
    assert immunization_ratio(k_h, k_h0, k_b, k_b0) > 18
    # benign task kept: the features move by under 2% of their variance
    assert float(torch.nn.functional.mse_loss(a_b, x_benign)) < 0.02 * float(x_benign.var())
    # the attacker: GD to fit a head on harmful data (a target the features can express)
    truth = torch.randn(k, generator=g, dtype=torch.float64)
    before = gd_iterations(x_harm, x_harm @ truth, 1e-6)
    assert before == gd_iterations_by_running(x_harm, x_harm @ truth, 1e-6)
    after = gd_iterations(a_h, x_harm @ truth, 1e-6)
    assert after > 10 * before, (before, after)
    benign_before = gd_iterations(x_benign, x_benign @ truth, 1e-6)
    benign_after = gd_iterations(a_b, x_benign @ truth, 1e-6)
    assert benign_after < 1.5 * benign_before, (benign_before, benign_after)


def test_immunize_trains_the_text_encoder_and_logs_the_ratio_against_the_original(
    tiny_model_dir, tmp_path
):
    settings = {"steps": 3, "images_per_prompt": 1, "batch_size": 2, "lr": 1e-3}
    out = erasekit.erase(tiny_model_dir, "circle", "immunize", tmp_path / "out",
                         progress=False, settings=settings)  # fmt: skip
    log = [json.loads(ln) for ln in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["immunization_ratio"] == pytest.approx(1.0)  # step 1 sees the original
    assert all(np.isfinite(r["kappa_harm"]) and r["kappa_harm"] > 1 for r in log)
    outputs = json.loads((out / "erasekit.json").read_text())["training"]["outputs"]
    assert outputs["feature_span"]["dimensions"] < outputs["feature_span"]["width"]
    final = outputs["kappa_final"]
    k0 = outputs["kappa_original"]
    ratio = immunization_ratio(final["harm"], k0["harm"], final["benign"], k0["benign"])
    assert final["immunization_ratio"] == pytest.approx(ratio)
    from safetensors.torch import load_file

    before = load_file(str(tiny_model_dir / "text_encoder" / "model.safetensors"))
    after = load_file(str(out / "text_encoder" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("layers.1." in k or "final_layer_norm" in k for k in changed)
    assert len(outputs["text_encoder_trained"]) == len(changed)


@pytest.mark.parametrize(
    ("setting", "needle"),
    [("lambda_harm=-1", "lambda_harm must be non-negative"),
     ("encoder_layers=9", "encoder_layers=9: the text encoder has 2 layers"),
     ("singular_tolerance=0.5", "singular beyond tolerance"),
     ("span_tolerance=1", "span_tolerance must be in [0, 1)")],
)  # fmt: skip
def test_bad_immunize_settings_exit_2(setting, needle, tiny_model_dir, tmp_path, capsys):
    result = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "circle",
                      "--method", "immunize", "--out", str(tmp_path / "o"), "--set", setting,
                      "--set", "steps=1", "--set", "images_per_prompt=1",
                      "--no-progress")  # fmt: skip
    assert_one_line_error(result, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_process_step_equals_one_process_with_accumulation(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes x 1 micro-step = 1 process x 2 micro-steps: the U-Net's
    and the text encoder's gradients and the logged condition numbers are averaged."""
    from safetensors.torch import load_file

    from tests.conftest import one_and_two_processes

    args = ["erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method",
            "immunize", "--no-progress", "--set", "steps=2", "--set", "images_per_prompt=1",
            "--set", "batch_size=1", "--set", "covariance_prompts=2", "--set", "lr=1e-3",
            "--set", "optimizer=sgd"]  # fmt: skip
    one, two = one_and_two_processes(args, ["--set", "gradient_accumulation_steps=2"], [],
                                     tmp_path)  # fmt: skip
    logs = [[json.loads(ln) for ln in (f / "training_log.jsonl").read_text().splitlines()]
            for f in (one, two)]  # fmt: skip
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "kappa_harm", "kappa_benign", "immunization_ratio", "r1", "r2"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for sub, file in (("unet", "diffusion_pytorch_model.safetensors"),
                      ("text_encoder", "model.safetensors")):  # fmt: skip
        before = load_file(str(tiny_model_dir / sub / file))
        w1, w2 = (load_file(str(f / sub / file)) for f in (one, two))
        assert any(not torch.equal(before[k], w1[k]) for k in before), sub
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), (sub, k)
