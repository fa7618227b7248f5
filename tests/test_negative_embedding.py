"""`erase --method negative-embedding`: a defended folder (unchanged weights + c* + guidance)
that steers the world model away from the concept, loads in plain diffusers, transfers to
another model, is audited with its guidance baselines; bad settings are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import assert_one_line_error, run_main


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


def _forget_rate(folder, concept, tmp_path, name: str) -> float:
    from erasekit.detectors import DetectorOptions
    from erasekit.evaluation import build_judges, evaluate_prompt_set
    from erasekit.models import load_pipeline
    from erasekit.sampling import SamplerSettings

    judges = build_judges(concept, DetectorOptions())
    samples = evaluate_prompt_set(load_pipeline(folder), concept.forget, tmp_path, name, judges,
                                  model_path=None, settings=SamplerSettings.for_model(folder),
                                  n_per_prompt=1, seed=0, batch_size=16)  # fmt: skip
    proto = judges.protocols[0].name
    return sum(s["flags"][proto] for s in samples) / len(samples)


def test_negative_embedding_defends_the_world_model_and_transfers(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from erasekit.concepts import load_concept
    from erasekit.world import world_path

    full, out = world_path("full"), tmp_path / "defended"
    common = ["--concept", "red", "--method", "negative-embedding", "--cache-dir",
              str(tmp_path / "cache"), "--no-progress", "--set", "images_per_prompt=2",
              "--set", f"original={full}"]  # fmt: skip
    r = run_main(
        capsys, "erase", "--model", str(full), "--out", str(out), "--set", "steps=150", *common
    )
    assert r.returncode == 0, r.stderr
    guidance = json.loads((out / "guidance.json").read_text())
    assert guidance == {"mode": "negative-prompt", "concept": "<negative-concept>",
                        "embedding": "learned_embeds.safetensors"}  # fmt: skip
    # The weights and the vocabulary are the ones it was given.
    for part in ("unet", "text_encoder", "vae"):
        mine, given = _tensors(out / part), _tensors(full / part)
        assert mine.keys() == given.keys()
        assert all(torch.equal(mine[k], given[k]) for k in given), part
    assert "<negative-concept>" not in (out / "tokenizer" / "tokenizer.json").read_text()
    # Plain diffusers: load the weights, then the embedding (the model card says how).
    assert 'negative_prompt="<negative-concept>"' in (out / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    assert "<negative-concept>" in pipe.tokenizer.get_vocab()
    # c* as the negative prompt steers the world model away from red.
    concept = load_concept("red")
    plain, defended = (_forget_rate(f, concept, tmp_path, f"rate-{f.name}") for f in (full, out))
    assert plain >= 0.75 and defended <= plain - 0.4, (plain, defended)
    # Transfer: the learned c* applied as is (0 steps) to another model of the family.
    moved = tmp_path / "moved"
    r = run_main(
        capsys, "erase", "--model", str(world_path("no-red")), "--out", str(moved), "--set",
        "steps=0", "--set", f"embedding={out / 'learned_embeds.safetensors'}", "--set",
        "guidance=sld", "--set", "sld=strong", *common)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert torch.equal(_tensors(moved)["<negative-concept>"], _tensors(out)["<negative-concept>"])
    assert json.loads((moved / "guidance.json").read_text())["sld"] == "strong"
    # The defended folder is audited as it is used, beside its guidance baselines.
    audit = tmp_path / "audit"
    r = run_main(
        capsys, "audit", "--model", str(out), "--concept", "red", "--out", str(audit), "--limit",
        "4", "--reference", "none", "--never-learned", "none", "--guidance-baselines",
        "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads((audit / "results.json").read_text())
    roles = ["audited", "baseline-unguided", "baseline-negative-prompt", "baseline-sld"]
    assert list(doc["results"]) == roles
    assert doc["models"]["audited"]["guidance"]["concept"] == "<negative-concept>"
    assert doc["models"]["baseline-sld"]["guidance"]["sld"]["edit_scale"] == 1000
    assert doc["models"]["baseline-negative-prompt"]["guidance"]["concept"] == "red"
    assert "retain_accuracy/retain" in doc["results"]["baseline-sld"]
    assert "## Guidance on the audited weights" in (audit / "report.md").read_text()
    assert "guidance: concept rate" in r.stdout


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["guidance=steer"], "guidance must be one of"),
        (["guidance=sld", "sld=1,2"], "five numbers"),
        (["token=negative"], "token must look like <name>"),
        ([], "needs images of the concept"),
        (["original=/nonexistent/model"], "original model not found"),
        (["embedding=/nonexistent/e.safetensors"], "embedding not found"),
    ],
)
def test_negative_embedding_bad_settings_are_clean_errors(tmp_path, tiny_model_dir, sets,
                                                          fragment, capsys):  # fmt: skip
    args = [a for s in sets for a in ("--set", s)]
    out = tmp_path / "out"
    r = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "red", "--method",
                "negative-embedding", "--out", str(out), "--no-progress", *args)  # fmt: skip
    assert_one_line_error(r, fragment)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
