"""The `ampacity` command line: local control plane, CRD generation, simulators and benchmarks."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

#: Each command's module registers it (and its subcommands) through `register(subparsers)`.
#: The modules import numpy, aiohttp, the simulators ...: only the one whose command runs is
#: imported, so `ampacity --help` and `--version` answer at once. The help texts are repeated
#: here for that reason; a unit test checks they match what the modules register.
COMMANDS: dict[str, tuple[str, str]] = {
    "crds": ("ampacity.api.cli", "CustomResourceDefinitions generated from the API models"),
    "cluster": ("ampacity.dev.cluster.cli", "local control plane with kwok GPU nodes"),
    "serving": ("ampacity.serving.cli", "LLM serving pools: simulate, plan, benchmark"),
    "activator": (
        "ampacity.activation",
        "hold requests to a ServingPool at zero or asleep, wake it at once, pass them on",
    ),
    "plan": (
        "ampacity.serving.cli",
        "preview the plan the operator would make for a ServingPool (no cluster needed)",
    ),
    "power": ("ampacity.power.cli", "power oversubscription: simulation and GPU model"),
    "demo": ("ampacity.dev.demo", "local control plane + operator + the samples in examples/"),
    "training": ("ampacity.training.cli", "TrainingJob checkpoint policy, simulation, benchmark"),
    "federated": ("ampacity.federated.cli", "federated learning: simulation, aggregator, client"),
    "observability": ("ampacity.observability", "Grafana dashboards and Prometheus rules"),
    "bench": ("ampacity.dev.scale_bench", "operator benchmarks on a local control plane"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ampacity")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the real subparsers of `commands` (all of them when None).

    The other commands are listed by name and help only, without importing their modules.
    """
    parser = argparse.ArgumentParser(prog="ampacity", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ampacity {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = {module for name, (module, _) in COMMANDS.items() if commands is None or name in commands}
    registered: set[str] = set()
    for name, (module, help_text) in COMMANDS.items():
        if module not in wanted:
            subparsers.add_parser(name, help=help_text, add_help=False)
        elif module not in registered:  # a module may register several commands
            importlib.import_module(module).register(subparsers)
            registered.add(module)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command named on the line (the first word that is not an option), if any."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    args = build_parser([command] if command else []).parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
