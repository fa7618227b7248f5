"""NegMerge: sign-consensus merge of fine-tuned copies' task vectors, negated with α."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.methods.negmerge import UNET_FILE, consensus_merge, merge_task_vectors
from tests.conftest import assert_one_line_error, run_main


def test_consensus_merge_on_hand_made_task_vectors():
    a = torch.tensor([1.0, -2.0, 3.0, 0.0, -1.0])
    b = torch.tensor([3.0, -4.0, -3.0, 1.0, -3.0])
    c = torch.tensor([2.0, -3.0, 1.0, 1.0, -2.0])
    # agree in sign: 0 (+), 1 (-), 4 (-); conflict: 2; a zero is no agreement: 3
    expected = torch.tensor([2.0, -3.0, 0.0, 0.0, -2.0])
    assert torch.equal(consensus_merge([a, b, c]), expected)
    assert torch.equal(consensus_merge([a]), a.where(a != 0, torch.zeros(())))


def _settings(**extra):
    return {"grid": "lr=1e-3;lr=2e-3,seed=1", "copy_steps": 2, "images_per_prompt": 1, **extra}


def test_negmerge_merges_streamed_copies_and_caches_each(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    out = erasekit.erase(tiny_model_dir, "circle", "negmerge", tmp_path / "a", cache_dir=cache,
                         settings=_settings(alpha=1.5), progress=False)  # fmt: skip
    copies = sorted((cache / "negmerge").iterdir())
    assert len(copies) == 2
    base = load_file(str(tiny_model_dir / UNET_FILE))
    merged, info = merge_task_vectors(tiny_model_dir, copies)
    tensors = [load_file(str(c / UNET_FILE)) for c in copies]
    after = load_file(str(out / UNET_FILE))
    for name, theta0 in base.items():  # the streamed merge equals the in-memory rule
        tau = consensus_merge([t[name] - theta0 for t in tensors])
        assert torch.equal(merged[name], tau)
        expected = (theta0.double() - 1.5 * tau.double()).float()
        assert torch.allclose(after[name], expected, atol=1e-7), name
    assert 0 < info["surviving_fraction"] < 1
    details = json.loads((out / "negmerge.json").read_text())
    assert details["alpha"] == 1.5 and details["n_copies"] == 2
    assert set(details["surviving_fraction_per_tensor"]) == set(base)
    # a third copy in the grid trains only that copy
    stamps = {c.name: os.stat(c / UNET_FILE).st_mtime_ns for c in copies}
    erasekit.erase(tiny_model_dir, "circle", "negmerge", tmp_path / "b", progress=False,
                   settings=_settings(alpha=1.5, grid="lr=1e-3;lr=2e-3,seed=1;lr=5e-4"),
                   cache_dir=cache)  # fmt: skip
    again = sorted((cache / "negmerge").iterdir())
    assert len(again) == 3
    assert all(os.stat(c / UNET_FILE).st_mtime_ns == stamps[c.name] for c in copies)


def test_negmerge_chooses_alpha_by_the_rule(tiny_model_dir, tmp_path):
    out = erasekit.erase(tiny_model_dir, "circle", "negmerge", tmp_path / "a",
                         settings=_settings(alphas="0.5,1", eval_per_prompt=1),
                         cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    details = json.loads((out / "negmerge.json").read_text())
    search = details["alpha_search"]
    assert search[0]["role"] == "original" and [r["alpha"] for r in search[1:3]] == [0.5, 1.0]
    floor = 0.95 * search[0]["retain"]
    eligible = [r for r in search[1:3] if r["retain"] >= floor]
    if eligible:
        assert details["alpha"] == min(eligible, key=lambda r: (r["forget"], r["alpha"]))["alpha"]
    else:
        assert details["alpha"] == 0.5 and "no alpha kept" in search[-1]["note"]
    # the chosen α's validation row, as a study tabulates it (outputs: [validated.forget])
    assert details["validated"] == next(r for r in search[1:3] if r["alpha"] == details["alpha"])


def test_bad_negmerge_settings_are_one_line(tiny_model_dir, tmp_path, capsys):
    base = ["erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method",
            "negmerge", "--out", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    cases = [
        (["--set", "grid= ; "], "grid is empty"),
        (["--set", "alpha=-1"], "alpha must be >= 0"),
        (["--set", "alphas=0,1"], "alphas must be positive"),
        (["--set", "grid=lr=1e-3,colour=red"], "is not key=value with a key"),
        (["--set", "steps=4"], "steps must be 0"),
    ]
    for extra, fragment in cases:
        assert_one_line_error(run_main(capsys, *base, *extra), fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_negmerge_on_two_processes_gives_the_one_process_merge(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes: each copy trains data-parallel (batch 1 per process =
    one process's batch 2), the alpha search renders together and finds the same table."""
    from tests.conftest import one_and_two_processes

    args = ["erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method",
            "negmerge", "--no-progress", "--set", "copy_steps=2", "--set",
            "images_per_prompt=1", "--set", "alphas=0.5,1", "--set",
            "eval_per_prompt=1"]  # fmt: skip
    # the copies train with SGD: Adam's first steps (about lr x sign(g)) would turn float
    # rounding into whole steps, and the sign consensus into different survivors
    sgd = ["--set", "grid=lr=0.5,optimizer=sgd;lr=1.0,seed=1,optimizer=sgd"]
    one, two = one_and_two_processes([*args, *sgd], ["--set", "copy_batch_size=2"],
                                     ["--set", "copy_batch_size=1"], tmp_path)  # fmt: skip
    details = [json.loads((f / "negmerge.json").read_text()) for f in (one, two)]
    assert details[0]["alpha_search"] == details[1]["alpha_search"]
    assert details[0]["alpha"] == details[1]["alpha"]
    file = "unet/diffusion_pytorch_model.safetensors"
    before, w1, w2 = (load_file(str(f / file)) for f in (tiny_model_dir, one, two))
    assert any(not torch.equal(before[k], w1[k]) for k in before)
    off = sum(int(((w1[k] - w2[k]).abs() > 1e-5).sum()) for k in w1)
    assert off <= 1e-3 * sum(w.numel() for w in w1.values()), off
