"""Reliability: broken models are errors not evidence, outputs are exclusive and atomic,
checkpoints survive a kill, and every bad input is one line + exit 2 with nothing left behind."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_one_line_error, run_main
from tests.test_detectors import tiny_clip  # noqa: F401  (session fixture)

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def _edit_weights(src: Path, dst: Path, file: str, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / file))
    edit(state)
    save_file(state, str(dst / file))
    return dst


def _nan_model(src: Path, dst: Path) -> Path:
    def edit(state):
        name = next(k for k in state if k.endswith("conv_in.weight"))
        state[name] = torch.full_like(state[name], float("nan"))

    return _edit_weights(src, dst, UNET_FILE, edit)


def _constant_model(src: Path, dst: Path) -> Path:
    """The VAE decoder's last convolution zeroed: every image is flat grey."""

    def edit(state):
        for k in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
            state[k] = torch.zeros_like(state[k])

    return _edit_weights(src, dst, "vae/diffusion_pytorch_model.safetensors", edit)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or ".lock" in p.name)


# ----------------------------------------------------------------------------- degenerate models


def test_broken_or_collapsed_model_is_an_error_not_an_erased_verdict(
    tiny_model_dir, tmp_path, capsys
):
    nan = _nan_model(tiny_model_dir, tmp_path / "nanw")
    flat = _constant_model(tiny_model_dir, tmp_path / "flat")
    audit = ["--concept", "red", "--reference", "none", "--never-learned", "none", "--limit",
             "2", "--no-progress"]  # fmt: skip
    r = run_main(capsys, "audit", "--model", str(nan), *audit, "--out", str(tmp_path / "a"))
    assert_one_line_error(r, "audited model", "non-finite pixel values", "prompt")
    r = run_main(capsys, "audit", "--model", str(flat), *audit, "--out", str(tmp_path / "b"))
    assert_one_line_error(r, "audited model", "constant image", "collapsed")
    r = run_main(capsys, "generate", "--model", str(nan), "--prompts", "a red circle", "--out",
                 str(tmp_path / "c"), "--no-progress")  # fmt: skip
    assert_one_line_error(r, "non-finite pixel values", "'a red circle'")
    for name in "abc":
        assert not (tmp_path / name).exists()
    assert _leftovers(tmp_path) == []


def _metric(metric: str, value: float, prompt_set: str, protocol: str | None = None) -> dict:
    ci = [max(0.0, value - 0.1), min(1.0, value + 0.1)]
    return {"metric": metric, "value": value, "ci95": ci, "n_images": 48, "n_prompts": 12,
            "prompt_set": prompt_set, "protocol": protocol}  # fmt: skip


def test_verdicts_refuse_to_read_a_drop_as_erasure_when_utility_collapsed():
    from erasekit.reporting import summary_rows, verdict

    def doc(audited, reference=None):
        results = {"audited": audited}
        if reference is not None:
            results["reference"] = reference
        return {"results": results}

    rate, keep = "concept_rate/direct/argmax", "retain_accuracy/retain"
    collapsed = doc({rate: _metric("concept_rate", 0.0, "direct", "argmax"),
                     keep: _metric("retain_accuracy", 0.38, "retain")},
                    {rate: _metric("concept_rate", 0.88, "direct", "argmax"),
                     keep: _metric("retain_accuracy", 0.96, "retain")})  # fmt: skip
    lines = [verdict(r) for r in summary_rows(collapsed)]
    assert "NOT evidence of erasure" in lines[0] and "0.38 vs reference 0.96" in lines[0]
    assert "NOT evidence" not in lines[1]  # the utility row itself states its values
    kept = doc({rate: _metric("concept_rate", 0.0, "direct", "argmax"),
                keep: _metric("retain_accuracy", 0.90, "retain")},
               {rate: _metric("concept_rate", 0.88, "direct", "argmax"),
                keep: _metric("retain_accuracy", 0.96, "retain")})  # fmt: skip
    assert all("NOT evidence" not in verdict(r) for r in summary_rows(kept))
    alone = doc({rate: _metric("concept_rate", 0.0, "direct", "argmax")})
    assert "cannot be told from a broken model" in verdict(summary_rows(alone)[0])


# ----------------------------------------------------------------------------- exclusive outputs


