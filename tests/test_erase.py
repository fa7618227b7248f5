"""Erasure: the shared training loop, ESD, SalUn, concept data and `erasekit erase`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit.concepts import load_concept
from erasekit.config import build_config
from erasekit.errors import ErasekitError
from erasekit.methods import METHODS, get_method
from erasekit.models import load_pipeline
from erasekit.training import epoch_indices, train
from tests.conftest import assert_one_line_error, run_cli, run_main

# Small settings every method accepts: a few steps on tiny data.
FAST = {"steps": 3, "images_per_prompt": 1, "batch_size": 2}
FAST_METHOD = {
    "mace": {"steps_per_concept": 2, "images_per_concept": 2, "lam": 1.0},
    "advunlearn": {"warmup": 1, "attack_steps": 2, "ddim_steps": 4, "retain_batch": 2},
    "esd": {"ddim_steps": 4},
    "salun": {"mask_batch_size": 4},
    "negmerge": {"grid": "lr=1e-3;lr=2e-3,seed=1", "copy_steps": 2, "alpha": 1.0},
    "resalign": {
        "configs_per_step": 1,
        "meta_distribution": str(Path(__file__).parent / "data" / "resalign-tiny-meta.yaml"),
    },
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def erase(model_dir, out, method="salun", concept="circle", resume=None, **settings):
    if method == "negative-embedding":  # the tiny model has no base model to render with
        settings.setdefault("original", str(model_dir))
    values = {**FAST, **FAST_METHOD.get(method, {}), **settings}
    if get_method(method).closed_form:  # no training steps to set
        values = {k: v for k, v in values.items() if k not in ("steps", "checkpointing_steps")}
    return erasekit.erase(model_dir, concept, method, out, settings=values, resume=resume,
                          progress=False)  # fmt: skip


def unet_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_vpred_dir"])
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_and_writes_a_loadable_model(method, model, request, tmp_path):
    """Every method on the ε-prediction (SD-1 style) and v-prediction (SD-2 style) tiny
    pipelines."""
    tiny_model_dir = request.getfixturevalue(model)
    out = erase(tiny_model_dir, tmp_path / "out", method=method)
    manifest = json.loads((out / "erasekit.json").read_text())
    if get_method(method).closed_form:  # an edit: no optimizer step of its own, no log
        assert manifest["training"]["steps"] == 0 and manifest["training"]["log"] is None
    else:
        log = [json.loads(ln) for ln in (out / "training_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3]
        assert all(np.isfinite(r["loss"]) for r in log)
    assert manifest["method"]["name"] == method
    assert manifest["concept"]["name"] == "circle"
    assert manifest["base_model"]["sha256"]
    before, after = unet_weights(tiny_model_dir), unet_weights(out)
    if method == "negative-embedding":  # trains a token embedding; the weights stay as given
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert load_pipeline(out).erasekit_guidance.concept == "<negative-concept>"
    elif method == "advunlearn":  # the text encoder alone, a plain CLIPTextModel
        from transformers import CLIPTextModel

        assert all(torch.equal(before[k], after[k]) for k in before)
        text = "text_encoder/model.safetensors"
        a, b = load_file(str(tiny_model_dir / text)), load_file(str(out / text))
        changed = {k for k in a if not torch.equal(a[k], b[k])}
        assert changed and not any("embeddings" in k for k in changed)
        CLIPTextModel.from_pretrained(out / "text_encoder")
    else:
        assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (out / "checkpoints").exists()
    load_pipeline(out)  # loads back


@pytest.mark.parametrize("method", [m for m in METHODS.names() if get_method(m).runs_on_sdxl])
def test_sdxl_methods_train_the_sdxl_unet(method, tiny_sdxl_dir, tmp_path):
    """The methods that run on SDXL (the rest refuse: tests/test_models.py) train its U-Net
    through the packed conditions and write a folder that loads as SDXL."""
    out = erase(tiny_sdxl_dir, tmp_path / "out", method=method, variant="esd-x") \
        if method == "esd" else erase(tiny_sdxl_dir, tmp_path / "out", method=method)  # fmt: skip
    before, after = unet_weights(tiny_sdxl_dir), unet_weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed
    if method == "esd":  # esd-x: cross-attention only
        assert all(".attn2." in k for k in changed)
    assert type(load_pipeline(out)).__name__ == "StableDiffusionXLPipeline"


def test_salun_changes_no_masked_out_weight_and_mask_has_its_density(tiny_model_dir, tmp_path):
    from erasekit.methods.salun import MASK_FILE, load_mask

    out = erase(tiny_model_dir, tmp_path / "out", mask_fraction=0.3, steps=4, lr=1e-3)
    masks, info = load_mask(out / MASK_FILE)
    n = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept / n - 0.3) < 1e-3 and abs(info["density"] - 0.3) < 1e-3
    before, after = unet_weights(tiny_model_dir), unet_weights(out)
    changed = 0
    for name, mask in masks.items():
        assert torch.equal(before[name][~mask], after[name][~mask]), name
        changed += int((before[name][mask] != after[name][mask]).sum())
    assert changed > 0.5 * kept  # the salient weights did train
    size = (out / MASK_FILE).stat().st_size
    assert size < n / 8 + 60_000  # one bit per weight plus the header (names, shapes)


def test_salun_reuses_a_saved_mask(tiny_model_dir, tmp_path):
    from erasekit.methods.salun import MASK_FILE, load_mask

    first = erase(tiny_model_dir, tmp_path / "a", mask_fraction=0.2)
    cls = get_method("salun")
    c = load_concept("circle")
    config = cls.Config(**{**cls.defaults(c), **FAST, "mask_fraction": 0.9})
    pipe = load_pipeline(tiny_model_dir)
    m = cls(config, c, model_path=tiny_model_dir, progress=False, mask=first / MASK_FILE)
    second = train(m, pipe, model_path=tiny_model_dir, out_dir=tmp_path / "b", progress=False)
    a, _ = load_mask(first / MASK_FILE)
    b, info = load_mask(second / MASK_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info["reused_from"].endswith(MASK_FILE)


@pytest.mark.parametrize(
    ("variant", "trained"),
    [
        ("esd-x", lambda n: ".attn2." in n),
        ("esd-x-strict", lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n),
        ("esd-u", lambda n: ".attn2." not in n and "norm" not in n),
        ("esd-u-all", lambda n: ".attn2." not in n),
    ],
)
def test_esd_variants_change_only_their_parameters(variant, trained, tiny_model_dir, tmp_path):
    out = erase(tiny_model_dir, tmp_path / "out", method="esd", variant=variant, lr=1e-3)
    before, after = unet_weights(tiny_model_dir), unet_weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(trained(k) for k in changed), sorted(changed)[:5]
    assert any(trained(k) for k in changed)


def trained_tensors(folder) -> dict[str, torch.Tensor]:
    """What a run trained: the U-Net and the text encoder (immunize trains both), or the
    learned embedding of negative-embedding."""
    embedding = Path(folder) / "learned_embeds.safetensors"
    if embedding.is_file():
        return load_file(str(embedding))
    text = load_file(str(Path(folder) / "text_encoder" / "model.safetensors"))
    return {**unet_weights(folder), **{f"text_encoder.{k}": v for k, v in text.items()}}


# Closed-form methods (UCE, NegMerge) run no optimizer step of their own: nothing to resume,
# so they are not rows here (no row that always skips).
RESUMABLE = [m for m in METHODS.names() if not get_method(m).closed_form]


@pytest.mark.parametrize(("method", "extra"), [(m, {}) for m in RESUMABLE]
                         + [("esd", {"teacher_reuse": 3})])  # resumed inside a group  # fmt: skip
def test_resume_after_interruption_equals_an_uninterrupted_run(
    method, extra, tiny_model_dir, tmp_path, monkeypatch
):
    cls = get_method(method)
    settings = {"method": method, "steps": 4, "checkpointing_steps": 2, "lr": 1e-3, **extra}
    whole = erase(tiny_model_dir, tmp_path / "whole", **settings)

    original = cls.loss

    def interrupted(self, ctx, micro):
        if ctx.step == 3:  # the 4th step, after checkpoint-2 was saved
            raise KeyboardInterrupt
        return original(self, ctx, micro)

    monkeypatch.setattr(cls, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        erase(tiny_model_dir, tmp_path / "resumed", **settings)
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / ".resumed.partial" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(cls, "loss", original)
    resumed = erase(tiny_model_dir, tmp_path / "resumed", resume="latest", **settings)
    a, b = trained_tensors(whole), trained_tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [
        json.loads(ln)["step"] for ln in (resumed / "training_log.jsonl").read_text().splitlines()
    ]
    assert log == [1, 2, 3, 4]
    manifest = json.loads((resumed / "erasekit.json").read_text())
    assert manifest["training"]["resumed_from"] == "checkpoint-2"


def test_gradient_accumulation_equals_the_larger_batch(tiny_model_dir, tmp_path):
    """SalUn: 2 accumulated micro-batches of 4 give the weights of one batch of 8 (the same
    items, and per-item noise and timesteps). SGD, so float rounding is not amplified as
    Adam's first step (≈ lr · sign(g)) would."""
    common = {"steps": 2, "images_per_prompt": 2, "lr": 0.5, "optimizer": "sgd"}
    big = erase(tiny_model_dir, tmp_path / "b8", batch_size=8, **common)
    acc = erase(tiny_model_dir, tmp_path / "b4x2", batch_size=4, gradient_accumulation_steps=2,
                **common)  # fmt: skip
    before, a, b = unet_weights(tiny_model_dir), unet_weights(big), unet_weights(acc)
    assert any(not torch.equal(a[k], before[k]) for k in a), "the runs trained"
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - before[k]).abs().max()) for k in a)
    assert worst < 1e-5 * max(1.0, moved), (worst, moved)


