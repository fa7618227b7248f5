"""Train ShapesWorld: VAE, world classifier, text encoder, and a U-Net per variant.

Recipe (measured on a 2-core CPU; docs/world.md has the reasoning and docs/results/world.md the
bars it meets):
- 32x32 RGB renders -> AutoencoderKL with 4x downsampling -> 8x8x4 latents.
- CLIPTextModel (hidden 32, 2 layers), pre-trained on every concept's captions to name the
  colour, shape and style of a caption from its pooled output and its mean over positions
  (synonyms and indirect phrasings included), then frozen: the U-Net gets conditioning that
  already separates the concepts.
- UNet2DConditionModel, cross-attention in both levels, v-prediction on SD's scaled-linear
  betas rescaled to zero terminal SNR (with SD-1's schedule so much signal survives at t=T on
  8x8 latents that the starting noise, not the prompt, picks the colour), 10% caption dropout,
  EMA. One base U-Net is trained on data without any held-out concept; every variant continues
  from it on its own data, so a never-learned reference's U-Net has seen no image and no caption
  of its concept. The VAE and the text encoder are shared.
- DDIM sampling with trailing timesteps, guidance ``recipe.sampler["guidance"]``.

The build is resumable: every stage writes into a work folder beside the output, U-Net training
checkpoints every ``checkpoint_every`` steps, and the per-step randomness is a function of
(seed, step), so a resumed build gives the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.world import WORLD_VERSION
from erasekit.world.parts import (  # noqa: F401 - re-exported
    assemble_pipeline,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    declare_float32,
    encode_dataset,
    latest_checkpoint,
    train_text_encoder,
    train_unet,
    train_vae,
)
from erasekit.world.recipe import (  # noqa: F401 - re-exported
    BASE,
    HELD_OUT,
    VARIANTS,
    WorldRecipe,
    variant_values,
)

# The recipe fields the shared stages (VAE, classifier, text encoder) depend on: a build may take
# those stages from an earlier build whose recipe agrees on every one of them.
SHARED_STAGE_FIELDS = ("seed", "vae_steps", "vae_batch", "vae_lr", "classifier_steps",
                       "text_encoder_steps", "text_encoder_batch", "text_encoder_lr", "warmup",
                       "heldout_n")  # fmt: skip


SHARED_STAGES = ("vae", "classifier", "text_encoder")


TEXT_ENCODER_NOTE = {True: "shared", False: "its own (trained on its captions only)"}


def _seed_shared_stages(work: Path, source: Path, recipe: WorldRecipe) -> dict:
    """Copy an earlier build's VAE, classifier and text encoder into ``work`` as finished
    stages, so that only the U-Nets are trained (the detector and the latent space stay those of
    ``source``). Weights stored in fp16 are loaded back as fp32. Returns what was reused."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from erasekit.outputs import write_json

    info_file = source / "build.json"
    if not info_file.is_file():
        raise ErasekitError(f"--reuse-from {source}: not a world build (no build.json)")
    built = json.loads(info_file.read_text())
    ours = _recipe_record(recipe)
    differ = [k for k in SHARED_STAGE_FIELDS if built.get("recipe", {}).get(k) != ours[k]]
    if differ:
        raise ErasekitError(
            f"--reuse-from {source}: its recipe differs in {', '.join(differ)}, which its VAE, "
            "classifier or text encoder depend on"
        )
    try:
        names = built["variants"]
        if built.get("recipe", {}).get("variant_text_encoders"):
            names = [v for v in names if HELD_OUT.get(v) is None]  # the shared encoder's models
        model = source / names[0]
        vae = AutoencoderKL.from_pretrained(str(model / "vae"), torch_dtype=torch.float32)
        encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder"),
                                                torch_dtype=torch.float32)  # fmt: skip
        shutil.copytree(source / "classifier", work / "classifier")
    except (KeyError, IndexError, OSError, ValueError) as e:
        raise ErasekitError(f"--reuse-from {source}: an incomplete world build ({e})") from None
    vae.save_pretrained(str(work / "vae"))
    config_file = work / "classifier" / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("world_version") != WORLD_VERSION:  # the detector of this world now
        config["trained_for_world_version"] = config.get("world_version", 1)
        config["world_version"] = WORLD_VERSION
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    encoder.save_pretrained(str(work / "text_encoder"))
    write_json(work / "text_encoder" / "training.json", built.get("text_encoder", {}))
    for name in SHARED_STAGES:
        (work / name / ".done").write_text("")
    timings = built.get("timings_s", {})
    return {"from": str(source), "stages": list(SHARED_STAGES),
            "source_timings_s": {k: timings[f"{k}_s"] for k in SHARED_STAGES
                                 if f"{k}_s" in timings}}  # fmt: skip


