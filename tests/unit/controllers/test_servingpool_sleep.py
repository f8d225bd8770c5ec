"""A sleep group's decisions as each pool's reconciler takes them: who sleeps, who wakes, and the
fencing that waits until a co-resident is seen asleep."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from ampacity.api import SERVING_POOL
from ampacity.api.servingpool import ServingPoolSpec, ServingPoolStatus
from ampacity.serving import sharing
from ampacity.serving.engine.server import Engine, EngineConfig
from controllers.servingpool.controller import reconcile
from controllers.servingpool.sleep import Observed, group_engines, own_actions
from tests.fakes import FakeKube, Operator
from tests.unit.controllers.test_reconcile_servingpool import h100_node

EXAMPLE_TEXT = (Path(__file__).resolve().parents[3] / "examples" / "servingpool.yaml").read_text()

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def _pool(level: int = 1) -> ServingPoolSpec:
    return ServingPoolSpec.model_validate(
        {
            "model": {"name": "llama3-8b", "uri": "hf://meta-llama/Meta-Llama-3-8B"},
            "engine": {"image": "vllm/vllm-openai:v0.11.0"},
            "gpuType": "h100",
            "slo": {"ttft": "1s", "tpot": "100ms"},
            "maxGpus": 1,
            "autoscaling": {"scaleToZeroAfter": "30m"},
            "sleep": {"group": "chat", "hostMemory": "20Gi", "level": level, "sleepAfter": "1m"},
        }
    )


def _status(idle: float, held: int = 0) -> ServingPoolStatus:
    last = NOW - timedelta(seconds=idle)
    raw: dict[str, Any] = {"autoscaling": {"lastRequestTime": last.isoformat()}}
    if held:
        raw["activation"] = {
            "wakeRequestedAt": (NOW - timedelta(seconds=1)).isoformat(),
            "heldRequests": held,
        }
    return ServingPoolStatus.model_validate(raw)


def _engine(pod: str, pool: str, sleeping: bool | None, node: str = "n0") -> Observed:
    return Observed(pod, pool, node, f"http://{pod}:8000", sleeping)


def _plan(
    observed: list[Observed], statuses: dict[str, ServingPoolStatus], own: str, busy: bool = False
) -> sharing.GroupPlan:
    pools = {name: (_pool(), status) for name, status in statuses.items()}
    return sharing.plan_group(group_engines(observed, pools, own, busy, NOW))


def test_a_held_request_puts_the_idle_co_resident_to_sleep_first_then_wakes_its_own_engine() -> None:
    statuses = {"a": _status(idle=300), "b": _status(idle=3600, held=4)}
    first = [_engine("a-0", "a", sleeping=False), _engine("b-0", "b", sleeping=True)]
    # Pool a's reconciler: its idle engine makes room. Pool b's: nothing yet, it waits for a.
    a_acts = own_actions(_plan(first, statuses, "a"), [first[0]])
    assert [(e.pod, action) for e, action, _ in a_acts] == [("a-0", sharing.SLEEP)]
    b_plan = _plan(first, statuses, "b")
    assert own_actions(b_plan, [first[1]]) == []
    assert "waiting for a-0 to sleep on GPU n0" in b_plan.blocked["b-0"]
    # Once a-0 is seen asleep, b wakes: never two awake on the node.
    second = [_engine("a-0", "a", sleeping=True), _engine("b-0", "b", sleeping=True)]
    b_acts = own_actions(_plan(second, statuses, "b"), [second[1]])
    assert [(e.pod, action) for e, action, _ in b_acts] == [("b-0", sharing.WAKE)]


def test_a_co_resident_within_its_keep_awake_time_is_not_interrupted() -> None:
    statuses = {"a": _status(idle=10), "b": _status(idle=3600, held=1)}
    observed = [_engine("a-0", "a", sleeping=False), _engine("b-0", "b", sleeping=True)]
    plan = _plan(observed, statuses, "b")
    assert own_actions(plan, observed) == []
    assert plan.blocked["b-0"].startswith(sharing.COLOCATED_BUSY)


def test_engines_on_other_nodes_wake_at_once_and_an_idle_engine_sleeps_after_its_time() -> None:
    statuses = {"a": _status(idle=10), "b": _status(idle=3600, held=2), "c": _status(idle=120)}
    observed = [
        _engine("a-0", "a", sleeping=False, node="n0"),
        _engine("b-0", "b", sleeping=True, node="n1"),
        _engine("c-0", "c", sleeping=False, node="n2"),
    ]
    acts = {(e.pod, a) for e, a, _ in own_actions(_plan(observed, statuses, "b"), observed)}
    assert acts == {("b-0", sharing.WAKE), ("c-0", sharing.SLEEP)}


def test_an_engine_without_sleep_mode_is_never_slept_only_stopped_so_a_wake_beside_it_waits() -> None:
    statuses = {"a": _status(idle=300), "b": _status(idle=3600, held=1)}
    observed = [_engine("a-0", "a", sleeping=None), _engine("b-0", "b", sleeping=True)]
    plan = _plan(observed, statuses, "b")
    assert own_actions(plan, observed) == []  # a-0 is for the autoscaler to stop, not to sleep
    assert "b-0" in plan.blocked


# --- the reconcile, against the fake API server and real test engines (vLLM's sleep endpoints) ---


async def _engine_server(sleep_mode: bool) -> tuple[Engine, web.AppRunner, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = EngineConfig(
        model="meta-llama/Llama-2-70b-chat-hf",
        served_model_name="llama2-70b",
        latency_model="llama2-70b",
        gpu="h100",
        tensor_parallel_size=4,
        time_scale=0.001,
        enable_sleep_mode=sleep_mode,
        dev_mode=True,
    )
    engine = Engine(config)
    runner = web.AppRunner(engine.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return engine, runner, port


async def test_the_reconcile_sleeps_an_idle_engine_wakes_it_for_a_held_request_and_says_when_it_cannot() -> (
    None
):
    for sleep_mode in (True, False):
        engine, runner, port = await _engine_server(sleep_mode)
        kube = FakeKube()
        kube.add(h100_node("h100-0"))
        pool = yaml.safe_load(EXAMPLE_TEXT)
        name = pool["metadata"]["name"]
        pool["metadata"]["namespace"] = "ns"
        pool["spec"] |= {
            "mode": "colocated",
            "minGpus": 0,
            "workload": {"peakRate": 0.5},
            "autoscaling": {"scaleToZeroAfter": "30m"},
            "sleep": {"group": "chat", "level": 2, "sleepAfter": "1m"},
        }
        kube.add(pool)
        labels = {
            "ampacity.dev/servingpool": name,
            "app.kubernetes.io/component": "engine",
            "ampacity.dev/sleep-group": "chat",
            "ampacity.dev/engine-port": str(port),
        }
        kube.add(
            {
                "kind": "Pod",
                "metadata": {"name": f"{name}-engine-0", "namespace": "ns", "labels": labels},
                "spec": {"nodeName": "h100-0"},
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        )
        try:
            async with Operator(kube) as op:
                await op.reconcile(SERVING_POOL, reconcile, "ns", name)
                await kube.patch_status("Deployment", "ns", f"{name}-engine", {"readyReplicas": 1})
                # Idle for ten minutes, past sleepAfter.
                stored = kube.stored("ServingPool", "ns", name)
                assert stored is not None
                idle = dict(stored["status"]["autoscaling"])
                idle["lastRequestTime"] = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()
                await kube.patch_status("ServingPool", "ns", name, {"autoscaling": idle})
                await op.reconcile(SERVING_POOL, reconcile, "ns", name)
                status = kube.stored("ServingPool", "ns", name)["status"]  # type: ignore[index]
                unavailable = op.condition("ServingPool", "ns", name, "SleepModeUnavailable")
                if not sleep_mode:
                    # The image without sleep mode: it is stopped and started instead, and says so.
                    assert unavailable["status"] == "True"
                    assert "cannot sleep (POST /sleep answered 500)" in unavailable["message"]
                    assert engine.sleep is None and status["sleep"]["sleeps"] == 0
                    continue
                assert unavailable["status"] == "False"
                assert engine.sleep is not None and engine.sleep.is_sleeping and engine.sleep.level == 2
                assert status["sleep"]["sleeps"] == 1
                await op.reconcile(SERVING_POOL, reconcile, "ns", name)
                assert kube.stored("ServingPool", "ns", name)["status"]["tier"] == "asleep"  # type: ignore[index]

                # The activator holds a request and asks: the engine is woken (nothing else on its GPU).
                activation = {"wakeRequestedAt": datetime.now(UTC).isoformat(), "heldRequests": 1, "wakes": 1}
                await kube.patch_status("ServingPool", "ns", name, {"activation": activation})
                await op.reconcile(SERVING_POOL, reconcile, "ns", name)
                assert not engine.sleep.is_sleeping and engine.sleep.wakes == 1
                assert kube.stored("ServingPool", "ns", name)["status"]["sleep"]["wakes"] == 1
        finally:
            await runner.cleanup()