def test_checkpoint_total_limit_keeps_the_newest(tiny_model_dir, tmp_path):
    out = erase(tiny_model_dir, tmp_path / "out", method="esd", steps=5, checkpointing_steps=1,
                checkpoints_total_limit=2, keep_checkpoints=True)  # fmt: skip
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-3", "checkpoint-4"]
    assert (out / "checkpoints" / "checkpoint-4" / "unet" / "config.json").is_file()


def test_epoch_indices_visit_every_item_once_per_epoch():
    first = epoch_indices(10, seed=0, start=0, count=10)
    assert sorted(first.tolist()) == list(range(10))
    stream = epoch_indices(10, seed=0, start=0, count=30)
    for e in range(3):
        assert sorted(stream[10 * e : 10 * e + 10].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])  # reshuffled each epoch
    assert torch.equal(epoch_indices(10, 0, 7, 9), stream[7:16])  # resumable at any position


def test_top_fraction_threshold_matches_an_exact_sort():
    from erasekit.methods.salun import masks_from_saliency, top_fraction_threshold

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g).abs() ** 3 for n in (1000, 5000, 37)]
    everything = torch.cat(tensors)
    for fraction in (0.01, 0.3, 0.5, 0.99):
        k = int(np.ceil(fraction * everything.numel()))
        exact = everything.sort(descending=True).values[k - 1]
        assert top_fraction_threshold(tensors, fraction, bins=16, exact_below=50) == exact
    masks, info = masks_from_saliency({"a": torch.zeros(10), "b": torch.arange(10.0)}, 0.8)
    assert not masks["a"].any()  # zero saliency is never salient
    assert info["density"] == 0.45


