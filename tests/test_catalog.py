"""The registries are the one source of truth: every name has a summary, presets are data that
build valid configs and name evidence that exists, and the README's and the docs' tables are
the registries rendered."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from erasekit import catalog
from erasekit.config import build_config
from erasekit.methods import PRESET_DIR, get_method, preset_data

ROOT = Path(__file__).resolve().parents[1]
GENERATED = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("kind", list(catalog.REGISTRIES))
def test_every_registered_name_has_a_one_line_summary(kind):
    for e in catalog.entries(kind):
        assert e.summary and "\n" not in e.summary, f"{kind} {e.name}: no one-line summary"
        assert len(e.summary) <= 110, f"{kind} {e.name}: the summary is longer than one line"


def _fields(method: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(get_method(method).Config)}


@pytest.mark.parametrize("method", catalog.names("methods"))
def test_presets_are_settings_the_config_accepts_as_typed(method):
    cls = get_method(method)
    variants = (cls.preset_info().get("world") or {}).get("by_variant") or {}
    layers = [("world", cls.world_preset()), *cls.named_presets().items(),
              *((f"world {v} {d}", {**cls.world_preset(), **cls.world_by_variant(v, d)})
                for v in variants for d in ("colour", "shape", "style"))]  # fmt: skip
    for where, settings in layers:
        config = build_config(cls.Config, mappings=[(where, settings)])
        for key, value in settings.items():
            # YAML reads 1e-5 as text: a preset value must already have the field's type
            assert type(getattr(config, key)) is type(value), (method, where, key, value)


def test_every_presets_file_belongs_to_a_method_and_names_evidence_that_exists():
    methods = set(catalog.names("methods"))
    for file in PRESET_DIR.glob("*.yaml"):
        if file.stem.endswith(("-meta-sd", "-meta-world")):  # ResAlign's meta-distributions
            continue
        assert file.stem in methods, f"{file.name}: no method of that name"
        world = preset_data(file.stem).get("world")
        if world:
            assert world.get("rule"), f"{file.name}: a world preset says the rule that chose it"
            assert world.get("evidence"), f"{file.name}: a world preset names its evidence"
            for folder in world["evidence"]:
                assert (ROOT / folder).is_dir(), f"{file.name}: evidence {folder} is missing"


def test_no_measured_numbers_in_method_comments():
    """Presets and the numbers behind them live in presets/*.yaml and docs/methods/, not in
    code comments beside a dict (a number in a comment goes stale unseen)."""
    for file in (ROOT / "erasekit" / "methods").rglob("*.py"):
        for line in file.read_text().splitlines():
            text = line.strip()
            if text.startswith("#") and "docs/results/" in text:
                raise AssertionError(f"{file.name}: {text!r}: move it to docs/methods/")


def test_listing_and_details_come_from_the_registry(capsys):
    from erasekit.cli import main

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert [line.split()[0] for line in listed.splitlines()] == catalog.names("methods")
    assert main(["methods", "salun"]) == 0
    shown = capsys.readouterr().out
    assert "docs/results/salun-world-tuning-red-seeds/" in shown and "colour:" in shown
    assert main(["attacks", "unlearndiffatk"]) == 0
    assert "white-box" in capsys.readouterr().out
    assert main(["detectors", "nudenet"]) == 0
    assert main(["methods", "sallun"]) == 2
    assert "did you mean 'salun'" in capsys.readouterr().err


def test_generated_help_names_every_method_and_attack(capsys):
    from erasekit.cli import main

    for argv, kind in ((["erase", "--help"], "methods"), (["audit", "--help"], "attacks")):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for name in catalog.names(kind):
            assert name in text, f"{' '.join(argv)} does not name {name}"


def test_tables_in_readme_and_docs_are_the_registries_rendered():
    found = 0
    for file in GENERATED:
        text = file.read_text()
        found += text.count("<!-- table:")
        assert catalog.fill_tables(text) == text, (
            f"{file.relative_to(ROOT)}: a generated table is stale; run scripts/render_tables.py"
        )
    assert found >= 4  # README's methods, attacks, detectors; the docs' own


def test_the_extending_example_registers_trains_and_lists(tiny_model_dir, tmp_path):
    """docs/extending.md's method, run as written: it registers, trains only cross-attention
    on the tiny pipeline and appears in the listing."""
    import re

    import torch
    from safetensors.torch import load_file

    import erasekit
    from erasekit.methods import METHODS

    page = (ROOT / "docs" / "extending.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    try:
        exec(compile(code, "docs/extending.md", "exec"), {})
        assert "ablate-x" in catalog.listing("methods")
        settings = {"steps": 2, "images_per_prompt": 1}
        out = erasekit.erase(tiny_model_dir, "circle", "ablate-x", tmp_path / "out",
                             settings=settings, progress=False)  # fmt: skip
        file = "unet/diffusion_pytorch_model.safetensors"
        before, after = load_file(tiny_model_dir / file), load_file(out / file)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(".attn2." in k for k in changed)
    finally:
        METHODS._objects.pop("ablate-x", None)


def test_a_world_preset_applies_its_variant_values_under_the_user_settings():
    """ESD's world preset names ESD-x's learning rate for colours: a run selecting esd-x on a
    world colour gets it, ESD-u and other dimensions keep the preset's, and a setting, a named
    preset or a real concept wins over it."""
    from erasekit.api import erase_config

    esd = get_method("esd")
    preset = esd.world_preset()["lr"]
    colour = esd.world_by_variant("esd-x", "colour")["lr"]
    assert colour != preset
    assert erase_config("esd", "red", {"variant": "esd-x"}).lr == colour
    assert erase_config("esd", "red").variant == "esd-u"
    assert erase_config("esd", "red").lr == preset
    assert erase_config("esd", "circle", {"variant": "esd-x"}).lr == preset
    assert erase_config("esd", "red", {"variant": "esd-x", "lr": 1e-5}).lr == 1e-5
    assert erase_config("esd", "red", {"variant": "esd-x"}, preset="paper").lr == 1e-5
    assert erase_config("esd", "church", {"variant": "esd-x"}).lr == esd.Config().lr
