"""The Python API: the README's snippet runs, roles are any mapping, in-memory pipelines are
audited as they are, results record the call, censoring follows the concept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import erasekit
from erasekit.errors import ErasekitError
from erasekit.world import world_path

README = Path(__file__).parent.parent / "README.md"


def readme_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch, capsys):
    """The snippet as written, with the erasure and the audit shrunk to a few steps/prompts."""
    erase, audit = erasekit.erase, erasekit.audit

    def small_erase(*args, **kwargs):
        settings = {"steps": 2, "images_per_prompt": 1, "mask_batch_size": 8}
        return erase(*args, **kwargs, settings=settings, progress=False)

    def small_audit(*args, **kwargs):
        return audit(*args, **{**kwargs, "n_per_prompt": 1}, limit=2, progress=False)

    monkeypatch.setattr(erasekit, "erase", small_erase)
    monkeypatch.setattr(erasekit, "audit", small_audit)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    exec(compile(readme_snippet(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"red on direct prompts: \d\.\d\d \[[\d.]+, [\d.]+\] \(n=2\)", out), out
    assert "vs never-learned" in out and "safe" not in out.lower()
    doc = json.loads((tmp_path / "audit-red" / "results.json").read_text())
    assert "command" not in doc and doc["call"]["function"] == "erasekit.audit"
    assert doc["models"]["audited"]["path"] == str((tmp_path / "erased-red").resolve())
    assert (tmp_path / "erased-red" / "erasekit.json").is_file()


@pytest.fixture(scope="module")
def roles_audit(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "audit"
    result = erasekit.audit(world_path("no-red"), "red", out, limit=1, progress=False,
                            roles={"reference": world_path("full"), "never-learned": None,
                                   "no-circle": world_path("no-circle")})  # fmt: skip
    return result


def test_audit_takes_any_roles_and_returns_the_results_document(roles_audit):
    assert roles_audit.roles == ["audited", "reference", "no-circle"]
    assert set(roles_audit.results) == {"audited", "reference", "no-circle"}
    m = roles_audit.metrics["concept_rate/direct"]
    assert 0 <= m["ci95"][0] <= m["value"] <= m["ci95"][1] <= 1 and m["definition"]["detector"]
    assert json.loads(roles_audit.to_json()) == roles_audit.document
    again = erasekit.AuditResult.load(roles_audit.path)
    assert again.document == roles_audit.document
    md = (roles_audit.path / "report.md").read_text()
    assert "no-circle" in md.split("## Verdicts")[0]


def test_world_reports_show_flagged_images_and_say_why(roles_audit, tmp_path):
    import shutil

    md = (roles_audit.path / "report.md").read_text()
    assert "shown as rendered" in md and "'red' is not marked sensitive" in md
    copy = tmp_path / "copy"
    shutil.copytree(roles_audit.path, copy)
    erasekit.report(copy, censor=True)
    assert "blurred in report.html (--censor)" in (copy / "report.md").read_text()


def test_audit_of_an_in_memory_pipeline(tmp_path):
    import torch

    pipe = erasekit.load_pipeline(world_path("no-red"))
    with torch.no_grad():  # an edit that exists only in memory
        pipe.unet.conv_out.bias.add_(0.5)
    result = erasekit.audit(pipe, "red", tmp_path / "a", limit=1, progress=False,
                            roles={"never-learned": None})  # fmt: skip
    audited = result.document["models"]["audited"]
    assert audited["in_memory"] is True and audited["path"] == str(world_path("no-red"))
    on_disk = result.document["models"]["reference"]  # no manifest base: the source folder
    assert on_disk["path"] == str(world_path("no-red").resolve())
    assert audited["sha256"] != on_disk["sha256"]  # the edited weights were audited
    assert not list(tmp_path.glob(".erasekit-audited-*"))


def test_evaluate_returns_metrics_with_definitions():
    metrics = erasekit.evaluate(world_path("full"), "red", sets=["direct"], limit=2, seed=1)
    assert set(metrics) == {"concept_rate/direct"}
    m = metrics["concept_rate/direct"]
    shipped = json.loads((world_path("full") / "erasekit.json").read_text())["world"]["version"]
    assert m["n_images"] == 2 and m["definition"]["protocol"]["world_version"] == shipped
    with pytest.raises(ErasekitError, match="unknown prompt set 'nope'"):
        erasekit.evaluate(world_path("full"), "red", sets=["nope"])


def test_api_errors_are_one_line(tmp_path):
    with pytest.raises(ErasekitError, match="unknown concept"):
        erasekit.erase(world_path("full"), "redd", "salun", tmp_path / "x")
    with pytest.raises(ErasekitError, match="role 'audited'"):
        erasekit.audit(world_path("full"), "red", tmp_path / "y", roles={"audited": "x"})
    with pytest.raises(ErasekitError, match="unknown config key 'stepz'"):
        erasekit.erase(world_path("full"), "red", "salun", tmp_path / "z", settings={"stepz": 1})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_metric_prints_as_value_interval_and_n():
    m = erasekit.Metric({"value": 0.0, "ci95": [0.0, 0.0385], "n_images": 96})
    assert str(m) == "0.00 [0.00, 0.04] (n=96)" and m["value"] == 0.0 and m.n == 96
    fid = erasekit.Metric({"value": 123.456, "ci95": [101.2, 140.0], "n_prompts": 8})
    assert str(fid) == "123.5 [101.2, 140.0] (n=8)"
    assert str(erasekit.Metric({"value": None})) == "not measured"


def test_audit_result_for_notebooks(roles_audit):
    """table(): a row per metric, a column per role; images(); the inline HTML."""
    table = roles_audit.table()
    assert table.roles == ["audited", "reference", "no-circle"]
    cell = table["concept_rate/direct"]["reference"]
    assert cell == roles_audit.results["reference"]["concept_rate/direct"]
    lines = str(table).splitlines()
    assert lines[0].split() == ["metric", "audited", "reference", "no-circle"]
    assert any(ln.startswith("concept_rate/direct") and str(cell) in ln for ln in lines)
    assert table.to_markdown().count("\n") == len(table) + 2
    direct = roles_audit.images("reference", "direct")
    assert len(direct) == 1 and direct[0].is_file() and direct[0].suffix == ".png"
    assert len(roles_audit.images("audited")) > len(roles_audit.images("audited", "direct"))
    with pytest.raises(KeyError, match="no images of role 'never-learned'"):
        roles_audit.images("never-learned")
    page = roles_audit._repr_html_()
    assert "<table>" in page and "data:image/png;base64," in page
    assert roles_audit.verdicts()[0][:20] in page.replace("&#x27;", "'")


def test_erase_returns_the_model_and_calls_a_progress_callback(tmp_path):
    events = []
    out = erasekit.erase(world_path("full"), "red", "uce", tmp_path / "uce", progress=events.append)
    assert isinstance(out, erasekit.ErasedModel) and out == tmp_path / "uce"
    assert out.manifest["method"]["name"] == "uce" and (out / "erasekit.json").is_file()
    assert type(out.pipeline().unet).__name__ == "UNet2DConditionModel"
    events.clear()
    erasekit.erase(world_path("full"), "red", "esd", tmp_path / "esd", progress=events.append,
                   settings={"steps": 2, "ddim_steps": 2})  # fmt: skip
    steps = [e for e in events if e.get("unit") == "step"]
    assert [e["done"] for e in steps] == [1, 2] and steps[-1]["total"] == 2
    assert all(e["stage"] == "esd" and "loss" in e for e in steps)


def test_evaluate_takes_generates_loading_options(tmp_path):
    metrics = erasekit.evaluate(world_path("full"), "red", sets=["direct"], limit=1,
                                dtype="fp32", allow_pickle=False)  # fmt: skip
    assert str(metrics["concept_rate/direct"]).endswith("(n=1)")
