"""The GPU benchmark suite in one command -> docs/results/bench-gpu-PROFILE.json.

Runs the GPU parts of the other benchmarks, each in its own process (memory is returned
between parts, and a part that fails is recorded as failed while the others still run),
within a time budget, and checks the measurements against the targets:

  steps        bench_erase.py gpu: plain fine-tuning step eager / channels-last + fused Adam /
               compiled, SalUn, ESD-u fresh and with teacher_reuse 4 (SD-1.5 U-Net, 512 px,
               batch 8, bf16): step time, peak memory, achieved TFLOP/s, MFU
  resalign     bench_resalign.py gpu: one ResAlign outer step, SD-1.5 + rank-4 LoRA: peak memory
  audit        bench_audit.py gpu: generate vs generate + NudeNet (+ CLIP): evaluation overhead
  adversarial  bench_adversarial.py gpu: UnlearnDiffAtk iterations, 1 prompt vs a batch

Profiles: ``gpu`` (one CUDA device; fits in about 10 minutes on an H100-class GPU) and
``cpu`` (the same code paths scaled down: SD-1.5's U-Net layout at a tenth of its width,
64 px, batch 1-2, 1-2 steps, Ring-A-Bell populations of 8; checks that the suite runs and
measures nothing a GPU target speaks of).

  python scripts/bench_gpu.py gpu
  python scripts/bench_gpu.py cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# part -> (script, arguments) per profile
PARTS = {
    "gpu": {
        "steps": ("bench_erase.py", ["gpu", "--batch", "8", "--steps", "10"]),
        "resalign": ("bench_resalign.py", ["gpu", "--steps", "3"]),
        "audit": ("bench_audit.py", ["gpu", "--prompts", "16", "--batch", "16"]),
        "adversarial": ("bench_adversarial.py", ["gpu", "--batch", "8", "--iterations", "5"]),
    },
    "cpu": {
        "steps": ("bench_erase.py", ["gpu", "--device", "cpu", "--latent", "8", "--batch", "1",
                                     "--steps", "2", "--variants",
                                     "finetune,finetune-fast,salun,esd-u,esd-u-reuse4"]),
        "resalign": ("bench_resalign.py", ["gpu", "--device", "cpu", "--latent", "8",
                                           "--steps", "1"]),
        "audit": ("bench_audit.py", ["gpu", "--device", "cpu", "--prompts", "2", "--batch", "2",
                                     "--steps", "2", "--latent", "8"]),
        "adversarial": ("bench_adversarial.py", ["gpu", "--device", "cpu", "--batch", "2",
                                                 "--iterations", "2", "--rab-prompts", "2",
                                                 "--latent", "8", "--population", "8"]),
    },
}  # fmt: skip

CPU_WIDTH = 32

# ESD-u step before this suite's settings (H200, 512 px, batch 8, bf16, eager): README
ESD_STEP_BEFORE_S = 1.63


def targets(parts: dict) -> list[dict]:
    """Each target of the GPU suite with the measured value and whether it is met (None when
    the part did not measure it)."""
    steps = parts.get("steps", {}).get("result", {})
    out = []

    def add(name, value, rule, met):
        out.append({"target": name, "rule": rule, "measured": value,
                    "met": None if value is None else bool(met(value))})  # fmt: skip

    best = max((steps[k].get("mfu") or 0 for k in steps if k.startswith("finetune")), default=None)
    add("plain fine-tuning step MFU", best or None, ">= 0.40", lambda v: v >= 0.40)
    # the earlier 1.63 s was timed at the mean stop depth; these at random stops: mean times
    esd = [steps[k]["mean_step_s"] for k in steps if k.startswith("esd-u")]
    add("ESD-u mean step speed-up over 1.63 s", round(ESD_STEP_BEFORE_S / min(esd), 2) if esd
        else None, ">= 3", lambda v: v >= 3)  # fmt: skip
    peak = parts.get("resalign", {}).get("result", {}).get("peak_gpu_gb")
    add("ResAlign SD-1.5 + LoRA peak memory (GB)", peak, "<= 24", lambda v: v <= 24)
    audit = parts.get("audit", {}).get("result", {}).get("sd15", {})
    add(
        "audit evaluation overhead (detector time / generation time)",
        audit.get("detector_time_over_generate_time"),
        "<= 0.10",
        lambda v: v <= 0.10,
    )
    uda = parts.get("adversarial", {}).get("result", {}).get("unlearndiffatk_by_batch", {})
    rates = {int(b): r["prompts_per_hour_2000_iterations"] for b, r in uda.items()}
    speedup = round(rates[max(rates)] / rates[1], 2) if len(rates) > 1 and 1 in rates else None
    add("UnlearnDiffAtk prompts/hour batched over one at a time", speedup, ">= 4",
        lambda v: v >= 4)  # fmt: skip
    return out


def run_part(script: str, args: list[str], budget_s: float, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, str(HERE / script), *args, "--out", str(out)],
                               capture_output=True, text=True, timeout=budget_s,
                               env=env)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "timed out", "seconds": round(time.time() - t0, 1)}
        record = {"status": "ok" if r.returncode == 0 else "failed",
                  "seconds": round(time.time() - t0, 1), "command": [script, *args]}  # fmt: skip
        if r.returncode != 0:
            record["stderr_tail"] = r.stderr[-2000:]
        if out.is_file():
            record["result"] = json.loads(out.read_text())["result"]
        return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("profile", choices=list(PARTS))
    ap.add_argument("--parts", default=None, help="comma-separated subset of the parts")
    ap.add_argument("--budget", type=float, default=540, help="seconds for the whole suite")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from benchlib import write_record

    chosen = args.parts.split(",") if args.parts else list(PARTS[args.profile])
    env = dict(os.environ)
    if args.profile == "cpu":  # SD-1.5's layout at a tenth of its width (see bench_erase.py)
        env["BENCH_UNET_WIDTH"] = str(CPU_WIDTH)
    started = time.time()
    parts = {}
    for name in chosen:
        left = args.budget - (time.time() - started)
        if left < 30:
            parts[name] = {"status": "skipped: the suite's time budget is spent"}
            continue
        script, part_args = PARTS[args.profile][name]
        print(f"bench_gpu: {name} ({left:.0f} s left) ...", file=sys.stderr, flush=True)
        parts[name] = run_part(script, part_args, left, env)
        print(f"bench_gpu: {name}: {parts[name]['status']} in {parts[name].get('seconds')} s",
              file=sys.stderr, flush=True)  # fmt: skip
    result = {"profile": args.profile, "parts": parts,
              "suite_seconds": round(time.time() - started, 1)}  # fmt: skip
    if args.profile == "gpu":
        result["targets"] = targets(parts)
    else:
        result["note"] = (f"CPU-scaled profile: the GPU suite's code paths with the U-Net at "
                          f"width {CPU_WIDTH} (SD-1.5: 320), 64 px, batch 1-2, on this CPU; its "
                          "numbers say nothing about the GPU targets, which are not yet "
                          "measured on a GPU")  # fmt: skip
        result["unet_width"] = CPU_WIDTH
    write_record(f"bench_gpu {args.profile}", result,
                 args.out or Path(f"docs/results/bench-gpu-{args.profile}.json"))  # fmt: skip


if __name__ == "__main__":
    main()