def test_config_layers_and_unknown_keys(tmp_path):
    cls = get_method("salun")
    file = tmp_path / "c.yaml"
    file.write_text("lr: 2.0e-5\nepochs: 2\n")
    config = build_config(
        cls.Config, {"alpha": 0.1}, file, ["epochs=3", "gradient_checkpointing=true"]
    )
    assert (config.lr, config.epochs, config.alpha, config.gradient_checkpointing) == (
        2e-5, 3, 0.1, True)  # fmt: skip
    with pytest.raises(ErasekitError, match="unknown config key 'alpah'.*alpha.*valid keys"):
        build_config(cls.Config, sets=["alpah=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense: 1\n")
    with pytest.raises(ErasekitError, match=r"'nonsense' in .*bad.yaml"):
        build_config(cls.Config, file=bad)
    with pytest.raises(ErasekitError, match="expected a whole number"):
        build_config(cls.Config, sets=["epochs=two"])
    with pytest.raises(ErasekitError, match="variant must be one of"):
        build_config(get_method("esd").Config, sets=["variant=esd-z"])


def test_rendered_data_is_cached_and_image_folders_are_read(tiny_model_dir, tiny_pipe, tmp_path):
    from erasekit.concepts import prompt_set_from_list
    from erasekit.data import read_image_folder, render_image_set

    prompts = prompt_set_from_list(["a red circle", "a blue square"])
    first = render_image_set(tiny_pipe, tiny_model_dir, prompts, n_per_prompt=2,
                             cache_dir=tmp_path / "c", progress=False)  # fmt: skip
    again = render_image_set(tiny_pipe, tiny_model_dir, prompts, n_per_prompt=2,
                             cache_dir=tmp_path / "c", progress=False)  # fmt: skip
    other = render_image_set(tiny_pipe, tiny_model_dir, prompts, n_per_prompt=2, seed=1,
                             cache_dir=tmp_path / "c", progress=False)  # fmt: skip
    assert len(first) == 4 and not first.source["cache_hit"] and again.source["cache_hit"]
    assert again.paths == first.paths and other.paths[0].parent != first.paths[0].parent
    assert first.prompts == ["a red circle"] * 2 + ["a blue square"] * 2
    # A run that finds the entry filled by another run when it finishes keeps the other's.
    from erasekit.data import _render_into_cache
    from erasekit.sampling import SamplerSettings

    entry = first.paths[0].parent.parent
    stamp = (entry / "samples.jsonl").stat().st_mtime_ns
    _render_into_cache(tiny_pipe, prompts, entry, tiny_model_dir,
                       SamplerSettings.for_model(tiny_model_dir), 2, 0, 16, False)  # fmt: skip
    assert (entry / "samples.jsonl").stat().st_mtime_ns == stamp
    assert not list(entry.parent.glob("*.run-*"))  # the late run's own folder is gone

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(first.paths):
        (folder / f"{i}.png").write_bytes(p.read_bytes())
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "prompt": f"p{i}"}) + "\n" for i in range(4))
    )
    s = read_image_folder(folder)
    assert s.prompts == ["p0", "p1", "p2", "p3"] and s.source["origin"] == "folder"
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a cat\n9.png,a dog\n")
    with pytest.raises(ErasekitError, match="missing image: 9.png"):
        read_image_folder(folder)
    with pytest.raises(ErasekitError, match="not found"):
        read_image_folder(tmp_path / "nope")


