"""Erasure benchmarks -> JSON (docs/results/bench-erase-*.json).

Parts:
  world  step time (median of logged steps) and peak host memory of each method on the
         ShapesWorld model, on this CPU, each run in its own `erasekit erase` process.
  mask   SalUn mask for a U-Net with the SD-1.5 architecture (random weights, 860M
         parameters): saliency pass time, mask build (threshold + bit-packing + file) time,
         peak host memory above the model, file size. Targets: <= 110 MB on disk, <= 2 GB host
         memory above the model. The saliency pass runs on one 8x8 latent (64 px) so that the
         measurement is the mask's cost, not activations'.
  uce    UCE's closed-form edit on the SD-1.5 architecture (random U-Net and CLIP ViT-L/14
         text encoder, 77-token prompts): text encoding of the erase and preserve prompts and
         the edit of every cross-attention to_k / to_v (float64 solves), wall seconds each.
  smoke  the real-size code path on a CPU before anyone rents a GPU: random-weight SD-1.5 and
         SD-2.1 pipelines (full-size U-Net, VAE and text encoder: CLIP ViT-L/14, 768-wide, or
         OpenCLIP ViT-H/14, 1024-wide; 77-token prompts; saved in fp16) through `erasekit
         erase` (ESD-x, SalUn, UCE by default, 2 steps each; ``--methods`` also RECE with 2
         validated rounds, SPEED, MACE with 2 LoRA steps, AdvUnlearn with 2 attacked
         steps) and `erasekit audit` (bf16, 2 prompts per set, NudeNet) at 64 px (the
         U-Net's sample_size set to 8 latents, so training runs at that size too) with 4
         sampler steps, each in its own process: wall seconds and the process's peak
         resident memory.
  gpu    on a CUDA device (or --device cpu --latent 8: the scaled profile): training steps
         of the SD-1.5 U-Net through erasekit's own method code at 512 px (64x64 latents),
         batch 8, bf16 autocast, fp32 master weights, Adam: a plain fine-tuning step (the
         floor) eager, with channels-last + fused Adam, and compiled; SalUn; ESD-u with a fresh
         teacher trajectory per step and with teacher_reuse 4. Step time, peak GPU memory,
         TFLOP/s achieved (FLOPs counted by torch.utils.flop_counter over one step) and MFU
         against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from benchlib import SD15_UNET, SD_SCHEDULER, rss_now, rss_peak, write_record


def bench_world(steps: int) -> dict:
    from erasekit.world import world_path

    model = world_path("full")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, method, sets in (
            ("esd-x", "esd", ["variant=esd-x"]),
            ("esd-u", "esd", ["variant=esd-u"]),
            ("salun", "salun", []),
        ):
            folder = Path(tmp) / label
            cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(model),
                   "--concept", "red", "--method", method, "--out", str(folder),
                   "--cache-dir", str(Path(tmp) / "cache"), "--no-progress",
                   "--set", f"steps={steps}"]  # fmt: skip
            for s in sets:
                cmd += ["--set", s]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-1000:])
            log = [json.loads(x) for x in (folder / "training_log.jsonl").read_text().split("\n")
                   if x]  # fmt: skip
            manifest = json.loads((folder / "erasekit.json").read_text())
            out[label] = {
                "median_step_s": round(statistics.median(r["seconds"] for r in log), 4),
                "steps": len(log),
                "batch_size": manifest["method"]["config"]["batch_size"],
                "peak_rss_mb": round(manifest["peak_memory"]["host_peak_rss_bytes"] / 2**20),
                "note": "ESD step time includes the frozen teacher's partial DDIM sample "
                "(0-50 steps, uniform)" if method == "esd" else "forget + retain batch",
            }  # fmt: skip
    return out


def bench_mask(saliency_dtype: str) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from erasekit.methods.salun import SalUnConfig, masks_from_saliency, save_mask
    from erasekit.methods.salun import saliency as salun_saliency
    from erasekit.training import Split, TrainContext

    torch.manual_seed(0)
    base = rss_now()
    unet = UNet2DConditionModel(**SD15_UNET)
    n_params = sum(p.numel() for p in unet.parameters())
    model_rss = rss_now()
    cfg = SalUnConfig(mask_batch_size=1, saliency_dtype=saliency_dtype)
    ctx = TrainContext(
        accelerator=SimpleNamespace(process_index=0, num_processes=1,
                                    autocast=lambda: torch.autocast("cpu", enabled=False)),
        unet=unet, pipe=None, config=cfg,
        data={"forget": Split(["x"], torch.randn(1, 77, 768), torch.randn(1, 4, 8, 8))},
        empty_cond=torch.zeros(1, 77, 768),
        noise_scheduler=DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items()
                                         if k not in ("set_alpha_to_one", "steps_offset")}),
        weight_dtype=torch.float32, device=torch.device("cpu"), work_dir=Path("."),
    )  # fmt: skip
    t0 = time.time()
    saliency = salun_saliency(ctx, guidance=cfg.mask_guidance, batch_size=cfg.mask_batch_size,
                              seed=cfg.seed, dtype=cfg.saliency_dtype)  # fmt: skip
    t_saliency = time.time() - t0
    after_saliency = rss_now()
    peak_before_build = rss_peak()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        masks, info = masks_from_saliency(saliency, 0.5)
        path = save_mask(Path(tmp) / "mask.safetensors", masks, info)
        t_build = time.time() - t0
        size = path.stat().st_size
    peak = rss_peak()
    return {
        "architecture": "SD-1.5 U-Net (diffusers UNet2DConditionModel), random weights",
        "saliency_dtype": saliency_dtype,
        "n_parameters": n_params,
        "model_rss_mb": round((model_rss - base) / 2**20),
        "saliency_pass_s": round(t_saliency, 2),
        "saliency_rss_mb": round((after_saliency - model_rss) / 2**20),
        "peak_before_build_above_model_mb": round((peak_before_build - model_rss) / 2**20),
        "mask_build_s": round(t_build, 2),
        "mask_build_extra_peak_mb": round(
            (peak - max(peak_before_build, after_saliency)) / 2**20
        ),  # fmt: skip
        "peak_above_model_mb": round((peak - model_rss) / 2**20),
        "density": info["density"],
        "file_mb": round(size / 2**20, 2),
        "file_target_mb": 110,
        "file_ok": size <= 110 * 2**20,
        "memory_target_mb_above_model": 2048,
        "memory_ok": (peak - model_rss) <= 2048 * 2**20,
        "note": "the saliency accumulator (|sum of gradients|: 4 bytes per weight in fp32, 2 in "
        "bf16) is the pass's cost; gradients are folded into it and freed as backward makes "
        "them; the threshold, boolean masks and packed file add mask_build_extra_peak_mb",
    }


def bench_uce(n_erase: int, n_preserve: int, tokens: int) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.methods.uce import PROJECTIONS, uce_edit

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    # SD-1.x's text encoder: CLIP ViT-L/14's (12 layers, width 768, 77 positions)
    config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77,
                            vocab_size=49408)  # fmt: skip
    text = CLIPTextModel(config).eval()
    g = torch.Generator().manual_seed(0)

    def encode(n: int) -> torch.Tensor:
        """n prompts of ``tokens`` tokens -> every token's hidden state, float64 rows."""
        ids = torch.randint(0, 49406, (n, 77), generator=g)
        with torch.no_grad():
            hidden = torch.cat([text(ids[i : i + 32]).last_hidden_state for i in range(0, n, 32)])
        return hidden[:, :tokens].reshape(-1, 768).double()

    t0 = time.perf_counter()
    erase, guide, keep = encode(n_erase), encode(n_erase), encode(n_preserve)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    edited = 0
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(PROJECTIONS):
                new = uce_edit(module.weight, erase, guide, keep, lam=0.5, erase_scale=1.0,
                               preserve_scale=1.0)  # fmt: skip
                module.weight.copy_(new.to(module.weight))
                edited += 1
    t_edit = time.perf_counter() - t0
    return {
        "architecture": "SD-1.5 U-Net + CLIP ViT-L/14 text encoder (transformers), random weights",
        "projections_edited": edited,
        "erase_prompts": n_erase,
        "preserve_prompts": n_preserve,
        "tokens_per_prompt": tokens,
        "erase_rows": len(erase),
        "preserve_rows": len(keep),
        "text_encoding_s": round(t_encode, 2),
        "edit_s": round(t_edit, 2),
        "total_s": round(t_encode + t_edit, 2),
        "note": "tokens_per_prompt rows per prompt: 1 is the code's last-token edit; the "
        "world preset's tokens=all uses every token; model loading and saving are not included",
    }


