"""Checkpoints: written under a hidden name and renamed when complete, fingerprinted by the
settings that make a run, found again by ``--resume latest`` or a path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.outputs import (
    disk_errors,
    write_json,
)
from erasekit.training.config import ADAPTED_UNET, CHECKPOINTS, STATE_FILE, TrainConfig


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (one being written is a hidden ``.partial`` folder;
    one without its state file is not complete)."""
    folder = work_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _fingerprinted(config: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    return {k: v for k, v in asdict(config).items() if k not in ("keep_checkpoints",)}


def config_fingerprint(method_name: str, config: TrainConfig) -> str:
    settings = _fingerprinted(config)
    return hashlib.sha256(json.dumps([method_name, settings], sort_keys=True).encode()).hexdigest()


def register_unet_hooks(accelerator) -> None:
    """Checkpoints hold a trained U-Net as a diffusers folder (save_pretrained /
    from_pretrained), or, when adapters (a LoRA) are injected into it, as its full state dict
    (``unet/adapted.safetensors``: base and adapter weights); another trained module (e.g. a
    token embedding) is left to accelerate."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    def is_unet(model) -> bool:
        return isinstance(accelerator.unwrap_model(model), UNet2DConditionModel)

    def adapted(model) -> bool:
        return any(".lora_A." in name for name, _ in model.named_parameters())

    def save_hook(models, weights, output_dir):
        for i in reversed(range(len(models))):
            if not is_unet(models[i]):
                continue
            model = accelerator.unwrap_model(models[i])
            if accelerator.is_main_process:
                folder = Path(output_dir) / "unet"
                if adapted(model):
                    folder.mkdir(parents=True, exist_ok=True)
                    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                    save_file(state, str(folder / ADAPTED_UNET))
                else:
                    model.save_pretrained(folder)
            if weights:
                weights.pop(i)

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            if not is_unet(models[i]):
                continue
            model = accelerator.unwrap_model(models.pop(i))
            file = Path(input_dir) / "unet" / ADAPTED_UNET
            if file.is_file():
                model.load_state_dict(load_file(str(file)))
                continue
            saved = UNet2DConditionModel.from_pretrained(Path(input_dir) / "unet")
            model.load_state_dict(saved.state_dict())
            del saved

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, work_dir: Path, step: int, fingerprint: str, config) -> Path:
    """Write checkpoint-STEP under a hidden name, rename it when complete, and only then drop
    the oldest beyond ``checkpoints_total_limit``: a kill at any moment leaves the last
    complete one."""
    folder = work_dir / CHECKPOINTS
    target = folder / f"checkpoint-{step}"
    tmp = folder / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with disk_errors(tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {"step": step, "config": fingerprint,
                                      "settings": _fingerprinted(config)})  # fmt: skip
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        old = list_checkpoints(work_dir)
        for stale in old[: max(0, len(old) - config.checkpoints_total_limit)]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return target


def find_resume(work_dir: Path, resume: str, fingerprint: str, config: TrainConfig) -> str:
    """The checkpoint to resume: the newest complete one for ``latest`` (named on stderr)."""
    if resume == "latest":
        found = list_checkpoints(work_dir)
        if not found:
            raise ErasekitError(
                f"--resume latest: no complete checkpoint in {work_dir / CHECKPOINTS}"
            )
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ErasekitError(f"--resume: not a complete erasekit checkpoint: {path}")
        if path.resolve().parent.parent != work_dir.resolve():
            raise ErasekitError(f"--resume: {path} is not a checkpoint of this output folder")
    saved = json.loads((path / STATE_FILE).read_text())
    if saved.get("config") != fingerprint:
        recorded, now = saved.get("settings") or {}, _fingerprinted(config)
        changed = [f"{k}={recorded.get(k)!r} (now {now.get(k)!r})" for k in sorted(now)
                   if k in recorded and recorded[k] != now[k]]  # fmt: skip
        what = "; ".join(changed) if changed else "another method or config"
        raise ErasekitError(
            f"--resume: {path.name} was made with {what}; a checkpoint resumes only with its own"
            " settings: resume without changing them, or start a new run (another --out, or"
            " --overwrite) with the new ones"
        )
    if resume == "latest":
        print(f"erasekit: resuming from {path.name} (newest complete checkpoint)", file=sys.stderr)
    return str(path)


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines past the resumed step (they belong to the interrupted continuation)."""
    if not log_path.is_file():
        return
    kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in kept))