def test_salun_trains_on_a_user_image_folder(tiny_model_dir, tiny_pipe, tmp_path):
    from erasekit.concepts import prompt_set_from_list
    from erasekit.data import render_image_set

    folders = {}
    for split, prompts in (("forget", ["a circle"] * 2), ("retain", ["a square"] * 2)):
        s = render_image_set(tiny_pipe, tiny_model_dir, prompt_set_from_list(prompts),
                             n_per_prompt=1, cache_dir=tmp_path / "c", progress=False)  # fmt: skip
        folders[split] = tmp_path / split
        folders[split].mkdir()
        rows = []
        for i, p in enumerate(s.paths):
            (folders[split] / f"{i}.png").write_bytes(p.read_bytes())
            rows.append(f"{i}.png,{s.prompts[i]}\n")
        (folders[split] / "metadata.csv").write_text("file_name,prompt\n" + "".join(rows))
    cls = get_method("salun")
    c = load_concept("circle")
    m = cls(cls.Config(**FAST), c, model_path=tiny_model_dir, progress=False,
            forget_images=folders["forget"], retain_images=folders["retain"])  # fmt: skip
    out = train(m, load_pipeline(tiny_model_dir), model_path=tiny_model_dir,
                out_dir=tmp_path / "out", progress=False)  # fmt: skip
    data = json.loads((out / "erasekit.json").read_text())["training"]["data"]
    assert data["forget"]["origin"] == "folder" and data["forget"]["n_images"] == 2


