"""ResAlign: the (I + γH)⁻¹ solve against exact formulas, its safeguards, double backprop through
the U-Net against finite differences, λ = 0 against the base methods, and a full run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erasekit.concepts import load_concept
from erasekit.errors import ErasekitError
from erasekit.methods import get_method
from erasekit.methods.resalign import (
    ResAlignConfig,
    double_backward_ready,
    load_meta_distribution,
    make_hvp,
    proximal_solve,
)
from erasekit.models import load_pipeline
from erasekit.training import train
from tests.conftest import assert_one_line_error, run_main

TINY_META = Path(__file__).parent / "data" / "resalign-tiny-meta.yaml"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _spd(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))  # fmt: skip
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _solve(h: torch.Tensor, g: torch.Tensor, **kw):
    kw = {"gamma": 1.0, "iterations": 5, "alpha": 1.0, "max_retries": 5, "max_norm": 1e9, **kw}
    term, stats = proximal_solve([g], lambda v: [h @ v[0]], **kw)
    return (term[0] if term is not None else None), stats


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_fixed_point_solve_converges_to_the_exact_inverse(gamma):
    h = _spd([0.05, 0.2, 0.4, 0.6, 0.8, 1.1, 1.5, 1.9][: 5 if gamma == 1.0 else 8])
    g = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.solve(torch.eye(h.shape[0], dtype=torch.float64) + gamma * h, g)
    term, stats = _solve(h, g, gamma=gamma, iterations=700)
    assert stats["retries"] == 0 and stats["hvps"] == 699
    assert torch.allclose(term, exact, rtol=1e-9, atol=1e-12)
    # K = 5 at alpha = 1 is the truncated Neumann series sum_{i<5} (-γH)^i g, exactly.
    term5, stats5 = _solve(h, g, gamma=gamma, iterations=5)
    series = sum(torch.linalg.matrix_power(-gamma * h, i) @ g for i in range(5))
    assert stats5["hvps"] == 4 and torch.allclose(term5, series, rtol=1e-12)
    assert (term5 - exact).norm() > 1e-6  # truncation is visible: the test can tell them apart


def test_safeguards_halve_alpha_then_fall_back():
    g = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # eigenvalue 5: the iteration contracts only for alpha < 2/6, so alpha 1 and 1/2 diverge.
    h = torch.diag(torch.tensor([5.0, 0.5], dtype=torch.float64))
    term, stats = _solve(h, g, iterations=300)
    assert stats["retries"] == 2 and stats["alpha"] == 0.25
    exact = torch.linalg.solve(torch.eye(2, dtype=torch.float64) + h, g)
    assert torch.allclose(term, exact, rtol=1e-8)
    # eigenvalue -3 < -1/γ: no alpha contracts; every retry fails, the caller falls back.
    term, stats = _solve(torch.diag(torch.tensor([-3.0, 0.5], dtype=torch.float64)), g)
    assert term is None and stats["retries"] == 5 and "diverging" in stats["reason"]
    # a norm cap the term cannot meet: halving alpha shrinks it until it passes or gives up
    term, stats = _solve(torch.zeros(2, 2, dtype=torch.float64), g, max_norm=0.5)
    assert term is not None and stats["retries"] == 4 and float(term.norm()) <= 0.5
    term, stats = _solve(torch.zeros(2, 2, dtype=torch.float64), g, max_norm=1e-6)
    assert term is None and "norm" in stats["reason"]


def test_hvp_by_double_backprop_equals_the_quadratic_hessian():
    a = _spd([0.3, 0.7, 1.2, 2.0], seed=3)
    b = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    phi = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    phi.requires_grad_(True)
    loss = 0.5 * phi @ a @ phi + b @ phi  # the Hessian is exactly A
    hvp = make_hvp(loss, [phi])
    v = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(hvp([v])[0], a @ v, rtol=1e-12)
    g = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    term, _ = proximal_solve([g], hvp, gamma=0.4, iterations=300, alpha=1.0, max_retries=0,
                             max_norm=1e9)  # fmt: skip
    exact = torch.linalg.solve(torch.eye(4, dtype=torch.float64) + 0.4 * a, g)
    assert torch.allclose(term[0], exact, rtol=1e-9)


def test_unet_hvp_matches_finite_differences(tiny_pipe):
    """Double backward through the diffusers U-Net (attention included) is the real Hessian."""
    import copy

    unet = copy.deepcopy(tiny_pipe.unet).double()
    names = [n for n, _ in unet.named_parameters() if "attn2.to_k" in n or "conv_in" in n]
    params = dict(unet.named_parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    cond = torch.randn(2, 77, 32, generator=gen, dtype=torch.float64)
    t = torch.tensor([100, 700])

    def loss_at(values):
        out = torch.func.functional_call(unet, values, (x, t), {"encoder_hidden_states": cond})
        return torch.nn.functional.mse_loss(out.sample, noise)

    phi = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    v = [torch.randn(phi[n].shape, generator=gen, dtype=torch.float64) for n in names]
    with double_backward_ready(unet, torch.device("cpu")):
        hv = make_hvp(loss_at(phi), list(phi.values()))(v)

    def grad_at(sign: float, eps: float = 1e-5):
        moved = {n: (phi[n].detach() + sign * eps * d).requires_grad_(True)
                 for n, d in zip(names, v, strict=True)}  # fmt: skip
        return torch.autograd.grad(loss_at(moved), list(moved.values()))

    plus, minus = grad_at(1.0), grad_at(-1.0)
    for h, p, m in zip(hv, plus, minus, strict=True):
        fd = (p - m) / 2e-5
        assert torch.allclose(h, fd, rtol=1e-5, atol=1e-8), float((h - fd).abs().max())
    assert sum(float(h.abs().sum()) for h in hv) > 0


def _erase(model_dir, out, method, **settings):
    cls = get_method(method)
    concept = load_concept("circle")
    config = cls.Config(**{**cls.defaults(concept), **settings})
    config.validate()
    m = cls(config, concept, model_path=model_dir, progress=False)
    train(m, load_pipeline(model_dir), model_path=model_dir, out_dir=out, concept=concept,
          progress=False)  # fmt: skip
    return load_file(str(Path(out) / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("base", ["esd", "salun", "salun-replace"])
def test_lambda_zero_reduces_to_the_base_methods_gradient(base, tiny_model_dir, tmp_path):
    """λ = 0 and w_r = 0: one SGD step of ResAlign moves the weights exactly as the base method."""
    common = {"steps": 1, "optimizer": "sgd", "lr": 1e-2, "max_grad_norm": 0.0, "seed": 3,
              "batch_size": 2, "images_per_prompt": 1}  # fmt: skip
    if base == "esd":
        ref = _erase(
            tiny_model_dir,
            tmp_path / "base",
            "esd",
            variant="esd-u",
            ddim_steps=4,
            negative_guidance=1.0,  # η as ResAlign's default (the world preset of ESD uses 2)
            target="paper",  # ResAlign's default convention (the world preset uses the code's)
            **common,
        )
        trainable = {"trainable": "esd-u", "ddim_steps": 4}
    elif base == "salun-replace":
        # SalUn's world preset: per-image anchor prompts (circle -> square) on the world
        # renderer's images, the same in ResAlign's L_h
        relabel = {"surrogate_mode": "replace", "surrogate_replacement": "square",
                   "image_source": "world"}  # fmt: skip
        ref = _erase(tiny_model_dir, tmp_path / "base", "salun", alpha=0.0, mask_fraction=1.0,
                     **relabel, **common)  # fmt: skip
        base, trainable = "salun", {"trainable": "full", **relabel}
    else:
        # SalUn as ResAlign's base uses it: the concept's fixed surrogate and the original's
        # renders (SalUn's world preset relabels, on the world renderer's images)
        ref = _erase(tiny_model_dir, tmp_path / "base", "salun", alpha=0.0, mask_fraction=1.0,
                     surrogate_mode="fixed", image_source="original", **common)  # fmt: skip
        trainable = {"trainable": "full", "surrogate_mode": "fixed"}
    ours = _erase(tiny_model_dir, tmp_path / "resalign", "resalign", base=base, lam=0.0,
                  retain_weight=0.0, retain_weight_late=0.0, weight_decay=0.0,
                  **trainable, **common)  # fmt: skip
    before = load_file(str(Path(tiny_model_dir) / "unet" / "diffusion_pytorch_model.safetensors"))
    per_weight = "surrogate_replacement" not in trainable  # the relabelled anchor: see below
    moved, diff, size = 0, 0.0, 0.0
    for k in before:
        d_ref, d_ours = ref[k] - before[k], ours[k] - before[k]
        diff, size = diff + float((d_ours - d_ref).pow(2).sum()), size + float(d_ref.pow(2).sum())
        moved += int(d_ref.abs().max() > 0)
        if not per_weight:
            continue
        # atol: two float32 ulps of a weight near 1 (the deltas are differences of weights)
        assert torch.allclose(d_ours, d_ref, rtol=1e-3, atol=2.5e-7), k
    assert moved > 10
    # The relabelled anchor differs from the forget prompt by one word, so the residual
    # ε(c_f) − ε(c_anchor) is small and float32 summation order (SalUn's forward batches the
    # forget images with the retain ones) shows in it: 1e-3 of the update measured, where the
    # fixed surrogate in place of the anchor gives 4.3.
    assert (diff / size) ** 0.5 < 1e-2


def test_resalign_lora_run_logs_its_statistics_and_saves_a_loadable_lora(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from erasekit.lora import LORA_FILE

    out = tmp_path / "ra"
    _erase(tiny_model_dir, out, "resalign", steps=2, images_per_prompt=1, batch_size=2,
           meta_distribution=str(TINY_META), configs_per_step=2, trainable="lora",
           max_resilience_norm=1e9)  # fmt: skip
    log = [json.loads(ln) for ln in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        keys = ("g_theta_norm", "hypergrad_norm", "alpha", "retries", "fallbacks", "hvps",
                "inner_loss_first", "inner_loss_last", "L_h", "L_h_phi", "R", "w_r")  # fmt: skip
        for key in keys:
            assert key in r, key
        assert r["inner_steps"] == 4 and len(r["configs"].split(",")) == 2
        assert r["hvps"] >= 2 * 4  # K - 1 = 4 HVPs per configuration at least
        ratio = r["resilience_norm"] / r["g_theta_norm"]
        assert r["resilience_to_gradient"] == pytest.approx(ratio)
    assert [r["w_r"] for r in log] == [1.6, 2.0]  # w_r rises in the second half
    manifest = json.loads((out / "erasekit.json").read_text())
    outputs = manifest["training"]["outputs"]
    assert outputs["lora"] == LORA_FILE and outputs["totals"]["hvps"] >= 16
    assert manifest["training"]["data"]["meta_distribution"]["configs"][0]["name"] == "gd-full"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    pipe.load_lora_weights(str(out), weight_name=LORA_FILE)  # loads in plain diffusers


def test_bf16_mixed_precision_runs(tiny_model_dir, tmp_path):
    _erase(tiny_model_dir, tmp_path / "bf16", "resalign", steps=1, images_per_prompt=1,
           batch_size=1, meta_distribution=str(TINY_META), configs_per_step=1,
           mixed_precision="bf16", trainable="full", weight_decay=0.0)  # fmt: skip
    log = json.loads((tmp_path / "bf16" / "training_log.jsonl").read_text().splitlines()[0])
    assert torch.isfinite(torch.tensor(log["loss"])) and log["hvps"] >= 4


def test_meta_distribution_checks(tmp_path):
    concept = load_concept("red")
    from erasekit.methods.resalign import META_SD, META_WORLD

    sd = load_meta_distribution(META_SD, concept)
    lrs = [c.lr for c in sd.configs]
    steps = [c.steps for c in sd.configs]
    assert len(sd.configs) == 15 and min(lrs) == 1e-6 and max(lrs) == 1e-4
    assert min(steps) == 5 and max(steps) == 30
    assert {c.optimizer for c in sd.configs} == {"gd", "adam"}
    assert {c.mode for c in sd.configs} == {"lora", "full"}
    assert load_meta_distribution(META_WORLD, concept).configs
    # the benign set differs from the retain set the audit's fine-tuning attack uses
    assert concept.benign is not None and concept.benign.sha256 != concept.retain.sha256
    assert not set(concept.benign.prompts) & set(concept.retain.prompts)
    bad = {
        "configs:\n  - {name: a, optimizer: rmsprop}\n": "optimizer",
        "configs:\n  - {name: a, speed: 3}\n": "unknown key 'speed'",
        "configs: []\n": "non-empty",
        "configs:\n  - {name: a, data: elsewhere}\n": "unknown data set",
        "datasets:\n  mine: {prompts: world/red/retain.txt}\nconfigs:\n  - {data: mine}\n":
            "retain set",
        "configs:\n  - {name: a, lr: -1}\n": "lr must be > 0",
    }  # fmt: skip
    for text, fragment in bad.items():
        f = tmp_path / "meta.yaml"
        f.write_text(text)
        with pytest.raises(ErasekitError, match=fragment):
            load_meta_distribution(f, concept)
    bad_settings = (("base", "kl"), ("trainable", "everything"), ("lam", 2.0),
                    ("mixed_precision", "fp16"), ("alpha", 0.0))  # fmt: skip
    for key, value in bad_settings:
        with pytest.raises(ErasekitError):
            ResAlignConfig(**{key: value}).validate()


def test_cli_bad_resalign_settings_exit_2_without_output(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method",
                "resalign", "--out", str(out), "--set", "base=kl")  # fmt: skip
    assert_one_line_error(r, "base must be one of")
    r = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method",
                "resalign", "--out", str(out), "--set", "meta_distribution=/nope.yaml")  # fmt: skip
    assert_one_line_error(r, "not found")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.slow
def test_two_process_step_equals_one_process_with_accumulation(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes x 1 micro-step = 1 process x 2 micro-steps on the same
    data: the hypergradient (and every logged statistic) is averaged over the processes."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ERASEKIT_CACHE": str(tmp_path / "cache")}
    common = ["-m", "erasekit", "erase", "--model", str(tiny_model_dir), "--concept", "circle",
              "--method", "resalign", "--no-progress", "--set", "steps=2",
              "--set", "images_per_prompt=1", "--set", "batch_size=1",
              "--set", f"meta_distribution={TINY_META}", "--set", "configs_per_step=1",
              "--set", "trainable=full", "--set", "max_resilience_norm=1e9"]  # fmt: skip
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *common, "--out", str(tmp_path / "two")]  # fmt: skip
    one = [sys.executable, *common, "--set", "gradient_accumulation_steps=2",
           "--out", str(tmp_path / "one")]  # fmt: skip
    for cmd in (two, one):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    logs = {name: [json.loads(ln) for ln in (tmp_path / name / "training_log.jsonl")
                   .read_text().splitlines()] for name in ("one", "two")}  # fmt: skip
    for a, b in zip(logs["one"], logs["two"], strict=True):
        for key in ("loss", "hypergrad_norm", "L_h", "R", "inner_loss_last", "hvps"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert json.loads((tmp_path / "two" / "erasekit.json").read_text())["training"][
        "n_processes"] == 2  # fmt: skip
    before = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    w1, w2 = (load_file(str(tmp_path / n / "unet" / "diffusion_pytorch_model.safetensors"))
              for n in ("one", "two"))  # fmt: skip
    assert any(not torch.equal(before[k], w1[k]) for k in before)
    # float summation order differs (an all-reduce vs accumulation); AdamW's normalised step
    # turns that into at most a fraction of one step (lr 1e-4) on a few near-zero gradients
    off = sum(int(((w1[k] - w2[k]).abs() > 1e-6).sum()) for k in w1)
    assert off <= 1e-4 * sum(w.numel() for w in w1.values())
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=5e-5, rtol=0), k


def test_world_surrogate_mode_follows_the_concepts_dimension():
    """ResAlign over SalUn relabels styles on ShapesWorld (a fixed surrogate leaves the style),
    and keeps the fixed surrogate for colours and shapes (where its LoRA erases further)."""
    from erasekit.methods.resalign import ResAlign

    modes = {c: ResAlign.defaults(load_concept(c))["surrogate_mode"]
             for c in ("red", "circle", "outlined")}  # fmt: skip
    assert modes == {"red": "fixed", "circle": "fixed", "outlined": "replace"}
    from erasekit.api import erase_config

    # another base has no surrogate: its configuration records the default, not the world's
    assert erase_config("resalign", "outlined", {"base": "esd"}).surrogate_mode == "fixed"
    assert erase_config("resalign", "outlined", {"base": "salun"}).surrogate_mode == "replace"
