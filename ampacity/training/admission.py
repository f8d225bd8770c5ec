"""Gang admission: which waiting gangs start now, on which nodes, and where the others stand in line.

A pure decision over what the operator reads (nodes, the pods bound to them) and what it
remembers (the GPUs it reserved for gangs it admitted whose pods are not bound yet):

- a gang is admitted only if every worker fits at once (first fit over the nodes its pod
  template may run on: nodeSelector, required node affinity, tolerated taints, not
  cordoned), so a gang is never partly placed; its placement is then *reserved* until its
  pods are bound (and held by them from then on), so two gangs deciding one after the other
  never count the same free GPUs, and neither ends half-placed waiting for the other;
- waiting gangs are served in a stated order: oldest first (creation time), then higher
  `priority` among gangs created at the same time, then name. The order is strict: a gang
  that does not fit now blocks the younger ones behind it (no backfill), so a large gang
  is never starved by a stream of small ones. A gang that could not fit even on an empty
  cluster does not block anyone: it waits without a place in line, saying so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ampacity.api.gpu import GPU_RESOURCE, pod_gpus

Object = Mapping[str, Any]


@dataclass(frozen=True)
class GangRequest:
    """A gang waiting to start: `workers` pods of `gpus_per_worker` GPUs with `pod_spec`'s placement rules."""

    key: str  # namespace/name
    created: datetime
    priority: int
    workers: int
    gpus_per_worker: int
    pod_spec: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Admitted:
    key: str
    nodes: tuple[str, ...]  # the node of each rank


@dataclass(frozen=True)
class Waiting:
    key: str
    position: int | None  # 1 = next in line; None: can never fit, not in line
    reason: str


@dataclass(frozen=True)
class AdmissionDecision:
    admitted: dict[str, Admitted]
    waiting: dict[str, Waiting]


def queue_order(requests: Iterable[GangRequest]) -> list[GangRequest]:
    """Oldest first; among gangs created together, higher priority first; then by name."""
    return sorted(requests, key=lambda r: (r.created, -r.priority, r.key))


# --- where a worker may run --------------------------------------------------------------------


def _tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    if taint.get("effect") == "PreferNoSchedule":
        return True
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        if toleration.get("operator") == "Exists" and not toleration.get("key"):
            return True
        if toleration.get("key") != taint.get("key"):
            continue
        if toleration.get("operator") == "Exists" or toleration.get("value") == taint.get("value"):
            return True
    return False


def _requirement(values: Mapping[str, str], requirement: Mapping[str, Any]) -> bool:
    """One nodeSelectorRequirement (In, NotIn, Exists, DoesNotExist, Gt, Lt) against labels or fields."""
    key, operator = requirement.get("key", ""), requirement.get("operator")
    wanted = [str(v) for v in requirement.get("values", [])]
    present = values.get(key)
    if operator == "In":
        return present in wanted
    if operator == "NotIn":
        return present not in wanted
    if operator == "Exists":
        return present is not None
    if operator == "DoesNotExist":
        return present is None
    if operator in ("Gt", "Lt") and present is not None and wanted:
        try:
            number, bound = int(present), int(wanted[0])
        except ValueError:
            return False
        return number > bound if operator == "Gt" else number < bound
    return False


def _required_affinity(node: Object, pod_spec: Mapping[str, Any]) -> bool:
    """requiredDuringSchedulingIgnoredDuringExecution: any term matches, all of a term's requirements."""
    required = (
        pod_spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution")
    )
    if not required:
        return True
    labels = node.get("metadata", {}).get("labels", {})
    fields = {"metadata.name": node.get("metadata", {}).get("name", "")}
    for term in required.get("nodeSelectorTerms", []):
        expressions, matched_fields = term.get("matchExpressions", []), term.get("matchFields", [])
        if not expressions and not matched_fields:
            continue  # an empty term matches nothing
        if all(_requirement(labels, r) for r in expressions) and all(
            _requirement(fields, r) for r in matched_fields
        ):
            return True
    return False


