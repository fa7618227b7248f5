"""Benchmark one ResAlign outer step -> docs/results/bench-resalign-PART.json.

  world  the ShapesWorld U-Net on the CPU (world defaults: k = 2 configurations from the world
         meta-distribution, outer batch 4, K = 5, alpha from 1/16; trainable = full U-Net)
  gpu    the SD-1.5 U-Net architecture (random weights, 860M) on a CUDA device (or --device cpu
         --latent 8: the scaled profile), rank-4 LoRA,
         bf16 autocast, the shipped SD meta-distribution (k = 3), 64x64 latents: peak memory
         and step time (target <= 24 GB)

The cost is given in forward+backward equivalents: the step's wall time over the measured time
of one fwd+bwd of the fine-tuning loss at batch 1. The lower bound counts what the algorithm
must do: every inner step and each configuration's fine-tuning graph (one fwd+bwd each, at
that configuration's batch), every Hessian-vector product the step ran (measured separately;
`..._no_retries`: K - 1 per configuration, as if no safeguard retried), and the outer losses
(L_h(theta), R(theta), one L_h(phi) per configuration) at the outer batch. Data are random
latents and conditions (cost only).

  python scripts/bench_resalign.py world [--steps 4]     # from the repository root
  python scripts/bench_resalign.py gpu [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_erase import SD15_UNET, SD_SCHEDULER, rss_peak, write_record

from erasekit.concepts import load_concept
from erasekit.methods.resalign import (
    META_SD,
    META_WORLD,
    ResAlign,
    ResAlignConfig,
    double_backward_ready,
    make_hvp,
)
from erasekit.training import Split, TrainContext, step_generator


def _timed(fn, device, repeat: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(unet, config: ResAlignConfig, meta: Path, device: str, precision: str,
          steps: int) -> dict:  # fmt: skip
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import DDIMScheduler, DDPMScheduler

    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    dev = acc.device
    c = unet.config
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(
            ["x"] * n,
            torch.randn(n, 77, c.cross_attention_dim, generator=gen),
            torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=gen),
        )

    config.meta_distribution = str(meta)
    config.validate()
    method = ResAlign(config, load_concept("red"), model_path=".", progress=False)
    unet.to(dev)
    unet.requires_grad_(False)
    trainable = dict(method.trainable_parameters(unet))
    for p in trainable.values():
        p.requires_grad_(True)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    ctx = TrainContext(
        accelerator=acc, unet=unet, pipe=SimpleNamespace(unet=unet, scheduler=scheduler),
        config=config, data={"forget": split(16), "retain": split(16), "sim:benign": split(16)},
        empty_cond=torch.zeros(1, 77, c.cross_attention_dim, device=dev),
        noise_scheduler=DDPMScheduler.from_config(scheduler.config),
        weight_dtype=torch.bfloat16 if precision == "bf16" else torch.float32, device=dev,
        work_dir=Path("."),
    )  # fmt: skip
    method.setup(ctx)
    opt = torch.optim.AdamW(list(trainable.values()), lr=config.lr)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # unit costs: fwd+bwd of the fine-tuning loss, and one HVP, at the batch sizes in use
    params = list(method.decision.values())
    batches = sorted({cfg.batch_size for cfg in method.meta.configs} | {1})
    fb, hvp_s = {}, {}
    for b in [*batches, config.batch_size]:
        g = step_generator(0, b)

        def fwd_bwd(b=b, g=g):
            loss = method.finetune_loss(ctx, "sim:benign", b, g, None)
            torch.autograd.grad(loss, params)

        fb[b] = _timed(fwd_bwd, dev)
        phi = {n: p.detach().clone().requires_grad_(True) for n, p in method.decision.items()}
        with double_backward_ready(unet, dev):
            hvp = make_hvp(method.finetune_loss(ctx, "sim:benign", b, g, phi), list(phi.values()))
            v = [torch.randn_like(x) for x in phi.values()]
            hvp_s[b] = _timed(lambda hvp=hvp, v=v: hvp(v), dev)
        del hvp, phi
    by_name = {cfg.name: cfg for cfg in method.meta.configs}
    records = []
    for i in range(steps):
        ctx.step = i
        t0 = time.perf_counter()
        loss, logs = method.loss(ctx, 0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        chosen = [by_name[n] for n in logs["configs"].split(",")]
        mean_b = sorted(cfg.batch_size for cfg in chosen)[len(chosen) // 2]
        bound = (sum((cfg.steps + 1) * fb[cfg.batch_size] for cfg in chosen)
                 + logs["hvps"] * hvp_s[mean_b]
                 + logs["outer_passes"] * fb[config.batch_size])  # fmt: skip
        # the same without retries: K - 1 HVPs per configuration (H·v_0 = 0 is free)
        ideal = bound + (len(chosen) * (config.fixed_point_iterations - 1) - logs["hvps"]) \
            * hvp_s[mean_b]  # fmt: skip
        records.append({"seconds": seconds, "bound": bound, "bound_no_retries": ideal,
                        "hvps": logs["hvps"],
                        "inner_steps": logs["inner_steps"], "configs": logs["configs"],
                        "seconds_inner": logs["seconds_inner"],
                        "seconds_solve": logs["seconds_solve"],
                        "fallbacks": logs["fallbacks"], "retries": logs["retries"]})  # fmt: skip
    unit = fb[1]
    out = {
        "unit_fwd_bwd_batch1_s": round(unit, 4),
        "fwd_bwd_s_by_batch": {b: round(t, 4) for b, t in fb.items()},
        "hvp_s_by_batch": {b: round(t, 4) for b, t in hvp_s.items()},
        "steps": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                  for r in records],  # fmt: skip
        "median_step_s": round(statistics.median(r["seconds"] for r in records), 3),
        "median_step_fwd_bwd_equivalents": round(
            statistics.median(r["seconds"] / unit for r in records), 1),
        "median_lower_bound_fwd_bwd_equivalents": round(
            statistics.median(r["bound"] / unit for r in records), 1),
        "median_lower_bound_no_retries_fwd_bwd_equivalents": round(
            statistics.median(r["bound_no_retries"] / unit for r in records), 1),
        "median_overhead_vs_lower_bound": round(
            statistics.median(r["seconds"] / r["bound"] for r in records), 2),
        "trainable": config.trainable,
        "trainable_parameters": sum(p.numel() for p in params),
        "k": config.configs_per_step, "K": config.fixed_point_iterations,
        "outer_batch": config.batch_size, "precision": precision,
        "meta_distribution": str(meta.name),
    }  # fmt: skip
    if dev.type == "cuda":
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["device"] = torch.cuda.get_device_name()
        out["target_peak_gb"] = 24
    out["peak_rss_mb"] = round(rss_peak() / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("part", choices=["world", "gpu"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="gpu part: cuda, or cpu (scaled profile)")
    ap.add_argument("--latent", type=int, default=64, help="gpu part: latent side (64: 512 px)")
    args = ap.parse_args()
    out = Path(args.out or f"docs/results/bench-resalign-{args.part}.json")
    if args.part == "world":
        from diffusers import UNet2DConditionModel

        from erasekit.world import world_path

        unet = UNet2DConditionModel.from_pretrained(str(world_path("full")), subfolder="unet")
        config = ResAlignConfig(**{**ResAlign.defaults(load_concept("red")), "trainable": "full",
                                   "weight_decay": 0.0})  # fmt: skip
        result = bench(unet, config, META_WORLD, "cpu", "no", args.steps)
    else:
        from diffusers import UNet2DConditionModel

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("bench_resalign gpu: no CUDA device")
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": args.latent})
        result = bench(unet, ResAlignConfig(trainable="lora"), META_SD,
                       "cpu" if args.device == "cpu" else "cuda", "bf16", args.steps)  # fmt: skip
        result["latents"] = f"{args.latent}x{args.latent}"
    write_record(f"bench_resalign {args.part}", result, out)


if __name__ == "__main__":
    main()
