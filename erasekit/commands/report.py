"""`erasekit report DIR`: re-render report.html and report.md from an audit's results."""

from __future__ import annotations

import argparse


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "report",
        parents=[parent],
        help="re-render report.html / report.md of an audit folder",
        description="Re-render the report of an audit folder from results.json and "
        "samples.jsonl. Flagged images are blurred unless --uncensored.",
    )
    p.add_argument("folder", metavar="DIR", help="an audit folder (holds results.json)")
    p.add_argument("--uncensored", action="store_true", help="show flagged images as is")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.report import write_report

    html_path, md_path = write_report(args.folder, uncensored=args.uncensored)
    print(f"wrote {html_path} and {md_path}")
    return 0
