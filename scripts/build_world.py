"""Thin wrapper: train ShapesWorld (same as `erasekit world build`)."""

import sys

from erasekit.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["world", "build", *sys.argv[1:]]))
