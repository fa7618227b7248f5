"""`erasekit report DIR`: re-render report.html and report.md from an audit's results."""

from __future__ import annotations

import argparse

from erasekit.commands._options import add_censor_options


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "report",
        parents=[parent],
        help="re-render report.html / report.md of an audit folder",
        description="Re-render the report of an audit folder from results.json and "
        "samples.jsonl. Flagged images are blurred when the concept is marked sensitive "
        "(nudity; any spec without 'sensitive: false'); --censor/--uncensored decide instead.",
    )
    p.add_argument("folder", metavar="DIR", help="an audit folder (holds results.json)")
    add_censor_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.api import report

    html_path, md_path = report(args.folder, censor=args.censor)
    print(f"wrote {html_path} and {md_path}")
    return 0
