"""The example notebook runs from top to bottom in a real Jupyter kernel (nbclient) and shows
what it promises: the metric line, the table, an image and the inline summary."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_example_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(ROOT / "examples" / "erase-and-audit.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "\n".join(o.get("text", "") for o in outputs)
    data = [o.get("data", {}) for o in outputs]
    assert "(n=2)" in text and "vs never-learned" in text
    assert any("<table>" in d.get("text/html", "") and "never-learned" in d.get("text/html", "")
               for d in data)  # fmt: skip
    assert any("image/png" in d for d in data)
    assert (tmp_path / "nb-output" / "audit-red" / "report.html").is_file()
