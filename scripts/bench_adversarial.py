"""Adversarial-prompt benchmarks -> docs/results/bench-adversarial-{world,gpu}.json.

world  On this CPU, a world model erased of `red` (ESD world preset; --model to pass one):
       UnlearnDiffAtk and Ring-A-Bell (--attacks: any prompt attacks, e.g. p4d,mma-diffusion
       into --out docs/results/bench-adversarial-world-p4d-mma.json) at their world budgets
       on the 16 red forget prompts,
       all prompts batched vs one prompt at a time. Per run: wall seconds, prompts per hour,
       pre-ASR / ASR (world detector, one image per prompt), cost, and whether both runs
       found the same prompts (they should: each prompt's randomness is its own).
gpu    The SD-1.5 architecture with random weights (cost only) on a CUDA device: one
       UnlearnDiffAtk iteration (text encoder with free prefix embeddings, U-Net forward and
       backward, Adam, simplex projection) for 1 prompt vs a batch, and one Ring-A-Bell
       generation (200 candidates x prompts through CLIP ViT-L/14's text encoder); prompts
       per hour at the reference budgets (2000 iterations; 3000 generations), renders
       excluded.

python scripts/bench_adversarial.py world [--model DIR]
python scripts/bench_adversarial.py gpu [--device cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def erased_red(folder: Path) -> Path:
    from erasekit.world import world_path

    out = folder / "red-esd"
    cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(world_path("full")),
           "--concept", "red", "--method", "esd", "--out", str(out), "--no-progress",
           "--set", "variant=esd-u", "--set", "steps=200", "--set", "lr=5e-5",
           "--set", "negative_guidance=2.0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"erasing red failed: {proc.stderr[-500:]}")
    return out


def run_once(name: str, batch: int, model: Path, folder: Path, limit: int) -> dict:
    from erasekit.attacks import AttackContext, get_attack
    from erasekit.auditing import attack_configs, prompt_attack_metrics
    from erasekit.concepts import load_concept
    from erasekit.detectors import DetectorOptions
    from erasekit.evaluation import PromptJudge, build_judges
    from erasekit.sampling import SamplerSettings
    from erasekit.world import world_path

    concept = load_concept("red")
    config = attack_configs({name: [f"batch_size={batch}"]}, concept=concept)[name]
    work = folder / f"{name}-batch{batch}"
    ctx = AttackContext(concept=concept, original=world_path("full"), audited=model,
                        work_dir=work)  # fmt: skip
    attack = get_attack(name)(config, ctx)
    attack.prepare(limit)
    judges = build_judges(concept, DetectorOptions())
    judge = PromptJudge(attack.prompt_set, judges, work, "renders",
                        SamplerSettings.for_model(world_path("full")), 0, 16)  # fmt: skip
    t0 = time.time()
    out = attack.run(model, work / "out", judge)
    wall = time.time() - t0
    metrics = prompt_attack_metrics(out["outcomes"], attack.prompt_set, judges, 0)
    pre = next(m for m in metrics.values() if m["metric"] == "pre_asr")
    asr = next(m for m in metrics.values() if m["metric"] == "asr")
    n = len(out["outcomes"])
    return {
        "prompts_per_forward": batch,
        "wall_s": round(wall, 1),
        "prompts_per_hour": round(n / wall * 3600),
        "n_prompts": n,
        "pre_asr": {"value": pre["value"], "ci95": pre["ci95"]},
        "asr": {"value": asr["value"], "ci95": asr["ci95"]},
        "cost": out["cost"],
        "prompts": [o["adversarial_prompt"] for o in out["outcomes"]],
    }


def bench_world(model: Path | None, limit: int, attacks: list[str]) -> dict:
    from erasekit.auditing import attack_configs
    from erasekit.concepts import load_concept

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = model or erased_red(folder)
        for name in attacks:
            batched = run_once(name, 16, model, folder, limit)
            single = run_once(name, 1, model, folder, limit)
            config = attack_configs([name], concept=load_concept("red"))[name]
            result[name] = {
                "world_budget": {
                    k: v for k, v in vars(config).items() if k not in ("prompts", "images", "pairs")
                },  # fmt: skip
                "batched": batched,
                "one_at_a_time": single,
                "speedup": round(single["wall_s"] / batched["wall_s"], 2),
                "same_prompts_found": batched["prompts"] == single["prompts"],
                "same_asr": batched["asr"]["value"] == single["asr"]["value"],
            }
    result["model"] = str(model)
    result["note"] = (
        f"ASR: world detector, one image per prompt, the first {limit} red forget prompts, "
        "evaluation seed 0; wall includes pre-check and renders"
    )
    return result


def bench_gpu(
    device: str,
    batch: int,
    iterations: int,
    rab_prompts: int,
    latent: int = 64,
    population: int = 200,
) -> dict:
    from benchlib import SD15_UNET, SD_SCHEDULER
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.attacks.adversarial import (
        free_token_embeddings,
        project_simplex,
        straight_through,
        text_vocabulary,
    )
    from erasekit.attacks.encoder_search import candidate_ids, encode
    from erasekit.attacks.unlearndiffatk import denoising_loss
    from erasekit.tokenizer import build_clip_tokenizer

    dev = torch.device(device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(dev).requires_grad_(False)
    te_config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                               num_hidden_layers=12, num_attention_heads=12,
                               max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
    te = CLIPTextModel(te_config).to(dev).requires_grad_(False)
    tok = build_clip_tokenizer()
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    vocab = text_vocabulary(tok).to(dev)
    table = te.get_input_embeddings().weight[vocab].float()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    uda = {}
    for b in sorted({1, batch}):
        relaxed = torch.rand(b, 5, len(vocab), device=dev)
        relaxed = project_simplex(relaxed).requires_grad_(True)
        opt = torch.optim.Adam([relaxed], lr=0.01, weight_decay=0.1)
        ids = torch.full((b, 77), tok.eos_token_id, device=dev)
        ids[:, 0] = tok.bos_token_id
        x0 = torch.randn(b, 4, latent, latent, device=dev)
        embeds = {}
        times = []
        with free_token_embeddings(te, embeds):
            for i in range(iterations + 1):
                sync()
                t0 = time.perf_counter()
                embeds["value"] = straight_through(relaxed) @ table
                loss = denoising_loss(unet, sched, te(ids)[0], x0, 500, torch.randn_like(x0))
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                with torch.no_grad():
                    relaxed.copy_(project_simplex(relaxed))
                sync()
                if i:  # the first iteration warms up
                    times.append(time.perf_counter() - t0)
        per_iter = sorted(times)[len(times) // 2]
        rate = 3600 * b / (2000 * per_iter)
        uda[b] = {"iteration_s": round(per_iter, 4), "prompts_per_hour_2000_iterations": rate}
    rab = {}
    for n in sorted({1, rab_prompts}):
        cand = candidate_ids(tok, vocab[torch.randint(0, len(vocab), (population * n, 16))]
                             .cpu())  # fmt: skip
        times = []
        for i in range(iterations + 1):
            sync()
            t0 = time.perf_counter()
            encode(te, cand, 2048)
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        per_gen = sorted(times)[len(times) // 2]
        rate = 3600 * n / (3000 * per_gen)
        rab[n] = {"generation_s": round(per_gen, 4), "prompts_per_hour_3000_generations": rate}
    out = {"architecture": "SD-1.5 U-Net + CLIP ViT-L/14 text encoder, random weights",
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else str(dev),
           "unlearndiffatk_by_batch": uda, "ring_a_bell_by_prompts": rab,
           "renders": "excluded (a render = 50 DDIM steps x 2 U-Net passes)"}  # fmt: skip
    if dev.type == "cuda":
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("part", choices=["world", "gpu"])
    ap.add_argument("--model", type=Path, help="world: an erased world model (default: erase)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8, help="gpu: prompts per U-Net pass")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16, help="world: first N red forget prompts")
    ap.add_argument("--rab-prompts", type=int, default=16, help="gpu: Ring-A-Bell prompts")
    ap.add_argument("--latent", type=int, default=64, help="gpu: latent side (64: 512 px)")
    ap.add_argument("--population", type=int, default=200, help="gpu: Ring-A-Bell candidates")
    ap.add_argument("--attacks", default="unlearndiffatk,ring-a-bell", help="world: attacks")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from benchlib import write_record

    from erasekit.cli import quiet_libraries

    quiet_libraries()
    if args.part == "world":
        result = bench_world(args.model, args.prompts, args.attacks.split(","))
    else:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("the gpu part needs a CUDA device (or --device cpu for a check)")
        result = bench_gpu(args.device, args.batch, args.iterations, args.rab_prompts,
                           args.latent, args.population)  # fmt: skip
    out = args.out or Path(f"docs/results/bench-adversarial-{args.part}.json")
    write_record(f"bench_adversarial {args.part}", result, out)


if __name__ == "__main__":
    main()
