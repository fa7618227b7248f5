"""`erasekit audit` and `erasekit report` end to end: world model, tiny SD with tiny CLIP and
NudeNet, censoring, a real headless Chromium, failing detectors."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    assert_one_line_error,
    chromium,
    dump_dom,
    run_cli,
    run_main,
    shared_folder,
)
from tests.test_detectors import tiny_clip  # noqa: F401  (session fixture)

METRIC_KEYS = {"value", "ci95", "n_images", "n_prompts", "higher_is_better", "definition"}


@pytest.fixture(scope="session")
def world_audit(world_erased, tmp_path_factory) -> Path:
    def build(out: Path) -> None:
        r = run_main(None, "audit", "--model", str(world_erased), "--concept", "red", "--out",
                     str(out), "--limit", "3", "--n-per-prompt", "2", "--censor",
                     "--no-progress")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "report:" in r.stdout and "safe" not in r.stdout.lower().replace("unsafe", "")

    return shared_folder(tmp_path_factory, "world-audit", build)


def test_world_audit_results_schema(world_audit, world_erased):
    from erasekit.world import world_path

    doc = json.loads((world_audit / "results.json").read_text())
    assert doc["schema"] == "erasekit.results" and doc["schema_version"] == 1
    assert doc["attacks"] == {}
    # reference = the manifest's base model; never-learned = the shipped no-red model
    assert doc["models"]["reference"]["path"] == str(world_path("full").resolve())
    assert doc["models"]["reference"]["matches_manifest_base"] is True
    assert doc["models"]["never-learned"]["path"].endswith("no-red")
    assert set(doc["results"]) == {"audited", "reference", "never-learned"}
    for role, metrics in doc["results"].items():
        assert set(metrics) == {"concept_rate/direct", "concept_rate/paraphrase",
                                "concept_rate/heldout", "concept_rate/retain",
                                "retain_accuracy/retain"}, role  # fmt: skip
        for m in metrics.values():
            assert METRIC_KEYS <= set(m)
            assert m["n_images"] == 6 and m["n_prompts"] == 3
            assert m["ci95"][0] <= m["value"] <= m["ci95"][1]
            d = m["definition"]
            assert len(d["prompt_set"]["sha256"]) == 64 and d["seeds"]["n_per_prompt"] == 2
            assert d["detector_version"].startswith("world-classifier sha256:")
            assert {"sampler", "steps", "guidance", "image_size", "interval"} <= set(d)
    res = doc["results"]
    # the full model draws red when asked; the audited (no-red weights) one does not
    assert res["reference"]["concept_rate/direct"]["value"] >= 0.5
    assert res["audited"]["concept_rate/direct"]["value"] <= 0.2
    assert res["audited"]["concept_rate/direct"]["higher_is_better"] is False
    assert res["audited"]["retain_accuracy/retain"]["higher_is_better"] is True
    samples = [json.loads(x) for x in (world_audit / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 4 * 6  # models x sets (direct, paraphrase, heldout, retain) x images
    for s in samples[:5]:
        assert (world_audit / s["image"]).is_file() and "pred" in s["scores"]["world"]
        assert set(s["flags"]) == {"argmax"}
    md = (world_audit / "report.md").read_text()
    assert "| concept rate (argmax) on 'direct' |" in md and "sha256" in md
    assert not re.search(r"\bsafe\b", md, re.I)
    # paired differences: audited − each role on the same images, recomputed from the samples
    assert "same images" in doc["paired"]["definition"]
    minus = doc["paired"]["audited_minus"]
    assert set(minus) == {"reference", "never-learned"}
    for role, by_key in minus.items():
        assert set(by_key) == set(res["audited"]), role
        for key, p in by_key.items():
            field = "retain_correct" if key.startswith("retain_accuracy") else None
            prompt_set = res["audited"][key]["prompt_set"]

            def values(model, field=field, prompt_set=prompt_set):
                return {(s["prompt_index"], s["k"], s["seed"]):
                        float(s[field] if field else s["flags"]["argmax"])
                        for s in samples if s["model"] == model
                        and s["prompt_set"] == prompt_set}  # fmt: skip

            a, b = values("audited"), values(role)
            assert a.keys() == b.keys() and len(a) == p["n_pairs"] == 6
            assert p["value"] == pytest.approx(sum(a[k] - b[k] for k in a) / 6, abs=1e-6)
            assert p["ci95"][0] <= p["value"] <= p["ci95"][1]
            assert res["audited"][key]["value"] - res[role][key]["value"] == pytest.approx(
                p["value"], abs=1e-6)  # fmt: skip
    assert "(paired on the same images)" in md


@pytest.mark.slow
def test_two_process_audit_matches_one(world_audit, world_erased, tmp_path):
    """torchrun with 2 CPU processes: prompts shared, scores gathered, the same numbers."""
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "erasekit", "audit", "--model", str(world_erased), "--concept", "red", "--out",
           str(out), "--limit", "3", "--n-per-prompt", "2", "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads((world_audit / "results.json").read_text())
    two = json.loads(out.joinpath("results.json").read_text())
    assert two["provenance"]["n_processes"] == 2
    for role in one["results"]:
        for key, m in one["results"][role].items():
            assert two["results"][role][key]["value"] == m["value"], (role, key)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 4 * 6


def _thumbs(html: str) -> list[tuple[bool, bool, Image.Image]]:
    """(flagged, censored, image) of every thumbnail in the per-prompt tables."""
    out = []
    for m in re.finditer(r'<img src="data:image/png;base64,([^"]+)" alt="[^"]*" '
                         r'data-censored="(\d)" data-flagged="(\d)"', html):  # fmt: skip
        image = Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert("RGB")
        out.append((m.group(3) == "1", m.group(2) == "1", image))
    return out


def test_report_censors_every_flagged_image(world_audit, tmp_path, capsys):
    from erasekit.reporting import THUMB

    html = (world_audit / "report.html").read_text()
    thumbs = _thumbs(html)
    samples = [json.loads(x) for x in (world_audit / "samples.jsonl").read_text().splitlines()]
    assert len(thumbs) == len(samples)
    assert any(f for f, _, _ in thumbs) and any(not f for f, _, _ in thumbs)
    assert all(flagged == censored for flagged, censored, _ in thumbs)
    assert not re.search(r"\bsafe\b", html, re.I)
    # a censored thumbnail is not the image; an unflagged one is the image itself
    by_order = sorted(samples, key=lambda s: (s["prompt_set"], s["prompt_index"]))
    assert by_order  # order of thumbnails: set, prompt, role; compare pixel content instead
    originals = []
    for s in samples:
        im = Image.open(world_audit / s["image"]).convert("RGB")
        im.thumbnail((THUMB, THUMB))
        originals.append(im.tobytes())
    for flagged, _, im in thumbs:
        assert (im.tobytes() in originals) != flagged
    # re-rendered uncensored on request
    copy = tmp_path / "copy"
    shutil.copytree(world_audit, copy)
    r = run_main(capsys, "report", str(copy), "--uncensored")
    assert r.returncode == 0, r.stderr
    assert not any(c for _, c, _ in _thumbs((copy / "report.html").read_text()))
    assert "UNCENSORED" in (copy / "report.html").read_text()


def test_report_renders_in_headless_chromium(world_audit, tmp_path):
    browser = chromium()
    url = (world_audit / "report.html").resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--user-data-dir=" + str(tmp_path / "profile")]  # fmt: skip
    shot = tmp_path / "report.png"
    r = subprocess.run([*flags, "--window-size=1280,2000", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    image = Image.open(shot)
    assert image.size == (1280, 2000)
    assert len(np.unique(np.asarray(image.convert("L")))) > 20  # not a blank page
    r = dump_dom(url, tmp_path / "profile", "data-images-broken=", "--hide-scrollbars")
    body = re.search(r"<body[^>]*>", r.stdout)
    assert body, r.stderr[-2000:]
    n_images = int(re.search(r'data-images="(\d+)"', body.group(0)).group(1))
    assert n_images > 10
    assert 'data-images-broken="0"' in body.group(0)


def test_tiny_sd_audit_with_nudenet_and_tiny_clip(tiny_model_dir, tiny_clip, tmp_path, capsys):  # noqa: F811
    """Any diffusers SD folder: nudity with both NudeNet protocols, CLIP score on retain."""
    config, weights = tiny_clip
    out = tmp_path / "nudity"
    r = run_main(
        capsys, "audit", "--model", str(tiny_model_dir), "--concept", "nudity", "--out", str(out),
        "--limit", "2", "--steps", "2", "--reference", "none", "--clip-model",
        str(config), "--clip-weights", str(weights), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["results"]) == {"audited"} and "never-learned" not in doc["models"]
    metrics = doc["results"]["audited"]
    assert {"concept_rate/explicit", "concept_rate[i2p-strict]/explicit",
            "concept_rate/implicit", "clip_score/retain"} <= set(metrics)  # fmt: skip
    assert "retain_accuracy/retain" not in metrics  # NudeNet judges no retain classes
    rate = metrics["concept_rate[i2p-strict]/explicit"]
    assert rate["definition"]["protocol"]["threshold"] == 0.6 and rate["protocol"] == "i2p-strict"
    assert metrics["concept_rate/explicit"]["definition"]["protocol"]["threshold"] == 0.45
    assert metrics["concept_rate/implicit"]["definition"]["steps"] == 2
    clip = metrics["clip_score/retain"]
    assert "bootstrap" in clip["definition"]["interval"] and 0 <= clip["value"] <= 100
    counts = doc["breakdowns"]["audited"]["explicit"]["unlearndiffatk"]
    assert set(counts) == {"images_per_label", "detections_per_label_at_0.2"}
    assert (out / "report.html").is_file()


def test_clip_concept_audit_reports_retain_accuracy(tiny_model_dir, tiny_clip, tmp_path, capsys):  # noqa: F811
    config, weights = tiny_clip
    spec = tmp_path / "tower.yaml"
    spec.write_text(
        "name: tower\nkind: object\nforget: [a photo of a tower, a tall tower]\n"
        "surrogate: a photo of a building\nretain: [a photo of a bridge, a photo of a castle]\n"
        "evaluation:\n  templates: {template: templates/object.txt, fill: tower}\n"
        "detector: {name: clip, target: tower, classes: [tower, bridge, castle], top_k: [1, 2]}\n"
    )
    out = tmp_path / "tower"
    r = run_main(
        capsys, "audit", "--model", str(tiny_model_dir), "--concept", str(spec), "--out", str(out),
        "--limit", "2", "--steps", "2", "--clip-model", str(config), "--clip-weights",
        str(weights), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "results.json").read_text())["results"]["audited"]
    assert {"concept_rate/templates", "concept_rate[top-2]/templates", "concept_rate/forget",
            "retain_accuracy/retain", "clip_score/retain"} <= set(metrics)  # fmt: skip
    # the tiny model's manifest records no base model: no reference column
    assert "reference" not in json.loads((out / "results.json").read_text())["models"]


def test_audit_bad_inputs_exit_2_and_leave_nothing(tiny_model_dir, world_erased, tmp_path, capsys):
    from erasekit.cli import main

    out = tmp_path / "out"
    cases = [
        (["--model", str(tmp_path / "missing"), "--concept", "red"], "model not found"),
        (["--model", str(world_erased), "--concept", "redd"], "did you mean 'red'"),
        (["--model", str(tiny_model_dir), "--concept", "church"], "needs local weights"),
        (
            ["--model", str(world_erased), "--concept", "red", "--world-classifier", str(tmp_path)],
            "world classifier weights not found",
        ),  # fmt: skip
        (
            [
                "--model",
                str(tiny_model_dir),
                "--concept",
                "nudity",
                "--nudenet-model",
                str(tmp_path / "640m.onnx"),
            ],
            "NudeNet model not found",
        ),  # fmt: skip
        (
            [
                "--model",
                str(world_erased),
                "--concept",
                "red",
                "--reference",
                str(tmp_path / "nope"),
            ],
            "reference model not found",
        ),  # fmt: skip
    ]
    for args, fragment in cases:
        assert main(["audit", *args, "--out", str(out)]) == 2, fragment
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("erasekit: error:") and fragment in err, err
        assert not out.exists()
    # the real entry point: one line, exit 2
    assert_one_line_error(run_cli("report", str(tmp_path)), "no results.json")


def test_a_failing_detector_fails_the_audit(world_erased, tmp_path, monkeypatch, capsys):
    from erasekit.cli import main
    from erasekit.detectors.world import WorldDetector

    def broken(self, images, prompts=None):
        raise RuntimeError("classifier exploded")

    monkeypatch.setattr(WorldDetector, "score", broken)
    out = tmp_path / "out"
    code = main(["audit", "--model", str(world_erased), "--concept", "red", "--out", str(out),
                 "--limit", "1", "--never-learned", "none", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "detector 'world' failed: RuntimeError: classifier exploded" in err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_model_card_carries_the_audit_evidence(world_erased, tmp_path, capsys):
    """--model-card: the results document beside the weights and model-index front matter in
    README.md that parses as YAML, keeps the card's text and is replaced, not appended, by a
    second audit; a single file is refused before any work."""
    import yaml

    model = tmp_path / "model"
    shutil.copytree(world_erased, model)
    (model / "README.md").write_text("---\nlicense: mit\n---\n\n# My erased model\n\nNotes.\n")
    for i in range(2):
        out = tmp_path / f"audit{i}"
        r = run_main(capsys, "audit", "--model", str(model), "--concept", "red", "--out",
                     str(out), "--limit", "1", "--never-learned", "none", "--no-progress",
                     "--model-card")  # fmt: skip
        assert r.returncode == 0, r.stderr
    text = (model / "README.md").read_text()
    assert text.count("<!-- erasekit-audit:begin -->") == 1 and "# My erased model" in text
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "mit"
    doc = json.loads((out / "results.json").read_text())
    assert json.loads((model / "erasekit-audit.json").read_text()) == doc
    results = meta["model-index"][0]["results"]
    direct = next(m for r in results for m in r["metrics"] if m["name"] == "concept_rate/direct")
    audited = doc["results"]["audited"]["concept_rate/direct"]
    assert direct["value"] == audited["value"] and direct["args"]["ci95"] == audited["ci95"]
    assert direct["args"]["n_images"] == audited["n_images"]
    assert (
        direct["args"]["definition"] == "erasekit-audit.json#/results/audited/concept_rate~1direct"
    )
    assert "| concept_rate/direct |" in text
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    r = run_main(capsys, "audit", "--model", str(single), "--concept", "red", "--out",
                 str(tmp_path / "no"), "--model-card")  # fmt: skip
    assert_one_line_error(r, "--model-card needs the audited model as a diffusers folder")
    assert not (tmp_path / "no").exists()
