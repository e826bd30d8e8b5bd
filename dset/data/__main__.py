"""``python -m dset.data``: convert a data set to COCO format, split it, check it (``dset-data`` is the same)."""

from __future__ import annotations

import argparse
import sys

from ..config_checks import ConfigError
from . import check, convert, split
from .errors import DatasetError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dset.data", description=__doc__.split(":", 1)[1].strip())
    commands = ap.add_subparsers(dest="command", required=True, metavar="{convert,split,check}")
    for module in (convert, split, check):
        module.add_command(commands)
    ns = ap.parse_args(argv)
    try:
        return ns.run(ns)
    except (DatasetError, ConfigError) as exc:  # the problem, named; no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
