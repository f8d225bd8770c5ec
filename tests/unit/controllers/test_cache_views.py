"""The cache keeps a projection of each object (`controllers.cache.VIEWS`): every reader of the cache
must see through it what it sees on the whole object.

The whole objects are as the API server returned them in `ampacity bench scale` (kwok nodes, a
TrainingJob worker, a ServingPool prefill engine, its Deployment and a Service;
`cluster_objects.json`), and
variants of them for the cases readers tell apart (failed, terminating, unbound, tainted, not
ready). Each reader runs on the whole objects and on their projections; a view that drops a field a
reader uses fails here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from ampacity.api.gpu import pod_gpus
from ampacity.api.servingpool import ServingPoolSpec
from ampacity.training.admission import GangRequest, decide_admission, free_gpus, node_matches
from controllers.cache import ClusterCache, projected
from controllers.powerbudget.controller import PRIORITY_LABEL, gpu_priorities, node_priorities
from controllers.servingpool import sleep
from controllers.servingpool.children import ENGINE_PORT_LABEL, gpu_names
from controllers.servingpool.controller import _has_gpu, _ready, warm_node_preferences
from controllers.trainingjob.admission import GangAdmission, Reservation
from controllers.trainingjob.controller import (
    bind_due,
    broken_workers,
    node_ready,
    unbound_too_long,
)
from tests.fakes import FakeKube, RecordingWakeups

Object = dict[str, Any]
OBJECTS: dict[str, Object] = json.loads((Path(__file__).parent / "cluster_objects.json").read_text())
EXAMPLE = Path(__file__).parents[3] / "examples" / "servingpool.yaml"
NOW = datetime(2026, 12, 7, 21, 0, tzinfo=UTC)


def _variant(name: str, change: Callable[[Object], None]) -> Object:
    obj = copy.deepcopy(OBJECTS[name])
    obj["metadata"]["managedFields"] = [{"manager": "kube-scheduler", "fieldsV1": {"f:status": {}}}]
    change(obj)
    return obj


def _renamed(obj: Object, suffix: str) -> None:
    obj["metadata"]["name"] += suffix
    obj["metadata"]["uid"] += suffix


def _failed(pod: Object) -> None:
    _renamed(pod, "-failed")
    pod["status"].update(phase="Failed", reason="OOMKilled")


def _terminating(pod: Object) -> None:
    _renamed(pod, "-terminating")
    pod["metadata"]["deletionTimestamp"] = "2026-12-07T20:59:00Z"


def _unbound(pod: Object) -> None:
    _renamed(pod, "-unbound")
    del pod["spec"]["nodeName"]
    pod["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False"}]}
    pod["metadata"]["creationTimestamp"] = (NOW - timedelta(seconds=100)).isoformat().replace("+00:00", "Z")


def _unbound_long_ago(pod: Object) -> None:
    _unbound(pod)
    _renamed(pod, "-long-ago")
    pod["metadata"]["creationTimestamp"] = "2026-12-07T20:00:00Z"


def _prioritised(pod: Object) -> None:
    pod["metadata"]["labels"][PRIORITY_LABEL] = "critical"
    pod["metadata"]["labels"][ENGINE_PORT_LABEL] = "8001"


def _not_ready(node: Object) -> None:
    _renamed(node, "-not-ready")
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    ready.update(status="Unknown", reason="NodeStatusUnknown")


def _cordoned(node: Object) -> None:
    _renamed(node, "-cordoned")
    node["spec"]["unschedulable"] = True


def _tainted(node: Object) -> None:
    _renamed(node, "-tainted")
    node["spec"]["taints"] = [{"key": "gpu", "value": "maintenance", "effect": "NoSchedule"}]


def _warm(node: Object) -> None:
    _renamed(node, "-warm")
    node["metadata"]["labels"]["models.ampacity.dev/llama2-70b"] = "host"
    node["status"]["allocatable"]["nvidia.com/gpu"] = "4"


def _whole() -> dict[str, list[Object]]:
    same = lambda _: None  # noqa: E731
    worker_node = OBJECTS["worker"]["spec"]["nodeName"]
    nodes = [
        _variant("node", same),
        _variant("node", _not_ready),
        _variant("node", _cordoned),
        _variant("node", _tainted),
        _variant("node", _warm),
        _variant("node", lambda n: n["metadata"].update(name=worker_node, uid=f"{worker_node}-uid")),
    ]
    workers = [
        _variant("worker", same),
        _variant("worker", _failed),
        _variant("worker", _terminating),
        _variant("worker", _unbound),
        _variant("worker", _unbound_long_ago),
    ]
    engines = [_variant("engine", same), _variant("engine", _prioritised), _variant("engine", _terminating)]
    return {
        "Node": nodes,
        "Pod": workers + engines,
        "Deployment": [_variant("deployment", same)],
        "Service": [_variant("service", same)],
    }


def _views(whole: dict[str, list[Object]]) -> dict[str, list[Object]]:
    return {kind: [projected(kind, copy.deepcopy(o)) for o in objs] for kind, objs in whole.items()}


#: Worker placement rules a TrainingJob's template may carry (admission's node filter).
POD_SPECS: list[Object] = [
    {},
    {"tolerations": [{"key": "gpu", "operator": "Exists"}]},
    {"nodeSelector": {"ampacity.dev/gpu-type": "h100"}},
    {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": ["gpu-node-0"]}
                            ]
                        }
                    ]
                }
            }
        }
    },
]


def _readers(objects: dict[str, list[Object]]) -> dict[str, Any]:
    """What each reader of the cache makes of these objects."""
    nodes, pods, deployments = objects["Node"], objects["Pod"], objects["Deployment"]
    children = deployments + objects["Service"]
    bound = [p for p in pods if p["spec"].get("nodeName")]
    running = [p for p in bound if p["status"]["phase"] == "Running"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    spec = ServingPoolSpec.model_validate(yaml.safe_load(EXAMPLE.read_text())["spec"])
    request = GangRequest("ns/job", NOW, 0, 2, 4, POD_SPECS[1])
    admission = GangAdmission()
    worker = OBJECTS["worker"]["metadata"]
    admission.reservations[f"{worker['namespace']}/job"] = Reservation(
        {worker["name"]: ("gpu-node-0", 1), "not-bound-yet": ("gpu-node-0", 2)}
    )
    wakeups = RecordingWakeups()
    for obj in pods + children:
        wakeups.child_changed(obj["kind"], obj)
    return {
        # the GPUs pods hold, and what is free for gangs (TrainingJob admission, ampacity.training)
        "pod_gpus": [pod_gpus(p) for p in pods],
        "free_gpus": free_gpus(nodes, bound),
        "node_matches": [node_matches(n, s) for n in nodes for s in POD_SPECS],
        "admission": decide_admission(nodes, bound, {}, [request]),
        "reserved": admission.reserved(bound),
        # the gang's workers and their nodes (TrainingJob)
        "broken": broken_workers(
            pods, {p["spec"]["nodeName"]: by_name.get(p["spec"]["nodeName"]) for p in bound}
        ),
        "unbound_too_long": unbound_too_long(pods, NOW),
        "bind_due": bind_due(pods, NOW),
        "node_ready": [node_ready(n) for n in nodes],
        # engines (ServingPool autoscaling and sleep) and warm-node preferences
        "engine_ready": [_ready(p) for p in pods],
        "sleep_urls": [
            sleep._ready_url(p, int(p["metadata"]["labels"].get(ENGINE_PORT_LABEL, "8000"))) for p in pods
        ],
        "has_gpu": [_has_gpu(n, gpu_names(spec.gpu_type)) for n in nodes],
        "warm_preferences": warm_node_preferences(nodes, spec, 2),
        # PowerBudget: GPU priorities from running pods, node identity and capacity
        "priorities": gpu_priorities(running, set(by_name), "batch"),
        "node_priorities": node_priorities({}, running, set(by_name), "batch"),
        "node_ids": [(n["metadata"]["name"], n["metadata"]["uid"], n["status"]["capacity"]) for n in nodes],
        # children: what Context.apply and prune read, and whom a child's change wakes
        "children": [
            (
                c["kind"],
                c["metadata"]["name"],
                c["metadata"]["namespace"],
                c["metadata"]["resourceVersion"],
                c["metadata"]["labels"],
            )
            for c in children
        ],
        "deployments": [
            (d["status"].get("readyReplicas"), d["status"].get("availableReplicas")) for d in deployments
        ],
        "woken": wakeups.woken,
    }


def test_every_reader_sees_the_same_through_the_projection() -> None:
    whole = _whole()
    seen, through_views = _readers(whole), _readers(_views(whole))
    for reader, result in seen.items():
        assert through_views[reader] == result, reader
    # The cases above are the ones readers tell apart: each reader's answer depends on the objects.
    assert seen["broken"] and seen["unbound_too_long"] and seen["bind_due"] is not None
    assert seen["warm_preferences"] and seen["priorities"] and seen["reserved"]
    assert False in seen["node_ready"] and False in seen["engine_ready"] and True in seen["engine_ready"]


def test_a_projection_is_smaller_and_keeps_no_managed_fields() -> None:
    whole = _whole()
    for kind, views in _views(whole).items():
        for full, view in zip(whole[kind], views, strict=True):
            assert "managedFields" not in view["metadata"]
            assert len(json.dumps(view)) < len(json.dumps(full)) / 2, (kind, full["metadata"]["name"])


@pytest.mark.parametrize("kind", ["Pod", "Node", "Deployment", "Service"])
def test_listed_objects_get_their_kind(kind: str) -> None:
    """A LIST's items carry no kind or apiVersion; readers (and Context.apply's callers) use them."""
    view = projected(kind, {"metadata": {"name": "x", "namespace": "ns"}})
    assert view["kind"] == kind and view["apiVersion"] in ("v1", "apps/v1")


async def test_the_cache_keeps_the_projection_from_the_list_and_from_the_watch() -> None:
    kube = FakeKube()
    listed = kube.add(copy.deepcopy(OBJECTS["worker"]))
    cache = ClusterCache(kube)
    await cache.start(sync_seconds=5)
    try:
        watched = kube.add(_variant("engine", lambda _: None))
        assert await cache.pod_informer.wait_for_version(watched["metadata"]["resourceVersion"], 1.0)
        pods = {p["metadata"]["name"]: p for p in await cache.pods()}
        for whole in (listed, watched):
            assert pods[whole["metadata"]["name"]] == projected("Pod", copy.deepcopy(whole))
    finally:
        await cache.close()
