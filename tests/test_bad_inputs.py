"""Reliability, round two: one row per case a hostile user found, each close to the command
that found it (``W=$(erasekit world path)``). A collapsed model is never "erased"; SIGTERM and
SIGHUP clean up as SIGINT does; outputs are compared with inputs by real path; resumable work
is never deleted silently; bad input is refused before any work; the Python API raises the
package's own usage error."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_one_line_error, run_main
from tests.test_reliability import UNET_FILE, _edit_weights, _leftovers, _nan_model

VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
AUDIT = ["--concept", "red", "--limit", "2", "--n-per-prompt", "1", "--no-progress"]
NO_ROLES = ["--reference", "none", "--never-learned", "none"]


def _world(tmp: Path, name: str, file: str, edit) -> Path:
    from erasekit.world import world_path

    return _edit_weights(world_path("full"), tmp / name, file, edit)


def _zero(*keys: str):
    def edit(state):
        for key in keys or list(state):
            state[key] = torch.zeros_like(state[key])

    return edit


def _erase(model: Path, out: Path) -> list[str]:
    """`erasekit erase` of circle with ESD at one step."""
    return ["erase", "--model", str(model), "--concept", "circle", "--method", "esd", "--set",
            "steps=1", "--set", "ddim_steps=2", "--out", str(out), "--no-progress"]  # fmt: skip


# ----------------------------------------------------------------------------- 1. collapse


def case_vae_out_zeroed_default_roles(tiny, tmp, capsys):
    """Zeroed decoder.conv_out.weight: every image one flat colour (its bias), with the
    default roles: refused, not 'audited − never-learned +0.00'."""
    m = _world(tmp, "m", VAE_FILE, _zero("decoder.conv_out.weight"))
    r = run_main(capsys, "audit", "--model", str(m), *AUDIT, "--out", str(tmp / "a"))
    assert_one_line_error(r, "the audited model", "constant image", "collapsed")


def case_identical_images_no_roles(tiny, tmp, capsys):
    """Zeroed decoder.conv_in.weight: each image has structure (padding) but all are the same
    picture whatever the prompt or seed; refused with no comparison role at all."""
    m = _world(tmp, "m", VAE_FILE, _zero("decoder.conv_in.weight"))
    r = run_main(capsys, "audit", "--model", str(m), *AUDIT, *NO_ROLES, "--out", str(tmp / "a"))
    assert_one_line_error(r, "the audited model", "near-identical", "standard deviation")


def case_unet_zeroed_is_not_evidence(tiny, tmp, capsys):
    """A zeroed U-Net renders noise (varied, not constant): its red 0.00 is read against the
    never-learned model's retain accuracy, not only the reference's."""
    from erasekit.world import world_path

    m = _world(tmp, "m", UNET_FILE, _zero())
    roles = ["--reference", "none", "--never-learned", str(world_path("no-red"))]
    r = run_main(capsys, "audit", "--model", str(m), *AUDIT, *roles, "--out", str(tmp / "a"))
    assert r.returncode == 0, r.stderr
    rates = [ln for ln in r.stdout.splitlines() if ln.startswith("concept rate")]
    assert rates and all("NOT evidence of erasure" in ln for ln in rates), r.stdout
    assert "vs never-learned 1.00" in rates[0], rates[0]
    shutil.rmtree(tmp / "a")
    r = run_main(capsys, "audit", "--model", str(m), *AUDIT, *NO_ROLES, "--out", str(tmp / "a"))
    rates = [ln for ln in r.stdout.splitlines() if ln.startswith("concept rate")]
    assert rates and all("unverified: no utility reference" in ln for ln in rates), r.stdout
    shutil.rmtree(tmp / "a")


# ----------------------------------------------------------------------------- 2. signals


def _signal_mid_run(argv: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start ``erasekit ARGV``, send ``sig`` once its partial output exists, wait for it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erasekit", *argv], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    partial = out.parent / f".{out.name}.partial"
    deadline = time.time() + 120
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the work
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _assert_interrupted(r, name: str, code: int) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert lines == [f"erasekit: interrupted ({name})"], r.stderr


def case_sigterm_generate(tiny, tmp, capsys):
    """`timeout`, Slurm, Kubernetes and `docker stop` send SIGTERM: cleanup, one line, 143."""
    out = tmp / "g"
    gen = ["generate", "--model", str(tiny), "--prompts", "a red circle", "--n-per-prompt",
           "4000", "--batch-size", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    _assert_interrupted(_signal_mid_run(gen, out, signal.SIGTERM), "SIGTERM", 143)
    assert not out.exists() and _leftovers(tmp) == []


def case_sighup_erase(tiny, tmp, capsys):
    """A closed terminal (SIGHUP) during erase: 129, nothing left (no checkpoint was made)."""
    out = tmp / "e"
    erase = ["erase", "--model", str(tiny), "--concept", "circle", "--method", "esd",
             "--set", "steps=100000", "--set", "ddim_steps=2", "--out", str(out),
             "--no-progress"]  # fmt: skip
    _assert_interrupted(_signal_mid_run(erase, out, signal.SIGHUP), "SIGHUP", 129)
    assert not out.exists() and _leftovers(tmp) == []


# ----------------------------------------------------------------------------- 3-4. outputs


def case_symlinked_out_to_the_model(tiny, tmp, capsys):
    """`ln -s model o; erasekit generate --model model ... --out o --overwrite`."""
    model = tmp / "model"
    shutil.copytree(tiny, model)
    (tmp / "o").symlink_to(model)
    r = run_main(capsys, "generate", "--model", str(model), "--prompts", "a red circle",
                 "--out", str(tmp / "o"), "--overwrite", "--no-progress")  # fmt: skip
    assert_one_line_error(r, "symbolic link")
    (tmp / "o").unlink()
    (tmp / "o").symlink_to(model / "unet")  # a link into the input, one level down
    r = run_main(capsys, "generate", "--model", str(model), "--prompts", "x", "--out",
                 str(tmp / "o" / "sub"), "--overwrite", "--no-progress")  # fmt: skip
    assert_one_line_error(r, "overlaps the input")
    assert (tmp / "o").is_symlink() and (model / "model_index.json").is_file()
    assert not (tmp / ".o.old").exists() and _leftovers(tmp) == []


def case_fresh_run_over_resumable_work(tiny, tmp, capsys):
    """`erase` without --resume over an interrupted run's checkpoints stops and says how."""
    checkpoint = tmp / ".e.partial" / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "erasekit_state.json").write_text("{}")
    erase = _erase(tiny, tmp / "e")
    assert_one_line_error(run_main(capsys, *erase), "--resume latest", "--overwrite")
    assert (checkpoint / "erasekit_state.json").is_file(), "the interrupted run's work is kept"
    assert not (tmp / ".e.lock").exists()
    assert run_main(capsys, *erase, "--overwrite").returncode == 0
    assert (tmp / "e" / "erasekit.json").is_file() and _leftovers(tmp) == []


