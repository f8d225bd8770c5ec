"""How many requests per second the operator sends the API server while nothing changes.

Starts the local control plane with `--nodes` GPU nodes, installs the CRDs and applies the
examples, then counts `apiserver_request_total` (the API server's own metric) over two equal
windows: without the operator (the control plane's own traffic: controllers, kwok) and with the
operator running and settled. The difference is the operator's rate. Prints progress and the
result as one line per window.

    python -m ampacity.dev.idle_requests --nodes 20 --settle 60 --window 60
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from ampacity.dev.cluster.kubectl import Kubectl, install_crds
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def request_counts(cluster: LocalCluster) -> Counter[str]:
    """apiserver_request_total by verb and resource."""
    with cluster.http() as http:
        text = http.get("/metrics").text
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            counts[f"{labels.get('verb')} {labels.get('resource')}"] += int(float(match["value"]))
    return counts


def rate(cluster: LocalCluster, seconds: float) -> tuple[float, Counter[str]]:
    before = request_counts(cluster)
    time.sleep(seconds)
    after = request_counts(cluster)
    delta = after - before
    return sum(delta.values()) / seconds, delta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--settle", type=float, default=60.0, help="seconds for the operator to settle")
    parser.add_argument("--window", type=float, default=60.0, help="seconds each count runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ampacity-idle-") as tmp:
        cluster = LocalCluster(
            Path(tmp) / "cluster", progress=lambda m: print(f"[cluster] {m}", file=sys.stderr)
        )
        cluster.up(nodes=args.nodes)
        operator = LocalOperator(cluster.kubeconfig, Path(tmp) / "operator.log")
        try:
            kubectl = Kubectl(cluster.kubeconfig)
            install_crds(kubectl, REPO / "crds")
            for example in sorted((REPO / "examples").glob("*.yaml")):
                kubectl("apply", "-f", str(example))
            print(f"counting {args.window:g} s without the operator", file=sys.stderr)
            baseline, _ = rate(cluster, args.window)
            operator.start()
            print(f"operator started; settling {args.settle:g} s", file=sys.stderr)
            time.sleep(args.settle)
            print(f"counting {args.window:g} s with the operator", file=sys.stderr)
            loaded, delta = rate(cluster, args.window)
            print(f"control plane alone: {baseline:.2f} requests/s")
            print(f"with the operator:   {loaded:.2f} requests/s")
            print(f"the operator:        {loaded - baseline:.2f} requests/s")
            for key, count in delta.most_common(8):
                print(f"  {key}: {count / args.window:.2f}/s")
        finally:
            operator.stop()
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
