"""ServingPool placement on the local control plane: engines go where the weights already are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ampacity.cluster.kubectl import Kubectl
from ampacity.cluster.local_operator import LocalOperator
from ampacity.cluster.polling import wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "servingpool.yaml"
WARM_NODE = "gpu-node-3"
CACHE_LABEL = "models.ampacity.dev/llama2-70b"


def test_engine_lands_on_the_node_that_caches_the_weights(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    pool: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    pool["metadata"]["namespace"] = namespace
    pool["spec"] |= {"mode": "colocated", "minGpus": 0, "workload": {"peakRate": 0.5}}
    kubectl("label", "node", WARM_NODE, f"{CACHE_LABEL}=host")
    try:
        assert kubectl.apply(pool).returncode == 0
        pods = wait_for(
            lambda: [
                p
                for p in kubectl.json("get", "pods", "-n", namespace, "-l", "ampacity.dev/servingpool")[
                    "items"
                ]
                if p.get("spec", {}).get("nodeName")
            ],
            what="engine pod scheduled",
        )
        assert len(pods) == 1
        assert pods[0]["spec"]["nodeName"] == WARM_NODE
        preferred = pods[0]["spec"]["affinity"]["nodeAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        assert preferred[0]["preference"]["matchExpressions"][0]["values"] == [WARM_NODE]
    finally:
        kubectl("label", "node", WARM_NODE, f"{CACHE_LABEL}-")