# ----------------------------------------------------------------------------- 5-6. refusals


def case_erase_onto_a_full_disk(tiny, tmp, capsys, monkeypatch):
    """safetensors' own writer fails with 'No space left on device (os error 28)'."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    erase = _erase(tiny, tmp / "e")
    assert_one_line_error(run_main(capsys, *erase), "cannot write", "disk full")
    assert not (tmp / "e").exists() and _leftovers(tmp) == []


def case_unknown_device(tiny, tmp, capsys):
    r = run_main(capsys, "generate", "--model", str(tiny), "--prompts", "x", "--device", "tpu",
                 "--out", str(tmp / "g"), "--no-progress")  # fmt: skip
    assert_one_line_error(r, "--device tpu", "available: cpu")


def case_study_with_an_unknown_attack(tiny, tmp, capsys):
    """A misspelt attack fails before the first cell, in --plan and in the run alike."""
    study = tmp / "s.yaml"
    study.write_text(f"name: s\nbase: {tiny}\nconcepts: [red]\nmodels:\n  original: original\n"
                     "attacks:\n  finetunne: {steps: 1}\n  finetune: {stepz: 1}\n")  # fmt: skip
    for extra in (["--plan"], []):
        r = run_main(capsys, "bench", "run", str(study), "--out", str(tmp / "b"), *extra)
        assert_one_line_error(r, "2 problems", "did you mean 'finetune'", "stepz", "no cell")
    assert not (tmp / "b" / "cells").exists()


def case_nan_base_model(tiny, tmp, capsys):
    """`erase` and `export` from a NaN-weight model refuse before writing anything."""
    nan = _nan_model(tiny, tmp / "nanw")
    r = run_main(capsys, "erase", "--model", str(nan), "--concept", "circle", "--method",
                 "uce", "--out", str(tmp / "e"), "--no-progress")  # fmt: skip
    assert_one_line_error(r, "non-finite weights", "unet.conv_in.weight")
    r = run_main(capsys, "export", "--model", str(nan), "--out", str(tmp / "x.safetensors"))
    assert_one_line_error(r, "non-finite weights")
    assert not (tmp / "e").exists() and not (tmp / "x.safetensors").exists()


def case_concept_yaml_with_an_unknown_key(tiny, tmp, capsys):
    spec = tmp / "c.yaml"
    spec.write_text("name: c\nkind: object\nforget: [a red circle]\nretain: [a blue circle]\n"
                    "surrogate: a shape\nsensitve: false\ndetector: {name: world, dimension:"
                    " colour, target: red}\n")  # fmt: skip
    r = run_main(capsys, "audit", "--model", str(tiny), "--concept", str(spec), "--out",
                 str(tmp / "a"), "--no-progress")  # fmt: skip
    assert_one_line_error(r, "unknown key 'sensitve'", "did you mean 'sensitive'")


def case_prompts_is_a_folder(tiny, tmp, capsys):
    (tmp / "prompts").mkdir()
    r = run_main(capsys, "generate", "--model", str(tiny), "--prompts", str(tmp / "prompts"),
                 "--out", str(tmp / "g"), "--no-progress")  # fmt: skip
    assert_one_line_error(r, "is a folder")


# ----------------------------------------------------------------------------- 7. Python API


def case_api_arguments(tiny, tmp, capsys):
    """Wrong types are the package's UsageError (a ValueError and a TypeError) with one line."""
    import erasekit

    calls = [
        (lambda: erasekit.erase(123, "red", "esd", tmp / "o"), "model: a model folder"),
        (lambda: erasekit.erase(tiny, "red", "esd", tmp / "o", settings=5), "settings:"),
        (lambda: erasekit.erase(tiny, None, "esd", tmp / "o"), "a concept is required"),
        (lambda: erasekit.generate(tiny, None, tmp / "o"), "prompts:"),
        (lambda: erasekit.audit(tiny, "red", tmp / "o", n_per_prompt=0), "n_per_prompt"),
        (lambda: erasekit.evaluate(tiny, "red", guidance=float("nan")), "guidance"),
    ]
    for call, fragment in calls:
        with pytest.raises(erasekit.UsageError, match=fragment) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
        assert "\n" not in str(info.value)
    assert not (tmp / "o").exists()


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_two(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    fn = CASES[case]
    args = (tiny_model_dir, tmp_path, capsys)
    if "monkeypatch" in fn.__code__.co_varnames:
        fn(*args, monkeypatch)
    else:
        fn(*args)
    assert _leftovers(tmp_path) == [], case
    assert (tiny_model_dir / "model_index.json").is_file()