# --- the command -----------------------------------------------------------------------------


def _erase_cli(model, out, *extra, env=None):
    return run_cli("erase", "--model", str(model), "--concept", "circle", "--out", str(out),
                   "--no-progress", *extra, env=env)  # fmt: skip


def test_cli_erases_and_bad_inputs_exit_2_without_output(tiny_model_dir, tmp_path, capsys):
    env = {"ERASEKIT_CACHE": str(tmp_path / "cache")}
    ok = _erase_cli(tiny_model_dir, tmp_path / "ok", "--method", "salun", "--set", "steps=2",
                    "--set", "images_per_prompt=1", env=env)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "ok" / "salun_mask.safetensors").is_file()

    def cli(model, out, *extra):  # the same entry point, in this process
        return run_main(capsys, "erase", "--model", str(model), "--concept", "circle", "--out",
                        str(out), "--no-progress", *extra)  # fmt: skip

    r = cli(tiny_model_dir, tmp_path / "a", "--method", "esdd")
    assert_one_line_error(r, "unknown method 'esdd'", "esd")
    r = cli(tiny_model_dir, tmp_path / "b", "--method", "esd", "--set", "etaa=2")
    assert_one_line_error(r, "unknown config key 'etaa'", "negative_guidance")
    r = cli(tiny_model_dir, tmp_path / "c", "--method", "esd", "--set", "steps=3",
            "--set", "ddim_steps=2", "--set", "lr=1e30", "--set", "max_grad_norm=0",
            "--set", "checkpointing_steps=1")  # fmt: skip
    assert_one_line_error(r, "loss became", "last good checkpoint", "checkpoint-1")
    r = cli(tmp_path / "missing", tmp_path / "d", "--method", "esd")
    assert_one_line_error(r, "model path not found")
    for name in "abcd":
        assert not (tmp_path / name).exists()
    assert (tmp_path / ".c.partial" / "checkpoints" / "checkpoint-1").is_dir()


LOOP = ["steps=2", "checkpointing_steps=1", "batch_size=2"]
TWO_PROCESS = {
    "salun": [*LOOP, "images_per_prompt=1"],
    # the text encoder under DDP, the inner attack on the unwrapped encoder
    "advunlearn": [*LOOP, "warmup=1", "attack_steps=2", "ddim_steps=4", "retain_batch=2"],
    # closed form on every process, the validation renders shared between them
    "rece": ["epochs=2", "validation_steps=2"],
}


@pytest.mark.parametrize("method", list(TWO_PROCESS))
def test_two_process_cpu_run_with_torchrun(method, tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ERASEKIT_CACHE": str(tmp_path / "cache")}
    extra = [a for s in TWO_PROCESS[method] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "erasekit", "erase", "--model", str(tiny_model_dir), "--concept", "circle",
           "--method", method, "--out", str(tmp_path / "two"), "--no-progress",
           *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "erasekit.json").read_text())
    assert manifest["training"]["n_processes"] == 2
    if get_method(method).closed_form:  # both processes chose the same round
        rates = [e["validation_rate"] for e in manifest["training"]["outputs"]["epochs"]]
        assert len(rates) == 2 and not (tmp_path / "two" / ".rece-validation").exists()
        return
    assert manifest["training"]["global_batch"] == 4
    assert len((tmp_path / "two" / "training_log.jsonl").read_text().splitlines()) == 2


