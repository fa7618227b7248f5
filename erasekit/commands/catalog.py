"""`erasekit methods`, `erasekit attacks`, `erasekit detectors`: what each registry holds, one
line each; with a NAME, that entry's source, presets and the evidence behind them."""

from __future__ import annotations

import argparse

WHAT = {
    "methods": "erasure methods (--method)",
    "attacks": "recovery and prompt attacks (--attacks)",
    "detectors": "detectors that judge images",
}


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    from erasekit.catalog import names

    for kind, what in WHAT.items():
        p = subparsers.add_parser(
            kind,
            parents=[parent],
            help=f"list the {what}",
            description=f"Without NAME: list the {what}, one line each. With NAME: its "
            "source, presets and the evidence that chose them.",
        )
        p.add_argument("name", nargs="?", metavar="NAME", help=", ".join(names(kind)))
        p.set_defaults(func=run, catalog=kind)


def run(args: argparse.Namespace) -> int:
    from erasekit.catalog import REGISTRIES, details, listing

    if args.name is None:
        print(listing(args.catalog))
        return 0
    REGISTRIES[args.catalog].get(args.name)  # an unknown name: one line with "did you mean"
    print(details(args.catalog, args.name))
    return 0
