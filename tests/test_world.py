"""ShapesWorld: renderer, captions, shipped models and classifier, and the build command."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.concepts import load_concept
from erasekit.world import WORLD_VARIANTS, classifier_path, world_path
from erasekit.world.render import (
    COLOUR_INDIRECT,
    COLOUR_SYNONYMS,
    COLOURS,
    SHAPE_INDIRECT,
    SHAPE_SYNONYMS,
    SHAPES,
    TEMPLATES,
    caption,
    render_dataset,
    sample_scene,
)
from tests.conftest import assert_one_line_error, run_main


def test_renderer_is_deterministic():
    a, ca, sa = render_dataset(16, seed=3)
    b, cb, sb = render_dataset(16, seed=3)
    c, _, _ = render_dataset(16, seed=4)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb and sa == sb
    assert not np.array_equal(a, c)


def test_grammar_sizes():
    assert len(TEMPLATES) >= 5
    for colour in COLOURS:
        assert len(COLOUR_SYNONYMS[colour]) >= 2 and len(COLOUR_INDIRECT[colour]) >= 2
    for shape in SHAPES:
        assert len(SHAPE_SYNONYMS[shape]) >= 2 and len(SHAPE_INDIRECT[shape]) >= 2


def test_captions_name_the_scene():
    rng = random.Random(0)
    indirect = 0
    for _ in range(400):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        colour_words = (
            scene.colour,
            *COLOUR_SYNONYMS[scene.colour],
            *COLOUR_INDIRECT[scene.colour],
        )
        colour_words += tuple(
            p.removeprefix("the colour of ") for p in COLOUR_INDIRECT[scene.colour]
        )
        shape_words = (scene.shape, *SHAPE_SYNONYMS[scene.shape], *SHAPE_INDIRECT[scene.shape])
        assert any(w in text for w in colour_words), text
        assert any(w in text for w in shape_words), text
        others = [c for c in COLOURS if c != scene.colour]
        assert not any(f" {c} " in f" {text} " for c in others), text
        if scene.style == "outlined":
            assert "outlined" in text or "hollow" in text, text
        assert " a outlined" not in f" {text}" and " a emerald" not in f" {text}"
        indirect += scene.colour not in text and not any(
            s in text for s in COLOUR_SYNONYMS[scene.colour]
        )
    assert indirect > 20, "indirect colour phrasings appear in training captions"


def test_variant_data_excludes_the_concept():
    _, captions, scenes = render_dataset(300, seed=1, colours=("green", "blue", "yellow"))
    assert {s.colour for s in scenes} == {"green", "blue", "yellow"}
    red_words = ("red", *COLOUR_SYNONYMS["red"], "blood", "tomato")
    assert not any(w in c.split() or w in c for c in captions for w in red_words)


@pytest.mark.parametrize(
    "name", ["red", "green", "blue", "yellow", "circle", "square", "triangle", "cross", "outlined"]
)
def test_world_concept_specs(name):
    c = load_concept(name)
    assert c.detector["name"] == "world" and c.detector["target"] == name
    assert len(c.forget) >= 16 and all(name in p for p in c.forget.prompts)
    para = c.evaluation["paraphrase"].prompts
    assert len(para) >= 16 and not any(f" {name} " in f" {p} " for p in para)


WORLD_CONCEPTS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "cross",
                  "outlined"]  # fmt: skip


@pytest.mark.parametrize("name", WORLD_CONCEPTS)
def test_world_heldout_phrasings_are_used_by_no_other_set(name):
    """The held-out set names its concept through the grammar (synonyms, indirect phrases),
    never by its word, and no prompt of any world concept's other sets (forget / direct,
    paraphrase, retain, benign, tuning, Ring-A-Bell's pairs: what methods train on, presets
    are tuned on and attacks start from) is one of its prompts."""
    from erasekit.world.render import prompt_attributes

    heldout = load_concept(name).evaluation["heldout"].prompts
    assert len(heldout) == len(set(heldout)) == 16
    assert not any(f" {name} " in f" {p.replace(',', ' ')} " for p in heldout)
    assert all(name in prompt_attributes(p).values() for p in heldout)
    others = set()
    for other in WORLD_CONCEPTS:
        c = load_concept(other)
        sets = [c.forget, c.retain, c.benign, *c.tuning.values(),
                *(v for k, v in c.evaluation.items() if k != "heldout")]  # fmt: skip
        others.update(p for ps in sets for p in ps.prompts)
        rows = Path(c.pairs).read_text().splitlines()[1:]
        others.update(p for row in rows for p in row.split(","))
    assert not set(heldout) & others


def test_classifier_accuracy_on_fresh_renders():
    from erasekit.world.classifier import heldout_accuracy, load_classifier

    model = load_classifier(classifier_path())
    acc = heldout_accuracy(model, n=600, seed=424242)
    assert min(acc.values()) >= 0.98, acc


def test_world_detector_protocol_and_scores():
    from PIL import Image

    from erasekit.detectors import DETECTORS
    from erasekit.errors import ErasekitError
    from erasekit.world.render import Scene, render

    det = DETECTORS.get("world")()
    scene = Scene("triangle", "blue", "filled", 16, 16, 11, 0.0, (35, 65, 215), (250, 250, 250))
    (rec,) = det.score([render(scene).resize((64, 64), Image.BILINEAR)])
    assert rec["pred"] == {"shape": "triangle", "colour": "blue", "style": "filled"}
    assert det.flagged(rec, "colour", "blue") and not det.flagged(rec, "colour", "red")
    assert det.protocol("shape", "circle")["version"].startswith("world-classifier sha256:")
    with pytest.raises(ErasekitError):
        det.protocol("shape", "hexagon")


@pytest.mark.slow
def test_shipped_models_load_in_plain_diffusers():
    code = (
        "import sys, torch, diffusers\n"
        "for path in sys.argv[1:]:\n"
        "    p = diffusers.StableDiffusionPipeline.from_pretrained(path)\n"
        "    assert 'erasekit' not in sys.modules\n"
        "    print(type(p).__name__)\n"
    )
    paths = [str(world_path(v)) for v in WORLD_VARIANTS]
    out = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["StableDiffusionPipeline"] * len(WORLD_VARIANTS)


CASES = [
    ("a red circle", {"shape": "circle", "colour": "red"}),
    ("a blue square", {"shape": "square", "colour": "blue"}),
    ("a green triangle", {"shape": "triangle", "colour": "green"}),
    ("a yellow cross", {"shape": "cross", "colour": "yellow"}),
]


def _joint_rate(pipe, cases, steps=10):
    """Share of images whose shape AND colour are both what the prompt asked for."""
    from erasekit.concepts import prompt_set_from_list
    from erasekit.detectors.world import WorldDetector
    from erasekit.sampling import SamplerSettings, plan_samples, render_batch

    det = WorldDetector()
    ps = prompt_set_from_list([p for p, _ in cases])
    settings = SamplerSettings(steps=steps, guidance=4.0, height=32, width=32)
    plan = plan_samples(ps, settings, n_per_prompt=8, seed=0)
    scores = det.score(render_batch(pipe, plan, 32, 32))
    hits = [
        all(s["pred"][d] == v for d, v in cases[r["prompt_index"]][1].items())
        for s, r in zip(scores, plan, strict=True)
    ]
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_shipped_full_model_draws_what_it_is_asked():
    from erasekit.models import load_pipeline
    from erasekit.world.build import build_unet

    pipe = load_pipeline(world_path("full"))
    trained = _joint_rate(pipe, CASES)
    pipe.unet = build_unet(seed=123)  # same architecture, untrained: must fail the bound
    untrained = _joint_rate(pipe, CASES)
    assert trained >= 0.6, trained  # measured 0.91-0.97 over three seeds
    assert untrained < 0.2, untrained  # chance for shape AND colour is 1/16


def test_world_path_and_info_commands(capsys):
    result = run_main(capsys, "world", "path", "--variant", "no-red")
    assert result.returncode == 0 and Path(result.stdout.strip()) == world_path("no-red")
    assert_one_line_error(run_main(capsys, "world", "path", "--variant", "no-blue"),
                          "invalid choice")  # fmt: skip
    info = run_main(capsys, "world", "info", "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert [v["variant"] for v in data["variants"]] == list(WORLD_VARIANTS)
    assert data["concepts"]["colour"] == list(COLOURS)
    total_mb = sum(v["size_mb"] for v in data["variants"])
    assert total_mb <= 40, total_mb


@pytest.mark.slow
def test_world_build_runs_end_to_end(tmp_path: Path, capsys):
    out = tmp_path / "world"
    result = run_main(
        capsys,
        "world",
        "build",
        "--out",
        str(out),
        "--n-images",
        "128",
        "--vae-steps",
        "2",
        "--classifier-steps",
        "2",
        "--text-encoder-steps",
        "2",
        "--base-steps",
        "2",
        "--unet-steps",
        "2",
        "--heldout-n",
        "32",
        "--variants",
        "full,no-red",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    build = json.loads((out / "build.json").read_text())
    assert build["variants"] == ["full", "no-red"] and build["recipe"]["unet_steps"] == 2
    from erasekit.world.build import WORLD_VERSION

    assert build["world_version"] == WORLD_VERSION and not (tmp_path / ".world.build").exists()
    manifest = json.loads((out / "no-red" / "erasekit.json").read_text())
    assert (
        manifest["world"]["held_out_concept"] == "red"
        and manifest["world"]["version"] == WORLD_VERSION
    )
    assert "red" not in manifest["world"]["colours"]
    assert manifest["sampler"]["steps"] > 0
    assert (out / "classifier" / "model.safetensors").is_file()
    gen = run_main(
        capsys,
        "generate",
        "--model",
        str(out / "full"),
        "--prompts",
        "a red circle",
        "--out",
        str(tmp_path / "g"),
        "--steps",
        "2",
        "--no-progress",
    )
    assert gen.returncode == 0, gen.stderr


def test_world_build_reuse_from_refuses_a_folder_that_is_not_a_build(tmp_path: Path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "build.json").write_text(json.dumps({"recipe": {}, "variants": []}))
    for source, fragment in ((tmp_path / "nope", "not a world build"),
                             (tmp_path / "half", "differs in seed")):  # fmt: skip
        result = run_main(capsys, "world", "build", "--out", str(tmp_path / "w"),
                          "--reuse-from", str(source), "--no-progress")  # fmt: skip
        assert_one_line_error(result, "--reuse-from", fragment)
        assert not (tmp_path / "w").exists() and not (tmp_path / ".w.build").exists()


TINY_RECIPE = dict(n_images=64, vae_steps=2, vae_batch=8, classifier_steps=2, text_encoder_steps=2,
                   text_encoder_batch=8, base_steps=3, unet_steps=5, unet_batch=8,
                   checkpoint_every=2, warmup=2, heldout_n=32)  # fmt: skip


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_world_build_resumes_to_identical_weights(tmp_path: Path, monkeypatch):
    """A build interrupted inside a U-Net stage resumes from its last checkpoint and ends with
    the same weights as an uninterrupted build; without --resume the work folder is refused."""
    from safetensors.torch import load_file

    from erasekit.errors import ErasekitError
    from erasekit.world import build as wb

    recipe = wb.WorldRecipe(**TINY_RECIPE)
    wb.build_world(tmp_path / "a", recipe, ("no-red",), progress=False)

    real = wb.train_unet

    def killed_at_step_3(*args, **kwargs):
        def boom(step, ema):
            raise _Killed

        return real(*args, **kwargs, callback=boom, callback_every=3)

    monkeypatch.setattr(wb, "train_unet", killed_at_step_3)
    with pytest.raises(_Killed):
        wb.build_world(tmp_path / "b", recipe, ("no-red",), progress=False)
    work = wb.work_dir(tmp_path / "b")
    assert [p.name for p in (work / "unet-base" / "checkpoints").iterdir()] == ["step-0000002"]
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(wb, "train_unet", real)
    with pytest.raises(ErasekitError, match="--resume"):
        wb.build_world(tmp_path / "b", recipe, ("no-red",), progress=False)
    with pytest.raises(ErasekitError, match="another recipe"):
        wb.build_world(tmp_path / "b", wb.WorldRecipe(**{**TINY_RECIPE, "unet_steps": 6}),
                       ("no-red",), progress=False, resume=True)  # fmt: skip
    wb.build_world(tmp_path / "b", recipe, ("no-red",), progress=False, resume=True)
    assert not work.exists()
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a = load_file(str(tmp_path / "a" / "no-red" / part))
        b = load_file(str(tmp_path / "b" / "no-red" / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part

    # --reuse-from: the earlier build's VAE, classifier and text encoder, new U-Nets only
    longer = wb.WorldRecipe(**{**TINY_RECIPE, "unet_steps": 6})
    with pytest.raises(ErasekitError, match="differs in vae_steps"):
        wb.build_world(tmp_path / "c", wb.WorldRecipe(**{**TINY_RECIPE, "vae_steps": 3}),
                       ("no-red",), progress=False, reuse_from=tmp_path / "a")  # fmt: skip
    assert not wb.work_dir(tmp_path / "c").exists() and not (tmp_path / "c").exists()
    info = wb.build_world(tmp_path / "c", longer, ("no-red",), progress=False,
                          reuse_from=tmp_path / "a")  # fmt: skip
    assert info["reused_stages"]["stages"] == ["vae", "classifier", "text_encoder"]
    assert set(info["timings_s"]) == {"unet-base_s", "unet-no-red_s", "total_s"}
    for part in ("classifier/model.safetensors", "classifier/config.json"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "c" / part).read_bytes()
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "unet/diffusion_pytorch_model.safetensors"):  # fmt: skip
        a = load_file(str(tmp_path / "a" / "no-red" / part))
        c = load_file(str(tmp_path / "c" / "no-red" / part))
        same = all(torch.equal(a[k], c[k]) for k in a)
        assert same == (not part.startswith("unet")), part  # the U-Net trained 6 steps, not 5
    # a U-Net replicate: its own seed, the same shared stages; refused if the seed itself changes
    replicate = wb.WorldRecipe(**{**TINY_RECIPE, "unet_seed": 7})
    wb.build_world(tmp_path / "d", replicate, ("no-red",), progress=False,
                   reuse_from=tmp_path / "a")  # fmt: skip
    unet = "no-red/unet/diffusion_pytorch_model.safetensors"
    a, d = load_file(str(tmp_path / "a" / unet)), load_file(str(tmp_path / "d" / unet))
    assert not all(torch.equal(a[k], d[k]) for k in a)
    with pytest.raises(ErasekitError, match="differs in seed"):
        wb.build_world(tmp_path / "e", wb.WorldRecipe(**{**TINY_RECIPE, "seed": 7}),
                       ("no-red",), progress=False, reuse_from=tmp_path / "a")  # fmt: skip


@pytest.mark.slow
def test_world_build_variant_text_encoders(tmp_path: Path):
    """--variant-text-encoders: a never-learned model ships an encoder that never read its
    concept's word (that embedding row keeps its initial value), the full model the shared one,
    and --reuse-from takes the shared encoder."""
    from safetensors.torch import load_file

    from erasekit.tokenizer import build_clip_tokenizer
    from erasekit.world import build as wb

    recipe = wb.WorldRecipe(**{**TINY_RECIPE, "variant_text_encoders": True})
    info = wb.build_world(tmp_path / "a", recipe, ("full", "no-red"), progress=False)
    assert set(info["variant_text_encoders"]) == {"no-red"}
    assert {"text_encoder-no-red_s", "unet-no-red_s"} <= set(info["timings_s"])
    red = build_clip_tokenizer()("red").input_ids[1]
    initial = wb.build_text_encoder(recipe.seed).embeddings.token_embedding.weight
    row = {}
    for variant in ("full", "no-red"):
        weights = load_file(str(tmp_path / "a" / variant / "text_encoder" / "model.safetensors"))
        row[variant] = weights["embeddings.token_embedding.weight"][red]
        world = json.loads((tmp_path / "a" / variant / "erasekit.json").read_text())["world"]
        assert world["text_encoder"].startswith("shared" if variant == "full" else "its own")
    assert torch.equal(row["no-red"], initial[red].detach().half())
    assert not torch.equal(row["full"], initial[red].detach().half())
    info = wb.build_world(tmp_path / "b", wb.WorldRecipe(**TINY_RECIPE), ("no-red",),
                          progress=False, reuse_from=tmp_path / "a")  # fmt: skip
    shared = load_file(str(tmp_path / "b" / "no-red" / "text_encoder" / "model.safetensors"))
    full = load_file(str(tmp_path / "a" / "full" / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(shared[k], full[k]) for k in full)
    assert "variant_text_encoders" not in info


def test_world_quality_doc_is_rendered_from_the_shipped_numbers(tmp_path: Path):
    """docs/results/world.md is scripts/world_quality.py's rendering of the assets'
    quality.json: every bar met, the attack floors reported beside them."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "erasekit" / "world" / "assets" / "quality.json", tmp_path / "world.json")
    r = subprocess.run([sys.executable, str(root / "scripts" / "world_quality.py"), "--render",
                        "--doc", str(tmp_path / "world.md")], capture_output=True, text=True,
                       cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rendered = (tmp_path / "world.md").read_text()
    assert rendered == (root / "docs" / "results" / "world.md").read_text()
    assert "## Attack floors (reported, no bar)" in rendered and "Not met" not in rendered


def test_world_quality_resumes_only_parts_measured_under_the_same_key(tmp_path: Path):
    """--resume keeps a part measured on the same world, code and seed; a part without that
    key (another world, or a folder written before keys) is neither kept nor reported."""
    root = Path(__file__).resolve().parents[1]
    doc, work = tmp_path / "w.md", tmp_path / "parts"
    cmd = [sys.executable, str(root / "scripts" / "world_quality.py"), "--parts", "speed",
           "--doc", str(doc), "--work", str(work)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    first = (work / "speed.json").read_text()
    assert json.loads(first)["key"]["seed"] == 0
    legacy = {"measured": {"rates": {}}, "wall_s": 1.0}  # another run's part, no key
    (work / "direct.json").write_text(json.dumps(legacy))
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "speed: kept" in r.stdout and "direct: ignored" in r.stdout
    assert (work / "speed.json").read_text() == first
    record = json.loads(doc.with_suffix(".json").read_text())
    assert "speed" in record and "direct" not in record
    r = subprocess.run([*cmd[:3], "speed,colour"], capture_output=True, text=True, cwd=root)
    assert r.returncode == 2 and "unknown part(s) colour" in r.stderr


def test_world_detector_abstains_on_off_world_renders():
    """Blends and off-palette colours are "none", not the nearest colour; distractor shapes
    are "none", not the nearest shape (rates measured on fresh renders, seeds unseen)."""
    from erasekit.detectors.world import WorldDetector
    from erasekit.world.classifier import abstention_rates, load_classifier
    from erasekit.world.render import RGB, Scene, render

    rates = abstention_rates(load_classifier(classifier_path()), n=300, seed=31337)
    assert rates["off_colour_named_any"] <= 0.1, rates
    assert rates["off_shape_named_any"] <= 0.1, rates
    orange = tuple((a + b) // 2 for a, b in zip(RGB["red"], RGB["yellow"], strict=True))
    scenes = [Scene("circle", "red", "filled", 16, 16, 11, 0.0, rgb, (250, 250, 250))
              for rgb in (RGB["red"], orange)]  # fmt: skip
    det = WorldDetector()
    red, blend = det.score([render(s) for s in scenes])
    assert det.flagged(red, "colour", "red") and red["pred"]["shape"] == "circle"
    assert blend["pred"]["colour"] == "none" and not det.flagged(blend, "colour", "red")
    assert det.protocol("colour", "red")["labels"][-1] == "none"


def test_prompts_become_ground_truth_scenes():
    from erasekit.world.render import prompt_attributes, prompt_scene

    assert prompt_attributes("a hollow crimson disc") == {
        "colour": "red", "shape": "circle", "style": "outlined"}  # fmt: skip
    assert prompt_attributes("a shape the colour of the sun") == {"colour": "yellow"}
    assert prompt_attributes("a red or blue square") == {"shape": "square"}  # ambiguous colour
    rng = random.Random(0)
    scenes = [prompt_scene("a solid green triangle", rng) for _ in range(20)]
    assert {s.labels["shape"] for s in scenes} == {"triangle"}
    assert {(s.colour, s.style) for s in scenes} == {("green", "filled")}
    assert len({prompt_scene("a cross", rng).colour for _ in range(40)}) == 4, "colour is free"
    with pytest.raises(ValueError, match="names no world shape or colour"):
        prompt_scene("a photo of a cat", rng)


def test_world_image_sets_show_what_each_prompt_names(tmp_path):
    """image_source=world: the renderer's images of each prompt, judged by the world classifier."""
    from erasekit.concepts import prompt_set_from_list
    from erasekit.data import load_images, world_image_set
    from erasekit.detectors.world import WorldDetector

    prompts = prompt_set_from_list(["a red circle", "an outlined blue square", "a golden wedge"])
    images = world_image_set(prompts, n_per_prompt=4, seed=3, cache_dir=tmp_path)
    again = world_image_set(prompts, n_per_prompt=4, seed=3, cache_dir=tmp_path)
    assert again.source["cache_hit"] and again.paths == images.paths
    assert len(images) == 12 and images.prompts[:4] == ["a red circle"] * 4
    pixels = load_images(images, 32)
    assert pixels.shape == (12, 3, 32, 32)
    detector = WorldDetector()
    from PIL import Image

    scores = detector.score([Image.open(p) for p in images.paths])
    want = [{"colour": "red", "shape": "circle", "style": "filled"},
            {"colour": "blue", "shape": "square", "style": "outlined"},
            {"colour": "yellow", "shape": "triangle", "style": "filled"}]  # fmt: skip
    for i, score in enumerate(scores):
        assert score["pred"] == want[i // 4], (i, score["pred"])