def test_salun_anchor_prompts_replace_the_concept_word(tiny_model_dir):
    cls = get_method("salun")
    m = cls(cls.Config(surrogate_mode="replace"), load_concept("red"), model_path=tiny_model_dir)
    assert m.anchor_prompts(["a red circle", "a picture of a Red square"]) == [
        "a circle",
        "a picture of a square",
    ]
    with pytest.raises(ErasekitError, match="lacks 'red'"):
        m.anchor_prompts(["a crimson circle"])


def test_bf16_saliency_gives_nearly_the_fp32_mask(tiny_model_dir, tmp_path):
    from erasekit.methods.salun import MASK_FILE, load_mask

    a, _ = load_mask(erase(tiny_model_dir, tmp_path / "a", steps=1) / MASK_FILE)
    b, _ = load_mask(erase(tiny_model_dir, tmp_path / "b", steps=1, saliency_dtype="bf16")
                     / MASK_FILE)  # fmt: skip
    agree = sum(int((a[k] == b[k]).sum()) for k in a) / sum(m.numel() for m in a.values())
    assert agree > 0.97


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "esd", "mixed_precision": "bf16"},
        {"method": "salun", "gradient_checkpointing": True, "gradient_accumulation_steps": 2},
        {"method": "salun", "lr_scheduler": "cosine", "lr_warmup_steps": 1, "optimizer": "adamw"},
    ],
)
def test_loop_options_run(settings, tiny_model_dir, tmp_path):
    out = erase(tiny_model_dir, tmp_path / "out", **settings)
    log = [json.loads(ln) for ln in (out / "training_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(np.isfinite(r["loss"]) for r in log)
    if settings.get("lr_scheduler") == "cosine":
        assert log[0]["lr"] != log[-1]["lr"]
    config = json.loads((out / "erasekit.json").read_text())["method"]["config"]
    assert all(config[k] == v for k, v in settings.items() if k != "method")


def test_faster_step_settings_train_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch,
                                                        capsys):  # fmt: skip
    """channels-last memory and the fused optimizer kernel change no result beyond float
    rounding; compile compiles the trained U-Net and ESD's frozen teacher in place with the
    asked mode (its result on the world model: README, not run here: a CPU compile takes
    minutes); a job with a double backward (ResAlign) refuses compile."""
    common = {"method": "esd", "steps": 2, "lr": 0.5, "optimizer": "sgd"}  # see above
    plain = unet_weights(erase(tiny_model_dir, tmp_path / "plain", **common))
    fast = unet_weights(erase(tiny_model_dir, tmp_path / "fast", channels_last=True,
                              fused_optimizer=True, **common))  # fmt: skip
    before = unet_weights(tiny_model_dir)
    moved = max(float((plain[k] - before[k]).abs().max()) for k in plain)
    worst = max(float((plain[k] - fast[k]).abs().max()) for k in plain)
    assert moved > 1e-4 and worst < 1e-5 * max(1.0, moved), (worst, moved)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compiled.append((type(self).__name__, kw)))  # fmt: skip
    erase(tiny_model_dir, tmp_path / "compiled", compile="max-autotune", **common)
    assert compiled == [("UNet2DConditionModel", {"mode": "max-autotune"})] * 2
    r = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "circle",
                 "--out", str(tmp_path / "r"), "--method", "resalign", "--set",
                 "compile=default")  # fmt: skip
    assert_one_line_error(r, "torch.compile does not support")
    assert not (tmp_path / "r").exists()


def test_a_run_that_fails_before_any_checkpoint_leaves_nothing(tiny_model_dir, tmp_path):
    r = _erase_cli(tiny_model_dir, tmp_path / "x", "--method", "esd", "--set", "steps=2",
                   "--set", "ddim_steps=2", "--set", "lr=1e30", "--set", "max_grad_norm=0",
                   env={"ERASEKIT_CACHE": str(tmp_path / "cache")})  # fmt: skip
    assert_one_line_error(r, "loss became")
    assert not (tmp_path / "x").exists() and not (tmp_path / ".x.partial").exists()


