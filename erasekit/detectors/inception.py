"""Inception-v3 pool features for FID and KID, from a local weights file.

The network, its antialiased resize to 299 px and the FID/KID statistics are torchmetrics'
(``NoTrainInceptionV3``, the torch-fidelity port of the TensorFlow FID Inception); erasekit only
loads the weights from a local file (nothing is downloaded) and batches the images. The file
people hold is torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth`` (a pickle: it needs
``--allow-pickle`` and is read with ``torch.load(weights_only=True)``) or a ``.safetensors``
conversion of it.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erasekit.errors import ErasekitError, first_line
from erasekit.provenance import sha256_file

FEATURES = 2048  # the pool3 features FID is defined on
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
OPTION = "--inception-weights PATH"


def _library():
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # torchmetrics without its image extra
        raise ErasekitError(f"FID/KID need torchmetrics[image] (torch-fidelity): {e}") from None
    return NoTrainInceptionV3


def read_inception_state(path: str | Path | None, allow_pickle: bool = False) -> dict:
    """The weights' tensors from a local ``.safetensors`` or (``allow_pickle``) ``.pth`` file."""
    if path is None:
        raise ErasekitError(f"FID/KID need local Inception-v3 weights: pass {OPTION} (a local"
                            f" copy of {WEIGHTS_FILE} or its .safetensors conversion; nothing is"
                            " downloaded)")  # fmt: skip
    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"Inception weights not found: {path} ({OPTION})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from erasekit.models import check_safetensors

        check_safetensors(path)  # a truncated or corrupt file: one line
        return load_file(str(path))
    if not allow_pickle:
        raise ErasekitError(f"{path} is a pickle file; convert it to .safetensors or pass "
                            "--allow-pickle if you trust it")  # fmt: skip
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ErasekitError(f"cannot read Inception weights {path}: {first_line(e)}") from None
    if not isinstance(state, dict):
        raise ErasekitError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


class InceptionFeatures:
    """``features(images)`` -> (n, 2048) float64 pool features of the FID Inception-v3."""

    name = "inception-v3-fid"

    def __init__(self, weights: str | Path | None, *, device: str = "cpu",
                 allow_pickle: bool = False, batch_size: int = 16) -> None:  # fmt: skip
        state = read_inception_state(weights, allow_pickle)
        network = _library()
        with tempfile.TemporaryDirectory() as tmp:
            # torchmetrics takes a path; hand it a file of the tensors read above only.
            staged = Path(tmp) / "inception.pt"
            torch.save(state, staged)
            try:
                module = network(name="inception-v3-compat", features_list=[str(FEATURES)],
                                 feature_extractor_weights_path=str(staged))  # fmt: skip
            except RuntimeError as e:  # load_state_dict: missing / unexpected / misshapen
                raise ErasekitError(f"{weights}: not the FID Inception-v3 weights "
                                    f"({first_line(e)[:160]})") from None  # fmt: skip
        self.model = module.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.version = (f"torchmetrics {importlib.metadata.version('torchmetrics')} "
                        f"inception-v3-compat pool3 {FEATURES}-d, antialiased resize to 299 px;"
                        f" weights sha256:{sha256_file(weights)[:16]}")  # fmt: skip

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            arrays = [np.asarray(im.convert("RGB")) for im in images[i : i + self.batch_size]]
            # a batch holds one image size (folders of real photos mix them)
            groups = [arrays] if len({a.shape for a in arrays}) == 1 else [[a] for a in arrays]
            for group in groups:
                x = torch.from_numpy(np.stack(group)).permute(0, 3, 1, 2).contiguous()
                out.append(self.model(x.to(self.device)).double().cpu())
        if not out:
            raise ErasekitError("no images to compute Inception features on")
        features = torch.cat(out)
        if not torch.isfinite(features).all():
            raise ErasekitError("Inception features are not finite (corrupt weights?)")
        return features

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version}


# ----------------------------------------------------------------------------- statistics

KID_SUBSETS = 100


class GivenFeatures(torch.nn.Module):
    """torchmetrics' FID/KID take a feature extractor; erasekit computes the features once per
    image set, so the extractor they run is the identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (rows = images), computed by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=GivenFeatures(a.shape[1])).double()
    fid.update(b, real=True)
    fid.update(a, real=False)
    return float(fid.compute())


def fid_low_rank(a: torch.Tensor, b: torch.Tensor) -> float:
    """The same Fréchet distance through the n_a x n_b cross product: the nonzero eigenvalues of
    Σ_a Σ_b are the squared singular values of A Bᵀ / sqrt((n_a - 1)(n_b - 1)) (A, B centred),
    so tr sqrt(Σ_a Σ_b) costs one small SVD (used for the bootstrap's resamples)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = a.shape[0], b.shape[0]
    cross = torch.linalg.svdvals(ca @ cb.T).sum() / ((na - 1) * (nb - 1)) ** 0.5
    mean_term = (a.mean(0) - b.mean(0)).square().sum()
    traces = ca.square().sum() / (na - 1) + cb.square().sum() / (nb - 1)
    return float(mean_term + traces - 2 * cross)


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subset_size: int) -> float:
    """KID (polynomial-kernel MMD², mean over ``KID_SUBSETS`` subsets) computed by torchmetrics;
    its subsets are drawn under seed 0 without touching the global RNG."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "saves all features in a buffer": they are given
        warnings.simplefilter("ignore")
        kid = KernelInceptionDistance(feature=GivenFeatures(a.shape[1]), subsets=KID_SUBSETS,
                                      subset_size=subset_size)  # fmt: skip
    kid.update(b, real=True)
    kid.update(a, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, _ = kid.compute()
    return float(mean)