def work_dir(out_dir: str | Path) -> Path:
    """Where a build keeps its finished stages and checkpoints until the output is complete."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.build"


def _recipe_record(recipe: WorldRecipe) -> dict:
    return json.loads(json.dumps(asdict(recipe)))  # tuples -> lists, as stored


class _Stages:
    """Finished stages of a build in its work folder, with their cumulative wall times."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.timings_file = work / "timings.json"
        self.timings = (
            json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        )

    def done(self, name: str) -> bool:
        return (self.work / name / ".done").is_file()

    def finish(self, name: str, seconds: float) -> None:
        (self.work / name / ".done").write_text("")
        self.timings[f"{name}_s"] = round(seconds, 1)
        tmp = self.timings_file.with_suffix(".partial")
        tmp.write_text(json.dumps(self.timings, indent=2) + "\n")
        os.replace(tmp, self.timings_file)


def build_world(out_dir: str | Path, *args: Any, **kwargs: Any) -> dict:
    """Train everything into ``out_dir``: stages and checkpoints go to ``work_dir(out_dir)``
    (``resume=True`` continues from them), the output is assembled aside and renamed when
    complete, then the work folder is removed. The output's lock is held throughout (a second
    build into the same folder stops at once). Arguments: see ``_build_world``."""
    from erasekit.outputs import output_lock

    with output_lock(out_dir):
        return _build_world(out_dir, *args, **kwargs)


def _build_world(
    out_dir: str | Path,
    recipe: WorldRecipe | None = None,
    variants: tuple[str, ...] = tuple(VARIANTS),
    progress: bool = True,
    fp16: bool = True,
    command: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    reuse_from: str | Path | None = None,
) -> dict:
    """The build's stages (see ``build_world``). With ``reuse_from`` (an earlier build), its
    VAE, classifier and text encoder are taken as they are and only the U-Nets are trained."""
    from erasekit.outputs import atomic_output_dir, write_json

    recipe = recipe or WorldRecipe()
    work, record = _open_work(work_dir(out_dir), recipe, variants, resume, reuse_from)
    started = time.time()
    build = _Build(recipe, work, _Stages(work), progress, device)
    build.shared_stages()
    unet_seed = recipe.seed if recipe.unet_seed is None else recipe.unet_seed
    build.unet_stage("unet-base", BASE, unet_seed + 100, recipe.base_steps)
    for variant in variants:
        index = list(VARIANTS).index(variant)
        build.unet_stage(f"unet-{variant}", VARIANTS[variant], unet_seed + 101 + index,
                         recipe.unet_steps, init=work / "unet-base",
                         text_encoder=build.load_encoder(build.encoder_stage(variant)))  # fmt: skip
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        shutil.copytree(work / "classifier", tmp / "classifier",
                        ignore=shutil.ignore_patterns(".done"))  # fmt: skip
        build.encoder = build.encoder.cpu()
        for variant in variants:
            build.save_variant(variant, tmp / variant, fp16)
        info = build.info(variants, record, command, started)
        write_json(tmp / "build.json", info)
    shutil.rmtree(work, ignore_errors=True)
    return info


def _open_work(work: Path, recipe: WorldRecipe, variants, resume: bool, reuse_from):
    """The build's work folder and its recipe record: a new one (seeded with an earlier
    build's shared stages with ``reuse_from``), or the unfinished one ``resume`` continues."""
    from erasekit.outputs import write_json

    record = {"recipe": _recipe_record(recipe), "variants": list(variants)}
    if reuse_from is not None:
        reuse_from = Path(reuse_from).resolve()
        record["reuse_from"] = str(reuse_from)
    if work.exists():
        if not resume:
            raise ErasekitError(
                f"an unfinished world build is in {work}: pass --resume to continue it, or "
                "remove that folder to start over"
            )
        stored = json.loads((work / "recipe.json").read_text())
        if {k: v for k, v in stored.items() if k != "reused"} != record:
            raise ErasekitError(
                f"the unfinished build in {work} used another recipe or variant list; remove "
                "that folder to start over"
            )
        return work, stored
    work.mkdir(parents=True)
    if reuse_from is not None:
        try:
            record["reused"] = _seed_shared_stages(work, reuse_from, recipe)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    write_json(work / "recipe.json", record)
    return work, record


