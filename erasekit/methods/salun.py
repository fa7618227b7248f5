"""SalUn: saliency-masked unlearning.

Mask, computed once before training by one pass over the forget set (batches of
``mask_batch_size``): loss ``-MSE(ε, (1+w)·ε_θ(x_t, c_f) - w·ε_θ(x_t, ""))`` with t ~ U{0..T-1};
the signed gradients are summed over batches, saliency s = |Σ g|, and the global (not per
layer) top ``mask_fraction`` of U-Net weights by saliency are trainable. The threshold is found
by histogram refinement (no full sort), and the mask is saved bit-packed (1 bit per weight) in a
safetensors file beside the model.

Training: forget loss ``MSE(ε_θ(x_t, c_f), sg[ε_θ(x_t, c_s)])`` toward the current model's
prediction for the surrogate prompt c_s (detached), plus α times the standard denoising loss on
retain images; gradients are multiplied by the mask after backward.

Departures from the public code, on purpose: every step draws a fresh batch from an epoch-wise
shuffled forget set (the public code reused the same first 8 images for every step until early
2026), and the mask is always applied (for part of 2024 it was not). The mask is 1 bit per
weight, not int64.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.config import one_per, split_list
from erasekit.distributed import my_share
from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.outputs import atomic_file
from erasekit.training import (
    TrainConfig,
    TrainContext,
    encode_prompt_list,
    encode_prompts,
    step_generator,
)

MASK_FILE = "salun_mask.safetensors"
MASK_FORMAT = "erasekit-salun-mask/1"


@dataclass
class SalUnConfig(TrainConfig):
    steps: int = 0  # 0: epochs x ceil(forget images / global batch)
    epochs: int = 5  # 1 for nudity (per the reference)
    lr: float = 1e-5
    batch_size: int = 8
    alpha: float = 0.5  # retain weight: 0.1 nudity, 0.5 objects/classes
    mask_fraction: float = 0.5  # global share of weights that are trained
    mask_source: str = "saliency"  # saliency (gradient) | lcodec (conditional dependence)
    lcodec_samples: int = 128  # lcodec: noise-perturbed forget inputs
    mask_guidance: float = 7.5  # w in the mask loss
    mask_batch_size: int = 8
    saliency_dtype: str = "fp32"  # gradient-sum accumulator; bf16 halves the mask pass' memory
    surrogate: str = ""  # "" = the concept spec's surrogate prompt
    # "fixed": one surrogate prompt c_s for every image (the paper's choice);
    # "replace": per image, its prompt with the concept word replaced (an anchor prompt)
    surrogate_mode: str = "fixed"
    surrogate_word: str = ""  # "" = the concept's name
    surrogate_replacement: str = ""

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mask_fraction <= 1.0:
            raise ErasekitError("mask_fraction must be in (0, 1]")
        if self.weight_decay != 0:
            raise ErasekitError("salun: weight_decay must be 0 (decay would move masked weights)")
        if self.epochs < 1 or self.mask_batch_size < 1:
            raise ErasekitError("epochs and mask_batch_size must be at least 1")
        if self.alpha < 0:
            raise ErasekitError("alpha must be non-negative")
        check_mask_source(self.mask_source, self.lcodec_samples)
        if self.saliency_dtype not in ("fp32", "bf16"):
            raise ErasekitError("saliency_dtype must be fp32 or bf16")
        if self.surrogate_mode not in ("fixed", "replace"):
            raise ErasekitError("surrogate_mode must be fixed or replace")


# --- thresholds and masks ------------------------------------------------------------------


def top_fraction_threshold(
    tensors: list[torch.Tensor], fraction: float, bins: int = 4096, exact_below: int = 1 << 20
) -> float:
    """The value v such that about ``fraction`` of all elements are >= v (elements >= 0).

    Narrows a histogram window around the k-th largest value until few enough elements remain
    to sort exactly; memory is one histogram plus one tensor's temporaries, never a global sort.
    """
    total = sum(t.numel() for t in tensors)
    k = max(1, math.ceil(fraction * total))  # elements to keep
    if k >= total:
        return float("-inf")
    lo = 0.0
    hi = max(float(t.max()) for t in tensors)
    for _ in range(16):
        if hi <= lo:
            return lo
        counts = torch.zeros(bins, dtype=torch.float64)
        for t in tensors:
            counts += torch.histc(t.float(), bins=bins, min=lo, max=hi).double().cpu()
        above = sum(int((t > hi).sum()) for t in tensors)
        need = k - above
        from_top = counts.flip(0).cumsum(0)
        j = (
            bins
            - 1
            - int(torch.searchsorted(from_top, torch.tensor(float(need), dtype=torch.float64)))
        )
        j = min(max(j, 0), bins - 1)
        width = (hi - lo) / bins
        lo, hi = lo + j * width, lo + (j + 1) * width
        if counts[j] <= exact_below:
            break
    window = torch.cat([t[(t >= lo) & (t <= hi)].float().flatten().cpu() for t in tensors])
    need = k - sum(int((t > hi).sum()) for t in tensors)
    if window.numel() == 0 or need <= 0:
        return hi
    need = min(need, window.numel())
    return float(window.topk(need).values[-1])


def masks_from_saliency(
    saliency: dict[str, torch.Tensor], fraction: float
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Boolean masks of the global top ``fraction`` (zero saliency is never salient).

    Consumes ``saliency``: each entry is dropped once its mask is made, so the peak is the
    saliency plus one tensor's mask, not saliency plus all masks."""
    threshold = top_fraction_threshold(list(saliency.values()), fraction)
    masks = {}
    for name in list(saliency):
        s = saliency.pop(name)
        m = s >= threshold
        if threshold <= 0:
            m &= s > 0
        masks[name] = m
        del s
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return masks, {"threshold": threshold, "density": kept / total, "n_weights": total}


