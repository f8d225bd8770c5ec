"""`ampacity demo`: the whole path on the embedded default, end to end.

Starts the local control plane (building it on first use), installs the CRDs,
runs the operator, applies the samples in examples/ and shows what
`kubectl get` says about them once the operator has reconciled them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ampacity.api import RESOURCES
from ampacity.api.cli import CRD_DIRS
from ampacity.dev.cluster.kubectl import Kubectl, condition, install_crds, reconciled
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import DEFAULT_STATE_DIR, LocalCluster
from ampacity.dev.cluster.polling import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        args.state_dir, progress=lambda m: print(f"[cluster] {m}", file=sys.stderr, flush=True)
    )
    cluster.up(nodes=args.nodes)
    kubectl = Kubectl(cluster.kubeconfig)
    _say("installing CRDs")
    install_crds(kubectl, REPO / CRD_DIRS[0])

    operator = LocalOperator(cluster.kubeconfig, cluster.logs / "operator.log")
    _say(f"starting the operator (log: {operator.log})")
    operator.start()
    try:
        samples = sorted(EXAMPLES.glob("*.yaml"))
        for sample in samples:
            _say(f"applying {sample.name}")
            kubectl("apply", "-f", str(sample))
        for sample in samples:
            manifest = yaml.safe_load(sample.read_text())
            kind, name = manifest["kind"].lower(), manifest["metadata"]["name"]
            namespace = manifest["metadata"].get("namespace")

            def done(kind: str = kind, name: str = name, namespace: str | None = namespace) -> bool:
                # Reconciled, and past the transient *Starting reasons while children come up.
                obj = kubectl.get(kind, name, namespace)
                ready = condition(obj)
                return reconciled(obj) and ready is not None and not ready["reason"].endswith("Starting")

            wait_for(done, timeout=120, what=f"{kind}/{name} to be reconciled")
        kinds = ",".join(r.plural for r in RESOURCES)
        print(kubectl("get", kinds, "-A", "-o", "wide"))
        print(kubectl("get", "deployments,pods,services", "-n", "default", "-o", "wide"))
        if args.keep_running:
            _say("operator running; Ctrl-C to stop it")
            wait_for(lambda: False, timeout=float("inf"), what="Ctrl-C")
    except KeyboardInterrupt:
        pass
    finally:
        operator.stop()
    _say(f"cluster still up: export KUBECONFIG={cluster.kubeconfig}; stop it with `ampacity cluster down`")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser("demo", help="local control plane + operator + the samples in examples/")
    demo.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="cluster state folder")
    demo.add_argument("--nodes", type=int, default=4, help="fake GPU nodes (default 4)")
    demo.add_argument("--keep-running", action="store_true", help="keep the operator running until Ctrl-C")
    demo.set_defaults(func=_run)
