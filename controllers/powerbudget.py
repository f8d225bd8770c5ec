"""PowerBudget reconciler: find the nodes a budget covers and report its power state."""

from __future__ import annotations

from ampacity.api import POWER_BUDGET
from ampacity.api.powerbudget import NodeSelector, PowerBudgetSpec
from ampacity.cluster.nodes import GPU_RESOURCE
from controllers import metrics
from controllers.reconciler import Context, controller


def label_selector(selector: NodeSelector) -> str:
    """The metav1.LabelSelector as the API server's `labelSelector` query string."""
    terms = [f"{key}={value}" for key, value in sorted(selector.match_labels.items())]
    for requirement in selector.match_expressions:
        values = ",".join(requirement.values)
        terms.append(
            {
                "In": f"{requirement.key} in ({values})",
                "NotIn": f"{requirement.key} notin ({values})",
                "Exists": requirement.key,
                "DoesNotExist": f"!{requirement.key}",
            }[requirement.operator]
        )
    return ",".join(terms)


async def reconcile(ctx: Context) -> None:
    spec: PowerBudgetSpec = ctx.spec
    nodes = await ctx.kube.list_objects("Node", None, label_selector(spec.node_selector))
    gpus = sum(int(n.get("status", {}).get("capacity", {}).get(GPU_RESOURCE, 0)) for n in nodes)
    ctx.status.nodes, ctx.status.gpus = len(nodes), gpus
    ctx.status.headroom_watts = spec.limit_watts - ctx.status.current_watts
    metrics.POWER_BUDGET_LIMIT.labels("", ctx.name).set(spec.limit_watts)
    metrics.POWER_BUDGET_NODES.labels("", ctx.name).set(len(nodes))
    if not nodes:
        ctx.set_ready(False, "NoNodesSelected", "the node selector matches no node")
        return
    ctx.set_ready(
        False,
        "AwaitingTelemetry",
        f"{len(nodes)} nodes with {gpus} GPUs selected; no node agent has reported power yet",
    )


controller(POWER_BUDGET, reconcile)
