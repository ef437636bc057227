"""The ``r1edge`` command line. Each subcommand is a small function over the sdk API."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _print_report(report: dict, as_json: bool, render) -> None:
    """Print a report as JSON (``--json``) or through a human-readable renderer."""
    if as_json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        render(report)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``r1edge inspect PATH``: what a checkpoint or package contains."""
    from sdk.loading import describe, render_description

    _print_report(describe(args.path), args.json, render_description)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="r1edge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show what a checkpoint or package contains")
    p.add_argument("path", help="HF checkpoint directory or r1edge package")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``r1edge`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"r1edge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
