"""The operator's gang admission state: the waiting gangs and the GPUs reserved for admitted ones.

One object for the whole operator (kept in kopf's memo), because admission is a decision
across jobs: every TrainingJob reconcile that wants to start a gang takes `lock`, puts its
request in `waiting`, and runs the pure `decide_admission` over the read cache's nodes and
bound pods plus what is reserved here. Every gang the decision admits gets a reservation
(rank → node, GPUs) at once, so the next decision, for whichever job, cannot hand out the
same GPUs; the job's own pass then creates its pods pinned to those nodes. A reservation
is held until the pod is bound (the cache then shows the pod holding the GPUs), and is
dropped when the job gives up (its pods stayed unbound too long), stops, or is deleted.

In memory: after an operator restart the jobs re-register on their next pass, and pods
already created are pinned to their nodes, so a lost reservation can at worst keep a pod
pending until the bind timeout gives its gang up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ampacity.training.admission import GangRequest


@dataclass
class Reservation:
    pods: dict[str, tuple[str, int]]  # worker pod name -> (node, GPUs)
    admitted_at: float = field(default_factory=time.monotonic)


@dataclass
class GangAdmission:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: namespace/name -> the request and the names of the pods it would create
    waiting: dict[str, tuple[GangRequest, list[str]]] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)

    def reserved(self, bound_pods: Iterable[Mapping[str, Any]]) -> dict[str, int]:
        """GPUs per node reserved for admitted pods not bound yet; bound ones leave their reservation."""
        bound = {(p["metadata"].get("namespace"), p["metadata"]["name"]) for p in bound_pods}
        per_node: dict[str, int] = {}
        for key, reservation in list(self.reservations.items()):
            namespace = key.split("/", 1)[0]
            for pod, (node, gpus) in list(reservation.pods.items()):
                if (namespace, pod) in bound:
                    del reservation.pods[pod]
                elif node and gpus:
                    per_node[node] = per_node.get(node, 0) + gpus
            if not reservation.pods:
                del self.reservations[key]
        return per_node

    def forget(self, key: str) -> None:
        self.waiting.pop(key, None)
        self.reservations.pop(key, None)


#: Where the operator keeps it in kopf's memo.
ADMISSION_MEMO = "gang_admission"


def gang_admission(memo: dict[str, Any]) -> GangAdmission:
    """The operator-wide admission state (created on first use where the memo is shared)."""
    admission = memo.get(ADMISSION_MEMO)
    if admission is None:
        admission = memo[ADMISSION_MEMO] = GangAdmission()
    assert isinstance(admission, GangAdmission)
    return admission
