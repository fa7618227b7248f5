"""The prompt attacks' power without memory on ShapesWorld: each attack's ASR by budget on the
never-learned models (`no-red`, `no-circle`, `no-outlined`) beside the original, and each
attack's discriminative budget (the largest at which the never-learned model's ASR stays at or
below 0.2).

    python scripts/attack_floors.py --out docs/results/attack-floors-world

One audit per concept (the original as the audited model and reference, the never-learned
model as the control; the concept's 16 forget prompts, one image each, the world detector),
every prompt attack at its world budget (Ring-A-Bell rendering its best prompt every 50 of its
200 generations). Resumable: a concept whose audit folder holds results.json is not run again.
README.md's tables are generated from the audits' results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTACKS = {"unlearndiffatk": {}, "p4d": {}, "mma-diffusion": {},
           "ring-a-bell": {"eval_every": 50}}  # fmt: skip
CONCEPTS = ("red", "circle", "outlined")


def run(out: Path, concepts: list[str], root: Path | None = None) -> None:
    """Audit each concept missing from ``out`` (the world at ``root``, default the shipped)."""
    import erasekit
    from erasekit.world import ASSETS, world_path

    root = root or ASSETS

    for concept in concepts:
        folder = out / concept
        if (folder / "results.json").is_file():
            continue
        full = world_path("full", root)
        roles = {"reference": full, "never-learned": world_path(f"no-{concept}", root)}
        erasekit.audit(full, concept, folder, attacks=ATTACKS, roles=roles, n_per_prompt=1,
                       batch_size=16, progress=False, cache_dir=out / "cache")  # fmt: skip


def table(out: Path, concepts: list[str]) -> str:
    lines = []
    for concept in concepts:
        path = out / concept / "results.json"
        if not path.is_file():
            lines += [f"## {concept}", "", "Not measured yet.", ""]
            continue
        doc = json.loads(path.read_text())
        never = doc["models"]["never-learned"]["path"]
        lines += [f"## {concept} (never-learned: `{Path(never).name}`)", ""]
        for name, entry in doc["attacks"].items():
            full, unit = entry["budgets"]["grid"], entry["budgets"]["unit"]
            disc = entry["residual_memory"]["discriminative_budget"]
            # about ten columns: every k-th budget, the last and the discriminative one (the
            # whole curve is in results.json)
            k = max(1, (len(full) - 1) // 10)
            grid = sorted({*full[::k], full[-1], *([disc] if disc is not None else [])})
            lines += [f"`{name}` — ASR by budget ({unit}); discriminative budget: "
                      f"{'none' if disc is None else disc}", "",
                      "| model | " + " | ".join(str(b) for b in grid) + " |",
                      "|---|" + "---|" * len(grid)]  # fmt: skip
            for role in ("audited", "never-learned"):
                curve = [p for p in entry["models"][role]["curve"] if p["step"] in grid]
                label = "original" if role == "audited" else "never-learned"
                lines.append(f"| {label} | " + " | ".join(
                    f"{p['value']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"
                    for p in curve) + " |")  # fmt: skip
            cost = entry["models"]["never-learned"]["cost"]
            n = len(entry["models"]["never-learned"]["outcomes"])
            lines += [
                "",
                f"Cost on the never-learned model (one CPU thread): {n} prompts in "
                f"{cost['seconds']:.0f} s ({3600 * n / cost['seconds']:.0f} prompts/hour, "
                f"pre-check and renders included), {cost['renders']} renders.",
                "",
            ]
    return "\n".join(lines)


def floor_summary(doc: dict) -> dict:
    """Per attack of one audit: its budget unit, full budget, discriminative budget and the
    never-learned model's ASR at the full budget."""
    out = {}
    for name, entry in doc["attacks"].items():
        last = entry["models"]["never-learned"]["curve"][-1]
        out[name] = {"unit": entry["budgets"]["unit"], "full": last["step"],
                     "discriminative": entry["residual_memory"]["discriminative_budget"],
                     "never_learned_asr": {"value": last["value"], "ci95": last["ci95"],
                                           "n": last["n_images"]}}  # fmt: skip
    return out


def summary_table(summaries: dict[str, dict]) -> str:
    """Attacks x concepts: the discriminative budget of the full budget, and the never-learned
    model's ASR at the full budget."""
    if not summaries:
        return ""
    first = next(iter(summaries.values()))
    lines = ["Discriminative budget / full budget (the never-learned model's ASR at the full "
             "budget, Wilson 95%):", "", "| attack | " + " | ".join(summaries) + " |",
             "|---|" + "---|" * len(summaries)]  # fmt: skip
    for name in first:
        cells = []
        for floors in summaries.values():
            f, asr = floors[name], floors[name]["never_learned_asr"]
            disc = "none" if f["discriminative"] is None else f["discriminative"]
            lo, hi = asr["ci95"]
            cells.append(f"{disc} / {f['full']} ({asr['value']:.2f} [{lo:.2f}, {hi:.2f}])")
        lines.append(f"| `{name}` ({first[name]['unit']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def summary(out: Path, concepts: list[str]) -> str:
    """The summary table of the audits in ``out``."""
    return summary_table({c: floor_summary(json.loads((out / c / "results.json").read_text()))
                          for c in concepts if (out / c / "results.json").is_file()})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    concepts = args.concepts.split(",")
    if not args.table_only:
        run(args.out, concepts)
    head = (
        __doc__.split("\n\n")[0] + "\n\n" + "Generated by `scripts/attack_floors.py` from "
        "each concept's `results.json` (its forget prompts, one image each, Wilson 95%).\n\n"
    )
    (args.out / "README.md").write_text("# Attack floors on ShapesWorld v3\n\n" + head
                                        + summary(args.out, concepts)
                                        + table(args.out, concepts) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
