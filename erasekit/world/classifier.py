"""The world classifier: a small CNN that names the shape, colour and style in a 32x32 image."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from erasekit.world.render import DIMENSIONS, render_dataset


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
            {dim: nn.Linear(4 * width, len(values)) for dim, values in DIMENSIONS.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 32, 32) in [0, 1]; returns logits per dimension."""
        h = self.features(x * 2 - 1)
        return {dim: head(h) for dim, head in self.heads.items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _labels(scenes) -> dict[str, torch.Tensor]:
    return {
        dim: torch.tensor([values.index(s.labels[dim]) for s in scenes])
        for dim, values in DIMENSIONS.items()
    }


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
    """Train on fresh renders; half of each batch goes through a VAE round trip when given."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    model = WorldClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in tqdm(range(steps), desc="world classifier", disable=not progress):
        images, _, scenes = render_dataset(batch_size, seed=10_000_000 + seed * 100_003 + step)
        x = to_tensor(images)
        if vae is not None:
            half = batch_size // 2
            x[:half] = vae_round_trip(vae, x[:half])
        x = augment(x, rng)
        logits = model(x)
        labels = _labels(scenes)
        loss = sum(F.cross_entropy(logits[d], labels[d]) for d in DIMENSIONS)
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


@torch.no_grad()
def heldout_accuracy(model: WorldClassifier, n: int = 2000, seed: int = 777, vae=None) -> dict:
    """Accuracy per dimension on fresh renders (seed never used in training)."""
    random.seed(seed)
    images, _, scenes = render_dataset(n, seed=seed)
    x = to_tensor(images)
    if vae is not None:
        x = torch.cat([vae_round_trip(vae, c) for c in x.split(256)])
    probs = {d: torch.cat([predict(model, c)[d] for c in x.split(256)]) for d in DIMENSIONS}
    labels = _labels(scenes)
    return {d: float((probs[d].argmax(-1) == labels[d]).float().mean()) for d in DIMENSIONS}


def save_classifier(model: WorldClassifier, folder: str | Path, info: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))  # fmt: skip
    config = {"dimensions": {d: list(v) for d, v in DIMENSIONS.items()}, **info}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(folder: str | Path) -> WorldClassifier:
    from safetensors.torch import load_file

    model = WorldClassifier()
    state = load_file(str(Path(folder) / "model.safetensors"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()
