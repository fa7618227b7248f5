"""NegMerge: consensual task-vector negation.

N copies of the model are fine-tuned on the forget images with a declared grid of settings
(the shared loop's plain denoising job, full or LoRA; each copy cached by content, so adding
one to the grid does not redo the others). Their task vectors τ_i = θ_i − θ_0 are merged
element by element: where every τ_i has the same sign the element is their mean, elsewhere 0.
The erased model is θ_0 − α·τ_merged, with α given, or chosen from ``alphas`` as the one with the
lowest concept rate on the forget prompts among those keeping the retain utility (retain
accuracy, else CLIP score) at ``retain_floor`` (0.95) of the original's, measured with the
audit's own evaluation. The merge streams tensor by tensor: no more than one tensor of each
copy is in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from erasekit.config import build_config
from erasekit.errors import ErasekitError
from erasekit.methods import Method
from erasekit.training import DenoisingConfig, DenoisingJob, TrainConfig, TrainContext

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
DETAILS = "negmerge.json"  # per-tensor surviving fractions and the α search
COPY_KEYS = ("lr", "steps", "batch_size", "optimizer", "weight_decay", "mode", "rank", "seed",
             "gradient_accumulation_steps", "max_grad_norm")  # fmt: skip


@dataclass
class NegMergeConfig(TrainConfig):
    steps: int = 0  # the merge itself trains nothing; the copies' steps are in the grid
    grid: str = "lr=1e-5;lr=2e-5;lr=5e-5"  # copies: ';'-separated, each 'key=value,key=value'
    copy_steps: int = 100  # each copy's steps unless its grid entry sets them
    copy_lr: float = 1e-5
    copy_batch_size: int = 4
    mode: str = "full"  # full | lora (the task vector is then the dense B·A, as fused)
    alpha: float = 0.0  # 0: chosen from ``alphas`` by the rule above
    alphas: str = "0.5,1,2,4"
    retain_floor: float = 0.95
    eval_per_prompt: int = 2  # images per prompt in the α search

    def validate(self) -> None:
        super().validate()
        if self.steps != 0:
            raise ErasekitError("negmerge: steps must be 0 (set the copies' steps in grid or "
                                "copy_steps)")  # fmt: skip
        if not parse_grid(self.grid):
            raise ErasekitError("negmerge: grid is empty (give at least one copy)")
        if self.alpha < 0 or not 0 < self.retain_floor <= 1:
            raise ErasekitError("negmerge: alpha must be >= 0 and retain_floor in (0, 1]")
        if any(a <= 0 for a in self.alpha_grid()):
            raise ErasekitError(f"negmerge: alphas must be positive, got {self.alphas!r}")
        if self.mode not in ("full", "lora"):
            raise ErasekitError(f"negmerge: mode must be full or lora, got {self.mode!r}")

    def alpha_grid(self) -> list[float]:
        try:
            return [float(a) for a in self.alphas.split(",") if a.strip()]
        except ValueError:
            raise ErasekitError(f"negmerge: alphas must be numbers, got {self.alphas!r}") from None


def parse_grid(text: str) -> list[dict[str, str]]:
    """'lr=1e-5,steps=50; lr=2e-5' -> [{'lr': '1e-5', 'steps': '50'}, {'lr': '2e-5'}]."""
    out = []
    for entry in text.split(";"):
        if not entry.strip():
            continue
        item = {}
        for pair in entry.split(","):
            key, sep, value = pair.partition("=")
            if not sep or key.strip() not in COPY_KEYS:
                raise ErasekitError(f"negmerge grid: {pair.strip()!r} is not key=value with a key"
                                    f" from {', '.join(COPY_KEYS)}")  # fmt: skip
            item[key.strip()] = value.strip()
        out.append(item)
    return out


def consensus_merge(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the task vectors where all have the same (non-zero) sign, else 0."""
    stacked = torch.stack([v.double() for v in vectors])
    agree = (stacked > 0).all(0) | (stacked < 0).all(0)
    return torch.where(agree, stacked.mean(0), torch.zeros_like(stacked[0])).to(vectors[0].dtype)


