"""What the loop runs: a ``TrainingJob`` (a method, an attack's fine-tuning, textual
inversion) and the ``TrainContext`` it is given at every step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.progress import Progress
from erasekit.training.config import DenoisingConfig, TrainConfig
from erasekit.training.data import Split, epoch_indices, make_split, step_generator


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


def make_optimizer(config: TrainConfig, groups: list[dict[str, Any]], lr: float):
    """The optimizer over the job's parameter groups (a group may set its own weight_decay)."""
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    fused = {"fused": True} if config.fused_optimizer else {}
    return kind[config.optimizer](groups, lr=lr, weight_decay=config.weight_decay, **fused)


def compile_unet(unet, config: TrainConfig) -> None:
    """Compile ``unet``'s forward in place (its parameters and state dict are unchanged) when
    ``config.compile`` asks for it."""
    if config.compile != "no":
        unet.compile(mode=None if config.compile == "default" else config.compile)


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
