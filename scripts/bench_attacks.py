"""Attack benchmarks -> docs/results/bench-attacks-world.json.

On this CPU: `erasekit audit --attacks finetune,memora,concept-inversion` with the world
default settings (every prompt, one image per prompt, both controls) on a world model erased of
`red` (the never-learned model's weights, so the numbers are about cost, not recovery): wall
time and peak resident memory of the whole audit process (the issue's bound: 15 minutes), and
each attack's training / evaluation seconds per attacked model from results.json.
(The SD-1.5 GPU step rates of LoRA and full fine-tuning need a GPU session; not measured yet.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import json, resource, sys
from erasekit.cli import main
code = main(sys.argv[1:])
print("BENCH " + json.dumps({"code": code,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def erased_copy(folder: Path) -> Path:
    from erasekit.models import build_manifest, load_pipeline, save_model
    from erasekit.world import world_path

    out = folder / "erased"
    save_model(load_pipeline(world_path("no-red")), out,
               build_manifest(base_model=world_path("full"), method="copy-of-no-red"))  # fmt: skip
    return out


def bench(attacks: list[str], model: Path, folder: Path) -> dict:
    out = folder / "audit"
    args = ["audit", "--model", str(model), "--concept", "red", "--out", str(out),
            "--attacks", ",".join(attacks), "--no-progress"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    wall = time.time() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"audit failed: {proc.stderr[-800:]}")
    child = json.loads(line[6:])
    doc = json.loads((out / "results.json").read_text())
    keys = ("steps", "lr", "eval_every")
    return {
        "command": "erasekit audit --concept red --attacks " + ",".join(attacks),
        "audit_wall_s": round(wall, 1),
        "audit_peak_rss_mb": round(child["peak_rss_bytes"] / 2**20),
        "attacks": {
            name: {
                "config": {k: entry["config"][k] for k in keys if k in entry["config"]},
                "per_model": {role: m["cost"] for role, m in entry["models"].items()},
            }
            for name, entry in doc["attacks"].items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="docs/results/bench-attacks-world.json")
    ap.add_argument("--attacks", nargs="+", default=["finetune", "memora", "concept-inversion"])
    args = ap.parse_args()
    from benchlib import write_record

    from erasekit.cli import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = erased_copy(folder)
        result = bench(args.attacks, model, folder)
    write_record("bench_attacks world", result, Path(args.out))


if __name__ == "__main__":
    main()
