"""What the benchmark scripts share: the SD-1.5 architecture they build at random weights,
the record writer (JSON with the machine it ran on) and memory readings. Imported by the
scripts as `import benchlib` (a script's own folder is first on its import path)."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

# The GPU suite's CPU profile narrows every benchmark's SD-1.5 U-Net (same layout, blocks and
# attention; channels (w, 2w, 4w, 4w)) by setting BENCH_UNET_WIDTH (default 320: SD-1.5).
WIDTH = int(os.environ.get("BENCH_UNET_WIDTH", "320"))

# SD-1.5 U-Net architecture (diffusers config values; the same for SD-1.4).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (WIDTH, 2 * WIDTH, 4 * WIDTH, 4 * WIDTH),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def write_record(benchmark: str, result: dict, out: Path) -> None:
    """Write (and print) a benchmark's JSON record with the machine it ran on."""
    from erasekit.provenance import machine

    record = {
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "result": result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
