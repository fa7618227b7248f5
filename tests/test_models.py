import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.errors import ErasekitError
from erasekit.models import (
    build_manifest,
    export_single_file,
    load_pipeline,
    read_manifest,
    save_model,
)
from erasekit.provenance import model_content_hash
from tests.conftest import assert_one_line_error, run_main


def _state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{k}": v
        for c in ("unet", "vae", "text_encoder")
        for k, v in getattr(pipe, c).state_dict().items()
    }


def _assert_same_weights(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _perturbed(pipe):
    """A copy of the pipeline with changed U-Net weights (stands in for an erased model)."""
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.01)
    return pipe


def test_save_load_round_trip_and_manifest(tiny_model_dir: Path, tmp_path: Path):
    pipe = _perturbed(load_pipeline(tiny_model_dir))
    manifest = build_manifest(
        base_model=tiny_model_dir,
        method="esd",
        config={"variant": "esd-x", "lr": 1e-5},
        concept={"name": "church"},
        seeds=[0, 1],
        started=0.0,
    )
    out = save_model(pipe, tmp_path / "erased", manifest)
    loaded = load_pipeline(out)
    _assert_same_weights(pipe, loaded)
    m = read_manifest(out)
    assert m["method"] == {"name": "esd", "config": {"variant": "esd-x", "lr": 1e-5}}
    assert m["base_model"]["sha256"] == model_content_hash(tiny_model_dir)
    assert m["concept"] == {"name": "church"} and m["seeds"] == [0, 1]
    assert m["versions"]["torch"] and m["versions"]["diffusers"]
    assert m["peak_memory"]["host_peak_rss_bytes"] > 0
    assert "git_commit" in m and m["wall_time_s"] > 0
    assert m["sampler"] == read_manifest(tiny_model_dir)["sampler"], "sampler defaults carry over"
    card = (out / "README.md").read_text()
    assert "esd" in card and m["base_model"]["sha256"] in card
    assert model_content_hash(out) != model_content_hash(tiny_model_dir)


