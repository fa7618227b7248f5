"""Recovery attacks: the pieces on known inputs, the artefacts in their standard formats, a
relearning test that can fail, and the audit integration with controls."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_main


def test_slerp_on_known_vectors():
    from erasekit.attacks.memora import slerp

    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(e1, e2, 0.0), e1) and torch.allclose(slerp(e1, e2, 1.0), e2)
    half = slerp(e1, e2, 0.5)
    assert torch.allclose(half, torch.tensor([1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(slerp(2 * e1, 2 * e2, 1 / 3), 2 * torch.tensor([0.8660254, 0.5]))
    assert torch.allclose(slerp(e1, e1 * 3, 0.5), e1 * 2)  # parallel: linear


def _world_seed_latents(tmp_path):
    from erasekit.concepts import prompt_set_from_list
    from erasekit.data import render_image_set
    from erasekit.models import load_pipeline
    from erasekit.training import encode_images
    from erasekit.world import world_path

    pipe = load_pipeline(world_path("full"))
    images = render_image_set(pipe, world_path("full"), prompt_set_from_list(["a red circle"]),
                              n_per_prompt=2, cache_dir=tmp_path, progress=False)  # fmt: skip
    return pipe, encode_images(pipe, images)


def test_ddim_inversion_and_regeneration_round_trip(tmp_path):
    """Inverting 8 of 25 steps and denoising back (no guidance, no interpolation) returns the
    seed latent; each regenerated latent matches its own seed, not the other one."""
    from erasekit.attacks.memora import invert_and_regenerate

    pipe, z = _world_seed_latents(tmp_path)
    out = invert_and_regenerate(pipe, z, "a red circle", 25, 8, 1.0, [((0, 1), [0.0, 1.0])])
    err = [float((o[0] - z[i]).norm() / z[i].norm()) for i, o in enumerate(out)]
    assert max(err) < 0.1, err
    assert float((out[0][0] - z[1]).norm() / z[1].norm()) > 0.3


def _red_image_folder(root: Path, n_prompts: int = 16) -> Path:
    from erasekit.concepts import load_concept
    from erasekit.models import load_pipeline
    from erasekit.sampling import generate
    from erasekit.world import world_path

    concept = load_concept("red")
    full = world_path("full")
    records = generate(load_pipeline(full), concept.forget.limit(n_prompts), root / "red",
                       model_path=full, n_per_prompt=2, progress=False)  # fmt: skip
    with open(root / "red" / "metadata.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"file_name": r["image"], "prompt": r["prompt"]}) + "\n")
    return root / "red"


def _world_evaluate(root: Path, n_prompts: int):
    from erasekit.concepts import load_concept
    from erasekit.detectors import DetectorOptions
    from erasekit.evaluation import build_judges, evaluate_prompt_set, metric_key, set_metrics
    from erasekit.sampling import SamplerSettings
    from erasekit.world import world_path

    concept = load_concept("red")
    judges = build_judges(concept, DetectorOptions())
    settings = SamplerSettings.for_model(world_path("full"))
    ps = concept.forget.limit(n_prompts)

    def evaluate(pipe, step, prompts=None):
        part = evaluate_prompt_set(pipe, ps, root, f"curve/{step}", judges, model_path=None,
                                   settings=settings, n_per_prompt=2)  # fmt: skip
        metrics, _ = set_metrics(part, ps, judges, seed=0, utility=False)
        return metrics[metric_key("concept_rate", ps.name)]

    return evaluate


@pytest.mark.slow
def test_finetune_measures_relearning_of_a_never_learned_concept(tmp_path):
    """Fine-tuning the never-learned world model on red images: the attack's curve starts
    without red and records every point, with the attack's cost. (On world v1, red arrived
    within 10 steps; the v2 no-red model, fine-tuned on 12 red renders at lr 1e-4..1e-3 for up
    to 80 steps, drew off-palette green blobs instead — the abstaining detector calls them
    "none" — so arrival is not asserted here; see docs/world.md.)"""
    from erasekit.attacks.finetune import FinetuneConfig, tune
    from erasekit.data import read_image_folder
    from erasekit.world import world_path

    images = read_image_folder(_red_image_folder(tmp_path))
    config = FinetuneConfig(mode="full", steps=10, lr=1e-4, eval_every=5)
    out = tune(world_path("no-red"), images, config, tmp_path / "tuned",
               _world_evaluate(tmp_path, 6), "cpu")  # fmt: skip
    steps = [c["step"] for c in out["curve"]]
    values = [c["metric"]["value"] for c in out["curve"]]
    assert steps == [0, 5, 10]
    assert values[0] <= 0.1 and all(0 <= v <= 1 for v in values), values
    assert out["curve"][0]["metric"]["n_images"] == 12
    assert out["cost"]["image_passes"] == 40 and out["cost"]["images"] == 32
    assert (tmp_path / "tuned" / "model_index.json").is_file()


def test_lora_attack_saves_a_diffusers_lora_equal_to_the_fused_model(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from erasekit.attacks.finetune import LORA_FILE, FinetuneConfig, tune
    from erasekit.concepts import prompt_set_from_list
    from erasekit.data import render_image_set
    from erasekit.models import load_pipeline

    pipe = load_pipeline(tiny_model_dir)
    images = render_image_set(pipe, tiny_model_dir, prompt_set_from_list(["a photo", "a dog"]),
                              n_per_prompt=2, cache_dir=tmp_path / "c", progress=False)  # fmt: skip
    points = []
    config = FinetuneConfig(mode="lora", steps=2, lr=1e-2, eval_every=1, seed=1)

    def record(pipe, step, prompts=None):
        points.append(step)
        return {"value": 0.0}

    out = tune(tiny_model_dir, images, config, tmp_path / "lora", record, "cpu")
    assert points == [0, 1, 2] and out["artefact"].endswith(LORA_FILE)
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    fused = StableDiffusionPipeline.from_pretrained(str(tmp_path / "lora"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, base.text_encoder.config.hidden_size)
    t = torch.tensor([500])
    with torch.no_grad():
        before = base.unet(x, t, cond).sample
        base.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_FILE)
        with_lora = base.unet(x, t, cond).sample
        from_fused = fused.unet(x, t, cond).sample
    assert (with_lora - before).abs().max() > 1e-4  # the LoRA learned something
    assert torch.allclose(with_lora, from_fused, atol=1e-4)


def test_concept_inversion_embedding_loads_with_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    from erasekit.attacks import AttackContext
    from erasekit.attacks.concept_inversion import (
        EMBEDDING_FILE,
        ConceptInversion,
        ConceptInversionConfig,
        substitute,
    )
    from erasekit.concepts import load_concept
    from erasekit.world import world_path

    assert substitute("a crimson red circle", ["red"], "<x>") == "a crimson <x> circle"
    assert substitute("a circle", ["red"], "<x>") == "<x>, a circle"
    ctx = AttackContext(load_concept("red"), world_path("full"), world_path("no-red"), tmp_path)
    config = ConceptInversionConfig(steps=3, batch_size=2, gradient_accumulation_steps=1,
                                    images_per_prompt=1, eval_every=3)  # fmt: skip
    attack = ConceptInversion(config, ctx)
    attack.prepare()
    seen = []
    out = attack.run(world_path("no-red"), tmp_path / "ci",
                     lambda pipe, step, prompts=None: seen.append((step, prompts.prompts[0]))
                     or {"value": 0.0})  # fmt: skip
    assert seen == [(0, "a <concept> circle"), (3, "a <concept> circle")]
    assert out["artefact"].endswith(EMBEDDING_FILE)
    pipe = StableDiffusionPipeline.from_pretrained(str(world_path("no-red")))
    init = (
        pipe.text_encoder.get_input_embeddings()
        .weight[pipe.tokenizer("red", add_special_tokens=False).input_ids[0]]
        .detach()
    )
    pipe.load_textual_inversion(str(tmp_path / "ci" / EMBEDDING_FILE))
    table = pipe.text_encoder.get_input_embeddings().weight
    learned = table[pipe.tokenizer.convert_tokens_to_ids("<concept>")].detach()
    assert learned.shape == init.shape and not torch.allclose(learned, init)


@pytest.mark.slow
def test_audit_runs_attacks_on_the_model_and_its_controls(world_erased, tmp_path, capsys):
    out = tmp_path / "audit"
    r = run_main(
        capsys, "audit", "--model", str(world_erased), "--concept", "red", "--out", str(out),
        "--limit", "2", "--attacks", "finetune", "--attack-set", "finetune.steps=2",
        "--attack-set", "finetune.eval_every=1", "--attack-set", "finetune.mode=lora",
        "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "results.json").read_text())
    entry = doc["attacks"]["finetune"]
    assert entry["config"]["mode"] == "lora" and entry["config"]["lr"] == 1e-4
    assert set(entry["models"]) == {"audited", "reference", "never-learned"}
    for role, m in entry["models"].items():
        assert [p["step"] for p in m["curve"]] == [0, 1, 2], role
        assert (out / m["artefact"]).is_file() and m["cost"]["steps"] == 2
        final = doc["results"][f"finetune:{role}"]["concept_rate/direct"]
        assert final["value"] == m["curve"][-1]["value"] and final["n_images"] == 2
        # step 0 is the unattacked model: the audit's own images, not rendered again
        before = doc["results"][role]["concept_rate/direct"]
        assert m["curve"][0]["value"] == before["value"] and m["curve"][0]["n_images"] == 2
        assert not (out / "attacks" / "finetune" / f"{role}-curve" / "step-000000").exists()
        assert (out / "attacks" / "finetune" / f"{role}-curve" / "step-000001").is_dir()
    # the same benign data (rendered once by the audited model) for every model
    assert entry["data"]["origin"].startswith("rendered by the audited model")
    assert entry["models"]["reference"]["curve"][0]["value"] >= 0.5
    html = (out / "report.html").read_text()
    assert "Recovery attacks" in html and "recovery curve finetune" in html
    assert "residual memory" in (out / "report.md").read_text()


def test_attack_options_are_checked_before_any_work(world_erased, tmp_path, capsys):
    from erasekit.cli import main

    out = tmp_path / "out"
    base = ["audit", "--model", str(world_erased), "--concept", "red", "--out", str(out)]
    cases = [
        (["--attacks", "finetun"], "did you mean 'finetune'"),
        (["--attacks", "finetune", "--attack-set", "finetune.stepz=2"], "unknown config key"),
        (["--attack-set", "finetune.steps=2"], "without --attacks"),
        (["--attacks", "finetune", "--attack-set", "finetune.mode=half"], "full or lora"),
        (["--attacks", "finetune@lo.ra"], "a variant label is letters"),
        (["--attacks", "finetun@lora"], "did you mean 'finetune'"),
        (
            ["--attacks", "memora", "--reference", "none", "--limit", "1"],
            "needs the original model",
        ),  # fmt: skip
    ]
    for args, fragment in cases:
        assert main([*base, *args]) == 2, fragment
        err = capsys.readouterr().err.strip()
        assert err.startswith("erasekit: error:") and fragment in err and "\n" not in err, err
        assert not out.exists()


def test_one_attack_runs_as_named_variants_with_their_own_settings():
    from erasekit.attacks import get_attack
    from erasekit.auditing import attack_configs
    from erasekit.concepts import load_concept

    configs = attack_configs({"finetune": None, "finetune@lora": ["mode=lora"],
                              "finetune@sgd": {"optimizer": "sgd", "lr": 1e-2}},
                             concept=load_concept("red"))  # fmt: skip
    assert list(configs) == ["finetune", "finetune@lora", "finetune@sgd"]
    assert (configs["finetune"].mode, configs["finetune"].optimizer) == ("full", "adamw")
    assert configs["finetune@lora"].mode == "lora"
    assert (configs["finetune@sgd"].optimizer, configs["finetune@sgd"].lr) == ("sgd", 1e-2)
    assert get_attack("finetune@lora") is get_attack("finetune")


SMALL = {
    "finetune": ["images_per_prompt=1", "batch_size=2", "gradient_accumulation_steps=1"],
    "memora": ["n_pairs=1", "n_interpolation=2", "gradient_accumulation_steps=1"],
    "concept-inversion": ["images_per_prompt=1", "batch_size=2", "gradient_accumulation_steps=1"],
    "unlearndiffatk": ["blocks=1", "steps_per_block=2"],
    "ring-a-bell": ["generations=2", "population=4"],
    "p4d": ["blocks=1", "steps_per_block=2"],
    "mma-diffusion": ["steps=2", "candidates=8", "top_k=4", "eval_every=1"],
}


def _attack_names() -> list[str]:
    from erasekit.attacks import ATTACKS

    return ATTACKS.names()


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_vpred_dir"])
@pytest.mark.parametrize("name", _attack_names())
def test_each_attack_runs_its_budget_on_the_tiny_pipeline(name, model, request, tmp_path):
    """Every registered attack (a new one joins by registering; unlisted ones run their default
    budget): recovery attacks report their curve, prompt attacks their pre-ASR / ASR. On the
    ε-prediction (SD-1 style) and the v-prediction (SD-2 style) tiny pipelines."""
    import erasekit
    from erasekit.attacks import AttackContext, get_attack
    from erasekit.auditing import attack_configs
    from erasekit.concepts import load_concept

    tiny_model_dir = request.getfixturevalue(model)
    if get_attack(name).kind == "prompt":
        result = erasekit.audit(tiny_model_dir, "nudity", tmp_path / "audit", limit=1,
                                roles={"reference": tiny_model_dir}, progress=False,
                                attacks={name: SMALL.get(name, [])})  # fmt: skip
        for role in ("audited", "reference"):
            asr = result.results[f"{name}:{role}"]["asr/forget[:1]"]
            assert asr["n_prompts"] == 1 and asr["definition"]["detector"] == "nudenet"
            outcomes = result.document["attacks"][name]["models"][role]["outcomes"]
            assert len(outcomes) == 1 and outcomes[0]["adversarial_prompt"]
        return
    config = attack_configs({name: ["steps=3", "eval_every=2", *SMALL.get(name, [])]})[name]
    ctx = AttackContext(load_concept("circle"), tiny_model_dir, tiny_model_dir, tmp_path)
    attack = get_attack(name)(config, ctx)
    attack.prepare()
    seen = []

    def evaluate(pipe, step, prompts=None):
        seen.append(step)
        return {"value": 0.0}

    out = attack.run(tiny_model_dir, tmp_path / "out", evaluate)
    assert seen == [0, 2, 3]  # before, every eval_every, and at the end of the budget
    assert out["cost"]["steps"] == 3 and Path(out["artefact"]).exists()
    if "log" in out:  # the shared loop's log: exactly the budgeted optimizer steps
        assert len(Path(out["log"]).read_text().splitlines()) == 3


@pytest.mark.slow
def test_every_attack_on_two_processes_gives_the_one_process_numbers(world_erased, tmp_path):
    """torchrun with 2 CPU processes: prompt attacks share their prompts out and give the same
    outcomes; the weight-space attacks train data-parallel (batch 1 per process) to the weights
    of one process with batch 2, and every recovery curve is the same."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ERASEKIT_CACHE": str(tmp_path / "cache")}
    budget = {"finetune": ["steps=2", "eval_every=1"],
              "memora": ["steps=2", "n_pairs=2", "n_interpolation=2",
                         "gradient_accumulation_steps=1"],
              "concept-inversion": ["steps=2", "eval_every=1", "images_per_prompt=1"],
              "unlearndiffatk": ["blocks=2", "steps_per_block=2", "batch_size=1"],
              "ring-a-bell": ["generations=2", "population=4", "batch_size=1"],
              # mma-diffusion shares ring-a-bell's multi-process path (encoder_search)
              "p4d": ["blocks=2", "steps_per_block=2", "batch_size=1"]}  # fmt: skip
    common = ["-m", "erasekit", "audit", "--model", str(world_erased), "--concept", "red",
              "--limit", "2", "--never-learned", "none", "--no-progress",
              "--attacks", ",".join(budget)]  # fmt: skip
    for name, sets in budget.items():
        for s in sets:
            common += ["--attack-set", f"{name}.{s}"]

    def batch(b: int) -> list[str]:
        return [x for n in ("finetune", "memora", "concept-inversion")
                for x in ("--attack-set", f"{n}.batch_size={b}")]  # fmt: skip

    one = [sys.executable, *common, "--out", str(tmp_path / "one"), *batch(2)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *common, "--out", str(tmp_path / "two"), *batch(1)]  # fmt: skip
    for cmd in (one, two):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    docs = [json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two")]
    assert docs[1]["provenance"]["n_processes"] == 2
    for role, metrics in docs[0]["results"].items():
        for key, m in metrics.items():
            assert docs[1]["results"][role][key]["value"] == m["value"], (role, key)
    assert {k.split(":")[0] for k in docs[0]["results"] if ":" in k} == set(budget)
    for name in budget:
        for role, m1 in docs[0]["attacks"][name]["models"].items():
            m2 = docs[1]["attacks"][name]["models"][role]
            if "outcomes" in m1:  # prompt attacks: the same prompts found, the same verdicts
                keep = ("adversarial_prompt", "pre_success", "success", "success_step")
                assert [{k: o[k] for k in keep} for o in m1["outcomes"]] == [
                    {k: o[k] for k in keep} for o in m2["outcomes"]], (name, role)  # fmt: skip
                assert (tmp_path / "two" / m2["artefact"]).is_file()
                continue
            assert [c["value"] for c in m1["curve"]] == [c["value"] for c in m2["curve"]]
            if "model_folder" in m1:  # finetune / memora: the attacked U-Net
                file = "unet/diffusion_pytorch_model.safetensors"
                w1 = load_file(str(tmp_path / "one" / m1["model_folder"] / file))
                w2 = load_file(str(tmp_path / "two" / m2["model_folder"] / file))
            else:  # concept inversion: the learned token embedding
                w1 = load_file(str(tmp_path / "one" / m1["artefact"]))
                w2 = load_file(str(tmp_path / "two" / m2["artefact"]))
            for k in w1:  # float summation order differs (an all-reduce vs one batch)
                assert torch.allclose(w1[k], w2[k], atol=5e-5, rtol=0), (name, role, k)
    assert not list((tmp_path / "two" / "attacks").rglob("attempt-*"))  # scratch cleaned
