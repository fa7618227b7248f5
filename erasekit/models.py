"""Model I/O: load a Stable Diffusion pipeline safely, save an erased one with its provenance.

Formats: a diffusers folder (SD-1.x/2.x ``StableDiffusionPipeline``, SDXL
``StableDiffusionXLPipeline``), or one SD ``.safetensors`` checkpoint plus a local diffusers
folder (``config``) that supplies the architecture. Pickle
formats (.ckpt/.bin/.pt/.pth) run arbitrary code when loaded, so they are refused unless the
caller passes ``allow_pickle=True`` (``--allow-pickle``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from erasekit.errors import ErasekitError, first_line
from erasekit.outputs import atomic_file, atomic_output_dir, disk_errors, write_json
from erasekit.provenance import model_content_hash, run_provenance

MANIFEST = "erasekit.json"
SD = "StableDiffusionPipeline"
SDXL = "StableDiffusionXLPipeline"
SUPPORTED_PIPELINES = (SD, SDXL)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
# SDXL adds a second text encoder (OpenCLIP bigG, with projection) and its tokenizer
SDXL_COMPONENTS = (*COMPONENTS, "text_encoder_2", "tokenizer_2")
SDXL_WEIGHTED = (*WEIGHTED, "text_encoder_2")


def is_sdxl(pipe) -> bool:
    """An SDXL pipeline (two text encoders, added time/text conditioning)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def pipeline_class(path: str | Path) -> str | None:
    """The ``_class_name`` of a diffusers folder's model_index.json (None for a file)."""
    index = Path(path) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def sdxl_time_ids(pipe) -> torch.Tensor:
    """SDXL's added time ids at the model's native size, uncropped: (H, W, 0, 0, H, W), what its
    pipeline passes when neither original nor target size is given."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)


def pack_sdxl_conditions(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(n, tokens + 1, d): SDXL's token conditions with the pooled text embedding as one more
    row (zero-padded to d), so every erasekit path can pass one conditions tensor."""
    row = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])
    row[:, 0, : pooled.shape[1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, row], dim=1)


def install_sdxl_conditioning(pipe) -> None:
    """Let ``pipe.unet(x, t, packed)`` work on SDXL: a forward pre-hook splits a packed
    conditions tensor (``pack_sdxl_conditions``) into the token conditions and SDXL's added
    conditioning (pooled embedding, native-size time ids). Calls that pass
    ``added_cond_kwargs`` themselves (the diffusers pipeline) are left as they are; the hook is
    not saved with the weights."""
    tokens = pipe.tokenizer.model_max_length
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = sdxl_time_ids(pipe)

    def unpack(module, args, kwargs):
        args = list(args)
        packed = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if kwargs.get("added_cond_kwargs") is not None or packed is None:
            return None
        if packed.shape[1] != tokens + 1:
            raise ErasekitError(f"SDXL U-Net called with {packed.shape[1]} condition rows: "
                                "expected tokens + the pooled embedding")  # fmt: skip
        hidden, pooled = packed[:, :tokens], packed[:, tokens, :pooled_dim]
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = hidden
        else:
            args[2] = hidden
        ids = time_ids.to(packed.device, packed.dtype).expand(packed.shape[0], -1)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
        return tuple(args), kwargs

    unet = pipe.unet
    if getattr(unet, "_erasekit_sdxl_hook", None) is None:
        unet._erasekit_sdxl_hook = unet.register_forward_pre_hook(unpack, with_kwargs=True)


def weighted_components(pipe) -> tuple[str, ...]:
    return SDXL_WEIGHTED if is_sdxl(pipe) else WEIGHTED


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
# Prefixes of the original (CompVis/LDM) single-file layout that diffusers' converter reads.
_LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ErasekitError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def _pickle_refusal(what: Path) -> ErasekitError:
    return ErasekitError(
        f"refusing to load pickle weights {what}: unpickling can run arbitrary code; "
        "convert to .safetensors, or pass --allow-pickle if you trust the file"
    )


