"""`erasekit bench run STUDY.yaml --out DIR` and `erasekit bench report DIR`: a study of models
x concepts x seeds through erase + audit, pooled into leaderboard.json / leaderboard.md."""

from __future__ import annotations

import argparse


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "bench",
        parents=[parent],
        help="run a study of several models and write its leaderboard",
        description="Run a study file (models x concepts x seeds, each cell through erasekit "
        "erase and erasekit audit with the same settings and attacks) into DIR, resuming what "
        "is done; pool the cells over seeds into DIR/leaderboard.json and leaderboard.md.",
    )
    sub = p.add_subparsers(dest="bench_command", metavar="run|report", required=True)
    r = sub.add_parser("run", parents=[parent], help="run (or resume) a study")
    r.add_argument("study", metavar="STUDY.yaml")
    r.add_argument("--out", required=True, help="the study folder (resumable)")
    which = r.add_mutually_exclusive_group()
    which.add_argument("--profile", help="one of the study's profiles (e.g. standard)")
    which.add_argument("--quick", action="store_const", const="quick", dest="profile",
                       help="the study's quick profile (same as --profile quick)")  # fmt: skip
    r.add_argument("--no-progress", action="store_true", help="no per-cell progress lines")
    r.add_argument("--plan", action="store_true",
                   help="print what each cell would do (reuse, restore, audit, erase + audit, "
                   "fails) and run nothing; nothing is written")  # fmt: skip
    r.add_argument("--share", choices=("cells", "batches"), default="cells",
                   help="several processes (accelerate launch / torchrun): each runs whole cells "
                   "(default; the same models and numbers as one process), or all of them run "
                   "every cell (data-parallel erasure, shared prompts)")  # fmt: skip
    r.set_defaults(func=run)
    rep = sub.add_parser("report", parents=[parent], help="re-pool and re-render a study folder")
    rep.add_argument("folder", metavar="DIR")
    rep.add_argument("--table", action="store_true",
                     help="print each concept's metric table from DIR/leaderboard.json (no "
                     "re-pooling, nothing written; for a README)")  # fmt: skip
    rep.set_defaults(func=report)


def _summary(board: dict, folder: str) -> int:
    """Print where the leaderboard is; the number of failed cells."""
    failed = sum(len(r["failed"]) for e in board["concepts"].values() for r in e["rows"].values())
    print(f"leaderboard: {folder}/leaderboard.md ({failed} failed cells)")
    return failed


def plan(args: argparse.Namespace) -> int:
    """One line per cell and a count of each action."""
    from collections import Counter

    from erasekit.bench import plan_study
    from erasekit.distributed import process_state

    cells = plan_study(args.study, args.out, profile=args.profile, share=args.share)
    if not process_state().is_main_process:
        return 0
    for c in cells:
        why = f" (needs {c['needs']})" if c.get("needs") else ""
        why = f" ({c['error']})" if c.get("error") else why
        print(f"{c['concept']} {c['row']} seed {c['seed']}: {c['action']}{why}")
    counts = Counter(c["action"] for c in cells)
    order = ("reuse", "restore", "audit", "erase + audit", "fails")
    print(f"plan: {len(cells)} cells: " + ", ".join(f"{counts[a]} {a}" for a in order))
    return 0


def run(args: argparse.Namespace) -> int:
    from erasekit.bench import run_study
    from erasekit.distributed import process_state

    if args.plan:
        return plan(args)

    board = run_study(args.study, args.out, profile=args.profile, progress=not args.no_progress,
                      share=args.share)  # fmt: skip
    if process_state().is_main_process:
        _summary(board, args.out)
    return (
        1 if any(r["failed"] for e in board["concepts"].values() for r in e["rows"].values()) else 0
    )


def report(args: argparse.Namespace) -> int:
    from erasekit.bench import report as render

    if args.table:
        import json
        from pathlib import Path

        from erasekit.bench import metrics_table
        from erasekit.errors import ErasekitError

        record = Path(args.folder) / "leaderboard.json"
        if not record.is_file():
            raise ErasekitError(f"no leaderboard.json in {args.folder}")
        board = json.loads(record.read_text())
        for concept in board["concepts"]:
            print("\n".join([f"{concept}:", "", *metrics_table(board, concept), ""]))
        return 0
    _summary(render(args.folder), args.folder)
    return 0
