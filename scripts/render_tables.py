"""Rewrite the generated tables (<!-- table:KIND --> blocks) in README.md and docs/ from the
method, attack and detector registries. `--check`: exit 1 when any is stale, write nothing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erasekit.catalog import fill_tables

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="report stale tables, write none")
    args = parser.parse_args()
    stale = []
    for file in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = file.read_text()
        filled = fill_tables(text)
        if filled != text:
            stale.append(file.relative_to(ROOT))
            if not args.check:
                file.write_text(filled)
    for file in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {file}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