def node_matches(node: Object, pod_spec: Mapping[str, Any]) -> bool:
    """Whether the scheduler could place a worker on `node`, as far as node rules go: not cordoned,
    nodeSelector, required node affinity, every NoSchedule/NoExecute taint tolerated."""
    if node.get("spec", {}).get("unschedulable"):
        return False
    labels = node.get("metadata", {}).get("labels", {})
    if any(labels.get(k) != v for k, v in pod_spec.get("nodeSelector", {}).items()):
        return False
    if not _required_affinity(node, pod_spec):
        return False
    tolerations = pod_spec.get("tolerations", [])
    return all(_tolerated(t, tolerations) for t in node.get("spec", {}).get("taints", []))


# --- capacity ----------------------------------------------------------------------------------


def allocatable_gpus(node: Object) -> int:
    return int(node.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, 0))


def free_gpus(
    nodes: Iterable[Object], pods: Iterable[Object], reserved: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Allocatable GPUs minus what the bound unfinished pods hold and what is reserved, per node."""
    free = {node["metadata"]["name"]: allocatable_gpus(node) for node in nodes}
    for pod in pods:
        node_name = pod.get("spec", {}).get("nodeName")
        if node_name in free and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            free[node_name] -= pod_gpus(pod)
    for node_name, gpus in (reserved or {}).items():
        if node_name in free:
            free[node_name] -= gpus
    return free


def first_fit(free: Mapping[str, int], workers: int, gpus_per_worker: int) -> tuple[str, ...] | None:
    """A node for each of `workers` workers (first fit, nodes by name), or None if not all fit."""
    if gpus_per_worker <= 0:
        return ("",) * workers
    left = dict(sorted(free.items()))
    placement = []
    for _ in range(workers):
        node = next((n for n, gpus in left.items() if gpus >= gpus_per_worker), None)
        if node is None:
            return None
        left[node] -= gpus_per_worker
        placement.append(node)
    return tuple(placement)


def _capacity(free: Mapping[str, int], request: GangRequest) -> str:
    usable = {n: g for n, g in sorted(free.items()) if g > 0}
    return (
        f"{request.workers} worker(s) x {request.gpus_per_worker} GPU need "
        f"{request.workers * request.gpus_per_worker} GPUs, at most {request.gpus_per_worker} on one node; "
        f"{len(free)} matching node(s) have {sum(usable.values())} free "
        f"({', '.join(f'{n}: {g}' for n, g in usable.items()) or 'none'})"
    )


def decide_admission(
    nodes: Sequence[Object],
    bound_pods: Iterable[Object],
    reserved: Mapping[str, int],
    requests: Iterable[GangRequest],
) -> AdmissionDecision:
    """Admit waiting gangs in queue order while they fit; the rest wait with their place in line.

    `reserved` is GPUs per node held for admitted gangs whose pods are not bound yet.
    """
    free = free_gpus(nodes, bound_pods, reserved)
    admitted: dict[str, Admitted] = {}
    waiting: dict[str, Waiting] = {}
    blocked_by: str | None = None
    in_line = 0
    for request in queue_order(requests):
        matching = [n for n in nodes if node_matches(n, request.pod_spec)]
        if (
            first_fit(
                {n["metadata"]["name"]: allocatable_gpus(n) for n in matching},
                request.workers,
                request.gpus_per_worker,
            )
            is None
        ):
            waiting[request.key] = Waiting(
                request.key,
                None,
                "can never fit the matching nodes, even empty: "
                + _capacity({n["metadata"]["name"]: allocatable_gpus(n) for n in matching}, request),
            )
            continue
        its_free = {n["metadata"]["name"]: free[n["metadata"]["name"]] for n in matching}
        placement = (
            first_fit(its_free, request.workers, request.gpus_per_worker) if blocked_by is None else None
        )
        if placement is not None:
            admitted[request.key] = Admitted(request.key, placement)
            for node_name in placement:
                if node_name:
                    free[node_name] -= request.gpus_per_worker
            continue
        in_line += 1
        if blocked_by is None:
            blocked_by = request.key
            reason = _capacity(its_free, request)
        else:
            reason = f"waiting behind {in_line - 1} older gang(s), first {blocked_by}"
        waiting[request.key] = Waiting(request.key, in_line, reason)
    return AdmissionDecision(admitted, waiting)
