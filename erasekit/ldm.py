"""The original (CompVis / LDM) single-file layout of a Stable Diffusion checkpoint.

``ldm_state_dict`` renames a diffusers pipeline's U-Net, VAE and CLIP text-encoder weights to
the keys of ``v1-5-pruned-emaonly.safetensors``-style files (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), so an erased model can
go to tools that take single files; diffusers' single-file loader reads them back. The mapping
is derived from the architecture's config (layers per block, which blocks have attention), so
any SD-1.x-style U-Net maps, not only the 512-px SD-1.5 one.
"""

from __future__ import annotations

import torch

from erasekit.errors import ErasekitError

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}  # fmt: skip


def _rename_inner(rest: str, table: dict[str, str]) -> str:
    """``rest`` (e.g. 'norm1.weight') with its first component renamed by ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_prefixes(config) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix for every block of the U-Net."""
    per = config.layers_per_block
    if not isinstance(per, int):
        raise ErasekitError("LDM export: per-block layer counts are not an SD-1.x/2.x U-Net")
    down, up = config.down_block_types, config.up_block_types
    out = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
           "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
           "mid_block.attentions.0.": "middle_block.1."}  # fmt: skip
    for j in range(2):
        out[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    for i, kind in enumerate(down):
        for j in range(per):
            block = (per + 1) * i + j + 1
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{block}.0."
            if "CrossAttn" in kind:
                out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{block}.1."
        if i < len(down) - 1:
            below = (per + 1) * (i + 1)
            out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{below}.0.op."
    for i, kind in enumerate(up):
        attention = "CrossAttn" in kind
        for j in range(per + 1):
            block = (per + 1) * i + j
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{block}.0."
            if attention:
                out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{block}.1."
        if i < len(up) - 1:
            last = (per + 1) * i + per
            out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{last}.{2 if attention else 1}."
    return out


def _rename(
    state: dict[str, torch.Tensor], prefixes: dict[str, str], head: str, what: str,
    resnet: dict[str, str], attention: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Each weight under its LDM name: its block prefix mapped, then the first name inside a
    resnet (or a VAE attention, whose projections LDM stores as 1x1 convolutions)."""
    out = {}
    for key, value in state.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        if old is None:
            raise ErasekitError(f"LDM export: no LDM name for {what} weight {key}")
        rest = key[len(old) :]
        if ".resnets." in old:
            rest = _rename_inner(rest, resnet)
        elif attention is not None and ".attentions." in old:
            rest = _rename_inner(rest, attention)
            if value.ndim == 2:
                value = value[:, :, None, None]
        out[head + prefixes[old] + rest] = value
    return out


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return _rename(state, _unet_prefixes(config), UNET, "U-Net", _RESNET)


def _vae_prefixes(config) -> dict[str, str]:
    per, n = config.layers_per_block, len(config.down_block_types)
    out = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.":
           "decoder.norm_out.", "encoder.conv_in.": "encoder.conv_in.",
           "encoder.conv_out.": "encoder.conv_out.", "decoder.conv_in.": "decoder.conv_in.",
           "decoder.conv_out.": "decoder.conv_out.", "quant_conv.": "quant_conv.",
           "post_quant_conv.": "post_quant_conv."}  # fmt: skip
    for part in ("encoder", "decoder"):
        out[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for j in range(2):
            out[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."
    for i in range(n):
        for j in range(per):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if i < n - 1:
            down = f"encoder.down_blocks.{i}.downsamplers.0.conv."
            out[down] = f"encoder.down.{i}.downsample.conv."
        for j in range(per + 1):
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        if i < n - 1:
            up = n - 1 - i
            out[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    return _rename(state, _vae_prefixes(config), VAE, "VAE", {"conv_shortcut": "nin_shortcut"},
                   _VAE_ATTENTION)  # fmt: skip


def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original single-file keys (contiguous CPU tensors)."""
    if type(pipe.text_encoder).__name__ != "CLIPTextModel":
        raise ErasekitError("LDM export covers SD-1.x-style pipelines with a CLIP text encoder")

    def plain(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}

    out = {**unet_to_ldm(plain(pipe.unet), pipe.unet.config),
           **vae_to_ldm(plain(pipe.vae), pipe.vae.config)}  # fmt: skip
    for key, value in plain(pipe.text_encoder).items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[TEXT + key] = value
    return out
