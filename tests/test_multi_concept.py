"""Several concepts erased in one run (`--concept red,circle`): the combined spec, every method
that can take a list, the audit of each concept and their union, and the one-line refusals."""

from __future__ import annotations

import json

import pytest

import erasekit
from erasekit.concepts import combine_concepts, load_concept
from erasekit.errors import ErasekitError
from tests.conftest import assert_one_line_error, run_main


def test_combined_spec_joins_forget_and_keeps_retain_prompts_naming_neither():
    red, circle = load_concept("red"), load_concept("circle")
    both = load_concept("red,circle")
    assert both.name == "red+circle" and both.words == ["red", "circle"]
    assert both.parts == (red, circle)
    assert set(both.forget.prompts) == set(red.forget.prompts) | set(circle.forget.prompts)
    assert len(both.forget) == len(set(both.forget.prompts))  # "a red circle" once
    kept = [p for p in red.retain.prompts + circle.retain.prompts
            if "red" not in p.split() and "circle" not in p.split()]  # fmt: skip
    assert both.retain.prompts == list(dict.fromkeys(kept)) and kept
    assert set(both.evaluation) == {"red/direct", "red/paraphrase", "red/heldout",
                                    "circle/direct", "circle/paraphrase", "circle/heldout",
                                    "retain"}  # fmt: skip
    assert both.evaluation["retain"] is both.retain and both.never_learned is None
    described = both.describe()
    assert [p["name"] for p in described["parts"]] == ["red", "circle"] and described["combined"]
    assert both.surrogate == "a shape" and both.scale == "world"


def test_bad_concept_lists_are_refused():
    with pytest.raises(ErasekitError, match="names one concept twice"):
        load_concept("red,red")
    with pytest.raises(ErasekitError, match="empty name"):
        load_concept("red,")
    with pytest.raises(ErasekitError, match="unknown concept 'circel'"):
        load_concept("red,circel")
    with pytest.raises(ErasekitError, match="at least two"):
        combine_concepts([load_concept("red")])


def test_salun_relabels_every_concept_word_a_prompt_holds():
    from erasekit.methods.salun import SalUn

    both = load_concept("red,circle")
    defaults = SalUn.defaults(both)
    assert defaults["surrogate_word"] == "red,circle"
    assert defaults["surrogate_replacement"] == "blue,square"
    # a relabel never lands on a concept erased in the same run
    assert SalUn.defaults(load_concept("red,blue"))["surrogate_replacement"] == "green,green"
    # the world learning rate by dimension: a run erasing several takes the highest
    assert [SalUn.defaults(load_concept(c))["lr"] for c in ("red", "circle", "outlined")] == [
        3e-5, 1e-4, 1e-4]  # fmt: skip
    assert defaults["lr"] == 1e-4 and SalUn.defaults(load_concept("red,blue"))["lr"] == 3e-5
    # the retain weight by dimension: a run erasing several takes the lowest
    assert [SalUn.defaults(load_concept(c))["alpha"] for c in ("red", "circle", "outlined")] == [
        8.0, 1.0, 1.0]  # fmt: skip
    assert defaults["alpha"] == 1.0 and SalUn.defaults(load_concept("red,blue"))["alpha"] == 8.0


MULTI = {
    "uce": {},
    "esd": {"steps": 2, "ddim_steps": 2},
    "salun": {"steps": 2, "images_per_prompt": 1},
    "negmerge": {"grid": "lr=1e-3", "copy_steps": 2, "images_per_prompt": 1, "alphas": "1",
                 "eval_per_prompt": 1},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(MULTI))
def test_two_concepts_in_one_run(method, tiny_model_dir, tmp_path):
    out = erasekit.erase(tiny_model_dir, "red,circle", method, tmp_path / "out",
                         settings=MULTI[method], cache_dir=tmp_path / "cache",
                         progress=False)  # fmt: skip
    manifest = json.loads((out / "erasekit.json").read_text())
    assert manifest["concept"]["name"] == "red+circle"
    assert [p["name"] for p in manifest["concept"]["parts"]] == ["red", "circle"]
    data = manifest["training"]["data"]
    if method == "uce":
        assert data["erase"] == ["red", "circle"] and data["guide"] == ["", ""]
    if method == "salun":
        surrogate = manifest["training"]["outputs"]["surrogate"]
        assert "'red' replaced by 'blue', 'circle' replaced by 'square'" in surrogate
        assert "a blue square" in data["anchor_examples"]  # from "a red circle"
    if method == "negmerge":
        original = json.loads((out / "negmerge.json").read_text())["alpha_search"][0]
        n = len(load_concept("red").forget) + len(load_concept("circle").forget)
        assert (original["forget"] * n).is_integer()  # both forget sets, one image per prompt


@pytest.mark.parametrize("method", ["resalign", "negative-embedding"])
def test_one_concept_methods_refuse_a_list(method, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_main(capsys, "erase", "--model", str(tiny_model_dir), "--concept", "red,circle",
                 "--method", method, "--out", str(out), "--no-progress")  # fmt: skip
    assert_one_line_error(r, f"{method} erases one concept per run", "one after another")
    assert not out.exists()


def test_audit_reports_each_concept_and_their_union(tmp_path, capsys):
    from erasekit.world import world_path

    result = erasekit.audit(world_path("full"), "red,circle", tmp_path / "audit", limit=2,
                            roles={"reference": None}, progress=False)  # fmt: skip
    m = result.metrics
    for suffix in ("direct", "paraphrase"):
        parts = [m[f"concept_rate/{c}/{suffix}"] for c in ("red", "circle")]
        union = m[f"concept_rate/union/{suffix}"]
        hits = sum(round(p["value"] * p["n_images"]) for p in parts)
        assert union["n_images"] == sum(p["n_images"] for p in parts) == 4
        assert union["value"] == hits / 4
        assert set(union["definition"]["parts"]) == {"red", "circle"}
    # each part is judged by its own detector target; retain on the combined set
    assert m["concept_rate/red/direct"]["definition"]["protocol"]["target"] == "red"
    assert m["concept_rate/circle/direct"]["definition"]["protocol"]["target"] == "circle"
    assert "retain_accuracy/retain" in m
    assert {"argmax (red)", "argmax (circle)"} <= set(result.document["protocols"])
    md = (tmp_path / "audit" / "report.md").read_text()
    assert "'union/direct'" in md and "'circle/paraphrase'" in md
    # attacks audit one concept at a time
    r = run_main(capsys, "audit", "--model", str(world_path("full")), "--concept", "red,circle",
                 "--out", str(tmp_path / "a2"), "--attacks", "finetune")  # fmt: skip
    assert_one_line_error(r, "attacks audit one concept at a time")
    assert not (tmp_path / "a2").exists()
