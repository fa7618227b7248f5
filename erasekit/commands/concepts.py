"""`erasekit concepts`: list the built-in concept specs, or show one."""

from __future__ import annotations

import argparse
import json


def register(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "concepts",
        parents=[parent],
        help="list built-in concepts, or show one spec",
        description="Without NAME: list built-in concepts. With NAME (or a YAML path): show it.",
    )
    p.add_argument("name", nargs="?", help="concept name or YAML spec path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from erasekit.concepts import available_concepts, load_concept

    if args.name is None:
        for name in available_concepts():
            c = load_concept(name)
            print(f"{name:12s} {c.kind:9s} {c.description}")
        return 0
    print(json.dumps(load_concept(args.name).describe(), indent=2))
    return 0
