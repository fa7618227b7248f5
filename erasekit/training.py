"""The one training loop every gradient-based erasure method runs on.

Patterned on diffusers' accelerate examples: an ``Accelerator`` with mixed precision, gradient
accumulation (a step is counted when gradients sync), clipping, an optimizer with an LR
schedule, optional gradient checkpointing, ``save_state`` checkpoints with diffusers-native model
hooks, a total limit and ``--resume latest``, a progress bar with the loss, a JSON-lines training
log, and a stop with the last good checkpoint kept when the loss turns NaN/inf.

A method (``erasekit.methods``) supplies its config dataclass (a ``TrainConfig``), the
parameters it trains (of the U-Net, or of another module it names, e.g. a token embedding), and
its loss on a ``{"forget": ..., "retain": ...}`` batch. Frozen parts (VAE, text encoder) are
used once, up front, to encode the data, unless the method runs the text encoder itself; a
frozen teacher U-Net, when a method needs one, stays out of ``prepare`` and is held in the
weight dtype.

Randomness (batch order, noise, timesteps) is a pure function of (seed, step, micro-step,
process), so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from erasekit.concepts import check_seed
from erasekit.errors import ErasekitError
from erasekit.outputs import (
    claim_output,
    commit_output_dir,
    discard_output_dir,
    disk_errors,
    holds_output,
    partial_path,
    prepare_output_dir,
    release_output,
    write_json,
)
from erasekit.progress import Progress
from erasekit.progress import bar as progress_bar

TRAINING_LOG = "training_log.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "erasekit_state.json"  # a checkpoint's step and config; written last
ADAPTED_UNET = "adapted.safetensors"  # a checkpoint's U-Net with adapters injected
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adam", "adamw", "sgd")
IMAGE_SOURCES = ("original", "world")
COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Loop settings every method shares; a method's config subclasses this."""

    steps: int = 100  # optimizer steps (counted when gradients sync)
    lr: float = 1e-5
    batch_size: int = 1  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 0  # 0: no intermediate checkpoints
    checkpoints_total_limit: int = 2
    keep_checkpoints: bool = False  # keep checkpoints/ in the output folder
    seed: int = 0
    images_per_prompt: int = 8  # rendered forget/retain data: images per prompt
    # forget/retain images: "original" (rendered by the original model) or "world" (ShapesWorld
    # concepts: ground-truth renders of each prompt by the world's renderer)
    image_source: str = "original"
    save_dtype: str = "fp32"
    # faster steps, off by default (not yet measured on a GPU; on a CPU see docs/methods/index.md):
    channels_last: bool = False  # the U-Net (and frozen teachers) in channels-last memory
    fused_optimizer: bool = False  # torch's fused Adam / AdamW / SGD kernel
    compile: str = "no"  # torch.compile mode of the U-Net(s): no | default | max-autotune ...

    def validate(self) -> None:
        """Raise ErasekitError on values no run could use."""
        choices = {
            "optimizer": OPTIMIZERS,
            "lr_scheduler": LR_SCHEDULES,
            "mixed_precision": MIXED_PRECISION,
            "save_dtype": ("fp32", "fp16", "bf16"),
            "image_source": IMAGE_SOURCES,
            "compile": COMPILE_MODES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ErasekitError(f"{key} must be one of {', '.join(allowed)}")
        for key in ("steps", "batch_size", "gradient_accumulation_steps", "images_per_prompt"):
            if getattr(self, key) < (0 if key == "steps" else 1):
                raise ErasekitError(f"{key} must be positive, got {getattr(self, key)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ErasekitError(f"lr must be a positive number, got {self.lr}")
        if self.checkpoints_total_limit < 1:
            raise ErasekitError("checkpoints_total_limit must be at least 1")
        if self.checkpointing_steps < 0:
            raise ErasekitError(f"checkpointing_steps must be 0 (none) or positive, got"
                                f" {self.checkpointing_steps}")  # fmt: skip
        if self.max_grad_norm < 0:
            raise ErasekitError(f"max_grad_norm must be 0 (no clipping) or positive, got"
                                f" {self.max_grad_norm}")  # fmt: skip
        check_seed(self.seed, "seed")


# --- data --------------------------------------------------------------------------------


@dataclass
class Split:
    """One side of the training data, encoded once: text conditions and (optional) latents."""

    prompts: list[str]
    cond: torch.Tensor | None  # (n, tokens, dim) text-encoder hidden states
    latents: torch.Tensor | None  # (n, c, h, w) scaled VAE latents; None for prompt-only sets
    anchor: torch.Tensor | None = None  # (n, tokens, dim) per-item surrogate conditions
    ids: torch.Tensor | None = None  # (n, tokens) token ids, for methods that encode per step

    def __len__(self) -> int:
        return len(self.prompts)


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(n, tokens) ids padded to the tokenizer's length: what the text encoder reads."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids  # fmt: skip


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """CLIP hidden states of ``prompts`` (what the U-Net cross-attends to). SDXL: both text
    encoders' penultimate hidden states, concatenated, as its pipeline conditions the U-Net,
    plus the pooled embedding as one more row (``models.pack_sdxl_conditions``)."""
    from erasekit.models import is_sdxl, pack_sdxl_conditions

    out = []
    if is_sdxl(pipe):
        for i in range(0, len(prompts), batch_size):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts[i : i + batch_size], device=pipe.text_encoder.device,
                num_images_per_prompt=1, do_classifier_free_guidance=False)  # fmt: skip
            out.append(pack_sdxl_conditions(embeds, pooled))
        return torch.cat(out)
    for i in range(0, len(prompts), batch_size):
        ids = token_ids(pipe.tokenizer, prompts[i : i + batch_size])
        out.append(pipe.text_encoder(ids.to(pipe.text_encoder.device))[0])
    return torch.cat(out)


@torch.no_grad()
def encode_images(pipe, image_set, batch_size: int = 16) -> torch.Tensor:
    """Scaled VAE latents (posterior means) of an ImageSet at the model's native size."""
    from erasekit.data import load_images

    vae = pipe.vae
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = load_images(image_set, size)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def condition_width(pipe) -> int:
    """The width of the text conditions the U-Net cross-attends to."""
    return int(pipe.unet.config.cross_attention_dim)


def encode_prompt_list(pipe, prompts: list[str]) -> torch.Tensor:
    """Hidden states for every prompt of a list, each distinct prompt encoded once."""
    unique = sorted(set(prompts))
    table = encode_prompts(pipe, unique)
    return table[torch.tensor([unique.index(p) for p in prompts])]


def make_split(pipe, prompts: list[str], image_set=None) -> Split:
    """Encode a prompt list (prompt-only) or an ImageSet (images with their prompts)."""
    if image_set is not None:
        prompts = list(image_set.prompts)
    if not prompts:
        raise ErasekitError("a training set is empty")
    cond = encode_prompt_list(pipe, prompts)
    latents = encode_images(pipe, image_set) if image_set is not None else None
    return Split(prompts=prompts, cond=cond, latents=latents)


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded by (seed, *parts): randomness as a function of the step."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def epoch_indices(n: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Items ``start .. start+count`` of an endless stream that visits all n items once per
    epoch, in a fresh seeded order each epoch (so every item is used, not the same first few)."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        order = torch.randperm(n, generator=step_generator(seed, 7919, epoch))
        take = min(count - len(out), n - offset)
        out.extend(order[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)


# --- the loop ----------------------------------------------------------------------------


@dataclass
class TrainContext:
    """What a method's loss sees: the model being trained, data, scheduler, devices."""

    accelerator: Any
    unet: Any  # the U-Net: prepared (possibly wrapped) when it is what is trained
    pipe: Any
    config: TrainConfig
    data: dict[str, Split]
    empty_cond: torch.Tensor  # (1, tokens, dim) hidden states of ""
    noise_scheduler: Any
    weight_dtype: torch.dtype
    device: torch.device
    work_dir: Path
    step: int = 0
    trained: Any = None  # the prepared module being trained (the U-Net for most methods)
    total: int = 0  # optimizer steps of the run
    optimizer: Any = None
    lr_schedule: Any = None

    def batch(self, split: str, micro: int) -> dict[str, torch.Tensor]:
        """This process's slice of the batch for (step, micro-step) from ``split``."""
        data = self.data[split]
        acc = self.accelerator
        b = self.config.batch_size
        per_step = b * acc.num_processes * self.config.gradient_accumulation_steps
        start = self.step * per_step + (micro * acc.num_processes + acc.process_index) * b
        salt = {"forget": 101, "retain": 202}.get(split, 303)
        idx = epoch_indices(len(data), self.config.seed + salt, start, b)
        fields = {"cond": data.cond, "latents": data.latents, "anchor": data.anchor,
                  "ids": data.ids}  # fmt: skip
        return {k: v[idx].to(self.device) for k, v in fields.items() if v is not None}

    def global_micro(self, micro: int) -> int:
        """The micro-step's index in the step's global batch (micro-step x processes + rank):
        2 processes x 1 micro-step and 1 process x 2 micro-steps draw the same randomness."""
        return micro * self.accelerator.num_processes + self.accelerator.process_index

    def generator(self, micro: int, salt: int = 0) -> torch.Generator:
        return step_generator(self.config.seed, self.step, self.global_micro(micro), 0, salt)

    def item_generators(self, micro: int, salt: int = 0) -> list[torch.Generator]:
        """One generator per item of this process's micro-batch, keyed by the item's position
        in the step's global batch: a batch of 8, 2 x 4 with gradient accumulation and 2
        processes x 4 draw the same noise and timesteps for the same items."""
        b, acc = self.config.batch_size, self.accelerator
        first = (micro * acc.num_processes + acc.process_index) * b
        return [step_generator(self.config.seed, self.step, first + i, salt, 1) for i in range(b)]

    def noisy(self, latents: torch.Tensor, gen: torch.Generator | list[torch.Generator]):
        """(x_t, t, noise) with t ~ U{0..T-1} and Gaussian noise, drawn from ``gen`` (or item i
        from ``gen[i]``, see ``item_generators``)."""
        n_train = self.noise_scheduler.config.num_train_timesteps
        if isinstance(gen, list):
            t = torch.cat([torch.randint(0, n_train, (1,), generator=g) for g in gen])
            noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gen])
        else:
            t = torch.randint(0, n_train, (latents.shape[0],), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
        noise, t = noise.to(latents), t.to(latents.device)
        return self.noise_scheduler.add_noise(latents, noise, t), t, noise

    def denoising_target(self, latents, noise, t) -> torch.Tensor:
        """What the U-Net is trained to predict (ε, or v for v-prediction models)."""
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        return noise

    def denoising_loss(self, batch: dict[str, torch.Tensor], micro: int) -> torch.Tensor:
        """The standard diffusion loss on a batch with latents (used for retain data)."""
        latents = batch["latents"]
        x_t, t, noise = self.noisy(latents, self.item_generators(micro, salt=1))
        pred = self.unet(x_t, t, batch["cond"]).sample
        return F.mse_loss(pred.float(), self.denoising_target(latents, noise, t).float())


def _make_optimizer(config: TrainConfig, groups: list[dict[str, Any]], lr: float):
    """The optimizer over the job's parameter groups (a group may set its own weight_decay)."""
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    fused = {"fused": True} if config.fused_optimizer else {}
    return kind[config.optimizer](groups, lr=lr, weight_decay=config.weight_decay, **fused)


def compile_unet(unet, config: TrainConfig) -> None:
    """Compile ``unet``'s forward in place (its parameters and state dict are unchanged) when
    ``config.compile`` asks for it."""
    if config.compile != "no":
        unet.compile(mode=None if config.compile == "default" else config.compile)


def _checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (one being written is a hidden ``.partial`` folder;
    one without its state file is not complete)."""
    folder = work_dir / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _fingerprinted(config: TrainConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    return {k: v for k, v in asdict(config).items() if k not in ("keep_checkpoints",)}


def _config_fingerprint(method_name: str, config: TrainConfig) -> str:
    settings = _fingerprinted(config)
    return hashlib.sha256(json.dumps([method_name, settings], sort_keys=True).encode()).hexdigest()


def _register_unet_hooks(accelerator) -> None:
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


def _save_checkpoint(accelerator, work_dir: Path, step: int, fingerprint: str, config) -> Path:
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
        old = _checkpoints(work_dir)
        for stale in old[: max(0, len(old) - config.checkpoints_total_limit)]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return target


class NonFiniteLoss(ErasekitError):
    """The loss became NaN or inf; the run stopped."""


class TrainingJob:
    """What the loop trains: a config, the trained module and parameters, a loss on a batch.

    Erasure methods (``erasekit.methods.Method``), the fine-tuning attack and textual inversion
    are jobs. Hooks with defaults: ``prepare_data`` (encode forget/retain sets), ``trained_module``
    (the U-Net, or e.g. a token embedding), ``trainable_parameters``, ``setup`` (teachers, masks;
    runs before ``accelerator.prepare``), ``after_backward`` (edit gradients), ``on_train_start`` /
    ``on_step_end`` (e.g. evaluation curves), ``finalize_unet`` (e.g. fuse a LoRA),
    ``write_outputs`` (extra files beside the model).
    """

    name: ClassVar[str] = "job"
    Config: ClassVar[type[TrainConfig]] = TrainConfig
    needs_images: ClassVar[bool] = False
    # True: ``loss`` also writes the parameters' gradients itself (e.g. a hypergradient) and
    # the loop does not backpropagate the returned (detached) loss.
    sets_gradients: ClassVar[bool] = False
    # True: ``loss`` runs the (frozen) text encoder itself, so the loop keeps it on the device.
    uses_text_encoder: ClassVar[bool] = False
    # True: the job's result is computed, not trained (UCE's closed form, NegMerge's merge of
    # copies it trained in ``prepare_data``), and applied in ``on_train_start``; the loop runs
    # no optimizer step.
    closed_form: ClassVar[bool] = False
    # False: the output folder holds the job's own outputs, the log and erasekit.json, not a
    # copy of the (unchanged) model (e.g. an attack's learned embedding).
    saves_model: ClassVar[bool] = True
    # True: the job handles SDXL (two text encoders, the U-Net's added time/text conditioning).
    runs_on_sdxl: ClassVar[bool] = False
    # True: ``loss`` differentiates through gradients (Hessian-vector products; the job puts
    # those passes on math attention itself): ``compile`` is refused.
    double_backward: ClassVar[bool] = False

    def __init__(
        self,
        config: TrainConfig,
        concept=None,
        *,
        model_path: str | Path,
        forget_images: str | Path | None = None,
        retain_images: str | Path | None = None,
        cache_dir: str | Path | None = None,
        progress: Progress = True,
    ) -> None:
        self.config = config
        self.concept = concept
        self.model_path = Path(model_path)
        self.forget_images = forget_images
        self.retain_images = retain_images
        self.cache_dir = cache_dir
        self.progress = progress
        self.data_info: dict[str, Any] = {}

    # data -----------------------------------------------------------------------------
    def image_set(self, pipe, split: str):
        """Forget/retain images: the user's folder, else (``images``) rendered by the original
        model or, for a ShapesWorld concept, by the world's renderer."""
        from erasekit.data import read_image_folder, render_image_set, world_image_set

        folder = self.forget_images if split == "forget" else self.retain_images
        if folder is not None:
            return read_image_folder(folder, name=f"{split} images")
        prompts = self.concept.forget if split == "forget" else self.concept.retain
        if self.config.image_source == "world":
            if self.concept.scale != "world":
                raise ErasekitError(
                    f"image_source=world needs a ShapesWorld concept ('{self.concept.name}' is not"
                    " one): use images=original, or --forget-images/--retain-images"
                )
            return world_image_set(prompts, n_per_prompt=self.config.images_per_prompt,
                                   seed=self.config.seed, cache_dir=self.cache_dir)  # fmt: skip
        return render_image_set(pipe, self.model_path, prompts,
                                n_per_prompt=self.config.images_per_prompt,
                                seed=self.config.seed, cache_dir=self.cache_dir,
                                progress=self.progress)  # fmt: skip

    def prepare_data(self, pipe) -> dict[str, Split]:
        if not self.needs_images:
            prompts = self.concept.forget.prompts
            self.data_info = {"forget": self.concept.forget.describe()}
            return {"forget": make_split(pipe, prompts)}
        data = {}
        for split in ("forget", "retain"):
            images = self.image_set(pipe, split)
            self.data_info[split] = images.describe()
            data[split] = make_split(pipe, [], images)
        return data

    def describe_data(self) -> dict[str, Any]:
        return self.data_info

    # training -------------------------------------------------------------------------
    def total_steps(self, data: dict[str, Split]) -> int:
        return self.config.steps

    def trained_module(self, pipe) -> torch.nn.Module:
        """The module the loop prepares and trains (after ``prepare_data``)."""
        return pipe.unet

    def trainable_parameters(self, module) -> list[tuple[str, torch.nn.Parameter]]:
        return list(module.named_parameters())

    def learning_rate(self, num_processes: int) -> float:
        """The optimizer's learning rate (e.g. scaled by the global batch)."""
        return self.config.lr

    def setup(self, ctx: TrainContext) -> None:
        """Runs before ``accelerator.prepare``: build frozen teachers, masks."""

    def loss(self, ctx: TrainContext, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_backward(self, unet) -> None:
        """Edit gradients after backward (e.g. a saliency mask)."""

    def parameter_groups(self, trainable: dict[str, torch.nn.Parameter]) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, each clipped to ``max_grad_norm`` on its own (the
        first group's norm is logged): one group unless the job trains two models at once."""
        return [{"params": list(trainable.values())}]

    def on_train_start(self, ctx: TrainContext) -> None:
        """Runs on every process after ``prepare``, before the first step (e.g. step-0 eval)."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """Runs on every process after each optimizer step (e.g. periodic evaluation)."""

    def finalize_unet(self, unet):
        """The U-Net to save (main process, after training): e.g. a LoRA fused into it."""
        return unet

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        """Write extra files into the output folder; return their description."""
        return {}


def train(job: TrainingJob, pipe, *, out_dir: str | Path, **kwargs: Any) -> Path:
    """Run ``job`` on ``pipe`` and write its output folder ``out_dir`` (all or nothing).

    Work happens in ``out_dir``'s hidden ``.partial`` sibling, which also holds the checkpoints,
    so ``resume="latest"`` (or a checkpoint path) continues an interrupted run. A run that fails
    before its first checkpoint leaves nothing behind. The main process holds the output's lock
    (``erasekit.outputs.claim_output``) for the whole run. Keyword arguments: see ``_train``.
    """
    from erasekit.distributed import process_state
    from erasekit.models import is_sdxl

    if is_sdxl(pipe) and not job.runs_on_sdxl:
        raise ErasekitError(f"{job.name} does not run on SDXL yet (its U-Net calls lack SDXL's "
                            "added time/text conditioning); on SDXL: --method uce")  # fmt: skip
    if job.double_backward and job.config.compile != "no":
        raise ErasekitError(f"compile={job.config.compile}: {job.name} differentiates through "
                            "its gradients, which torch.compile does not support; use "
                            "compile=no")  # fmt: skip
    main = process_state(str(pipe.device)).is_main_process
    try:
        return _train(job, pipe, out_dir=out_dir, **kwargs)
    except BaseException:
        work_dir = partial_path(out_dir)
        if main and holds_output(out_dir) and not _checkpoints(work_dir):
            discard_output_dir(work_dir)
        raise
    finally:
        if main:
            release_output(out_dir)


def _train(
    job: TrainingJob,
    pipe,
    *,
    model_path: str | Path,
    out_dir: str | Path,
    concept=None,
    resume: str | None = None,
    overwrite: bool = False,
    progress: Progress = True,
) -> Path:
    """The loop's phases, top to bottom."""
    started = time.time()
    out_dir = Path(out_dir)
    work_dir = partial_path(out_dir)
    fingerprint = _config_fingerprint(job.name, job.config)
    resume_from = _negotiate_output(out_dir, work_dir, str(pipe.device), resume, overwrite,
                                    fingerprint, job.config)  # fmt: skip
    # Data first: encoded once by the frozen VAE and text encoder (a job may also run trainings
    # of its own here, e.g. NegMerge's fine-tuned copies, each with its own accelerator).
    data = job.prepare_data(pipe)
    accelerator = _make_accelerator(job.config, str(pipe.device))
    module, trainable = _freeze(job, pipe, accelerator)
    ctx = _prepare(job, pipe, accelerator, data, module, trainable, work_dir)
    if resume_from:
        _resume(ctx, resume_from)
    job.on_train_start(ctx)
    total = _run_steps(job, ctx, fingerprint, progress)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save(job, ctx, model_path, concept, total, resume_from, started)
        if not job.config.keep_checkpoints:
            shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
        commit_output_dir(work_dir, out_dir)
    accelerator.wait_for_everyone()
    # not accelerator.end_training(): it destroys the process group, and one audit trains
    # several times (its attacks); the CLI closes the group on exit
    return out_dir


def _negotiate_output(
    out_dir: Path, work_dir: Path, device: str, resume: str | None, overwrite: bool,
    fingerprint: str, config: TrainConfig,
) -> str | None:  # fmt: skip
    """Claim the output folder (or find the checkpoint to resume) on the main process; every
    process gets the same answer or the same error."""
    from erasekit.distributed import process_state

    state = process_state(device)
    resume_from, error = None, None
    if state.is_main_process:
        try:
            if resume:
                claim_output(out_dir)
                resume_from = _find_resume(work_dir, resume, fingerprint, config)
                if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
                    raise ErasekitError(f"output folder is not empty: {out_dir}")
            else:
                _refuse_to_drop_checkpoints(out_dir, work_dir, overwrite)
                prepare_output_dir(out_dir, overwrite)
        except ErasekitError as e:
            error = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error, resume_from = broadcast_object_list([error, resume_from])
    if error:
        raise ErasekitError(error)
    return resume_from


def _refuse_to_drop_checkpoints(out_dir: Path, work_dir: Path, overwrite: bool) -> None:
    """A new run over an interrupted run's checkpoints would delete them: without
    ``overwrite``, stop and say how to continue it instead."""
    claim_output(out_dir)  # a live run's work is refused by the lock, not here
    found = _checkpoints(work_dir)
    if found and not overwrite:
        release_output(out_dir)
        raise ErasekitError(f"{work_dir} holds an interrupted run's checkpoints (newest:"
                            f" {found[-1].name}); continue it with --resume latest, or pass"
                            " --overwrite to discard them")  # fmt: skip


def _make_accelerator(config: TrainConfig, device: str):
    """A fresh Accelerator for this run (several trainings in one process may differ in
    precision: the accelerator state is per run, the process group is kept), seeded."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=device.startswith("cpu"),
        )
    except (ValueError, RuntimeError) as e:
        raise ErasekitError(f"mixed_precision={config.mixed_precision}: {e}") from None
    set_seed(config.seed)
    return accelerator


def _freeze(job: TrainingJob, pipe, accelerator) -> tuple[torch.nn.Module, dict]:
    """Everything frozen but the job's trainable parameters; frozen encoders leave the GPU
    unless the job runs the text encoder itself. Returns (trained module, name -> parameter)."""
    if accelerator.device.type == "cuda":
        pipe.vae.to("cpu")
        if not job.uses_text_encoder:
            pipe.text_encoder.to("cpu")
    unet = pipe.unet
    unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    module = job.trained_module(pipe)
    trainable = dict(job.trainable_parameters(module))
    if not trainable:
        raise ErasekitError(f"{job.name}: no parameter is selected for training")
    for p in trainable.values():
        p.requires_grad_(True)
    if job.config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train(module is unet)
    module.train()
    return module, trainable


def _prepare(job, pipe, accelerator, data, module, trainable, work_dir: Path) -> TrainContext:
    """The job's setup on the raw U-Net, then optimizer, LR schedule and ``prepare``."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    config = job.config
    ctx = TrainContext(
        accelerator=accelerator,
        unet=pipe.unet,
        pipe=pipe,
        config=config,
        data=data,
        empty_cond=encode_prompts(pipe, [""]).to(accelerator.device),
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        weight_dtype=_WEIGHT_DTYPES[config.mixed_precision],
        device=accelerator.device,
        work_dir=work_dir,
    )
    pipe.unet.to(accelerator.device)
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    module.to(accelerator.device)
    job.setup(ctx)  # frozen teachers, masks: before prepare, on the raw U-Net
    compile_unet(pipe.unet, config)
    ctx.total = job.total_steps(data)
    lr = job.learning_rate(accelerator.num_processes)
    optimizer = _make_optimizer(config, job.parameter_groups(trainable), lr)
    ctx.lr_schedule = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                    num_warmup_steps=config.lr_warmup_steps,
                                    num_training_steps=max(1, ctx.total))  # fmt: skip
    _register_unet_hooks(accelerator)
    ctx.trained, ctx.optimizer = accelerator.prepare(module, optimizer)
    if module is pipe.unet:
        ctx.unet = ctx.trained
    accelerator.register_for_checkpointing(ctx.lr_schedule)
    return ctx


def _resume(ctx: TrainContext, checkpoint: str) -> None:
    ctx.accelerator.load_state(checkpoint)
    ctx.step = json.loads((Path(checkpoint) / STATE_FILE).read_text())["step"]
    if ctx.accelerator.is_main_process:
        _truncate_log(ctx.work_dir / TRAINING_LOG, ctx.step)


def _run_steps(job, ctx: TrainContext, fingerprint: str, progress) -> int:
    """Optimizer steps until the job's total, one log line each, checkpoints on schedule."""

    accelerator, config = ctx.accelerator, ctx.config
    found = _checkpoints(ctx.work_dir)
    last_good = str(found[-1]) if found else None
    bar = progress_bar(progress, total=ctx.total, initial=ctx.step, desc=job.name, unit="step",
                       main=accelerator.is_main_process)  # fmt: skip
    t_last = time.time()
    while ctx.step < ctx.total:
        try:
            record = _step(job, ctx)
        except NonFiniteLoss as e:
            bar.close()
            hint = ""
            if last_good:
                hint = (f"; the last good checkpoint ({last_good}) resumes only with the same"
                        " settings, so start a new run with a lower lr (--set lr=...)")  # fmt: skip
            raise NonFiniteLoss(f"{e}{hint}") from None
        record["seconds"] = round(time.time() - t_last, 4)
        t_last = time.time()
        if accelerator.is_main_process:
            with open(ctx.work_dir / TRAINING_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        bar.update(1)
        job.on_step_end(ctx)
        every = config.checkpointing_steps
        if every and ctx.step % every == 0 and ctx.step < ctx.total:
            last_good = str(_save_checkpoint(accelerator, ctx.work_dir, ctx.step, fingerprint,
                                             config))  # fmt: skip
    bar.close()
    return ctx.total


def _average_gradients(ctx: TrainContext) -> None:
    """Mean of every trained parameter's gradient over the processes (a parameter a process
    left without one counts as zero there), for jobs that write their gradients themselves."""
    for group in ctx.optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = ctx.accelerator.reduce(grad.contiguous(), reduction="mean")


def _step(job, ctx: TrainContext) -> dict[str, Any]:
    """One optimizer step over the accumulation micro-steps; its log record. The logged loss
    (and every numeric statistic) is the mean over micro-steps and processes."""
    accelerator, config = ctx.accelerator, ctx.config
    n_micro = config.gradient_accumulation_steps
    losses: list[float] = []
    extra: dict[str, Any] = {}
    grad_norm = None
    for micro in range(n_micro):
        with accelerator.accumulate(ctx.trained):
            loss, logs = job.loss(ctx, micro)
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=ctx.device)
            if accelerator.gather(bad).sum() > 0:
                raise NonFiniteLoss(f"{job.name}: loss became {loss.item()} at step "
                                    f"{ctx.step + 1} (lower lr or check the data)")  # fmt: skip
            if not job.sets_gradients:
                accelerator.backward(loss)
            elif accelerator.num_processes > 1 and accelerator.sync_gradients:
                _average_gradients(ctx)  # no backward pass, so no DDP all-reduce: do it here
            job.after_backward(ctx.trained)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                norms = [accelerator.clip_grad_norm_(g["params"], config.max_grad_norm)
                         for g in ctx.optimizer.param_groups]  # fmt: skip
                grad_norm = norms[0]
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        for k, v in logs.items():
            if isinstance(v, (int, float)):
                extra[k] = extra.get(k, 0.0) + float(v) / n_micro
            else:  # e.g. the names of sampled configurations: kept as given
                extra[k] = v
    ctx.lr_schedule.step()
    ctx.step += 1
    loss_value = sum(losses) / len(losses)
    if accelerator.num_processes > 1:  # every process's share, not the main one's alone
        numeric = sorted(k for k, v in extra.items() if isinstance(v, float))
        values = torch.tensor([loss_value, *[extra[k] for k in numeric]], dtype=torch.float64,
                              device=ctx.device)  # fmt: skip
        values = accelerator.reduce(values, reduction="mean").tolist()
        loss_value = values[0]
        extra.update(zip(numeric, values[1:], strict=True))
    return {
        "step": ctx.step,
        "loss": loss_value,
        **extra,
        "lr": ctx.lr_schedule.get_last_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
    }


def _save(job, ctx: TrainContext, model_path, concept, total: int, resume_from, started) -> None:
    """Main process: the final model (unless the job saves none), its outputs and manifest."""
    from erasekit.models import MANIFEST, build_manifest, write_model

    accelerator, config, pipe = ctx.accelerator, ctx.config, ctx.pipe
    if job.saves_model:
        final = job.finalize_unet(accelerator.unwrap_model(ctx.unet))
        final.requires_grad_(False).eval()
        if config.gradient_checkpointing:
            final.disable_gradient_checkpointing()
        if config.save_dtype != "fp32":
            final = final.to(_WEIGHT_DTYPES[config.save_dtype])
        pipe.unet = final
        pipe.vae.to(accelerator.device)
        pipe.text_encoder.to(accelerator.device)
    outputs = job.write_outputs(ctx.work_dir)
    manifest = build_manifest(
        base_model=model_path,
        method=job.name,
        config=asdict(config),
        concept=concept.describe() if concept is not None else None,
        seeds=[config.seed],
        started=started,
        extra={
            "training": {
                "steps": total,
                "resumed_from": Path(resume_from).name if resume_from else None,
                "n_processes": accelerator.num_processes,
                "global_batch": config.batch_size * accelerator.num_processes
                * config.gradient_accumulation_steps,
                "data": job.describe_data(),
                "log": TRAINING_LOG if (ctx.work_dir / TRAINING_LOG).is_file() else None,
                "outputs": outputs,
            },
        },
    )  # fmt: skip
    if job.saves_model:
        write_model(pipe, ctx.work_dir, manifest)
    else:
        write_json(ctx.work_dir / MANIFEST, manifest)


def _find_resume(work_dir: Path, resume: str, fingerprint: str, config: TrainConfig) -> str:
    """The checkpoint to resume: the newest complete one for ``latest`` (named on stderr)."""
    if resume == "latest":
        found = _checkpoints(work_dir)
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


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines past the resumed step (they belong to the interrupted continuation)."""
    if not log_path.is_file():
        return
    kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    log_path.write_text("".join(ln + "\n" for ln in kept))


@dataclass
class DenoisingConfig(TrainConfig):
    """Plain fine-tuning: the full U-Net or a LoRA on the attention projections."""

    mode: str = "full"  # full | lora
    rank: int = 4
    lora_alpha: float = 4.0

    def validate(self) -> None:
        if self.mode not in ("full", "lora"):
            raise ErasekitError(f"mode must be full or lora, got {self.mode!r}")
        super().validate()


class DenoisingJob(TrainingJob):
    """The plain denoising loss on one image set, the full U-Net or a LoRA (fused into the
    saved weights; its factors written beside them). The fine-tuning attack and NegMerge's
    copies are this job."""

    name = "denoising"
    Config = DenoisingConfig
    needs_images = True

    def __init__(self, config: DenoisingConfig, image_set, **kwargs: Any) -> None:
        super().__init__(config, None, **kwargs)
        self.images = image_set
        self.lora_state: dict | None = None

    def prepare_data(self, pipe) -> dict[str, Split]:
        self.data_info = {"train": self.images.describe()}
        return {"train": make_split(pipe, [], self.images)}

    def trainable_parameters(self, unet):
        if self.config.mode == "full":
            return list(unet.named_parameters())
        from erasekit.lora import add_lora

        return add_lora(unet, self.config.rank, self.config.lora_alpha)

    def loss(self, ctx: TrainContext, micro: int):
        return ctx.denoising_loss(ctx.batch("train", micro), micro), {}

    def finalize_unet(self, unet):
        if self.config.mode == "lora":
            from erasekit.lora import fuse_lora

            self.lora_state = fuse_lora(unet)
        return unet

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        if self.lora_state is None:
            return {}
        from erasekit.lora import save_lora

        return save_lora(folder, self.lora_state, self.config.rank)