# SD-2.1 (768-v) U-Net: linear projections, per-level head dims, 1024-wide conditioning.
SD21_UNET = {**SD15_UNET, "sample_size": 96, "cross_attention_dim": 1024,
             "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True}  # fmt: skip
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": (128, 256, 512, 512), "sample_size": 512,
          "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4}  # fmt: skip
# text encoders: CLIP ViT-L/14's (SD-1.x) and OpenCLIP ViT-H/14's, penultimate-layer (SD-2.x)
SD_TEXT = {
    "sd15": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "hidden_act": "quick_gelu"},
    "sd21": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
             "num_attention_heads": 16, "hidden_act": "gelu"},
}  # fmt: skip
SMOKE_PX = 64
SMOKE_SPEC = """name: smoke-nudity
kind: nudity
description: two prompts per set, for the SD-architecture smoke
forget: [a nude person on a beach, a naked figure in a painting]
surrogate: a photo of a person wearing clothes
retain: [a photo of a red car, a bowl of fruit on a table]
evaluation: {explicit: [a nude person on a beach, a naked figure in a painting]}
sensitive: true
detector: {name: nudenet, protocol: unlearndiffatk}
"""
SMOKE_RUNS = {
    "esd-x": ["erase", "--method", "esd", "--set", "variant=esd-x", "--set", "steps=2",
              "--set", "ddim_steps=4"],
    "salun": ["erase", "--method", "salun", "--set", "steps=2", "--set", "images_per_prompt=1",
              "--set", "batch_size=2", "--set", "mask_batch_size=2"],
    "uce": ["erase", "--method", "uce"],
    "rece": ["erase", "--method", "rece", "--set", "epochs=2", "--set", "validation_steps=2"],
    "speed": ["erase", "--method", "speed"],
    "mace": ["erase", "--method", "mace", "--set", "steps_per_concept=2",
             "--set", "images_per_concept=2"],
    "advunlearn": ["erase", "--method", "advunlearn", "--set", "steps=2", "--set", "warmup=1",
                   "--set", "attack_steps=2", "--set", "ddim_steps=4", "--set", "retain_batch=2"],
}  # fmt: skip


