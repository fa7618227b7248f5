"""The CLI's conventions, through the real entry point in subprocesses."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import erasekit
from erasekit.cli import build_parser
from tests.conftest import assert_one_line_error, run_cli, run_main


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"erasekit {erasekit.__version__}"


def test_help_for_every_subcommand(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"generate", "concepts", "demo"} <= set(subcommands)
    for name in subcommands:
        result = run_main(capsys, name, "--help")
        assert result.returncode == 0 and "usage: erasekit " + name in result.stdout


def test_generate_end_to_end(tiny_model_dir: Path, tmp_path: Path, capsys):
    result = run_main(
        capsys,
        "generate",
        "--model",
        str(tiny_model_dir),
        "--prompts",
        "a red circle",
        "--out",
        str(tmp_path / "o"),
        "--n-per-prompt",
        "2",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "o" / "images").glob("*.png"))) == 2
    assert "wrote 2 images of 1 prompts" in result.stdout


def test_bad_inputs_one_line_exit_2(tiny_model_dir: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    gen = ["generate", "--prompts", "x", "--out", str(tmp_path / "o")]
    cases = [
        (
            [
                "generate",
                "--model",
                str(tmp_path / "missing"),
                "--prompts",
                "x",
                "--out",
                str(tmp_path / "o"),
            ],
            "model path not found",
        ),
        (
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                str(empty),
                "--out",
                str(tmp_path / "o"),
            ],
            "prompt file is empty",
        ),
        (
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--prompts",
                "missing.csv",
                "--out",
                str(tmp_path / "o"),
            ],
            "prompt file not found",
        ),
        (["generate", "--model", str(tmp_path), *gen[1:]], "not a model"),
        (["generate", "--model", str(tiny_model_dir), "--prompts", "x"], "--out"),
        (["generate", "--model", str(tiny_model_dir), *gen[1:], "--steps", "0"], "at least 1"),
        (["concepts", "nudty"], "did you mean 'nudity'"),
        (["no-such-command"], "invalid choice"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_main(capsys, *args), fragment)
    assert not (tmp_path / "o").exists(), "no output is left behind on errors"


def test_pickle_checkpoint_names_the_flag(tiny_model_dir: Path, tmp_path: Path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    result = run_main(
        capsys,
        "generate",
        "--model",
        str(ckpt),
        "--config",
        str(tiny_model_dir),
        "--prompts",
        "x",
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_error(result, "--allow-pickle")


def test_corrupt_checkpoint(tiny_model_dir: Path, tmp_path: Path, capsys):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    result = run_main(
        capsys, "generate", "--model", str(copy), "--prompts", "x", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, "corrupt or truncated safetensors")


def test_debug_shows_traceback(tmp_path: Path):
    result = run_cli(
        "generate",
        "--model",
        str(tmp_path / "missing"),
        "--prompts",
        "x",
        "--out",
        str(tmp_path / "o"),
        "--debug",
    )
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_demo_runs(tmp_path: Path):
    # the main job: both cores; the limit leaves room for a busy machine
    # the main job at its preset, the audit and the attack shrunk (make demo runs it full size)
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--n-per-prompt", "1",
                     "--attack-steps", "20", "--attack-eval-every", "10", timeout=900,
                     env={"OMP_NUM_THREADS": "2"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    audit = tmp_path / "demo" / "audit"
    data = json.loads((audit / "results.json").read_text())
    roles = {"audited", "reference", "never-learned"}
    assert set(data["results"]) == roles | {f"finetune:{r}" for r in roles}
    assert data["models"]["audited"]["method"] == "salun"
    # the report names the erased model where it lives, not a temporary folder
    erased = (tmp_path / "demo" / "erased-salun").resolve()
    assert data["models"]["audited"]["path"] == str(erased) and "partial" not in str(erased)
    res = data["results"]
    for role in roles:
        acc = res[role]["retain_accuracy/retain"]
        assert 0 <= acc["ci95"][0] <= acc["value"] <= acc["ci95"][1] <= 1
    direct = {role: res[role]["concept_rate/direct"]["value"] for role in roles}
    # the full model draws red when asked; its never-learned reference and the erased one do not
    assert direct["reference"] > direct["never-learned"] + 0.3
    assert direct["reference"] > direct["audited"] + 0.3
    assert (tmp_path / "demo" / "erased-salun" / "salun_mask.safetensors").is_file()
    assert (audit / "report.html").is_file() and (audit / "report.md").is_file()
    assert "report:" in result.stdout and "vs never-learned" in result.stdout
    # the short benign fine-tuning attack ran on all three models, with its curve
    attack = data["attacks"]["finetune"]
    assert set(attack["models"]) == {"audited", "reference", "never-learned"}
    assert all([p["step"] for p in m["curve"]] == [0, 10, 20] for m in attack["models"].values())
    assert "residual memory" in result.stdout