class _Build:
    """One world build's stages in its work folder: each trained once (resumable), then
    loaded for the stages after it."""

    def __init__(self, recipe: WorldRecipe, work: Path, stages, progress: bool, device: str):
        from erasekit.tokenizer import build_clip_tokenizer

        self.recipe, self.work, self.stages = recipe, work, stages
        self.progress, self.device = progress, device
        self.tokenizer = build_clip_tokenizer()

    def _stage(self, name: str, train) -> None:
        """Run ``train()`` (which writes the stage's folder) unless the stage is done."""
        if not self.stages.done(name):
            t0 = time.time()
            train()
            self.stages.finish(name, time.time() - t0)

    def shared_stages(self) -> None:
        """The VAE, the classifier, the latent scale and the text encoder every U-Net shares."""
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        from erasekit.world.classifier import load_classifier

        recipe, work, device = self.recipe, self.work, self.device
        self._stage("vae", lambda: train_vae(recipe, self.progress, device).save_pretrained(
            str(work / "vae")))  # fmt: skip
        vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval().requires_grad_(False)
        self.vae = vae.to(device)
        self._stage("classifier", self._train_classifier)
        self.classifier_info = json.loads((work / "classifier" / "config.json").read_text())
        load_classifier(work / "classifier")  # fail early on a damaged stage
        # Latent scale: unit variance of the full data set's latents, as SD's 0.18215.
        probe = encode_dataset(self.vae, min(2048, recipe.n_images), seed=recipe.seed + 1,
                               device=device)  # fmt: skip
        self.scaling = float(1.0 / probe.mean.std())
        self.vae.register_to_config(scaling_factor=self.scaling)
        self._stage("text_encoder", lambda: self._train_encoder("full", "text_encoder"))
        self.text_info = json.loads((work / "text_encoder" / "training.json").read_text())
        encoder = CLIPTextModel.from_pretrained(str(work / "text_encoder"))
        self.encoder = encoder.eval().requires_grad_(False).to(device)

    def _train_classifier(self) -> None:
        from erasekit.world.classifier import (
            abstention_rates,
            heldout_accuracy,
            save_classifier,
            train_classifier,
        )

        recipe, vae = self.recipe, self.vae
        classifier = train_classifier(vae.cpu(), recipe.classifier_steps, seed=recipe.seed,
                                      progress=self.progress)  # fmt: skip
        n = recipe.heldout_n
        accuracy = {
            "renders": heldout_accuracy(classifier, n),
            "vae_round_trips": heldout_accuracy(classifier, n, vae=vae),
        }
        abstention = {
            "renders": abstention_rates(classifier, n // 2),
            "vae_round_trips": abstention_rates(classifier, n // 2, vae=vae),
        }
        save_classifier(classifier, self.work / "classifier",
                        {"heldout_accuracy": accuracy, "n_heldout": n,
                         "off_world_false_positives": abstention})  # fmt: skip
        vae.to(self.device)

    def _train_encoder(self, variant: str, name: str) -> None:
        from erasekit.outputs import write_json

        encoder, info = train_text_encoder(self.recipe, self.tokenizer, variant, self.progress,
                                           self.device)  # fmt: skip
        encoder.save_pretrained(str(self.work / name))
        write_json(self.work / name / "training.json", info)

    def encoder_stage(self, variant: str) -> str:
        """The text encoder's stage ``variant``'s U-Net is trained and shipped with."""
        if not self.recipe.variant_text_encoders or HELD_OUT[variant] is None:
            return "text_encoder"
        name = f"text_encoder-{variant}"
        self._stage(name, lambda: self._train_encoder(variant, name))
        return name

    def load_encoder(self, name: str):
        from transformers import CLIPTextModel

        if name == "text_encoder":
            return self.encoder
        own = CLIPTextModel.from_pretrained(str(self.work / name))
        return own.eval().requires_grad_(False).to(self.encoder.device)

    def unet_stage(self, name: str, concepts: dict, data_seed: int, steps: int, init=None,
                   text_encoder=None) -> None:  # fmt: skip
        """A U-Net trained on the world's images of ``concepts`` (from ``init``'s weights)."""
        if self.stages.done(name):
            return
        from safetensors.torch import save_file

        from erasekit.outputs import write_json

        work = self.work
        data = encode_dataset(self.vae, self.recipe.n_images, seed=data_seed, device=self.device,
                              **concepts)  # fmt: skip
        unet, ema, log, seconds = train_unet(
            self.recipe, data, text_encoder or self.encoder, self.tokenizer, self.scaling,
            seed=data_seed, progress=self.progress, desc=f"world unet ({name})",
            device=self.device, steps=steps, init_dir=init,
            checkpoint_dir=work / name / "checkpoints",
        )  # fmt: skip
        (work / name).mkdir(parents=True, exist_ok=True)
        save_file(unet.state_dict(), str(work / name / "unet.safetensors"))
        save_file(ema.state_dict(), str(work / name / "ema.safetensors"))
        write_json(work / name / "training.json", {"training_log": log})
        self.stages.finish(name, seconds)
        shutil.rmtree(work / name / "checkpoints", ignore_errors=True)

    def save_variant(self, variant: str, folder: Path, fp16: bool) -> None:
        """One world model: its U-Net's EMA weights with the shared VAE and its encoder."""
        from safetensors.torch import load_file

        from erasekit.models import build_manifest, save_model

        recipe, work = self.recipe, self.work
        base_log = json.loads((work / "unet-base" / "training.json").read_text())
        unet = build_unet(recipe.seed, recipe.unet_channels)
        unet.load_state_dict(load_file(str(work / f"unet-{variant}" / "ema.safetensors")))
        log = json.loads((work / f"unet-{variant}" / "training.json").read_text())
        encoder_name = self.encoder_stage(variant)
        own_encoder = self.load_encoder(encoder_name).cpu()
        pipe = assemble_pipeline(unet, self.vae.cpu(), own_encoder, self.tokenizer, recipe)
        if fp16:
            pipe = pipe.to(torch.float16)
        values = variant_values(variant)
        world = {"version": WORLD_VERSION, "variant": variant,
                 "held_out_concept": HELD_OUT[variant], "shapes": list(values["shape"]),
                 "colours": list(values["colour"]), "styles": list(values["style"]),
                 "weights_dtype": "float16" if fp16 else "float32",
                 "text_encoder": TEXT_ENCODER_NOTE[encoder_name == "text_encoder"]}  # fmt: skip
        manifest = build_manifest(
            base_model=None, method="shapesworld-build", config=asdict(recipe),
            seeds=[recipe.seed],
            extra={"world": world, "sampler": dict(recipe.sampler),
                   "training_log": {"base": base_log["training_log"],
                                    variant: log["training_log"]}},
        )  # fmt: skip
        save_model(pipe, folder, manifest)
        if fp16:
            declare_float32(folder)
        self.vae.float()
        self.encoder.float()

    def info(self, variants, record: dict, command: str | None, started: float) -> dict:
        """build.json: the recipe, stage timings, the classifier's and encoders' figures."""
        timings = dict(self.stages.timings)  # this build's stages only
        timings["total_s"] = round(sum(timings.values()) + 0.0, 1)
        info = {
            "world_version": WORLD_VERSION,
            "recipe": _recipe_record(self.recipe),
            "variants": list(variants),
            "timings_s": timings,
            "timings_note": "training wall seconds per stage, summed over resumed runs; "
            f"this run's assembly took {time.time() - started:.0f} s",
            "classifier_heldout_accuracy": self.classifier_info.get("heldout_accuracy"),
            "classifier": {
                k: v for k, v in self.classifier_info.items() if k != "heldout_accuracy"
            },  # fmt: skip
            "text_encoder": self.text_info,
            "command": command,
            "device": self.device,
            "threads": torch.get_num_threads(),
        }
        own = {v: self.encoder_stage(v) for v in variants
               if self.encoder_stage(v) != "text_encoder"}  # fmt: skip
        if own:  # the never-learned models' own encoders
            info["variant_text_encoders"] = {
                v: json.loads((self.work / name / "training.json").read_text())
                for v, name in own.items()
            }
        if "reused" in record:  # stages taken from an earlier build, with what they cost there
            info["reused_stages"] = record["reused"]
        return info