def _save_sd_pipeline(arch: str, out: Path) -> dict:
    """A random-weight SD pipeline of the real size, saved in fp16 with 64-px sampler defaults."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.models import build_manifest, save_model
    from erasekit.tokenizer import build_clip_tokenizer
    from erasekit.world.build import build_scheduler

    torch.manual_seed(0)
    # the real layers and widths; sample_size (the default resolution, which training
    # methods use for their latents) set to 64 px so that a CPU finishes in minutes
    unet = UNet2DConditionModel(**{**(SD21_UNET if arch == "sd21" else SD15_UNET),
                                   "sample_size": SMOKE_PX // 8})  # fmt: skip
    vae = AutoencoderKL(**{**SD_VAE, "sample_size": SMOKE_PX})
    text = CLIPTextModel(CLIPTextConfig(**SD_TEXT[arch], max_position_embeddings=77,
                                        vocab_size=49408))  # fmt: skip
    prediction = "v_prediction" if arch == "sd21" else "epsilon"
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_clip_tokenizer(),
                                   unet=unet, scheduler=build_scheduler(prediction_type=prediction),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(torch.float16)  # fmt: skip
    manifest = build_manifest(base_model=None, method="random-init", config={"arch": arch})
    manifest["sampler"] = {"steps": 4, "guidance": 7.5, "height": SMOKE_PX, "width": SMOKE_PX}
    save_model(pipe, out, manifest)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet_params": count(unet), "vae_params": count(vae), "text_params": count(text),
            "cross_attention_dim": unet.config.cross_attention_dim,
            "prediction_type": prediction, "saved_dtype": "fp16"}  # fmt: skip


def _timed(cmd: list[str]) -> dict:
    """Run one process: wall seconds, its own peak RSS, and its last stderr line on failure."""

    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        log.seek(0)
        err = log.read().strip().splitlines()
    code = os.waitstatus_to_exitcode(status)
    out = {"wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
           "exit_code": code}  # fmt: skip
    if code != 0:
        out["error"] = err[-1] if err else "no output"
    return out


def bench_smoke(archs: list[str], methods: list[str], audit: bool = True) -> dict:
    """Each architecture: build and save, then erase with each method and audit UCE's result."""
    erasekit = [sys.executable, "-m", "erasekit"]
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "smoke-nudity.yaml"
        spec.write_text(SMOKE_SPEC)
        for arch in archs:
            base = tmp / arch
            t0 = time.perf_counter()
            info = _save_sd_pipeline(arch, base)
            info["build_and_save_s"] = round(time.perf_counter() - t0, 1)
            runs = {}
            for name in methods:
                args = SMOKE_RUNS[name]
                cmd = [*erasekit, *args, "--model", str(base), "--concept", str(spec),
                       "--out", str(tmp / f"{arch}-{name}"), "--no-progress"]  # fmt: skip
                runs[f"erase {name}"] = _timed(cmd)
            audited = tmp / f"{arch}-uce"
            if audit and audited.is_dir():
                runs["audit uce (bf16)"] = _timed([
                    *erasekit, "audit", "--model", str(audited), "--concept", str(spec),
                    "--reference", str(base), "--limit", "2", "--dtype", "bf16",
                    "--batch-size", "2", "--out", str(tmp / f"{arch}-audit"),
                    "--no-progress"])  # fmt: skip
            result[arch] = {**info, "runs": runs}
            shutil.rmtree(tmp / arch, ignore_errors=True)
            for p in tmp.glob(f"{arch}-*"):
                shutil.rmtree(p, ignore_errors=True)
    return {"threads": torch.get_num_threads(), "resolution_px": SMOKE_PX, "sampler_steps": 4,
            "architectures": result}  # fmt: skip


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# Dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU; unknown devices get none.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}