def check_safetensors(path: Path) -> None:
    """Parse a .safetensors header; a truncated or corrupt file gives a clear error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError, OSError
        raise ErasekitError(f"corrupt or truncated safetensors file {path}: {e}") from None


def _check_diffusers_folder(path: Path, allow_pickle: bool) -> None:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ErasekitError(
            f"not a model: {path} has no model_index.json (expected a diffusers Stable Diffusion "
            "folder, or a .safetensors checkpoint with --config DIR)"
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ErasekitError(f"corrupt model_index.json in {path}") from None
    arch = index.get("_class_name")
    if arch not in SUPPORTED_PIPELINES:
        raise ErasekitError(
            f"unsupported architecture {arch!r} in {path} (erasekit supports "
            "StableDiffusionPipeline: SD-1.x and SD-2.x, and StableDiffusionXLPipeline: SDXL)"
        )
    missing = [c for c in (SDXL_COMPONENTS if arch == SDXL else COMPONENTS)
               if not (path / c).is_dir()]  # fmt: skip
    if missing:
        raise ErasekitError(f"not a complete model: {path} lacks {', '.join(missing)}")
    for component in SDXL_WEIGHTED if arch == SDXL else WEIGHTED:
        folder = path / component
        safe = sorted(folder.glob("*.safetensors"))
        pickled = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if not safe and not pickled:
            raise ErasekitError(f"not a complete model: {folder} holds no weights")
        if not safe and not allow_pickle:
            raise _pickle_refusal(pickled[0])
        for f in safe:
            check_safetensors(f)


def _wrap_load_error(path: Path, e: Exception) -> ErasekitError:
    first = first_line(e)
    return ErasekitError(f"could not load model {path}: {first}")


def _load_folder(path: Path, dtype: torch.dtype, allow_pickle: bool):
    import diffusers

    _check_diffusers_folder(path, allow_pickle)
    arch = pipeline_class(path)
    # SD's safety checker is never loaded (an audit must see what the model draws); SDXL has
    # none, and its invisible watermark is not applied to images erasekit evaluates.
    extra = (
        {"add_watermarker": False}
        if arch == SDXL
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    try:
        pipe = getattr(diffusers, arch).from_pretrained(
            str(path),
            dtype=dtype,
            use_safetensors=None if allow_pickle else True,
            local_files_only=True,
            **extra,
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise _wrap_load_error(path, e) from e
    check_complete(pipe, path)
    return pipe


def check_complete(pipe, path: Path) -> None:
    """Every weight loaded: a file that lacks a tensor leaves it on the meta device."""
    for component in weighted_components(pipe):
        module = getattr(pipe, component)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                raise ErasekitError(
                    f"could not load model {path}: {component} lacks the weight {name!r}"
                    " (an incomplete or mismatched weights file)"
                )


def _read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(path)
        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_refusal(path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e:
            raise _wrap_load_error(path, e) from None
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ErasekitError(f"unsupported architecture: {path} holds no state dict")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    raise ErasekitError(
        f"not a model: {path} (expected a diffusers folder, .safetensors, or with "
        f"--allow-pickle {'/'.join(PICKLE_SUFFIXES)})"
    )


def _load_single_file(path: Path, config: Path | None, dtype: torch.dtype, allow_pickle: bool):
    state = _read_state_dict(path, allow_pickle)
    if config is None:
        raise ErasekitError(
            f"single-file checkpoint {path} needs --config DIR: a local diffusers folder of the "
            "same architecture (nothing is fetched from a hub)"
        )
    if not Path(config).is_dir():
        raise ErasekitError(f"--config folder not found: {config}")
    if pipeline_class(config) == SDXL:
        raise ErasekitError(f"single-file SDXL checkpoints are not supported yet ({path}): load "
                            "the SDXL diffusers folder")  # fmt: skip
    if any(k.startswith(_LDM_PREFIXES) for k in state):
        # Original (LDM) key layout: diffusers' converter maps it onto the config's architecture.
        from diffusers import StableDiffusionPipeline

        del state
        try:
            return StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(config),
                dtype=dtype,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except Exception as e:
            raise _wrap_load_error(path, e) from e
    pipe = _load_folder(Path(config), dtype, allow_pickle)
    for component in WEIGHTED:
        prefix = component + "."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module = getattr(pipe, component)
        if not part:
            raise ErasekitError(f"unsupported architecture: {path} has no {component} weights")
        result = module.load_state_dict(part, strict=False)
        if result.missing_keys or result.unexpected_keys:
            wrong = (result.missing_keys + result.unexpected_keys)[:3]
            raise ErasekitError(
                f"unsupported architecture: {path} does not match {config}/{component} "
                f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected "
                f"keys, e.g. {', '.join(wrong)})"
            )
        module.to(dtype)
    return pipe


def load_pipeline(
    path: str | Path,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    config: str | Path | None = None,
    allow_pickle: bool = False,
):
    """Load a Stable Diffusion pipeline from local files only, with the safety checker off.

    ``path`` is a diffusers folder or a single checkpoint file; a single file needs ``config``,
    a diffusers folder with the same architecture. Errors are ``ErasekitError`` with one line.
    """
    path = Path(path)
    dtype = parse_dtype(dtype)
    if not path.exists():
        raise ErasekitError(f"model path not found: {path}")
    if path.is_dir():
        pipe = _load_folder(path, dtype, allow_pickle)
    else:
        pipe = _load_single_file(path, Path(config) if config else None, dtype, allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    if is_sdxl(pipe):
        install_sdxl_conditioning(pipe)
    if path.is_dir():
        attach_guidance(pipe, path)
    return pipe.to(device)


def attach_guidance(pipe, folder: Path) -> None:
    """Load a folder's guidance config (and its textual-inversion embedding) onto ``pipe``:
    the one generate path then renders with it."""
    from erasekit.guidance import read_guidance

    guidance = read_guidance(folder)
    if guidance is None:
        return
    if guidance.embedding:
        try:
            pipe.load_textual_inversion(str(folder / guidance.embedding))
        except (ValueError, OSError) as e:
            raise ErasekitError(f"{folder / guidance.embedding}: not a textual-inversion "
                                f"embedding ({str(e).splitlines()[0]})") from None  # fmt: skip
    pipe.erasekit_guidance = guidance


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The erasekit.json of a model folder, or {} when it has none."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return {}
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ErasekitError(f"corrupt {MANIFEST} in {path}") from None
    if not isinstance(manifest, dict):
        raise ErasekitError(f"corrupt {MANIFEST} in {path}: not a JSON object")
    return manifest


SINGLE_FILE_LAYOUTS = ("ldm", "components")


def export_single_file(pipe, path: str | Path, layout: str = "ldm") -> Path:
    """Write the weights as one .safetensors file, atomically.

    ``layout="ldm"``: the original single-file keys (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.transformer.*``), what tools that take
    ``v1-5-pruned-emaonly.safetensors``-style files read. ``"components"``: ``unet.*``,
    ``vae.*``, ``text_encoder.*`` with the diffusers names. Both load back with
    ``load_pipeline(path, config=<a diffusers folder of the same architecture>)``.
    """
    from safetensors.torch import save_file

    if layout not in SINGLE_FILE_LAYOUTS:
        raise ErasekitError(f"layout must be one of {', '.join(SINGLE_FILE_LAYOUTS)}")
    if Path(path).suffix != ".safetensors":
        raise ErasekitError(f"single files are written as .safetensors, got {path}")
    if is_sdxl(pipe):
        raise ErasekitError("single-file export of SDXL is not supported yet: ship the folder")
    if layout == "ldm":
        from erasekit.ldm import ldm_state_dict

        state = ldm_state_dict(pipe)
    else:
        state = {f"{component}.{k}": v.detach().contiguous().cpu()
                 for component in WEIGHTED
                 for k, v in getattr(pipe, component).state_dict().items()}  # fmt: skip
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "layout": layout})
    return Path(path)


def build_manifest(
    *,
    base_model: str | Path | None,
    method: str | None = None,
    config: dict[str, Any] | None = None,
    concept: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
    started: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance record saved as erasekit.json beside every model erasekit writes.

    Sampler defaults recorded in the base model's manifest carry over, so the erased model is
    sampled as its base was.
    """
    base_info = None
    sampler = None
    if base_model is not None:
        base = Path(base_model)
        base_info = {"path": str(base.resolve()), "sha256": model_content_hash(base)}
        if base.is_dir():
            base_manifest = read_manifest(base)
            sampler = base_manifest.get("sampler")
            world = base_manifest.get("world")
            if world:  # which ShapesWorld build (version) and variant this model derives from
                base_info["world"] = {"version": world.get("version", 1),
                                      "variant": world.get("variant")}  # fmt: skip
    manifest: dict[str, Any] = {
        "format": "erasekit-manifest/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_info,
        "method": {"name": method, "config": config or {}},
        "concept": concept,
        "seeds": seeds or [],
        "wall_time_s": None,
        **run_provenance(started, memory=True),
    }
    if sampler:
        manifest["sampler"] = sampler
    if extra:
        manifest.update(extra)
    return manifest


