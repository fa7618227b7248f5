"""FID and KID (torchmetrics on local Inception weights) and COCO-style caption sets: the
statistics, the weights loader's refusals, and the audit's utility metrics end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_one_line_error, run_main, shared_folder


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    from erasekit.testing import save_random_inception

    def build(out: Path) -> None:
        out.mkdir()
        save_random_inception(out / "inception.safetensors")

    return shared_folder(tmp_path_factory, "inception", build) / "inception.safetensors"


def _noise(n: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def _flat(n: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 3))
    return [Image.fromarray(np.full((size, size, 3), c, dtype=np.uint8)) for c in colours]


def test_low_rank_frechet_distance_equals_torchmetrics():
    from erasekit.detectors.inception import fid_low_rank, frechet_distance

    gen = torch.Generator().manual_seed(0)
    for n_a, n_b, d in ((7, 5, 64), (40, 30, 16)):  # fewer and more images than dimensions
        a = torch.randn(n_a, d, generator=gen, dtype=torch.float64) * 2 + 1
        b = torch.randn(n_b, d, generator=gen, dtype=torch.float64)
        full = frechet_distance(a, b)
        assert full == pytest.approx(fid_low_rank(a, b), rel=1e-6)
        # the mean term alone: shifting one set by v adds |v|² on top
        assert frechet_distance(a + 3, a) == pytest.approx(9 * d, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_fid_and_kid_separate_distributions_with_intervals(inception_weights):
    from erasekit.concepts import prompt_set_from_list
    from erasekit.detectors.inception import InceptionFeatures
    from erasekit.evaluation import distribution_metrics

    features = InceptionFeatures(inception_weights)
    assert features.version.startswith("torchmetrics ") and "sha256:" in features.version
    noise_a, noise_b, flat = (features.features(_noise(8, 0)), features.features(_noise(8, 1)),
                              features.features(_flat(8, 2)))  # fmt: skip
    assert noise_a.shape == (8, 2048) and noise_a.dtype == torch.float64
    ps = prompt_set_from_list([f"p{i}" for i in range(4)])
    groups = [i // 2 for i in range(8)]  # 4 prompts x 2 images

    def measure(a, b):
        return distribution_metrics(a, groups, b, list(range(8)), prompt_set=ps,
                                    definition={"features": features.describe()})  # fmt: skip

    same, different = measure(noise_a, noise_b), measure(noise_a, flat)
    assert set(same) == {"fid/inline", "kid/inline"}
    for key in same:
        assert different[key]["value"] > 10 * abs(same[key]["value"])
        lo, hi = different[key]["ci95"]
        assert lo <= hi and lo > same[key]["ci95"][1]  # the intervals separate
        m = different[key]
        assert m["n_images"] == 8 and m["n_prompts"] == 4 and m["higher_is_better"] is False
        assert m["definition"]["n_reference_images"] == 8
        assert "bootstrap" in m["definition"]["interval"]
    # a permutation of the images changes nothing (the statistic is of the sets)
    again = measure(noise_a[torch.randperm(8, generator=torch.Generator().manual_seed(1))], flat)
    assert again["fid/inline"]["value"] == pytest.approx(different["fid/inline"]["value"])


def test_inception_weights_refusals(inception_weights, tmp_path):
    from safetensors.torch import save_file

    from erasekit.detectors.inception import InceptionFeatures
    from erasekit.errors import ErasekitError

    with pytest.raises(ErasekitError, match="--inception-weights PATH"):
        InceptionFeatures(None)
    with pytest.raises(ErasekitError, match="not found"):
        InceptionFeatures(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ErasekitError, match="corrupt or truncated"):
        InceptionFeatures(corrupt)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(ErasekitError, match="not the FID Inception-v3 weights"):
        InceptionFeatures(wrong)
    from safetensors.torch import load_file

    pth = tmp_path / "pt_inception.pth"
    torch.save(load_file(str(inception_weights)), pth)
    with pytest.raises(ErasekitError, match="pickle file"):
        InceptionFeatures(pth)
    loaded = InceptionFeatures(pth, allow_pickle=True)  # read with weights_only=True
    ref = InceptionFeatures(inception_weights)
    image = _noise(1, 3)
    assert torch.equal(loaded.features(image), ref.features(image))


def test_coco_caption_csv_is_a_prompt_set(tmp_path):
    from erasekit.concepts import read_prompt_set
    from erasekit.errors import ErasekitError

    coco = tmp_path / "coco_30k.csv"
    coco.write_text(
        "image_id,source,prompt,evaluation_seed\n"
        "000000203564,coco-30k,A bicycle replica with a clock as the front wheel.,41337\n"
        '000000571635,coco-30k,"A bathroom with a toilet, sink, and shower.",10030\n'
        '000000482917,coco-30k,"A dog sitting on a footstool watching tv\n",64297\n'
    )
    ps = read_prompt_set(coco)
    assert ps.format == "coco" and len(ps) == 3
    assert [e.id for e in ps.entries] == ["000000203564", "000000571635", "000000482917"]
    assert [e.seed for e in ps.entries] == [41337, 10030, 64297]
    assert ps.entries[1].prompt == "A bathroom with a toilet, sink, and shower."
    assert ps.entries[2].prompt == "A dog sitting on a footstool watching tv"
    assert ps.entries[0].extra == {"source": "coco-30k"}
    raw = tmp_path / "captions.csv"  # a raw COCO caption export: a 'caption' column
    raw.write_text("image_id,id,caption\n1,10,A red bus.\n2,11,Two cats.\n")
    ps = read_prompt_set(raw)
    assert (
        ps.format == "coco"
        and ps.prompts == ["A red bus.", "Two cats."]
        and ps.entries[0].id == "1"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,text\n1,A red bus.\n")
    with pytest.raises(ErasekitError, match="no 'prompt' \\(or 'caption'\\) column"):
        read_prompt_set(bad)


@pytest.mark.slow
def test_audit_reports_fid_and_kid_on_utility_sets(
    world_erased, inception_weights, tmp_path, capsys, monkeypatch
):
    captions = tmp_path / "coco.csv"
    captions.write_text("image_id,source,prompt,evaluation_seed\n"
                        "1,coco,a blue square,11\n2,coco,a green circle,12\n")  # fmt: skip
    out = tmp_path / "audit"
    common = ["audit", "--model", str(world_erased), "--concept", "red", "--limit", "2",
              "--n-per-prompt", "1", "--never-learned", "none", "--no-progress",
              "--inception-weights", str(inception_weights),
              "--captions", str(captions)]  # fmt: skip
    r = run_main(capsys, *common, "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "results.json").read_text())
    audited, reference = doc["results"]["audited"], doc["results"]["reference"]
    for s in ("retain", "captions"):
        for metric in ("fid", "kid"):
            m = audited[f"{metric}/{s}"]
            assert m["n_images"] == 2 and m["definition"]["n_reference_images"] == 2
            assert m["definition"]["reference"].startswith("the reference model's images")
            assert m["definition"]["features"]["version"].startswith("torchmetrics")
            assert m["ci95"][0] <= m["ci95"][1]
        assert f"fid/{s}" not in reference  # against itself it is 0 by construction
    assert "concept_rate/captions" in audited and "retain_accuracy/captions" not in audited
    assert doc["evaluation"]["prompt_sets"]["captions"]["format"] == "coco"
    report = (out / "report.md").read_text()
    assert "FID on 'captions'" in report and "KID on 'retain'" in report

    # against a folder of images, the reference model is measured too (its 2048-d eigensolve,
    # ~8 s each on a CPU thread, replaced by the equal low-rank form tested above)
    import erasekit.detectors.inception as inception

    monkeypatch.setattr(inception, "frechet_distance", inception.fid_low_rank)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, im in enumerate(_noise(3, 5)):
        im.save(folder / f"{i}.png")
    out2 = tmp_path / "audit2"
    r = run_main(capsys, *common, "--fid-images", str(folder), "--out", str(out2))
    assert r.returncode == 0, r.stderr
    doc = json.loads((out2 / "results.json").read_text())
    m = doc["results"]["reference"]["fid/captions"]
    assert (
        m["definition"]["reference"] == "image folder"
        and m["definition"]["n_reference_images"] == 3
    )
    assert len(m["definition"]["folder_sha256"]) == 64


def test_audit_fid_refusals_exit_2(world_erased, inception_weights, tmp_path, capsys):
    base = ["audit", "--model", str(world_erased), "--concept", "red", "--limit", "1"]
    photos = tmp_path / "photos"
    photos.mkdir()
    cases = [
        (["--fid-images", str(photos)], "--fid-images needs --inception-weights"),
        (["--inception-weights", str(inception_weights), "--reference", "none"],
         "FID/KID need reference images"),
        (["--inception-weights", str(inception_weights), "--fid-images", str(photos / "no")],
         "not a folder"),
        (["--inception-weights", str(tmp_path / "none.safetensors")],
         "Inception weights not found"),
    ]  # fmt: skip
    for extra, needle in cases:
        out = tmp_path / "out"
        r = run_main(capsys, *base, *extra, "--out", str(out))
        assert_one_line_error(r, needle)
        assert not out.exists()


def test_world_features_tell_a_shifted_world_from_the_world():
    """The world classifier's pooled trunk as FID/KID features: fresh renders of the world's
    retain colours against other renders of the same colours are near 0; against renders in
    another colour (red), far away, with intervals that separate."""
    from erasekit.concepts import prompt_set_from_list
    from erasekit.detectors.world import WorldFeatures
    from erasekit.evaluation import distribution_metrics
    from erasekit.world.render import render_dataset

    features = WorldFeatures()
    assert features.describe()["version"].startswith("world-classifier sha256:")

    def renders(seed, colours):
        images, _, _ = render_dataset(32, seed, colours=colours)
        return features.features([Image.fromarray(a) for a in images])

    a, b = renders(0, ("green", "blue")), renders(1, ("green", "blue"))
    shifted = renders(2, ("red",))
    assert a.shape == (32, 64) and a.dtype == torch.float64
    ps = prompt_set_from_list([f"p{i}" for i in range(8)])
    groups = [i // 4 for i in range(32)]

    def measure(x, y):
        return distribution_metrics(x, groups, y, list(range(32)), prompt_set=ps,
                                    definition={"features": features.describe()})  # fmt: skip

    same, different = measure(a, b), measure(a, shifted)
    for key in ("fid/inline", "kid/inline"):
        assert different[key]["value"] > 10 * abs(same[key]["value"])
        assert different[key]["ci95"][0] > same[key]["ci95"][1]


def test_world_audit_reports_kid_on_the_world_features(world_erased, tmp_path, capsys):
    """--fid-features world: FID and KID of the retain renders against the reference model's,
    no Inception weights needed; an unknown choice is one line."""
    out = tmp_path / "audit"
    r = run_main(capsys, "audit", "--model", str(world_erased), "--concept", "red", "--limit",
                 "2", "--n-per-prompt", "2", "--never-learned", "none", "--no-progress",
                 "--fid-features", "world", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    audited = json.loads((out / "results.json").read_text())["results"]["audited"]
    m = audited["kid/retain"]
    assert m["n_images"] == 4 and m["definition"]["features"]["name"] == (
        "world-classifier-features"
    )
    assert m["ci95"][0] <= m["ci95"][1] and m["higher_is_better"] is False
    assert "fid/retain" in audited and "kid/direct" not in audited
    r = run_main(capsys, "audit", "--model", str(world_erased), "--concept", "red",
                 "--fid-features", "clip", "--out", str(tmp_path / "bad"))  # fmt: skip
    assert_one_line_error(r, "invalid choice")
    assert not (tmp_path / "bad").exists()