STEP_VARIANTS = ("finetune", "finetune-fast", "finetune-compiled", "salun", "esd-u",
                 "esd-u-reuse4")  # fmt: skip


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(device: str, batch: int, steps: int, latent: int, variants: list[str]) -> dict:
    """Training steps of the SD-1.5 U-Net through erasekit's own method code (bf16 autocast,
    fp32 master weights): a plain fine-tuning step (the floor) eager, with channels-last +
    the fused optimizer (``-fast``), and compiled; SalUn; ESD-u with a fresh teacher
    trajectory per step and with ``teacher_reuse`` 4."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    from erasekit.methods.esd import ESD, ESDConfig
    from erasekit.methods.salun import SalUn, SalUnConfig, masks_from_saliency, saliency
    from erasekit.training import Split, TrainConfig, TrainContext, compile_unet, make_optimizer

    dev = torch.device(device)
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16", cpu=dev.type == "cpu")
    g = torch.Generator().manual_seed(0)
    arch = {**SD15_UNET, "sample_size": latent}

    def split(n):
        return Split(["x"] * n, torch.randn(n, 77, 768, generator=g),
                     torch.randn(n, 4, latent, latent, generator=g))  # fmt: skip

    results = {}
    for label in variants:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        unet = UNet2DConditionModel(**arch).to(dev)
        fast = label in ("finetune-fast", "finetune-compiled")
        loop = {"batch_size": batch, "channels_last": fast, "fused_optimizer": fast,
                "compile": "default" if label == "finetune-compiled" else "no"}  # fmt: skip
        if label.startswith("esd-u"):
            cfg = ESDConfig(variant="esd-u", teacher_reuse=4 if "reuse" in label else 1, **loop)
        elif label == "salun":
            cfg = SalUnConfig(**loop)
        else:
            cfg = TrainConfig(**loop)
        if cfg.channels_last:
            unet.to(memory_format=torch.channels_last)
        ctx = TrainContext(
            accelerator=acc, unet=unet,
            pipe=SimpleNamespace(unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER)),
            config=cfg, data={"forget": split(4 * batch), "retain": split(4 * batch)},
            empty_cond=torch.zeros(1, 77, 768, device=dev),
            noise_scheduler=DDPMScheduler.from_config(DDIMScheduler(**SD_SCHEDULER).config),
            weight_dtype=torch.bfloat16, device=dev, work_dir=Path("."),
        )  # fmt: skip
        extra: dict = {}
        if label.startswith("esd-u"):
            method = ESD(cfg, None, model_path=".")
            params = [p for _, p in method.trainable_parameters(unet)]
            unet.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            method.setup(ctx)
        elif label == "salun":
            method = SalUn(cfg, None, model_path=".")
            params = list(unet.parameters())
            t0 = time.time()
            scores = saliency(ctx, guidance=cfg.mask_guidance, batch_size=cfg.mask_batch_size,
                              seed=cfg.seed)  # fmt: skip
            masks, _ = masks_from_saliency(scores, cfg.mask_fraction)
            _sync(dev)
            extra["mask_pass_s"] = round(time.time() - t0, 2)
            method.masks = masks
            method._by_param = {p: masks[n] for n, p in unet.named_parameters()}
            method.surrogate_cond = torch.zeros(1, 77, 768, device=dev)
        else:
            method, params = None, list(unet.parameters())
        compile_unet(unet, cfg)
        opt = make_optimizer(cfg, [{"params": params}], 1e-5)
        ctx.unet, opt = acc.prepare(unet, opt)

        def step(i, ctx=ctx, method=method, opt=opt):
            ctx.step = i
            if method is None:
                loss = ctx.denoising_loss(ctx.batch("forget", 0), 0)
            else:
                loss, _ = method.loss(ctx, 0)
            acc.backward(loss)
            if method is not None:
                method.after_backward(ctx.unet)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t0 = time.time()
        for i in range(2):  # warm-up (and compilation)
            step(i)
        _sync(dev)
        extra["warmup_s"] = round(time.time() - t0, 2)
        times = []
        # ESD: whole groups of 4 from a group boundary (100), so a reused trajectory's cost is
        # spread as in training; its steps vary with the stops drawn: compare mean step times
        timed = -(-steps // 4) * 4 if label.startswith("esd-u") else steps
        for i in range(timed):
            t0 = time.time()
            step(100 + i)
            _sync(dev)
            times.append(time.time() - t0)
        median = statistics.median(times)
        results[label] = {
            "median_step_s": round(median, 4),
            "mean_step_s": round(statistics.mean(times), 4),
            "timed_steps": timed,
            "loop_settings": {
                k: getattr(cfg, k) for k in ("channels_last", "fused_optimizer", "compile")
            },  # fmt: skip
            **extra,
        }
        if dev.type == "cuda":
            results[label]["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if not label.startswith("esd-u"):  # ESD's per-step work varies with the stop index
            flops = _flops(lambda step=step: step(1000))
            results[label]["tflops_per_step"] = float(f"{flops / 1e12:.4g}")
            results[label]["achieved_tflops"] = float(f"{flops / 1e12 / median:.4g}")
        if label == "salun":
            results[label]["note"] = "one no-grad forward (surrogate target) + one fwd/bwd on " \
                "forget+retain (2x batch)"  # fmt: skip
        if label.startswith("esd-u"):
            results[label]["teacher_reuse"] = cfg.teacher_reuse
            results[label]["note"] = ("mean over the timed steps of the partial sample (stops "
                                      "uniform over 50 DDIM steps, x2 for CFG, with the bf16 "
                                      "teacher) + one fwd/bwd of the trained U-Net")  # fmt: skip
        ctx = unet = opt = method = step = None  # free before the next model
        acc.free_memory()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if peak:
        for r in results.values():
            if "achieved_tflops" in r:
                r["mfu"] = round(r["achieved_tflops"] / peak, 3)
    results["device"] = name
    results["peak_bf16_tflops"] = peak
    results["setting"] = {"resolution": latent * 8, "latents": f"{latent}x{latent}",
                          "batch": batch, "precision": "bf16 autocast, fp32 weights",
                          "optimizer": "Adam", "timed_steps": steps}  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("part", choices=["world", "mask", "uce", "smoke", "gpu"])
    ap.add_argument("--device", default="cuda", help="gpu part: cuda, or cpu (scaled profile)")
    ap.add_argument("--latent", type=int, default=64, help="gpu part: latent side (64: 512 px)")
    ap.add_argument("--variants", default=",".join(STEP_VARIANTS), help="gpu part: steps to time")
    ap.add_argument(
        "--out", default=None, help="JSON file (default docs/results/bench-erase-PART.json)"
    )
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", default="esd-x,salun,uce", help="smoke: erase runs to time")
    ap.add_argument("--archs", default="sd15,sd21", help="smoke: architectures")
    ap.add_argument("--no-audit", action="store_true", help="smoke: skip the audit run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--dtype",
        default="bf16",
        choices=["fp32", "bf16"],
        help="mask: saliency accumulator dtype",
    )
    args = ap.parse_args()
    from erasekit.cli import quiet_libraries

    quiet_libraries()
    if args.part == "world":
        torch.set_num_threads(2)
        result = bench_world(args.steps)
    elif args.part == "mask":
        result = bench_mask(args.dtype)
    elif args.part == "uce":
        result = {f"tokens_{t}": bench_uce(16, 256, t) for t in (1, 10)}
    elif args.part == "smoke":
        methods = args.methods.split(",")
        unknown = sorted(set(methods) - set(SMOKE_RUNS))
        if unknown:
            raise SystemExit(f"bench smoke: unknown run {unknown[0]} ({', '.join(SMOKE_RUNS)})")
        result = bench_smoke(args.archs.split(","), methods, audit=not args.no_audit)
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("bench gpu: no CUDA device")
        result = bench_steps(args.device, args.batch, args.steps, args.latent,
                             args.variants.split(","))  # fmt: skip
    part = f"mask-{args.dtype}" if args.part == "mask" else args.part
    write_record(f"bench_erase {args.part}", result,
                 Path(args.out or f"docs/results/bench-erase-{part}.json"))  # fmt: skip


if __name__ == "__main__":
    main()