def _guidance_usage(manifest: dict[str, Any]) -> list[str]:
    """Model-card lines for a folder whose defence is its guidance.json (negative-embedding):
    without them plain diffusers renders the bare weights."""
    outputs = (manifest.get("training") or {}).get("outputs") or {}
    guidance = outputs.get("guidance")
    if not guidance:
        return []
    lines = [f'pipe.load_textual_inversion("path/to/this/folder/{guidance["embedding"]}")']
    if guidance["mode"] == "negative-prompt":
        return lines + [f'image = pipe("a prompt", negative_prompt="{guidance["concept"]}")'
                        ".images[0]  # the defence"]  # fmt: skip
    return lines + ["# the defence is SLD (guidance.json): render with `erasekit generate` "
                    "--model path/to/this/folder"]  # fmt: skip


def model_card(manifest: dict[str, Any], pipeline: str = SD) -> str:
    method = manifest.get("method") or {}
    concept = manifest.get("concept") or {}
    base = manifest.get("base_model") or {}
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [stable-diffusion, concept-erasure, erasekit]",
        "---",
        "",
        f"# {method.get('name') or 'model'} (erasekit {manifest.get('erasekit_version')})",
        "",
        f"- Method: `{method.get('name')}`",
        f"- Concept: `{concept.get('name') if isinstance(concept, dict) else concept}`",
        f"- Base model: `{base.get('path')}` (sha256 `{base.get('sha256')}`)",
        f"- Seeds: {manifest.get('seeds')}",
        f"- Created: {manifest.get('created')}, erasekit commit `{manifest.get('git_commit')}`",
        "",
        "The full configuration and library versions are in `erasekit.json`.",
        "",
        "```python",
        f"from diffusers import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("path/to/this/folder")',
        *_guidance_usage(manifest),
        "```",
        "",
        "Erasure is not a guarantee: audit the model (`erasekit audit`) against adversarial",
        "prompts and fine-tuning before you rely on it.",
        "",
    ]
    return "\n".join(lines)


