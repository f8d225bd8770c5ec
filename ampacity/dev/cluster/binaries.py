"""Locate (building on first use) the control-plane binaries and kwok's stage definitions."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

BUILD_SCRIPT = Path(__file__).resolve().parents[3] / "tools" / "controlplane" / "build.sh"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "helm")

# kwok's "fast" profile: nodes ready at once, lease heartbeats, pods Running at once,
# Job pods completed, deleted pods finalized (kwok's kustomize/stage/fast).
_KWOK_STAGE_SETS = ("node/fast", "node/heartbeat-with-lease", "pod/fast")


@dataclass(frozen=True)
class Binaries:
    directory: Path

    def __getitem__(self, name: str) -> str:
        return str(self.directory / name)

    @property
    def kwok_stages(self) -> Path:
        return self.directory.parent / "kwok-stages"


def ensure_binaries(verbose: bool = True) -> Binaries:
    """Build whatever is missing from the cache (minutes the first time) and return its location.

    `AMPACITY_BIN_DIR` points at a prebuilt set instead.
    """
    prebuilt = os.environ.get("AMPACITY_BIN_DIR")
    if prebuilt:
        binaries = Binaries(Path(prebuilt))
    else:
        if not BUILD_SCRIPT.exists():
            raise FileNotFoundError(
                f"{BUILD_SCRIPT} is missing: run from a checkout of the repository or set AMPACITY_BIN_DIR"
            )
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            check=True,
            stdout=subprocess.PIPE,
            stderr=sys.stderr if verbose else subprocess.DEVNULL,
            text=True,
        )
        binaries = Binaries(Path(result.stdout.strip().splitlines()[-1]))
    missing = [c for c in COMPONENTS if not (binaries.directory / c).exists()]
    if missing:
        raise FileNotFoundError(f"control-plane binaries missing from {binaries.directory}: {missing}")
    return binaries


def kwok_stage_documents(stages_dir: Path) -> list[str]:
    """The Stage YAML documents of kwok's fast profile, resolved from its kustomizations."""
    documents = []
    for stage_set in _KWOK_STAGE_SETS:
        folder = stages_dir / stage_set
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        documents += [(folder / resource).read_text() for resource in kustomization["resources"]]
    return documents
