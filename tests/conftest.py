"""Shared fixtures: everything is built offline, once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:  # `make test` runs two workers: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD pipeline saved as a diffusers folder with an erasekit manifest."""
    from erasekit.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_vpred_dir(tmp_path_factory) -> Path:
    """The tiny pipeline SD-2 style: v-prediction and 64-wide text embeddings."""
    from erasekit.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-v", seed=0, variant="sd2")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """The tiny pipeline SDXL style: two text encoders, added time/text conditioning."""
    from erasekit.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-xl", variant="sdxl")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from erasekit.models import load_pipeline

    return load_pipeline(tiny_model_dir)


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300
):
    """Run the real `erasekit` entry point in a subprocess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "erasekit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def run_main(capsys, *args: str):
    """The `erasekit` entry point in this process (no interpreter start-up): exit code, stdout
    and stderr, as ``run_cli`` reports them. ``capsys`` None (a fixture wider than one test):
    the output is captured by redirecting sys.stdout and sys.stderr."""
    import contextlib
    import io
    import subprocess as sp

    from erasekit.cli import main

    def call() -> int:
        try:
            return main(list(args))
        except SystemExit as e:  # argparse: --help, usage errors
            return e.code if isinstance(e.code, int) else 2

    if capsys is None:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = call()
        return sp.CompletedProcess(["erasekit", *args], code, out.getvalue(), err.getvalue())
    capsys.readouterr()
    code = call()
    captured = capsys.readouterr()
    return sp.CompletedProcess(["erasekit", *args], code, captured.out, captured.err)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2, one stderr line starting 'erasekit: error:', no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("erasekit: error:"), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def chromium() -> str:
    """A headless-capable Chromium; skips the test where none is installed (CI must have it:
    .ci/run installs it)."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must provide chromium (.ci/run installs it)")
    pytest.skip("chromium is not installed")


def dump_dom(url: str, profile: Path, ready: str, *extra: str) -> subprocess.CompletedProcess:
    """The DOM of ``url`` after headless Chromium ran its scripts, once ``ready`` (a marker the
    page's script sets) is in it: tried with a virtual-time budget of 5, 20 and 60 s, as image
    decoding runs on real time and a busy machine can miss the first budget."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", *extra,
             f"--user-data-dir={profile}", "--dump-dom"]  # fmt: skip
    for budget in (5000, 20000, 60000):
        r = subprocess.run([*flags, f"--virtual-time-budget={budget}", url],
                           capture_output=True, text=True, timeout=180)  # fmt: skip
        if ready in r.stdout:
            break
    return r


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(path)`` makes once per test session, shared by the xdist workers (an
    flock on a file beside it): expensive fixtures that tests only read."""
    import fcntl
    import shutil

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the session's folder, above every worker's
    out = root / "shared" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.parent / f"{name}.done"
    with open(out.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            if out.exists():
                shutil.rmtree(out)
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def world_erased(tmp_path_factory) -> Path:
    """A world model whose manifest names the full model as its base (weights of no-red)."""
    from erasekit.models import build_manifest, load_pipeline, save_model
    from erasekit.world import world_path

    def build(out: Path) -> None:
        manifest = build_manifest(base_model=world_path("full"), method="copy-of-no-red")
        save_model(load_pipeline(world_path("no-red")), out, manifest)

    return shared_folder(tmp_path_factory, "world-erased", build)


def one_and_two_processes(
    args: list[str], one: list[str], two: list[str], tmp_path: Path, timeout: int = 900
) -> tuple[Path, Path]:
    """Run ``python -m erasekit ARGS`` in one process (+ ``one``) and under torchrun with 2 CPU
    processes (+ ``two``), into tmp_path/one and tmp_path/two; both must succeed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ERASEKIT_CACHE": str(tmp_path / "cache")}
    outs = tmp_path / "one", tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node", "2"]  # fmt: skip
    for prefix, extra, out in (([sys.executable], one, outs[0]), (launch, two, outs[1])):
        cmd = [*prefix, "-m", "erasekit", *args, *extra, "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
    return outs


def sld_folder(model_dir: Path, dest: Path) -> Path:
    """A copy of ``model_dir`` guided by SLD ("max") on a learned ``<neg>`` token."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    shutil.copytree(model_dir, dest)
    save_file({"<neg>": torch.randn(32, generator=torch.Generator().manual_seed(0))},
              str(dest / "learned_embeds.safetensors"))  # fmt: skip
    (dest / "guidance.json").write_text(json.dumps(
        {"mode": "sld", "concept": "<neg>", "embedding": "learned_embeds.safetensors",
         "sld": "max"}))  # fmt: skip
    return dest
