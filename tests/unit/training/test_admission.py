"""Gang admission as a pure decision: whole gangs or nothing, reservations, a stated order, node rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from ampacity.api.gpu import pod_gpus
from ampacity.training.admission import (
    GangRequest,
    decide_admission,
    first_fit,
    free_gpus,
    node_matches,
    queue_order,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def node(name: str, gpus: int, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"pool": "a", **(labels or {})}},
        "spec": spec,
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def pod(node_name: str | None, gpus: int, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {"name": f"p-{node_name}-{gpus}", "namespace": "ns"},
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}, {"resources": {}}],
        },
        "status": {"phase": phase},
    }


def job(
    name: str, workers: int, gpus: int, *, age: int = 0, priority: int = 0, **pod_spec: Any
) -> GangRequest:
    return GangRequest(f"ns/{name}", T0 + timedelta(seconds=age), priority, workers, gpus, pod_spec)


def test_pod_gpus_reads_limits_or_requests_and_sums_containers() -> None:
    assert pod_gpus(pod("n", 3)) == 3
    both = {"spec": {"containers": [{"resources": {"requests": {"nvidia.com/gpu": "2"}}}] * 2}}
    assert pod_gpus(both) == 4
    assert pod_gpus({"spec": {}}) == 0


def test_free_gpus_subtract_bound_unfinished_pods_and_reservations() -> None:
    nodes = [node("a", 8), node("b", 8)]
    pods = [pod("a", 4), pod("a", 2, "Succeeded"), pod("b", 8, "Failed"), pod(None, 8), pod("c", 1)]
    assert free_gpus(nodes, pods) == {"a": 4, "b": 8}
    assert free_gpus(nodes, pods, {"b": 6, "z": 1}) == {"a": 4, "b": 2}


def test_first_fit_places_all_of_a_gang_or_none_of_it() -> None:
    free = {"b": 8, "a": 8, "c": 8, "d": 8}
    assert first_fit(free, 4, 8) == ("a", "b", "c", "d")
    assert first_fit(free, 6, 8) is None
    # 3 + 3 + 3 GPUs free: three 2-GPU workers fit, a fourth does not (no node keeps 2 free after one).
    assert first_fit({"a": 3, "b": 3, "c": 3}, 3, 2) == ("a", "b", "c")
    assert first_fit({"a": 3, "b": 3, "c": 3}, 4, 2) is None
    assert first_fit({}, 2, 0) == ("", "")


def test_node_matching_honours_selector_cordon_taints_and_required_affinity() -> None:
    assert node_matches(node("a", 8), {"nodeSelector": {"pool": "a"}})
    assert not node_matches(node("a", 8), {"nodeSelector": {"pool": "b"}})
    assert not node_matches(node("a", 8, unschedulable=True), {})
    tainted = node("a", 8, taints=[{"key": "gpu", "value": "x", "effect": "NoSchedule"}])
    assert not node_matches(tainted, {})
    assert node_matches(tainted, {"tolerations": [{"key": "gpu", "operator": "Exists"}]})
    assert node_matches(tainted, {"tolerations": [{"key": "gpu", "value": "x", "effect": "NoSchedule"}]})
    assert not node_matches(tainted, {"tolerations": [{"key": "gpu", "value": "y"}]})
    assert node_matches(tainted, {"tolerations": [{"operator": "Exists"}]})
    assert node_matches(node("a", 8, taints=[{"key": "k", "effect": "PreferNoSchedule"}]), {})

    def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
        return {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}
                }
            }
        }

    h100 = node("a", 8, {"gpu": "h100", "generation": "9"})
    assert node_matches(
        h100, affinity({"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]})
    )
    assert not node_matches(
        h100, affinity({"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["h100"]}]})
    )
    assert node_matches(
        h100, affinity({"matchExpressions": [{"key": "generation", "operator": "Gt", "values": ["8"]}]})
    )
    assert not node_matches(h100, affinity({"matchExpressions": [{"key": "spot", "operator": "Exists"}]}))
    # Terms are ORed; the requirements of one term ANDed; matchFields by node name.
    assert node_matches(
        h100,
        affinity(
            {"matchExpressions": [{"key": "spot", "operator": "Exists"}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["a"]}]},
        ),
    )
    assert not node_matches(
        h100,
        affinity(
            {
                "matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}],
                "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}],
            }
        ),
    )


def test_two_gangs_that_each_fit_alone_never_both_start_half_placed() -> None:
    nodes = [node("a", 8), node("b", 8)]
    first = decide_admission(nodes, [], {}, [job("x", 2, 8), job("y", 2, 8, age=1)])
    assert list(first.admitted) == ["ns/x"] and first.admitted["ns/x"].nodes == ("a", "b")
    assert first.waiting["ns/y"].position == 1
    # The next decision (any job's pass) sees x's reservation although no pod of x is bound yet.
    again = decide_admission(nodes, [], {"a": 8, "b": 8}, [job("y", 2, 8, age=1)])
    assert not again.admitted and again.waiting["ns/y"].position == 1
    assert "0 free" in again.waiting["ns/y"].reason
    # Once x's pods are bound the reservation is gone but the pods hold the GPUs.
    bound = [pod("a", 8), pod("b", 8)]
    assert not decide_admission(nodes, bound, {}, [job("y", 2, 8, age=1)]).admitted


def test_waiting_gangs_are_served_oldest_first_then_by_priority_without_backfill() -> None:
    nodes = [node("a", 8), node("b", 8)]
    requests = [
        job("small-young", 1, 1, age=30),
        job("big-old", 3, 8, age=10),  # needs 24 of 16: can never fit, does not block
        job("mid", 2, 8, age=20),
        job("low", 1, 8, age=20, priority=-1),
        job("first", 1, 4, age=0),
    ]
    assert [r.key for r in queue_order(requests)] == [
        "ns/first",
        "ns/big-old",
        "ns/mid",
        "ns/low",
        "ns/small-young",
    ]
    decision = decide_admission(nodes, [], {}, requests)
    assert list(decision.admitted) == ["ns/first"]
    assert decision.waiting["ns/big-old"].position is None
    assert "never fit" in decision.waiting["ns/big-old"].reason
    # mid needs both whole nodes; a 4-GPU job holds one: mid heads the line and blocks the rest,
    # even the 1-GPU job that would fit (no backfill: a large gang is never starved).
    assert [(k, w.position) for k, w in decision.waiting.items() if w.position] == [
        ("ns/mid", 1),
        ("ns/low", 2),
        ("ns/small-young", 3),
    ]
    assert "behind 1 older gang(s), first ns/mid" in decision.waiting["ns/low"].reason


def test_only_nodes_a_gang_may_use_count_for_it() -> None:
    nodes = [
        node("a", 8, {"gpu": "h100"}),
        node("b", 8, {"gpu": "a100"}),
        node("c", 8, taints=[{"key": "x", "effect": "NoSchedule"}]),
    ]
    h100_only = job("h", 2, 8, nodeSelector={"gpu": "h100"})
    decision = decide_admission(nodes, [], {}, [h100_only])
    assert decision.waiting["ns/h"].position is None  # one matching node of 8 GPUs: never fits
    tolerant = job(
        "t",
        2,
        8,
        tolerations=[{"key": "x", "operator": "Exists"}],
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["a100"]}]}
                    ]
                }
            }
        },
    )
    assert decide_admission(nodes, [], {}, [tolerant]).admitted["ns/t"].nodes == ("a", "c")