def save_mask(path: str | Path, masks: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Bit-packed masks (numpy packbits, big-endian bit order, C order) in safetensors."""
    from safetensors.torch import save_file

    packed = {n: torch.from_numpy(np.packbits(m.cpu().numpy().ravel())) for n, m in masks.items()}
    shapes = {n: list(m.shape) for n, m in masks.items()}
    meta = {"format": MASK_FORMAT, "shapes": json.dumps(shapes), "info": json.dumps(info)}
    with atomic_file(path) as tmp:
        save_file(packed, str(tmp), metadata=meta)
    return Path(path)


def load_mask(path: str | Path, unet=None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unpack a mask file; with ``unet``, check it covers exactly that U-Net's weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"mask file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MASK_FORMAT:
                raise ErasekitError(f"{path}: not an erasekit SalUn mask")
            shapes = json.loads(meta["shapes"])
            masks = {}
            for name, shape in shapes.items():
                bits = np.unpackbits(f.get_tensor(name).numpy())[: math.prod(shape)]
                masks[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    except ErasekitError:
        raise
    except Exception as e:
        raise ErasekitError(f"cannot read mask {path}: {e}") from None
    if unet is not None:
        params = {n: tuple(p.shape) for n, p in unet.named_parameters()}
        wrong = [n for n in params if n not in masks or tuple(masks[n].shape) != params[n]]
        if wrong or len(masks) != len(params):
            raise ErasekitError(f"{path}: mask does not match this U-Net (e.g. {wrong[:1]})")
    return masks, json.loads(meta.get("info", "{}"))


def mask_overlap(a: str | Path, b: str | Path) -> dict[str, Any]:
    """How mask A relates to mask B (each a mask file or a model folder holding one): their
    densities, A's overlap |A ∩ B| / |A| beside the overlap an unrelated mask would have (B's
    density), the Jaccard index, the share of tensors each touches, and each mask's own cost
    (seconds recorded in its info: L-CODEC's sampling + statistic, saliency's gradient pass)."""
    files = [Path(p) / MASK_FILE if Path(p).is_dir() else Path(p) for p in (a, b)]
    (ma, ia), (mb, ib) = (load_mask(f) for f in files)
    if {n: m.shape for n, m in ma.items()} != {n: m.shape for n, m in mb.items()}:
        raise ErasekitError(f"{files[0]} and {files[1]} cover different weights")
    n = sum(m.numel() for m in ma.values())
    kept_a = sum(int(m.sum()) for m in ma.values())
    kept_b = sum(int(m.sum()) for m in mb.values())
    both = sum(int((ma[k] & mb[k]).sum()) for k in ma)
    either = sum(int((ma[k] | mb[k]).sum()) for k in ma)

    def seconds(info: dict[str, Any]) -> float | None:
        if info.get("source") == "lcodec":
            return round(info["seconds_sampling"] + info["seconds_statistic"], 2)
        return round(info["seconds"], 2) if "seconds" in info else None

    return {
        "n_weights": n,
        "density_a": kept_a / n,
        "density_b": kept_b / n,
        "overlap": both / kept_a if kept_a else None,
        "chance_overlap": kept_b / n,
        "jaccard": both / either if either else None,
        "tensors_touched_a": sum(bool(m.any()) for m in ma.values()) / len(ma),
        "tensors_touched_b": sum(bool(m.any()) for m in mb.values()) / len(mb),
        "source_a": ia.get("source", "saliency"),
        "source_b": ib.get("source", "saliency"),
        "units_a": ia.get("units"),
        "units_b": ib.get("units"),
        "seconds_a": seconds(ia),
        "seconds_b": seconds(ib),
    }


MASK_OVERLAP_DEFINITIONS = {
    "overlap": "|A ∩ B| / |A|: the share of mask A's weights that mask B also selects",
    "chance_overlap": "B's density: the overlap an unrelated mask A would have",
    "jaccard": "|A ∩ B| / |A ∪ B|",
    "tensors_touched": "share of the U-Net's tensors with at least one selected weight",
    "seconds": "each mask's own timing in its info (L-CODEC: sampling + statistic; saliency: "
    "the gradient pass and threshold)",
}


# --- the method ------------------------------------------------------------------------------


def saliency(
    ctx: TrainContext, *, guidance: float, batch_size: int, seed: int, dtype: str = "fp32"
) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency on the context's forget split:
    |Σ_batches ∇ -MSE(ε, (1+w)ε_θ(x_t,c_f) - wε_θ(x_t,""))| with w = ``guidance``.

    Each parameter's gradient is added into an accumulator of ``dtype`` (fp32 or bf16) as soon
    as backward produces it and then freed, so the pass holds one accumulator per weight
    (4 bytes in fp32, 2 in bf16) and never a full set of gradients besides.
    """
    acc, unet, split = ctx.accelerator, ctx.unet, ctx.data["forget"]
    accumulator = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    params = dict(unet.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=accumulator) for n, p in params.items()}

    def make_hook(name):
        def hook(p):
            sums[name].add_(p.grad.to(accumulator))
            p.grad = None

        return hook

    handles = [p.register_post_accumulate_grad_hook(make_hook(n)) for n, p in params.items()]
    try:
        starts = list(range(0, len(split), batch_size))
        for start in [starts[i] for i in my_share(len(starts))]:
            latents = split.latents[start : start + batch_size].to(ctx.device)
            cond = split.cond[start : start + batch_size].to(ctx.device)
            x_t, t, noise = ctx.noisy(latents, step_generator(seed, -1, start))
            empty = ctx.empty_cond.expand_as(cond)
            with acc.autocast():
                out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, empty]))
            e_c, e_u = out.sample.float().chunk(2)
            guided = (1 + guidance) * e_c - guidance * e_u
            loss = -F.mse_loss(guided, ctx.denoising_target(latents, noise, t).float())
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    for name in sums:
        if acc.num_processes > 1:
            sums[name] = acc.reduce(sums[name], reduction="sum")
        sums[name].abs_()
    return sums