def merge_task_vectors(base: Path, copies: list[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """τ_merged over the base U-Net's tensors, streamed tensor by tensor from the copies' files;
    and the share of elements that survive the sign consensus, per tensor and overall."""
    from safetensors import safe_open

    merged, kept, total, per_tensor = {}, 0, 0, {}
    handles = [safe_open(str(c / UNET_FILE), framework="pt") for c in copies]
    with safe_open(str(base / UNET_FILE), framework="pt") as b:
        for name in b.keys():
            theta0 = b.get_tensor(name)
            tau = consensus_merge([h.get_tensor(name) - theta0 for h in handles])
            merged[name] = tau
            n, k = tau.numel(), int((tau != 0).sum())
            kept, total = kept + k, total + n
            per_tensor[name] = round(k / n, 6)
    return merged, {"surviving_fraction": round(kept / max(total, 1), 6),
                    "surviving_fraction_per_tensor": per_tensor}  # fmt: skip


class NegMerge(Method):
    name = "negmerge"
    summary = "subtracts the sign-consensus of task vectors from copies fine-tuned on the concept"
    source = "Kim et al., NegMerge: Consensual Weight Negation for Strong Machine Unlearning"
    Config = NegMergeConfig
    closed_form = True
    needs_images = True

    @classmethod
    def defaults(cls, concept) -> dict[str, Any]:
        return cls.world_preset() if concept.scale == "world" else {}

    def copy_configs(self) -> list[DenoisingConfig]:
        cfg: NegMergeConfig = self.config
        common = {"steps": cfg.copy_steps, "lr": cfg.copy_lr, "batch_size": cfg.copy_batch_size,
                  "mode": cfg.mode, "seed": cfg.seed, "image_source": cfg.image_source,
                  "images_per_prompt": cfg.images_per_prompt,
                  "mixed_precision": cfg.mixed_precision}  # fmt: skip
        return [build_config(DenoisingConfig, common, mappings=[(f"grid[{i}]", entry)])
                for i, entry in enumerate(parse_grid(cfg.grid))]  # fmt: skip

    def train_copies(self, pipe, images) -> list[Path]:
        """Each copy fine-tuned once and cached by (base content, its settings, the images)."""
        from erasekit.data import cache_root
        from erasekit.models import load_pipeline
        from erasekit.provenance import model_content_hash
        from erasekit.training import train

        base_hash = model_content_hash(self.model_path)
        volatile = ("cache", "cache_hit")  # where the images are cached, not what they are
        described = {k: v for k, v in images.describe().items() if k not in volatile}
        data_key = json.dumps(described, sort_keys=True, default=str)
        folders = []
        for config in self.copy_configs():
            spec = [base_hash, asdict(config), data_key]
            key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
            folder = Path(self.cache_dir or cache_root()) / "negmerge" / key.hexdigest()[:24]
            if not (folder / UNET_FILE).is_file():
                job = DenoisingJob(config, images, model_path=self.model_path,
                                   progress=self.progress)  # fmt: skip
                copy_pipe = load_pipeline(self.model_path, device=str(pipe.device))
                train(job, copy_pipe, model_path=self.model_path, out_dir=folder,
                      overwrite=True, progress=self.progress)  # fmt: skip
            folders.append(folder)
        return folders

    def prepare_data(self, pipe):
        images = self.image_set(pipe, "forget")
        copies = self.train_copies(pipe, images)
        self.tau, merge_info = merge_task_vectors(self.model_path, copies)
        cfg: NegMergeConfig = self.config
        search = None
        alpha = cfg.alpha
        if alpha == 0:
            alpha, search = self.choose_alpha(pipe)
        self.alpha = alpha
        self.data_info = {"forget": images.describe(),
                          "copies": [{"folder": str(c), **dict(e)} for c, e in
                                     zip(copies, parse_grid(cfg.grid), strict=True)]}  # fmt: skip
        # the search's own renders at the chosen α: what "best validated" compares
        validated = next((r for r in search or [] if r.get("alpha") == alpha
                          and r.get("role") != "original"), None)  # fmt: skip
        self.merge_info = {**merge_info, "alpha": alpha, "alpha_search": search,
                           "validated": validated, "n_copies": len(copies)}  # fmt: skip
        return {}

    @torch.no_grad()
    def apply(self, unet, alpha: float, base: dict[str, torch.Tensor]) -> None:
        """θ = θ_0 − α·τ_merged on ``unet`` (``base``: θ_0 by name)."""
        for name, p in unet.named_parameters():
            if name in self.tau:
                p.copy_((base[name].double() - alpha * self.tau[name].double()).to(p.dtype))

    def choose_alpha(self, pipe) -> tuple[float, list[dict[str, Any]]]:
        """The rule: lowest forget rate among the α keeping retain utility at ``retain_floor``
        of the original's (if none does, the smallest α, and the log says so)."""
        from erasekit.detectors import DetectorOptions
        from erasekit.distributed import shared_temporary_folder
        from erasekit.evaluation import build_judges, evaluate_prompt_set, set_metrics
        from erasekit.sampling import SamplerSettings

        cfg: NegMergeConfig = self.config
        concept = self.concept
        judges = build_judges(concept, DetectorOptions(device=str(pipe.device)))
        settings = SamplerSettings.for_model(self.model_path)
        base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}

        def render(ps, judge, tag: str) -> list[dict[str, Any]]:
            return evaluate_prompt_set(pipe, ps, root, f"{tag}/{ps.name}", judge,
                                       model_path=self.model_path, settings=settings,
                                       n_per_prompt=cfg.eval_per_prompt, seed=cfg.seed)  # fmt: skip

        def measure(tag: str) -> dict[str, float]:
            """The forget rate (primary protocol; combined concepts: each part's forget set
            judged by its own detector, pooled) and the retain utility."""
            flags = []
            for part in concept.parts or (concept,):
                judge = judges.parts.get(part.name, judges)
                primary = judge.protocols[0].name
                flags += [s["flags"][primary] for s in render(part.forget, judge, tag)]
            out = {"forget": sum(flags) / len(flags)}
            samples = render(concept.retain, judges, tag)
            metrics, _ = set_metrics(samples, concept.retain, judges, seed=cfg.seed, utility=True)
            for m in metrics.values():
                if m["metric"] in ("retain_accuracy", "clip_score"):
                    out.setdefault("retain", m["value"])
            if "retain" not in out:
                raise ErasekitError("negmerge: choosing alpha needs a retain utility (retain"
                                    " accuracy or CLIP score); pass alpha")  # fmt: skip
            return out

        with shared_temporary_folder("erasekit-negmerge-") as root:  # rendered together
            original = measure("original")
            rows = []
            for a in cfg.alpha_grid():
                self.apply(pipe.unet, a, base)
                rows.append({"alpha": a, **measure(f"alpha-{a}")})
            self.apply(pipe.unet, 0.0, base)
        floor = cfg.retain_floor * original["retain"]
        ok = [r for r in rows if r["retain"] >= floor]
        best = (
            min(ok, key=lambda r: (r["forget"], r["alpha"]))
            if ok
            else min(rows, key=lambda r: r["alpha"])
        )
        log = [{"alpha": 0.0, **original, "role": "original"}] + [
            {**r, "meets_floor": r["retain"] >= floor} for r in rows
        ]
        if not ok:
            log.append({"note": f"no alpha kept retain >= {floor:.3f}; the smallest was taken"})
        return best["alpha"], log

    def trainable_parameters(self, unet):
        return [(n, p) for n, p in unet.named_parameters() if n in self.tau]

    @torch.no_grad()
    def on_train_start(self, ctx: TrainContext) -> None:
        unet = ctx.accelerator.unwrap_model(ctx.unet)
        base = {n: p.detach().clone() for n, p in unet.named_parameters() if n in self.tau}
        self.apply(unet, self.alpha, base)

    def write_outputs(self, folder) -> dict[str, Any]:
        from erasekit.outputs import write_json

        info = dict(self.merge_info)
        per_tensor = info.pop("surviving_fraction_per_tensor")
        write_json(Path(folder) / DETAILS, {**info, "surviving_fraction_per_tensor": per_tensor})
        return {**info, "details": DETAILS}
