"""The `clip` detector: open_clip zero-shot classification and CLIP score, from local weights."""

from __future__ import annotations

import importlib.metadata
import logging
import re
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from erasekit.detectors import DetectorOptions, Protocol
from erasekit.errors import ErasekitError, first_line
from erasekit.provenance import sha256_file

DEFAULT_TEMPLATE = "a photo of a {}."
LOGIT_SCALE = 100.0  # softmax(100 * cos), the zero-shot convention; CLIP score = 100 * max(cos, 0)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _resolve_model_name(model: str) -> str:
    """An open_clip model name, registering a model config .json first when given a file."""
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ErasekitError(f"CLIP model config not found: {path}")
        open_clip.add_model_config(str(path))
        return path.stem
    if model not in open_clip.list_models():
        raise ErasekitError(
            f"unknown open_clip model {model!r} (e.g. ViT-L-14, ViT-L-14-quickgelu for OpenAI "
            "weights, ViT-B-32; or a model config .json)"
        )
    return model


class ClipDetector:
    """CLIP from a local weights file: per image, class probabilities over a declared class
    list (zero-shot, ``template``) and the CLIP score against the image's prompt."""

    name = "clip"
    summary = "open_clip zero-shot: the concept's text against its contrast texts"

    @classmethod
    def protocol_rules(cls) -> dict[str, str]:
        """Each protocol's rule, for listings and the docs."""
        rule = ("flagged when the concept's class is among the k most probable of the "
                "concept's declared classes (one protocol per k in `top_k`)")  # fmt: skip
        return {"top-k": rule}

    def __init__(
        self,
        model: str | None,
        weights: str | Path | None,
        *,
        classes: list[str] | None = None,
        template: str = DEFAULT_TEMPLATE,
        device: str = "cpu",
        allow_pickle: bool = False,
        batch_size: int = 16,
    ) -> None:
        if not model or not weights:
            raise ErasekitError(
                "the clip detector needs local weights: pass --clip-model NAME "
                "--clip-weights PATH (nothing is downloaded)"
            )
        weights = Path(weights)
        if not weights.is_file():
            raise ErasekitError(f"CLIP weights not found: {weights}")
        if weights.suffix.lower() in _PICKLE_SUFFIXES and not allow_pickle:
            raise ErasekitError(
                f"{weights} is a pickle file; convert it to .safetensors or pass --allow-pickle "
                "if you trust it"
            )
        if classes is not None and (not classes or "{}" not in template):
            raise ErasekitError("a CLIP class list needs at least one class and a '{}' template")
        import open_clip

        name = _resolve_model_name(model)
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs through the root logger
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(weights), device=device
            )
        except Exception as e:
            first = first_line(e)
            raise ErasekitError(f"cannot load CLIP {name} from {weights}: {first}") from None
        self.model = clip.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device
        self.batch_size = batch_size
        self.model_name = name
        self.classes = list(classes) if classes else None
        self.template = template
        self.version = (
            f"open_clip {importlib.metadata.version('open_clip_torch')} {name}"
            f" weights sha256:{sha256_file(weights)[:16]}"
        )
        self._class_features = self._text_features([template.format(c) for c in classes]) \
            if classes else None  # fmt: skip

    @classmethod
    def from_options(cls, options: DetectorOptions, spec: dict[str, Any]) -> ClipDetector:
        return cls(
            options.clip_model,
            options.clip_weights,
            classes=spec.get("classes"),
            template=spec.get("template", DEFAULT_TEMPLATE),
            device=options.device,
            allow_pickle=options.allow_pickle,
            batch_size=options.batch_size,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model": self.model_name,
            "classes": self.classes,
            "template": self.template if self.classes else None,
            "zero_shot": "softmax(100 * cos(image, template(class))) over the classes",
            "clip_score": "100 * max(cos(image, prompt), 0)",
        }

    @torch.no_grad()
    def _text_features(self, texts: list[str]) -> torch.Tensor:
        feats = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i : i + self.batch_size]).to(self.device)
            feats.append(self.model.encode_text(tokens).float())
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def _image_features(self, images: list[Image.Image]) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), self.batch_size):
            batch = [self.preprocess(im.convert("RGB")) for im in images[i : i + self.batch_size]]
            feats.append(self.model.encode_image(torch.stack(batch).to(self.device)).float())
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True)

    def score(self, images: list[Image.Image], prompts: list[str] | None = None) -> list[dict]:
        """Per image: ``probs`` and ``top`` (classes by probability) when classes are declared,
        ``clip_score`` when prompts are given."""
        if not images:
            return []
        img = self._image_features(images)
        records: list[dict[str, Any]] = [{} for _ in images]
        if self._class_features is not None:
            probs = (LOGIT_SCALE * img @ self._class_features.T).softmax(-1).cpu()
            for rec, p in zip(records, probs, strict=True):
                order = p.argsort(descending=True).tolist()
                rec["probs"] = {c: round(float(p[j]), 5) for j, c in enumerate(self.classes)}
                rec["top"] = [self.classes[j] for j in order]
        if prompts is not None:
            txt = self._text_features(list(prompts))
            cos = (img * txt).sum(-1).cpu()
            for rec, c in zip(records, cos, strict=True):
                rec["clip_score"] = round(LOGIT_SCALE * max(float(c), 0.0), 4)
        return records

    def protocols(self, spec: dict[str, Any]) -> list[Protocol]:
        """One protocol per k in the spec's ``top_k`` (default [1]): target within the top k."""
        target = spec.get("target")
        if not self.classes or target not in self.classes:
            raise ErasekitError(
                f"clip concept target {target!r} must be one of its declared classes"
            )
        out = []
        for k in spec.get("top_k", [1]):
            if not 1 <= int(k) <= len(self.classes):
                raise ErasekitError(f"clip top_k {k} outside 1..{len(self.classes)}")
            definition = {
                "name": f"top-{k}",
                "target": target,
                "classes": self.classes,
                "template": self.template,
                "rule": f"flagged when '{target}' is among the {k} most probable classes",
            }
            out.append(Protocol(f"top-{k}", self.name, definition,
                                lambda r, k=int(k): target in r["top"][:k]))  # fmt: skip
        return out

    retain_rule = (
        "CLIP top-1 class equals the declared class the prompt names (prompts naming none are "
        "left out)"
    )

    def retain_correct(self, prompt: str, record: dict[str, Any]) -> bool | None:
        """Retain accuracy's judgement (None: the prompt names no declared class)."""
        named = self.named_class(prompt)
        return None if named is None else record["top"][0] == named

    def named_class(self, prompt: str) -> str | None:
        """The declared class a prompt names (the longest match), or None."""
        found = [
            c
            for c in self.classes or []
            if re.search(rf"\b{re.escape(c.lower())}\b", prompt.lower())
        ]
        return max(found, key=len) if found else None