def test_esd_target_conventions_on_hand_made_tensors():
    """paper: ε_u − η(ε_c − ε_u); diffusers-code: ε_c − η(ε_c − ε_u), i.e. its η = paper's η + 1."""
    from erasekit.methods.esd import esd_target

    e_u, e_c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(esd_target(e_u, e_c, 2.0, "paper"), torch.tensor([-3.0, -7.0]))
    assert torch.equal(esd_target(e_u, e_c, 2.0, "diffusers-code"), torch.tensor([-1.0, -4.5]))
    assert torch.equal(esd_target(e_u, e_c, 3.0, "diffusers-code"),
                       esd_target(e_u, e_c, 2.0, "paper"))  # fmt: skip


def test_esd_teacher_reuse_hands_out_the_stops_of_one_trajectory(tiny_pipe):
    """teacher_reuse k: k stop indices, one trajectory to the deepest; each x_t is the partial
    sample the reference would draw from the same initial noise, for max(stops) teacher
    passes instead of sum(stops)."""
    from types import SimpleNamespace

    from erasekit.methods.esd import ESDConfig, ESDTeacher

    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.inner = unet

        @property
        def dtype(self):
            return self.inner.dtype

        def forward(self, *args):
            calls.append(1)
            return self.inner(*args)

    teacher = ESDTeacher(Counting(tiny_pipe.unet), ddim_steps=10, sample_guidance=3.0,
                         negative_guidance=1.0, convention="paper")  # fmt: skip
    cond = torch.randn(2, 77, tiny_pipe.text_encoder.config.hidden_size)
    ctx = SimpleNamespace(pipe=tiny_pipe, device=torch.device("cpu"),
                          empty_cond=torch.zeros_like(cond[:1]))  # fmt: skip
    pairs = teacher.partial_samples(ctx, cond, torch.Generator().manual_seed(5), k=4)
    draws = torch.Generator().manual_seed(5)
    stops = [int(torch.randint(0, 10, (1,), generator=draws)) for _ in range(4)]
    assert len(pairs) == 4 and len(set(stops)) > 1 and len(calls) == max(stops)
    for j, (x_t, t) in enumerate(pairs):
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):  # the same draws before the initial noise
            torch.randint(0, 10, (1,), generator=gen)
        teacher.fixed_stop = stops[j]
        x_ref, t_ref = teacher.partial_sample(ctx, cond, gen)
        teacher.fixed_stop = None
        assert torch.equal(t, t_ref) and torch.allclose(x_t, x_ref, atol=1e-6), j
    with pytest.raises(ErasekitError, match="teacher_reuse must be between 1 and ddim_steps"):
        ESDConfig(teacher_reuse=51).validate()


def test_esd_u_trains_the_codes_set_and_presets_name_their_source(tiny_pipe):
    from erasekit.methods.esd import ESD, esd_parameters

    unet = tiny_pipe.unet
    code = dict(esd_parameters(unet, "esd-u"))
    every = dict(esd_parameters(unet, "esd-u-all"))
    norms = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.GroupNorm,
             torch.nn.LayerNorm))}  # fmt: skip
    assert code and not any(n.rsplit(".", 1)[0] in norms for n in code)
    assert set(every) - set(code) and all(".attn2." not in n for n in every)
    assert ESD.preset("diffusers-code")["target"] == "diffusers-code"
    assert ESD.preset("diffusers-code")["max_grad_norm"] == 0.0
    assert ESD.preset("paper")["negative_guidance"] == 1.0
    with pytest.raises(ErasekitError, match="no preset 'nope'"):
        ESD.preset("nope")
    world = ESD.defaults(load_concept("red"))
    assert world["target"] == "diffusers-code" and world["negative_guidance"] == 3.0