def check_finite_weights(pipe, what: str = "the model") -> None:
    """Refuse weights with NaN or infinite values (one pass of ``isfinite`` over every
    component's tensors): erasing or exporting them would write a broken model."""
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is None or not hasattr(module, "named_parameters"):
            continue
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ErasekitError(f"{what} has non-finite weights ({name}.{key} holds NaN or"
                                    " inf): broken weights, nothing was written")  # fmt: skip


def save_model(
    pipe, out_dir: str | Path, manifest: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write a complete diffusers folder + erasekit.json + model card, all or nothing.

    The folder is assembled next to ``out_dir`` and renamed into place at the end, so an
    interrupted save never leaves a loadable half model. A non-empty ``out_dir`` is refused
    unless ``overwrite``.
    """
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_model(pipe, tmp, manifest)
    return Path(out_dir)


def write_model(pipe, folder: str | Path, manifest: dict[str, Any]) -> None:
    """Write the diffusers files, erasekit.json and the model card into ``folder`` (callers
    make it atomic: ``save_model``, or the training loop's partial folder)."""
    folder = Path(folder)
    with disk_errors(folder):
        pipe.save_pretrained(str(folder), safe_serialization=True)
        write_json(folder / MANIFEST, manifest)
        (folder / "README.md").write_text(model_card(manifest, type(pipe).__name__))
