"""The world classifier: a small CNN that names the shape, colour and style in a 32x32 image.

Shape and colour heads have a "none" class, trained on shapes outside the world (pentagons,
stars, ellipses, bars, an empty canvas) and on colours far from the palette (blends of two
palette colours, greys, browns, ...), so a blob or a blend is not forced into a world class.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from erasekit.world.render import (
    COLOURS,
    DIMENSIONS,
    DISTRACTOR_SHAPES,
    SHAPES,
    STYLES,
    Scene,
    off_palette_rgb,
    render,
    render_dataset,
    sample_scene,
)

NONE = "none"
# The classes of each head: the world's values, plus an abstaining class for shape and colour.
LABELS = {"shape": (*SHAPES, NONE), "colour": (*COLOURS, NONE), "style": STYLES}
IGNORE = -100  # no style label on an empty canvas


class WorldClassifier(nn.Module):
    """Conv net with one head per concept dimension (shape, colour, style)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.features = nn.Sequential(
            block(3, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict(
            {dim: nn.Linear(4 * width, len(values)) for dim, values in LABELS.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 32, 32) in [0, 1]; returns logits per dimension."""
        h = self.features(x * 2 - 1)
        return {dim: head(h) for dim, head in self.heads.items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _label(scene: Scene, dim: str) -> int:
    value = scene.labels[dim]
    if dim == "style" and scene.shape == "blank":
        return IGNORE
    if dim == "shape" and value in DISTRACTOR_SHAPES:
        return LABELS[dim].index(NONE)
    if dim == "colour" and (value not in COLOURS or scene.shape == "blank"):
        return LABELS[dim].index(NONE)
    return LABELS[dim].index(value)


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {dim: torch.tensor([_label(s, dim) for s in scenes]) for dim in LABELS}


def off_world_scene(rng: random.Random, kind: str) -> Scene:
    """A scene the classifier must call "none": ``kind`` "colour" (a world shape in an
    off-palette colour, labelled colour "off-palette") or "shape" (a distractor shape in a
    palette colour; an empty canvas is "none" for both)."""
    scene = sample_scene(rng)
    if kind == "colour":
        return Scene(scene.shape, "off-palette", scene.style, scene.cx, scene.cy, scene.radius,
                     scene.angle, off_palette_rgb(rng), scene.background)  # fmt: skip
    shape = rng.choice(DISTRACTOR_SHAPES)
    return Scene(shape, scene.colour, scene.style, scene.cx, scene.cy, scene.radius,
                 rng.uniform(-0.6, 0.6), scene.rgb, scene.background)  # fmt: skip


def off_world_batch(n: int, seed: int, kind: str) -> tuple[np.ndarray, list[Scene]]:
    rng = random.Random(seed)
    scenes = [off_world_scene(rng, kind) for _ in range(n)]
    return np.stack([np.asarray(render(s)) for s in scenes]), scenes


@torch.no_grad()
def vae_round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode (sampling the posterior) and decode: the artefacts generated images carry."""
    z = vae.encode(x * 2 - 1).latent_dist.sample()
    return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)


def augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Noise, blur and brightness jitter: robustness to generation artefacts."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=rng) * 0.08
    x = x + sigma * torch.randn(x.shape, generator=rng)
    blur = torch.rand(b, generator=rng) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    x = x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=rng) - 0.5))
    return x.clamp(0, 1)


def train_classifier(
    vae=None,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> WorldClassifier:
    """Train on fresh renders (a quarter of each batch off-world: off-palette colours and
    distractor shapes, labelled "none"); half of each batch goes through a VAE round trip
    when given."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    model = WorldClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in tqdm(range(steps), desc="world classifier", disable=not progress):
        base = 10_000_000 + seed * 100_003 + step
        off = batch_size // 8
        images, _, scenes = render_dataset(batch_size - 2 * off, seed=base)
        colour_img, colour_scenes = off_world_batch(off, base + 50_000_000, "colour")
        shape_img, shape_scenes = off_world_batch(off, base + 60_000_000, "shape")
        images = np.concatenate([images, colour_img, shape_img])
        scenes = [*scenes, *colour_scenes, *shape_scenes]
        perm = torch.randperm(batch_size, generator=rng)
        images, scenes = images[perm.numpy()], [scenes[i] for i in perm.tolist()]
        x = to_tensor(images)
        if vae is not None:
            half = batch_size // 2
            x[:half] = vae_round_trip(vae, x[:half])
        x = augment(x, rng)
        logits = model(x)
        labels = _labels(scenes)
        loss = sum(F.cross_entropy(logits[d], labels[d], ignore_index=IGNORE) for d in LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: WorldClassifier, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Softmax probabilities per dimension for images in [0, 1]."""
    model.eval()
    return {d: v.softmax(-1) for d, v in model(x).items()}


def _predictions(model: WorldClassifier, images: np.ndarray, vae=None) -> dict[str, torch.Tensor]:
    x = to_tensor(images)
    if vae is not None:
        x = torch.cat([vae_round_trip(vae, c) for c in x.split(256)])
    return {d: torch.cat([predict(model, c)[d] for c in x.split(256)]).argmax(-1) for d in LABELS}


@torch.no_grad()
def heldout_accuracy(model: WorldClassifier, n: int = 2000, seed: int = 777, vae=None) -> dict:
    """Accuracy per dimension on fresh world renders (seed never used in training); an
    abstention ("none") counts as an error."""
    images, _, scenes = render_dataset(n, seed=seed)
    pred = _predictions(model, images, vae)
    labels = _labels(scenes)
    return {d: float((pred[d] == labels[d]).float().mean()) for d in DIMENSIONS}


@torch.no_grad()
def abstention_rates(model: WorldClassifier, n: int = 1000, seed: int = 778, vae=None) -> dict:
    """On fresh off-world renders: how often the classifier still names a world class (false
    positives) instead of "none". Per colour: the share of off-palette renders called that
    colour; per shape likewise for distractor shapes."""
    out: dict = {}
    for kind, dim in (("colour", "colour"), ("shape", "shape")):
        images, scenes = off_world_batch(n, seed + (0 if kind == "colour" else 1), kind)
        pred = _predictions(model, images, vae)[dim]
        values = COLOURS if dim == "colour" else SHAPES
        if kind == "shape":  # empty canvases aside: they carry no palette colour either
            keep = torch.tensor([s.shape != "blank" for s in scenes])
            pred = pred[keep]
        out[f"off_{kind}_n"] = int(pred.numel())
        out[f"off_{kind}_named_any"] = round(
            float((pred != LABELS[dim].index(NONE)).float().mean()), 4
        )
        out[f"off_{kind}_named_as"] = {
            v: round(float((pred == LABELS[dim].index(v)).float().mean()), 4) for v in values
        }
    return out


def save_classifier(model: WorldClassifier, folder: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))  # fmt: skip
    from erasekit.world import WORLD_VERSION

    config = {
        "world_version": WORLD_VERSION,
        "dimensions": {d: list(v) for d, v in DIMENSIONS.items()},
        "labels": {d: list(v) for d, v in LABELS.items()},
        **info,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(folder: str | Path) -> WorldClassifier:
    from safetensors.torch import load_file

    model = WorldClassifier()
    state = load_file(str(Path(folder) / "model.safetensors"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
