"""The `ampacity` command line: local control plane, CRD generation, simulators and benchmarks."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module registers its own subcommands through `register(subparsers)`.
COMMAND_MODULES = [
    "ampacity.api.cli",
    "ampacity.dev.cluster.cli",
    "ampacity.serving.cli",
    "ampacity.power.cli",
    "ampacity.dev.demo",
    "ampacity.training.cli",
    "ampacity.federated.cli",
    "ampacity.observability",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ampacity", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