MASK_SOURCES = ("saliency", "lcodec")


def check_mask_source(source: str, samples: int) -> None:
    if source not in MASK_SOURCES:
        raise ErasekitError(f"mask_source must be one of {', '.join(MASK_SOURCES)}, got {source!r}")
    if samples < 3:
        raise ErasekitError("lcodec_samples must be at least 3")


def forget_masks(ctx: TrainContext, cfg) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable mask of a config with ``mask_source``, ``mask_fraction`` and SalUn's mask
    settings: gradient saliency (SalUn) or L-CODEC's conditional dependence (``lcodec``)."""
    if cfg.mask_source == "lcodec":
        from erasekit.methods.lcodec import lcodec_masks

        return lcodec_masks(ctx, cfg.mask_fraction, samples=cfg.lcodec_samples,
                            batch_size=cfg.mask_batch_size, seed=cfg.seed)  # fmt: skip
    started = time.perf_counter()
    scores = saliency(ctx, guidance=cfg.mask_guidance, batch_size=cfg.mask_batch_size,
                      seed=cfg.seed, dtype=getattr(cfg, "saliency_dtype", "fp32"))  # fmt: skip
    masks, info = masks_from_saliency(scores, cfg.mask_fraction)
    return masks, {**info, "source": "saliency", "fraction": cfg.mask_fraction,
                   "w": cfg.mask_guidance, "forget_images": len(ctx.data["forget"]),
                   "batch_size": cfg.mask_batch_size,
                   "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip


def world_setting(concept, key: str) -> Any:
    """SalUn's ShapesWorld value of ``key`` (lr, alpha) for a concept's dimension: the preset's
    ``by_dimension`` table, else its settings (``presets/salun.yaml``)."""
    by_dimension = SalUn.world_by_dimension(concept.detector.get("dimension"))
    return by_dimension.get(key, SalUn.world_preset()[key])


def world_relabel(concept, avoid: frozenset[str] = frozenset()) -> str:
    """Another value of a ShapesWorld concept's dimension (the preset's relabel, else the first
    other one, never one in ``avoid``: concepts erased in the same run) that its forget prompts
    are relabelled to."""
    from erasekit.world.render import DIMENSIONS

    dimension, target = concept.detector.get("dimension"), concept.detector.get("target")
    if dimension not in DIMENSIONS:
        raise ErasekitError(f"{concept.name}: a world concept needs a detector dimension")
    taken = {target, *avoid}
    choice = SalUn.world_by_dimension(dimension)["relabel"]
    return choice if choice not in taken else next(v for v in DIMENSIONS[dimension]
                                                   if v not in taken)  # fmt: skip


def surrogate_pairs(cfg, concept, owner: str = "salun") -> list[tuple[str, str]]:
    """surrogate_mode=replace: (word, replacement) pairs from ``cfg.surrogate_word`` (default
    the concept's words) and ``cfg.surrogate_replacement``; comma lists pair up in order (one
    replacement serves every word)."""
    words = split_list(cfg.surrogate_word) or concept.words
    given = split_list(cfg.surrogate_replacement) or [""]
    replacements = one_per(given, words, owner=owner, what="surrogate replacements",
                           per="words")  # fmt: skip
    return list(zip(words, replacements, strict=True))


def relabel_prompts(prompts: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    """Each prompt with every concept word it holds replaced (anchor prompts); a prompt that
    holds none of the words is an error."""
    patterns = [(re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE), r) for w, r in pairs]
    out = []
    for p in prompts:
        held = [(pattern, r) for pattern, r in patterns if pattern.search(p)]
        if not held:
            words = ", ".join(repr(w) for w, _ in pairs)
            raise ErasekitError(f"surrogate_mode=replace: forget prompt {p!r} lacks {words}")
        for pattern, r in held:
            p = pattern.sub(r, p)
        out.append(" ".join(p.split()))
    return out


class SalUn(Method):
    name = "salun"
    summary = "fine-tunes only the weights salient to the concept, relabelling it (random labels)"
    source = ("Fan et al., SalUn: Empowering Machine Unlearning via Gradient-based Weight "
              "Saliency in Both Image Classification and Generation, ICLR 2024")  # fmt: skip
    Config = SalUnConfig
    needs_images = True
    runs_on_sdxl = True  # conditions packed with SDXL's pooled embedding (models.py)

    def __init__(self, *args, mask: str | Path | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if mask is not None and not Path(mask).is_file():
            raise ErasekitError(f"mask file not found: {mask}")
        self.mask_path = mask
        self.masks: dict[str, torch.Tensor] = {}
        self.mask_info: dict[str, Any] = {}

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        if concept.kind == "nudity":
            return {"alpha": 0.1, "epochs": 1}
        if concept.scale == "world" and concept.parts:  # each concept to its own relabel
            avoid = frozenset(str(p.detector.get("target")) for p in concept.parts)
            relabels = [world_relabel(p, avoid) for p in concept.parts]
            lr = max(world_setting(p, "lr") for p in concept.parts)
            alpha = min(world_setting(p, "alpha") for p in concept.parts)
            return {**cls.world_preset(), "lr": lr, "alpha": alpha,
                    "surrogate_word": ",".join(concept.words),
                    "surrogate_replacement": ",".join(relabels)}  # fmt: skip
        if concept.scale == "world":
            return {**cls.world_preset(), "lr": world_setting(concept, "lr"),
                    "alpha": world_setting(concept, "alpha"),
                    "surrogate_replacement": world_relabel(concept)}  # fmt: skip
        return {"alpha": 0.5, "epochs": 5}

    def replacements(self) -> list[tuple[str, str]]:
        """surrogate_mode=replace: (word, replacement) pairs."""
        return surrogate_pairs(self.config, self.concept)

    def anchor_prompts(self, prompts: list[str]) -> list[str]:
        """surrogate_mode=replace: each prompt with every concept word it holds replaced."""
        return relabel_prompts(prompts, self.replacements())

    def prepare_data(self, pipe):
        data = super().prepare_data(pipe)
        if self.config.surrogate_mode == "replace":
            anchors = self.anchor_prompts(data["forget"].prompts)
            data["forget"].anchor = encode_prompt_list(pipe, anchors)
            self.data_info["anchor_examples"] = sorted(set(anchors))[:5]
        return data

    def total_steps(self, data) -> int:
        if self.config.steps:
            return self.config.steps
        from erasekit.distributed import process_state

        cfg = self.config
        global_batch = (
            cfg.batch_size * process_state().num_processes * cfg.gradient_accumulation_steps
        )
        return cfg.epochs * math.ceil(len(data["forget"]) / global_batch)

    def setup(self, ctx: TrainContext) -> None:
        cfg: SalUnConfig = self.config
        surrogate = cfg.surrogate or self.concept.surrogate
        if not surrogate:
            raise ErasekitError(f"salun: the concepts {', '.join(self.concept.words)} name "
                                "different surrogate prompts; set surrogate=PROMPT")  # fmt: skip
        self.surrogate_cond = encode_prompts(ctx.pipe, [surrogate]).to(ctx.device)
        self.surrogate = surrogate
        unet = ctx.unet
        if self.mask_path:
            masks, info = load_mask(self.mask_path, unet)
            self.mask_info = {**info, "reused_from": str(Path(self.mask_path).resolve())}
        else:
            masks, self.mask_info = forget_masks(ctx, cfg)
        self.masks = {n: m.to(ctx.device) for n, m in masks.items()}
        self._by_param = {p: self.masks[n] for n, p in unet.named_parameters() if p.requires_grad}

    def after_backward(self, unet) -> None:
        for p, m in self._by_param.items():
            if p.grad is not None:
                p.grad.mul_(m)

    def loss(self, ctx: TrainContext, micro: int):
        cfg: SalUnConfig = self.config
        forget, retain = ctx.batch("forget", micro), ctx.batch("retain", micro)
        xf, tf, _ = ctx.noisy(forget["latents"], ctx.item_generators(micro))
        xr, tr, noise_r = ctx.noisy(retain["latents"], ctx.item_generators(micro, salt=1))
        anchor = forget.get("anchor", self.surrogate_cond.expand_as(forget["cond"]))
        with torch.no_grad():
            target = ctx.unet(xf, tf, anchor).sample
        # One forward with gradients for both halves (DDP expects one per backward).
        pred = ctx.unet(torch.cat([xf, xr]), torch.cat([tf, tr]),
                        torch.cat([forget["cond"], retain["cond"]])).sample.float()  # fmt: skip
        pf, pr = pred[: len(xf)], pred[len(xf) :]
        forget_loss = F.mse_loss(pf, target.detach().float())
        retain_loss = F.mse_loss(pr, ctx.denoising_target(retain["latents"], noise_r, tr).float())
        loss = forget_loss + cfg.alpha * retain_loss
        return loss, {"forget_loss": forget_loss.item(), "retain_loss": retain_loss.item()}

    def write_outputs(self, folder: Path) -> dict[str, Any]:
        save_mask(folder / MASK_FILE, self.masks, self.mask_info)
        cfg: SalUnConfig = self.config
        surrogate = self.surrogate
        if cfg.surrogate_mode == "replace":
            pairs = ", ".join(f"{w!r} replaced by {r!r}" for w, r in self.replacements())
            surrogate = f"each prompt with {pairs}"
        return {"mask": MASK_FILE, "surrogate": surrogate, **self.mask_info}
