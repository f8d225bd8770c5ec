"""`ampacity crds`: generate the CRDs from the models, or check that they have not drifted."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ampacity.api import RESOURCES
from ampacity.api.crd import stale_files, write_all

#: The checked-in CRDs, and the copy the Helm chart templates (a chart can only read its own files).
CRD_DIRS = (Path("crds"), Path("helm/ampacity/files/crds"))


def _generate(args: argparse.Namespace) -> int:
    out_dirs: list[Path] = args.out or list(CRD_DIRS)
    if args.check:
        stale = [path for out in out_dirs for path in stale_files(RESOURCES, out)]
        for path in stale:
            print(f"{path} is out of date; run `ampacity crds generate`", file=sys.stderr)
        return 1 if stale else 0
    for out in out_dirs:
        for path in write_all(RESOURCES, out):
            print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    crds = subparsers.add_parser("crds", help="CustomResourceDefinitions generated from the API models")
    actions = crds.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = actions.add_parser("generate", help="write the CRD YAML files from ampacity/api")
    generate.add_argument(
        "--out",
        type=Path,
        action="append",
        help="output folder, repeatable (default: crds and the chart's copy)",
    )
    generate.add_argument("--check", action="store_true", help="fail if the files differ instead of writing")
    generate.set_defaults(func=_generate)
