"""Closed-form editors on ShapesWorld -> docs/results/bench-closed-form-world.json.

Each of UCE, RECE, SPEED and MACE erases red from the shipped world at its world preset in its
own `erasekit erase` process (2 threads): the process's wall seconds (load, encode, edit, save:
what a user waits for) and the edit's own seconds from the manifest (RECE: with and without its
validation renders). Then SPEED erases eight words in one call (`--set erase=...`, the last
token of each; the world has four colours and four shapes): the edit's seconds per concept.
Targets (the robust-methods issue): RECE and SPEED <= 10 s per concept including load; SPEED
<= 1 s per concept for 8 concepts in one call (edit time).
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

from benchlib import write_record

EIGHT = "red,green,blue,yellow,circle,square,triangle,cross"


def erase(model: Path, out: Path, method: str, *sets: str) -> dict:
    cmd = [sys.executable, "-m", "erasekit", "erase", "--model", str(model), "--concept", "red",
           "--method", method, "--out", str(out), "--no-progress"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{method}: {proc.stderr.strip().splitlines()[-1]}")
    outputs = json.loads((out / "erasekit.json").read_text())["training"]["outputs"]
    return {"wall_s": round(wall, 2), "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/results/bench-closed-form-world.json")
    args = ap.parse_args()
    from erasekit.world import world_path

    model = world_path("full")
    result = {"concept": "red", "threads": 2, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("uce", "rece", "speed", "mace"):
            result["runs"][method] = erase(model, Path(tmp) / method, method)
        eight = erase(model, Path(tmp) / "speed-8", "speed", f"erase={EIGHT}", "tokens=last")
        result["runs"]["speed, 8 concepts in one call"] = eight
    write_record("bench_closed_form world", result, Path(args.out))


if __name__ == "__main__":
    main()
