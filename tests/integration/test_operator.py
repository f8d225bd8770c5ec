"""The operator against the real control plane: samples reconcile, children are owned, restarts converge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ampacity.dev.cluster.kubectl import Kubectl, condition, reconciled
from ampacity.dev.cluster.local_operator import LocalOperator
from ampacity.dev.cluster.polling import wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(kind: str, namespace: str | None) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{kind}.yaml").read_text())
    if namespace:
        manifest["metadata"]["namespace"] = namespace
    return manifest


def current(kubectl: Kubectl, kind: str, name: str, namespace: str | None) -> dict[str, Any] | None:
    """The object once the operator has reconciled its current generation."""
    obj = kubectl.get(kind, name, namespace)
    return obj if reconciled(obj) else None


def test_samples_reach_ready_or_explained(kubectl: Kubectl, operator: LocalOperator, namespace: str) -> None:
    for kind in ("servingpool", "trainingjob", "federatedround"):
        assert kubectl.apply(load(kind, namespace)).returncode == 0
    pool = wait_for(
        lambda: (
            (o := current(kubectl, "servingpool", "llama2-70b-chat", namespace))
            and condition(o)["status"] == "True"
            and o
        ),
        what="ServingPool ready",
    )  # type: ignore[index]
    assert condition(pool)["reason"] == "EnginesReady"  # type: ignore[index]
    plan = pool["status"]["plan"]
    assert plan["gpus"] >= 8 and plan["predictedGoodput"] > 0
    # The pool's engines; its router (component=router) runs no GPU.
    engines = kubectl.json(
        "get",
        "deployments",
        "-n",
        namespace,
        "-l",
        "ampacity.dev/servingpool,app.kubernetes.io/component!=router",
    )["items"]
    gpus = {
        d["metadata"]["name"]: (
            d["spec"]["replicas"],
            int(d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]),
        )
        for d in engines
    }
    if plan["mode"] == "disaggregated":
        assert gpus == {
            "llama2-70b-chat-prefill": (plan["prefillReplicas"], plan["prefillTensorParallel"]),
            "llama2-70b-chat-decode": (plan["decodeReplicas"], plan["decodeTensorParallel"]),
        }
    else:
        assert gpus == {"llama2-70b-chat-engine": (plan["prefillReplicas"], plan["prefillTensorParallel"])}
    assert sum(replicas * tp for replicas, tp in gpus.values()) == plan["gpus"]

    job = wait_for(
        lambda: (
            (o := current(kubectl, "trainingjob", "gpt-pretrain", namespace))
            and o["status"].get("phase") == "Running"
            and o
        ),
        what="TrainingJob running",
    )
    assert condition(job)["reason"] == "GangRunning"  # type: ignore[index]
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "ampacity.dev/trainingjob=gpt-pretrain")[
        "items"
    ]
    assert sorted(p["metadata"]["name"] for p in pods) == [f"gpt-pretrain-worker-{r}" for r in range(4)]
    ranks = {
        p["metadata"]["name"]: {e["name"]: e["value"] for e in p["spec"]["containers"][0]["env"]}
        for p in pods
    }
    assert {env["RANK"] for env in ranks.values()} == {"0", "1", "2", "3"}
    assert all(env["WORLD_SIZE"] == "4" for env in ranks.values())
    assert all(p["spec"]["nodeName"].startswith("gpu-node-") for p in pods)

    round_ = wait_for(
        lambda: current(kubectl, "federatedround", "digits", namespace),
        what="FederatedRound reconciled",
    )
    assert condition(round_)["message"]  # type: ignore[index]

    table = kubectl("get", "servingpools,trainingjobs,federatedrounds", "-n", namespace)
    for column in ("MODEL", "MODE", "GPUS", "PHASE", "STEP", "STRATEGY", "READY"):
        assert column in table


def test_power_budget_counts_its_nodes(kubectl: Kubectl, operator: LocalOperator) -> None:
    assert kubectl.apply(load("powerbudget", None)).returncode == 0
    try:
        budget = wait_for(
            lambda: current(kubectl, "powerbudget", "row-a", None), what="PowerBudget reconciled"
        )
        assert budget["status"]["nodes"] == 4
        assert budget["status"]["gpus"] == 32
        assert condition(budget)["reason"] == "AwaitingTelemetry"  # type: ignore[index]
    finally:
        kubectl("delete", "powerbudget", "row-a")


def test_deleting_a_pool_deletes_its_children(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    assert kubectl.apply(load("servingpool", namespace)).returncode == 0
    selector = "ampacity.dev/servingpool=llama2-70b-chat"
    wait_for(
        lambda: kubectl.json("get", "deployments,services", "-n", namespace, "-l", selector)["items"],
        what="children created",
    )
    kubectl("delete", "servingpool", "llama2-70b-chat", "-n", namespace)
    wait_for(
        lambda: (
            not kubectl.json("get", "deployments,services,pods", "-n", namespace, "-l", selector)["items"]
        ),
        timeout=90,
        what="children garbage-collected",
    )


def test_spec_change_replans_and_prunes(kubectl: Kubectl, operator: LocalOperator, namespace: str) -> None:
    pool = load("servingpool", namespace)
    assert kubectl.apply(pool).returncode == 0
    first = wait_for(lambda: current(kubectl, "servingpool", "llama2-70b-chat", namespace), what="first plan")
    # A tighter TPOT needs more decode capacity per request: the pool is re-planned.
    pool["spec"]["slo"]["tpot"] = "50ms"
    assert kubectl.apply(pool).returncode == 0
    tighter = wait_for(
        lambda: current(kubectl, "servingpool", "llama2-70b-chat", namespace),
        what="re-plan for the tighter TPOT",
    )
    assert tighter["status"]["plan"]["predictedGoodput"] < first["status"]["plan"]["predictedGoodput"]
    assert tighter["status"]["plan"]["gpus"] > first["status"]["plan"]["gpus"]
    pool["spec"]["mode"] = "disaggregated"
    assert kubectl.apply(pool).returncode == 0
    engines = "ampacity.dev/servingpool=llama2-70b-chat,app.kubernetes.io/component!=router"

    def deployment_names() -> set[str]:
        items = kubectl.json("get", "deployments", "-n", namespace, "-l", engines)["items"]
        return {d["metadata"]["name"] for d in items}

    wait_for(
        lambda: deployment_names() == {"llama2-70b-chat-prefill", "llama2-70b-chat-decode"},
        what="disaggregated engines",
    )
    pool["spec"]["mode"] = "colocated"
    assert kubectl.apply(pool).returncode == 0
    wait_for(lambda: deployment_names() == {"llama2-70b-chat-engine"}, what="decode and prefill pruned")

    # A model the planner does not know runs on the fallback plan, saying which field to add.
    pool["spec"]["model"]["name"] = "no-such-model"
    assert kubectl.apply(pool).returncode == 0
    obj = wait_for(
        lambda: (
            (o := current(kubectl, "servingpool", "llama2-70b-chat", namespace))
            and (c := condition(o, "Planned"))
            and c["reason"] == "NoLatencyModel"
            and o
        ),
        what="fallback explained",
    )  # type: ignore[index]
    assert "no-such-model" in condition(obj, "Planned")["message"]  # type: ignore[index]
    # Weights that no node can hold are unplannable.
    pool["spec"]["model"]["name"] = "acme/Giant-405B"
    assert kubectl.apply(pool).returncode == 0
    obj = wait_for(
        lambda: (
            (o := current(kubectl, "servingpool", "llama2-70b-chat", namespace))
            and condition(o)["reason"] == "Unplannable"
            and o
        ),
        what="unplannable explained",
    )  # type: ignore[index]
    assert "weights" in condition(obj)["message"]  # type: ignore[index]
    events = kubectl(
        "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=llama2-70b-chat"
    )
    assert "Unplannable" in events


def test_restarted_operator_converges(kubectl: Kubectl, operator: LocalOperator, namespace: str) -> None:
    operator.kill()
    job = load("trainingjob", namespace)
    assert kubectl.apply(job).returncode == 0
    pool = load("servingpool", namespace)
    assert kubectl.apply(pool).returncode == 0
    operator.start()
    wait_for(
        lambda: (
            (o := current(kubectl, "trainingjob", "gpt-pretrain", namespace))
            and o["status"]["phase"] == "Running"
        ),
        what="TrainingJob running after restart",
    )
    wait_for(
        lambda: (
            (o := current(kubectl, "servingpool", "llama2-70b-chat", namespace))
            and condition(o)["status"] == "True"
        ),
        what="ServingPool ready after restart",
    )  # type: ignore[index]
    # Nothing duplicated: exactly one gang of four workers, one Deployment per engine role and the router.
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "ampacity.dev/trainingjob=gpt-pretrain")[
        "items"
    ]
    assert len(pods) == 4
    deployments = kubectl.json("get", "deployments", "-n", namespace, "-l", "ampacity.dev/servingpool")[
        "items"
    ]
    plan = kubectl.get("servingpool", "llama2-70b-chat", namespace)["status"]["plan"]  # type: ignore[index]
    assert len(deployments) == (3 if plan["mode"] == "disaggregated" else 2)


def test_failed_worker_restarts_the_whole_gang(
    kubectl: Kubectl, operator: LocalOperator, namespace: str
) -> None:
    assert kubectl.apply(load("trainingjob", namespace)).returncode == 0
    wait_for(
        lambda: (
            (o := current(kubectl, "trainingjob", "gpt-pretrain", namespace))
            and o["status"]["phase"] == "Running"
        ),
        what="gang running",
    )
    first = {
        p["metadata"]["uid"]
        for p in kubectl.json("get", "pods", "-n", namespace, "-l", "ampacity.dev/trainingjob=gpt-pretrain")[
            "items"
        ]
    }
    kubectl("delete", "pod", "gpt-pretrain-worker-2", "-n", namespace, "--wait=false")
    job = wait_for(
        lambda: (
            (o := current(kubectl, "trainingjob", "gpt-pretrain", namespace))
            and o["status"]["restarts"] == 1
            and o["status"]["phase"] == "Running"
            and o
        ),
        timeout=90,
        what="gang restarted",
    )
    pods = kubectl.json("get", "pods", "-n", namespace, "-l", "ampacity.dev/trainingjob=gpt-pretrain")[
        "items"
    ]
    assert len(pods) == 4
    assert not first & {p["metadata"]["uid"] for p in pods}, "some workers of the failed gang survived"
    assert job["status"]["restarts"] == 1


def test_metrics_follow_objects(kubectl: Kubectl, operator: LocalOperator, namespace: str) -> None:
    assert kubectl.apply(load("servingpool", namespace)).returncode == 0
    series = f'ampacity_servingpool_gpus{{name="llama2-70b-chat",namespace="{namespace}"}}'
    wait_for(lambda: series in operator.metrics(), what="per-object gauge")
    text = operator.metrics()
    assert 'ampacity_reconcile_total{controller="servingpool",result="success"}' in text
    assert "ampacity_reconcile_duration_seconds_bucket" in text
    assert "ampacity_build_info{" in text
    kubectl("delete", "servingpool", "llama2-70b-chat", "-n", namespace)
    wait_for(lambda: series not in operator.metrics(), what="gauge removed after delete")
