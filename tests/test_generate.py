import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.concepts import prompt_set_from_list, read_prompt_set
from erasekit.errors import ErasekitError
from erasekit.outputs import read_jsonl
from erasekit.sampling import SamplerSettings, derive_seed, generate, make_batches, plan_samples

FAST = SamplerSettings(steps=3, guidance=5.0)


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


def test_generate_writes_images_and_records(tiny_pipe, tiny_model_dir, tmp_path):
    ps = prompt_set_from_list(["a red circle", "a blue square"])
    records = generate(
        tiny_pipe,
        ps,
        tmp_path / "out",
        model_path=tiny_model_dir,
        settings=FAST,
        n_per_prompt=2,
        seed=7,
        progress=False,
    )
    assert len(records) == 4
    lines = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert lines == json.loads(json.dumps(records))
    for rec in lines:
        assert {"prompt", "seed", "guidance", "steps", "sampler", "image"} <= rec.keys()
        img = Image.open(tmp_path / "out" / rec["image"])
        assert img.size == (32, 32) and rec["sampler"] == "DDIMScheduler"
    assert [r["seed"] for r in lines] == [derive_seed(7, i, k) for i in range(2) for k in range(2)]
    meta = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert meta["prompt_set"]["sha256"] == ps.sha256 and meta["n_images"] == 4
    assert meta["model"]["sha256"] and meta["sampler"]["steps"] == 3
    assert not list(tmp_path.glob(".*partial")), "temporary folder was renamed"


def test_generate_is_deterministic_and_seed_sensitive(tiny_pipe, tmp_path):
    ps = prompt_set_from_list(["a red circle", "a green cross", "a yellow triangle"])
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate(
            tiny_pipe, ps, tmp_path / name, settings=FAST, seed=seed, batch_size=2, progress=False
        )
    a, b, c = (_pixels(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a), "another seed gives other images"


def test_prompt_set_seeds_and_guidance_precedence(tmp_path):
    f = tmp_path / "u.csv"
    f.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n0,a,100,9.0\n1,b,200,\n")
    ps = read_prompt_set(f)
    plan = plan_samples(ps, FAST, n_per_prompt=2, seed=5)
    assert [r["seed"] for r in plan] == [100, 101, 200, 201]
    assert [r["guidance"] for r in plan] == [9.0, 9.0, 5.0, 5.0]  # CSV, else the model default
    forced = plan_samples(ps, FAST, guidance=3.0)
    assert {r["guidance"] for r in forced} == {3.0}  # an explicit flag wins


def test_batches_group_equal_settings():
    ps = prompt_set_from_list(list("abcde"))
    plan = plan_samples(ps, FAST)
    plan[2]["guidance"] = 9.0
    assert [[r["prompt"] for r in b] for b in make_batches(plan, 2)] == [
        ["a", "b"],
        ["c"],
        ["d", "e"],
    ]
    with pytest.raises(ErasekitError):
        make_batches(plan, 0)


def test_model_recorded_defaults_and_overrides(tiny_model_dir):
    recorded = SamplerSettings.for_model(tiny_model_dir)
    assert (recorded.steps, recorded.guidance, recorded.height) == (4, 5.0, 32)
    assert SamplerSettings.for_model(tiny_model_dir, steps=9, guidance=None).steps == 9
    assert SamplerSettings.for_model(None) == SamplerSettings()  # SD's 50 steps, 7.5


def test_generate_refuses_non_empty_output(tiny_pipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(ErasekitError, match="not empty"):
        generate(tiny_pipe, prompt_set_from_list(["a"]), out, settings=FAST, progress=False)
    assert (out / "x").read_text() == "keep"


@pytest.mark.slow
def test_two_processes_match_one(tiny_model_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) renders the same images as one process."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow cross\n")
    common = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        str(prompts),
        "--n-per-prompt",
        "2",
        "--batch-size",
        "3",
        "--steps",
        "3",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "erasekit", *common, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "erasekit",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    meta = json.loads((tmp_path / "two" / "generation.json").read_text())
    assert meta["n_processes"] == 2
    a, b = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert len(a) == 8 and a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert read_jsonl(tmp_path / "one" / "samples.jsonl") == read_jsonl(
        tmp_path / "two" / "samples.jsonl"
    )


def test_generate_uses_given_settings_else_the_models(tiny_pipe, tiny_model_dir, tmp_path):
    """The one generate path samples with the model's recorded sampler unless settings are
    given."""
    from erasekit.sampling import generate

    ps = prompt_set_from_list(["a photo of a dog"])
    recorded = SamplerSettings.for_model(tiny_model_dir)
    records = generate(tiny_pipe, ps, tmp_path / "a", model_path=tiny_model_dir, n_per_prompt=2,
                       progress=False)  # fmt: skip
    assert [r["guidance"] for r in records] == [recorded.guidance] * 2
    other = SamplerSettings.for_model(tiny_model_dir, guidance=recorded.guidance + 2.5)
    records = generate(tiny_pipe, ps, tmp_path / "b", model_path=tiny_model_dir, settings=other,
                       progress=False)  # fmt: skip
    assert [r["guidance"] for r in records] == [recorded.guidance + 2.5]
