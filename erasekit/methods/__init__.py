"""Erasure methods. Each registers a class deriving from ``Method``; the shared training loop
(``erasekit.training.train``) runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from erasekit.registry import Registry
from erasekit.training import Split, TrainConfig, TrainContext, make_split

METHODS: Registry[type] = Registry("method")
METHODS.register_lazy("esd", "erasekit.methods.esd:ESD")
METHODS.register_lazy("salun", "erasekit.methods.salun:SalUn")
METHODS.register_lazy("resalign", "erasekit.methods.resalign:ResAlign")
METHODS.register_lazy("negative-embedding", "erasekit.methods.negative_embedding:NegativeEmbedding")


class Method:
    """A gradient-based erasure method: config, trainable parameters, loss on a batch.

    Hooks with defaults: ``trained_module`` (what is trained: the U-Net, or e.g. a token
    embedding), ``defaults(concept)`` (config defaults that depend on the concept's
    kind), ``prepare_data`` (encode forget/retain sets), ``setup`` (teachers, masks; runs before
    ``accelerator.prepare``), ``after_backward`` (edit gradients), ``on_train_start`` /
    ``on_step_end`` (e.g. evaluation curves), ``finalize_unet`` (e.g. fuse a LoRA),
    ``write_outputs`` (extra files beside the model).
    """

    name: ClassVar[str]
    Config: ClassVar[type[TrainConfig]] = TrainConfig
    needs_images: ClassVar[bool] = False
    # True: ``loss`` also writes the parameters' gradients itself (e.g. a hypergradient) and
    # the loop does not backpropagate the returned (detached) loss.
    sets_gradients: ClassVar[bool] = False
    # True: ``loss`` runs the (frozen) text encoder itself, so the loop keeps it on the device.
    uses_text_encoder: ClassVar[bool] = False

    def __init__(
        self,
        config: TrainConfig,
        concept,
        *,
        model_path: str | Path,
        forget_images: str | Path | None = None,
        retain_images: str | Path | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.concept = concept
        self.model_path = Path(model_path)
        self.forget_images = forget_images
        self.retain_images = retain_images
        self.cache_dir = cache_dir
        self.progress = progress
        self.data_info: dict[str, Any] = {}

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        return {}

    # data -----------------------------------------------------------------------------
    def image_set(self, pipe, split: str):
        """Forget/retain images: the user's folder, else rendered by the original model."""
        from erasekit.data import read_image_folder, render_image_set

        folder = self.forget_images if split == "forget" else self.retain_images
        if folder is not None:
            return read_image_folder(folder, name=f"{split} images")
        prompts = self.concept.forget if split == "forget" else self.concept.retain
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

    def setup(self, ctx: TrainContext) -> None:
        """Runs before ``accelerator.prepare``: build frozen teachers, masks."""

    def loss(self, ctx: TrainContext, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_backward(self, unet) -> None:
        """Edit gradients after backward (e.g. a saliency mask)."""

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


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


__all__ = ["METHODS", "Method", "get_method"]