def test_plain_diffusers_loads_saved_folder_without_erasekit(tiny_model_dir: Path):
    code = (
        "import sys, diffusers\n"
        f"p = diffusers.StableDiffusionPipeline.from_pretrained({str(tiny_model_dir)!r})\n"
        "assert 'erasekit' not in sys.modules, 'erasekit was imported'\n"
        "print(type(p).__name__, p.unet.config.sample_size)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert "StableDiffusionPipeline 8" in out.stdout


def test_save_refuses_non_empty_folder(tiny_pipe, tmp_path: Path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(ErasekitError, match="not empty"):
        save_model(tiny_pipe, target, {"method": {}})
    assert (target / "keep.txt").read_text() == "user data"
    save_model(tiny_pipe, target, {"method": {}}, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model_index.json").exists()


def test_interrupted_save_leaves_nothing(tiny_pipe, tmp_path: Path, monkeypatch):
    def explode(self, *args, **kwargs):
        Path(args[0], "model_index.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_pipe), "save_pretrained", explode)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny_pipe, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == [], "no half model and no partial folder remain"


def test_missing_path_and_not_a_model(tmp_path: Path):
    with pytest.raises(ErasekitError, match="model path not found"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(ErasekitError, match="not a model: .* no model_index.json"):
        load_pipeline(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ErasekitError, match="not a model"):
        load_pipeline(text)


def test_unsupported_architecture(tiny_model_dir: Path, tmp_path: Path):
    copy = tmp_path / "xl"
    shutil.copytree(tiny_model_dir, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ErasekitError, match="unsupported architecture 'StableDiffusion3Pipeline'"):
        load_pipeline(copy)
    # an SDXL index over SD-1 components: SDXL's second encoder is missing
    index["_class_name"] = "StableDiffusionXLPipeline"
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ErasekitError, match="lacks text_encoder_2, tokenizer_2"):
        load_pipeline(copy)


def test_truncated_safetensors_in_folder(tiny_model_dir: Path, tmp_path: Path):
    copy = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ErasekitError, match="corrupt or truncated safetensors"):
        load_pipeline(copy)


def test_pickle_folder_refused_unless_allowed(tiny_pipe, tmp_path: Path):
    folder = tmp_path / "pickled"
    tiny_pipe.save_pretrained(str(folder), safe_serialization=False)
    assert list(folder.glob("unet/*.bin")), "fixture should hold pickle weights"
    with pytest.raises(ErasekitError, match="--allow-pickle"):
        load_pipeline(folder)
    _assert_same_weights(tiny_pipe, load_pipeline(folder, allow_pickle=True))


def _images(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, generator=g, output_type="np").images


def test_ldm_single_file_round_trip_is_bit_identical(tiny_model_dir: Path, tmp_path: Path):
    """An erased model exported in the original LDM layout (what tools taking
    v1-5-pruned-emaonly.safetensors read) loads back through diffusers' single-file converter
    with the same weights and the same images."""
    from safetensors import safe_open

    erased = _perturbed(load_pipeline(tiny_model_dir))
    single = export_single_file(erased, tmp_path / "erased.safetensors")
    with safe_open(str(single), framework="pt") as f:
        keys = list(f.keys())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    assert all(k.startswith(prefixes) for k in keys)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys  # LDM names, not diffusers'
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    loaded = load_pipeline(single, config=tiny_model_dir)
    _assert_same_weights(erased, loaded)
    assert np.array_equal(_images(erased), _images(loaded))


def test_export_command_and_bad_single_files_are_one_line(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tests.conftest import assert_one_line_error, run_main

    out = tmp_path / "model.safetensors"
    r = run_main(capsys, "export", "--model", str(tiny_model_dir), "--out", str(out))
    assert r.returncode == 0 and "ldm layout" in r.stdout
    state = load_file(str(out))
    wrong = {k: v for k, v in state.items() if ".input_blocks.1." not in k}  # a block missing
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    other = tmp_path / "out.safetensors"
    cases = [
        (["--model", str(tmp_path / "wrong.safetensors"), "--config", str(tiny_model_dir)],
         "could not load model"),
        (["--model", str(out)], "needs --config DIR"),
        (["--model", str(out), "--config", str(tmp_path / "absent")], "--config folder not found"),
        (["--model", str(tmp_path / "model.ckpt"), "--config", str(tiny_model_dir)],
         "refusing to load pickle"),
    ]  # fmt: skip
    torch.save({"state_dict": {}}, tmp_path / "model.ckpt")
    for args, needle in cases:
        r = run_main(capsys, "export", *args, "--out", str(other))
        assert_one_line_error(r, needle)
        assert not other.exists()
    r = run_main(capsys, "export", "--model", str(tiny_model_dir), "--out", str(out))
    assert_one_line_error(r, "exists (pass --overwrite")


def test_single_safetensors_with_config_folder(tiny_model_dir: Path, tmp_path: Path):
    erased = _perturbed(load_pipeline(tiny_model_dir))
    single = export_single_file(erased, tmp_path / "erased.safetensors", layout="components")
    with pytest.raises(ErasekitError, match="needs --config"):
        load_pipeline(single)
    loaded = load_pipeline(single, config=tiny_model_dir)
    _assert_same_weights(erased, loaded)
    single.write_bytes(single.read_bytes()[:-100])
    with pytest.raises(ErasekitError, match="corrupt or truncated"):
        load_pipeline(single, config=tiny_model_dir)


def test_single_file_of_another_architecture(tiny_model_dir: Path, tmp_path: Path):
    from safetensors.torch import save_file

    f = tmp_path / "other.safetensors"
    save_file({"unet.nonsense.weight": torch.zeros(3)}, str(f))
    with pytest.raises(ErasekitError, match="unsupported architecture"):
        load_pipeline(f, config=tiny_model_dir)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_checkpoint_refused_unless_allowed(tiny_pipe, tiny_model_dir, tmp_path, suffix):
    f = tmp_path / f"model{suffix}"
    state = {
        f"{c}.{k}": v
        for c in ("unet", "vae", "text_encoder")
        for k, v in getattr(tiny_pipe, c).state_dict().items()
    }
    torch.save({"state_dict": state}, f)
    with pytest.raises(ErasekitError, match="refusing to load pickle.*--allow-pickle"):
        load_pipeline(f, config=tiny_model_dir)
    _assert_same_weights(tiny_pipe, load_pipeline(f, config=tiny_model_dir, allow_pickle=True))


def test_model_hash_ignores_descriptive_files(tiny_model_dir: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = model_content_hash(copy)
    (copy / "README.md").write_text("another card")
    (copy / "erasekit.json").write_text("{}")
    assert model_content_hash(copy) == before
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert model_content_hash(copy) != before


# --- SDXL --------------------------------------------------------------------------------


def test_sdxl_folder_loads_generates_and_takes_uce(tiny_sdxl_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from erasekit.models import is_sdxl, load_pipeline
    from erasekit.training import encode_prompts

    pipe = load_pipeline(tiny_sdxl_dir)
    assert is_sdxl(pipe) and type(pipe).__name__ == "StableDiffusionXLPipeline"
    # the U-Net's conditions: both encoders' penultimate hidden states, concatenated, and the
    # pooled embedding as one more row; the U-Net called on them equals the pipeline's call
    cond = encode_prompts(pipe, ["a red car"])
    embeds, _, pooled, _ = pipe.encode_prompt("a red car", device="cpu",
                                              do_classifier_free_guidance=False)  # fmt: skip
    assert cond.shape == (1, 78, 64) and torch.equal(cond[:, :77], embeds)
    assert torch.equal(cond[0, 77, :32], pooled[0]) and not cond[0, 77, 32:].any()
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]])  # what the pipeline passes at 32 px
    with torch.no_grad():
        direct = pipe.unet(
            x,
            t,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        packed = pipe.unet(x, t, cond).sample
    assert torch.equal(direct, packed)

    r = run_main(capsys, "generate", "--model", str(tiny_sdxl_dir), "--prompts", "a circle",
                 "--out", str(tmp_path / "gen"), "--n-per-prompt", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "gen").rglob("*.png"))) == 2

    out = tmp_path / "xl-uce"
    r = run_main(capsys, "erase", "--model", str(tiny_sdxl_dir), "--concept", "circle",
                 "--method", "uce", "--out", str(out), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    unet = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(tiny_sdxl_dir / unet)), load_file(str(out / unet))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed == {
        k for k in before if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
    }
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()
    # the erased folder loads in plain diffusers, in a process without erasekit
    code = ("import sys; sys.modules['erasekit'] = None\n"
            "from diffusers import StableDiffusionXLPipeline\n"
            f"p = StableDiffusionXLPipeline.from_pretrained({str(out)!r}, local_files_only=True)\n"
            "print(type(p).__name__, p.unet.config.cross_attention_dim)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["StableDiffusionXLPipeline", "64"]
    # the audit renders every prompt set with the erased SDXL and its SDXL reference
    r = run_main(capsys, "audit", "--model", str(out), "--concept", "circle", "--limit", "1",
                 "--never-learned", "none", "--out", str(tmp_path / "audit"),
                 "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "audit" / "results.json").read_text())
    assert set(doc["results"]) == {"audited", "reference"}
    assert doc["models"]["reference"]["path"] == str(tiny_sdxl_dir.resolve())


def test_sdxl_refusals_are_one_line(tiny_sdxl_dir, tmp_path, capsys):
    model, out = ["--model", str(tiny_sdxl_dir)], ["--out", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["erase", *model, "--method", "resalign", "--concept", "circle", *out],
         "resalign does not run on SDXL yet"),
        (["erase", *model, "--method", "negative-embedding", "--concept", "circle", *out],
         "does not run on SDXL yet"),
        (["audit", *model, "--concept", "red", "--attacks", "finetune", "--reference", "none",
          "--never-learned", "none", *out], "attacks do not run on SDXL yet"),
        (["export", *model, "--out", str(tmp_path / "xl.safetensors")],
         "SDXL is not supported yet"),
    ]  # fmt: skip
    for args, needle in cases:
        assert_one_line_error(run_main(capsys, *args), needle)
        assert not (tmp_path / "o").exists() and not (tmp_path / "xl.safetensors").exists()


def test_an_exported_tree_records_its_commit(tmp_path: Path):
    """Evidence runs from `git archive` snapshots: erasekit/COMMIT carries the commit there
    (export-subst) and git_commit() reads it; a checkout's placeholder is not a commit."""
    from erasekit.provenance import archived_commit

    root = Path(__file__).resolve().parents[1]
    assert archived_commit((root / "erasekit" / "COMMIT").read_text()) is None  # placeholder
    assert archived_commit("0" * 39) is None and archived_commit("a" * 40) == "a" * 40
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    archive = subprocess.run(["git", "-C", str(root), "archive", "HEAD", "erasekit"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    out = subprocess.run(
        [sys.executable, "-c", "from erasekit.provenance import git_commit; print(git_commit())"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout.strip() == head.stdout.strip()