def test_world_images_for_training_data(tiny_model_dir, tmp_path):
    """image_source=world trains on the world renderer's images of the concept's prompts
    (recorded in the manifest); a concept outside ShapesWorld is refused before any work."""
    out = erase(tiny_model_dir, tmp_path / "w", image_source="world", steps=1)
    data = json.loads((out / "erasekit.json").read_text())["training"]["data"]
    assert data["forget"]["origin"].startswith("ShapesWorld renderer")
    assert data["retain"]["n_images"] == len(load_concept("circle").retain.prompts)
    with pytest.raises(ErasekitError, match="image_source=world needs a ShapesWorld concept"):
        erase(tiny_model_dir, tmp_path / "n", concept="nudity", image_source="world")
    assert not (tmp_path / "n").exists()


def test_no_job_config_redefines_a_loop_setting():
    """A job's config may change a shared loop setting's default, never its meaning (type)."""
    import dataclasses

    from erasekit.attacks.finetune import FinetuneConfig
    from erasekit.inversion import InversionConfig
    from erasekit.training import TrainConfig

    loop = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    configs = [get_method(n).Config for n in METHODS.names()] + [FinetuneConfig, InversionConfig]
    for config in configs:
        for f in dataclasses.fields(config):
            assert f.name not in loop or f.type == loop[f.name], (config.__name__, f.name)


def test_v_prediction_targets_are_velocities_not_noise():
    """Where the model predicts v, the losses' targets are v = √ᾱ·ε − √(1−ᾱ)·x0: the shared
    loop's denoising target and UnlearnDiffAtk's loss (a stub U-Net that outputs exactly v has
    zero loss; the same stub scored against ε would not)."""
    from types import SimpleNamespace

    from erasekit.attacks.unlearndiffatk import denoising_loss
    from erasekit.training import TrainContext
    from erasekit.world.build import build_scheduler

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    for kind in ("v_prediction", "epsilon"):
        sched = build_scheduler(prediction_type=kind)
        ctx = TrainContext(accelerator=None, unet=None, pipe=None, config=None, data={},
                           empty_cond=None, noise_scheduler=sched, weight_dtype=torch.float32,
                           device=torch.device("cpu"), work_dir=Path("."))  # fmt: skip
        target = ctx.denoising_target(x0, noise, t)
        expected = sched.get_velocity(x0, noise, t) if kind == "v_prediction" else noise
        assert torch.allclose(target, expected)
        a = sched.alphas_cumprod[700].sqrt()
        s = (1 - sched.alphas_cumprod[700]).sqrt()
        v = a * noise - s * x0

        def unet(x, tt, cond, _v=v):  # outputs exactly v at t = 700
            return SimpleNamespace(sample=_v)

        unet.dtype = torch.float32
        loss = denoising_loss(unet, sched, torch.zeros(2, 77, 32), x0, 700, noise)
        if kind == "v_prediction":
            assert float(loss.max()) < 1e-10
            assert not torch.allclose(target, noise)
        else:
            assert float(loss.min()) > 1e-3


def test_esd_moves_the_concept_prediction_away_from_the_concept(tiny_model_dir, tmp_path):
    """ESD by its effect, not its helper: after training, the erased U-Net's prediction for the
    concept prompt has moved against the original's guidance direction ε_c − ε_u (towards
    ε_u − η(ε_c − ε_u)). Guidance wired backwards (e_u and e_c swapped) moves it along it."""
    from erasekit.training import encode_prompts

    out = erase(tiny_model_dir, tmp_path / "out", method="esd", steps=6, lr=1e-3, batch_size=2,
                negative_guidance=2.0, variant="esd-u-all")  # fmt: skip
    before, after = load_pipeline(tiny_model_dir), load_pipeline(out)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = encode_prompts(before, ["a circle"] * 8)
        empty = encode_prompts(before, [""] * 8)
        latent = before.unet.config.sample_size
        x = torch.randn(8, before.unet.config.in_channels, latent, latent, generator=gen)
        t = torch.randint(50, 950, (8,), generator=gen)
        e_c, e_u = (before.unet(x, t, c).sample for c in (cond, empty))
        moved = after.unet(x, t, cond).sample - e_c
    along = float((moved * (e_c - e_u)).sum()) / float((e_c - e_u).pow(2).sum())
    assert along < -0.05, along  # backwards guidance gives a positive projection