def test_a_second_writer_of_the_same_output_stops_at_once(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "S"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom erasekit.outputs import claim_output\n"
         f"claim_output({str(out)!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / ".S.partial").mkdir()  # the other run's work in progress
        (tmp_path / ".S.partial" / "mine.png").write_bytes(b"x")
        gen = ["generate", "--model", str(tiny_model_dir), "--prompts", "a red circle",
               "--out", str(out), "--no-progress"]  # fmt: skip
        r = run_main(capsys, *gen)
        assert_one_line_error(r, "being written by another erasekit process", str(holder.pid))
        assert (tmp_path / ".S.partial" / "mine.png").is_file(), "the other run's work is kept"
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and the output is free again.
    assert run_main(capsys, *gen).returncode == 0
    assert (out / "samples.jsonl").is_file() and _leftovers(tmp_path) == []


def test_output_may_not_overlap_an_input(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    gen = ["generate", "--model", str(model), "--prompts", "x", "--no-progress", "--overwrite"]
    assert_one_line_error(run_main(capsys, *gen, "--out", str(model)), "overlaps the input")
    assert_one_line_error(run_main(capsys, *gen, "--out", str(tmp_path)), "overlaps the input")
    assert (model / "model_index.json").is_file(), "the model folder is untouched"


# ----------------------------------------------------------------------------- checkpoints


def test_a_kill_during_a_checkpoint_save_resumes_from_the_last_complete_one(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = []

    def dying_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # half of the second checkpoint is on disk when the kill comes
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(self, output_dir, **kwargs)

    args = ["erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method", "esd",
            "--out", str(tmp_path / "e"), "--no-progress", "--set", "steps=3", "--set",
            "ddim_steps=2", "--set", "checkpointing_steps=1", "--set",
            "checkpoints_total_limit=1"]  # fmt: skip
    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    assert run_main(capsys, *args).returncode == 130  # interrupted
    monkeypatch.setattr(Accelerator, "save_state", real)
    checkpoints = tmp_path / ".e.partial" / "checkpoints"
    assert (checkpoints / "checkpoint-1" / "erasekit_state.json").is_file(), "limit waits"
    assert not (checkpoints / "checkpoint-2").exists()
    r = run_main(capsys, *args, "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert "resuming from checkpoint-1" in r.stderr
    log = (tmp_path / "e" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in log] == [1, 2, 3]


def test_resume_with_changed_settings_names_them(tiny_model_dir, tmp_path, capsys):
    base = ["erase", "--model", str(tiny_model_dir), "--concept", "circle", "--method", "esd",
            "--out", str(tmp_path / "e"), "--no-progress", "--set", "ddim_steps=2", "--set",
            "checkpointing_steps=1"]  # fmt: skip
    r = run_main(capsys, *base, "--set", "steps=2", "--set", "lr=1e30", "--set",
                 "max_grad_norm=0")  # fmt: skip
    assert_one_line_error(r, "loss became", "start a new run with a lower lr")
    r = run_main(capsys, *base, "--set", "steps=2", "--set", "lr=1e-5", "--set",
                 "max_grad_norm=0", "--resume", "latest")  # fmt: skip
    assert_one_line_error(r, "lr=1e+30 (now 1e-05)", "start a new run")


# ----------------------------------------------------------------------------- cleanup


def test_every_failure_cleans_its_partial_and_a_full_disk_says_so(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from PIL import Image

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    gen = ["generate", "--model", str(tiny_model_dir), "--prompts", "a red circle", "--out",
           str(tmp_path / "g"), "--no-progress", "--n-per-prompt", "2"]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", full)
        assert_one_line_error(run_main(capsys, *gen), "disk full", "cannot write")
    assert not (tmp_path / "g").exists() and _leftovers(tmp_path) == []

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", read_only)
        assert_one_line_error(run_main(capsys, *gen), "read-only file system")
    assert _leftovers(tmp_path) == []

    assert run_main(capsys, *gen, "--height", "7").returncode == 2
    assert not (tmp_path / "g").exists() and _leftovers(tmp_path) == []

    assert run_main(capsys, *gen).returncode == 0
    write_text = Path.write_text

    def full_for_reports(self, *args, **kwargs):
        if self.name.startswith(".report"):
            self.write_bytes(b"<html>half")  # part of it reached the disk
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    audit = tmp_path / "audit"
    r = run_main(capsys, "audit", "--model", str(tiny_model_dir), "--concept", "red",
                 "--reference", "none", "--never-learned", "none", "--limit", "1",
                 "--no-progress", "--out", str(audit))  # fmt: skip
    assert r.returncode == 0, r.stderr
    monkeypatch.setattr(Path, "write_text", full_for_reports)
    assert_one_line_error(run_main(capsys, "report", str(audit)), "disk full")
    assert sorted(p.name for p in audit.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------- bad inputs


def _bad_cases(tiny: Path, tmp: Path, clip: tuple[Path, Path]) -> list[tuple[list[str], str]]:
    """(argv, fragment of the one error line), close to the commands that found each case."""
    gen = ["generate", "--model", str(tiny), "--no-progress", "--out", str(tmp / "o")]
    erase = ["erase", "--model", str(tiny), "--concept", "circle", "--method", "esd",
             "--no-progress", "--out", str(tmp / "o"), "--set", "steps=1", "--set",
             "ddim_steps=2"]  # fmt: skip

    def write(name: str, data: str | bytes) -> str:
        path = tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    def drop(state):
        state.pop(next(k for k in state if k.endswith("conv_in.bias")))

    missing = _edit_weights(tiny, tmp / "missing-tensor", UNET_FILE, drop)
    listed = tmp / "list-manifest"
    shutil.copytree(tiny, listed)
    (listed / "erasekit.json").write_text("[]")
    bad_sampler = tmp / "bad-sampler"
    shutil.copytree(tiny, bad_sampler)
    manifest = json.loads((bad_sampler / "erasekit.json").read_text())
    (bad_sampler / "erasekit.json").write_text(json.dumps({**manifest, "sampler": {"steps": "x"}}))
    file = write("a-file", "x")
    results = {"schema": "erasekit.results", "schema_version": 1, "concept": {}, "evaluation": {},
               "protocols": {}, "detectors": {}, "provenance": {}, "results": {}}  # fmt: skip
    no_results = tmp / "no-results"
    no_results.mkdir()
    (no_results / "results.json").write_text(json.dumps({k: v for k, v in results.items()
                                                         if k != "results"}))  # fmt: skip
    future = tmp / "future"
    future.mkdir()
    (future / "results.json").write_text(json.dumps({**results, "schema_version": 99}))
    corrupt = tmp / "corrupt-samples"
    corrupt.mkdir()
    (corrupt / "results.json").write_text(json.dumps(results))
    (corrupt / "samples.jsonl").write_text('{"index": 0}\n{"index": 1, \n')
    bogus = {}
    for detector, extra in (("world", "dimension: colour, target: red"),
                            ("clip", "target: cat, classes: [cat, dog]")):  # fmt: skip
        bogus[detector] = write(f"bogus-{detector}.yaml", (
            f"name: bogus-{detector}\nkind: object\nforget: [a red circle]\nretain: [a blue"
            f" circle]\nsurrogate: a shape\ndetector: {{name: {detector}, {extra},"
            " protocol: bogus}\n"))  # fmt: skip
    return [
        ([*gen[:2], str(missing), *gen[3:], "--prompts", "x"], "lacks the weight"),
        ([*gen, "--prompts", write("s.csv", "prompt,seed\nx,1e400\n")], "integer in [0, 2^63-1]"),
        ([*gen, "--prompts", write("t.csv", "prompt,seed\nx,99999999999999999999\n")], "2^63-1"),
        ([*erase, "--set", "seed=99999999999999999999999"], "seed must be an integer"),
        ([*gen, "--prompts", "x", "--height", "7"], "--height 7: must be a multiple of"),
        ([*gen[:-1], str(Path(file) / "sub"), "--prompts", "x"], "cannot write"),
        ([*gen[:2], str(listed), *gen[3:], "--prompts", "x"], "not a JSON object"),
        ([*gen[:2], str(bad_sampler), *gen[3:], "--prompts", "x"], "steps must be a positive"),
        (["report", str(no_results)], "no 'results' object"),
        (["report", str(future)], "schema_version 99"),
        (["report", str(corrupt)], "line 2 is not valid JSON"),
        ([*gen, "--prompts", "x", "--guidance", "nan"], "guidance: a finite number is required"),
        ([*erase, "--set", "max_grad_norm=nan"], "max_grad_norm: expected a finite number"),
        ([*erase, "--set", "checkpointing_steps=-1"], "checkpointing_steps must be 0"),
        ([*gen, "--prompts", write("nul.txt", b"\x00" * 64)], "NUL bytes"),
        (
            ["audit", "--model", str(tiny), "--concept", bogus["world"], "--out", str(tmp / "o")],
            "unknown world protocol 'bogus'",
        ),
        (
            [
                "audit",
                "--model",
                str(tiny),
                "--concept",
                bogus["clip"],
                "--out",
                str(tmp / "o"),
                "--clip-model",
                str(clip[0]),
                "--clip-weights",
                str(clip[1]),
            ],
            "unknown clip protocol 'bogus'",
        ),
        ([*gen[:-1], str(tiny), "--overwrite", "--prompts", "x"], "overlaps the input"),
    ]


def test_bad_inputs_are_one_line_and_exit_2(tiny_model_dir, tiny_clip, tmp_path, capsys):  # noqa: F811
    cases = _bad_cases(tiny_model_dir, tmp_path, tiny_clip)
    for args, fragment in cases:
        assert_one_line_error(run_main(capsys, *args), fragment)
        assert not (tmp_path / "o").exists(), args
        assert _leftovers(tmp_path) == [], args
    assert (tiny_model_dir / "model_index.json").is_file()


def test_long_prompts_warn_once_with_the_count(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n" + "very " * 2000 + "long\n" + "also " * 100 + "long\n")
    r = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o"), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "warning:" in ln]
    assert len(warnings) == 1 and "2 of 3 prompts exceed" in warnings[0], r.stderr
    text = (tmp_path / "o" / "generation.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
