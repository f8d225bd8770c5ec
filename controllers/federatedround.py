"""FederatedRound reconciler: run the round's aggregator service and report the round's progress."""

from __future__ import annotations

import os
from typing import Any

from ampacity.api import FEDERATED_ROUND
from ampacity.api.federatedround import FederatedRoundSpec, RoundPhase
from controllers import metrics
from controllers.reconciler import Context, controller

#: The operator's own image also runs the aggregator service.
OPERATOR_IMAGE = os.environ.get("AMPACITY_IMAGE", "ghcr.io/ampacity/ampacity:0.1.0")
AGGREGATOR_PORT = 8443


def aggregator_deployment(ctx: Context, spec: FederatedRoundSpec) -> dict[str, Any]:
    labels = ctx.child_labels("aggregator")
    container = {
        "name": "aggregator",
        "image": OPERATOR_IMAGE,
        "args": [
            "federated",
            "aggregator",
            f"--port={AGGREGATOR_PORT}",
            "--state-dir=/state",
            f"--rule={spec.aggregation.rule}",
            f"--model={spec.model}",
        ],
        "ports": [{"name": "http", "containerPort": AGGREGATOR_PORT}],
        "volumeMounts": [{"name": "state", "mountPath": "/state"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.child_metadata(f"{ctx.name}-aggregator", "aggregator"),
        "spec": {
            "replicas": 1,
            # One aggregator at a time: two would each accept half of the updates.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "state", "emptyDir": {}}],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                },
            },
        },
    }


def aggregator_service(ctx: Context) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.child_metadata(f"{ctx.name}-aggregator", "aggregator"),
        "spec": {
            "selector": ctx.child_labels("aggregator"),
            "ports": [{"name": "http", "port": AGGREGATOR_PORT, "targetPort": "http"}],
        },
    }


async def reconcile(ctx: Context) -> None:
    spec: FederatedRoundSpec = ctx.spec
    status = ctx.status
    if status.phase in (RoundPhase.COMPLETED, RoundPhase.FAILED):
        return
    deployment = await ctx.kube.apply(aggregator_deployment(ctx, spec))
    service = await ctx.kube.apply(aggregator_service(ctx))
    status.aggregator = f"http://{service['metadata']['name']}.{ctx.namespace}.svc:{AGGREGATOR_PORT}"
    metrics.FEDERATED_ROUND_RECEIVED.labels(ctx.namespace, ctx.name).set(status.received_updates)
    if deployment.get("status", {}).get("availableReplicas", 0) < 1:
        ctx.set_ready(False, "AggregatorStarting", "waiting for the aggregator service to become available")
        return
    status.phase = RoundPhase.SELECTING
    ctx.set_ready(
        False,
        "AwaitingClients",
        f"aggregator ready at {status.aggregator}; waiting for {spec.cohort_size} clients to register",
    )


controller(FEDERATED_ROUND, reconcile)
