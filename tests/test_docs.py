"""The documentation site builds with --strict (a broken link fails) and renders in a real
headless browser: the home page and a method page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import dump_dom

ROOT = Path(__file__).resolve().parents[1]
ENV = {"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)}


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
               "--site-dir", str(site)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = build(ROOT / "mkdocs.yml", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_docs_build_strictly_with_every_page_in_the_nav(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md")]
    pages += [f"methods/{p.name}" for p in (ROOT / "docs" / "methods").glob("*.md")]
    nav = yaml.safe_dump(config["nav"])
    assert not [p for p in pages if p not in nav], "a docs page missing from mkdocs.yml's nav"
    api = (site / "api" / "index.html").read_text()
    assert "erasekit.api.erase" in api and "AuditResult" in api  # mkdocstrings ran


def test_a_broken_link_fails_the_build(tmp_path):
    """The project's validation settings turn a link to a missing page into a failed build."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the methods](methods/nope.md).\n")
    config.update(docs_dir=str(docs), plugins=["search"], nav=[{"Home": "index.md"}])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    r = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert r.returncode != 0 and "methods/nope.md" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "page, expect",
    [("index.html", ["never learned the concept", "What is in the box", "salun"]),
     ("methods/salun/index.html", ["SalUn (", "ShapesWorld preset", "salun-world-tuning"])],
)  # fmt: skip
def test_pages_render_in_a_headless_browser(site, page, expect, tmp_path):
    r = dump_dom((site / page).as_uri(), tmp_path / "profile", expect[0])
    dom = r.stdout
    assert "md-header" in dom and "md-nav" in dom, r.stderr[-2000:]  # the theme rendered
    for text in expect:
        assert text in dom, text
