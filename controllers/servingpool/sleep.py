"""A sleep group's reconcile, for one pool: observe the group's engines, let
`ampacity.serving.sharing.plan_group` decide, act on this pool's own engines only.

Each pool's reconciler is the one writer of its engines' sleep state: it sends `POST /sleep` and
`POST /wake_up` to its own engine pods and to no other. Every pool of the group computes the same
plan from the same observations, so a co-resident that must make room is put to sleep by its own
reconciler (on its next pass) and the waiting pool's wake follows once that engine is *seen*
asleep: two engines are never awake on one GPU share, even when a sleep is slow or lost.

What is observed: the group's engine pods (label `ampacity.dev/sleep-group`) and their
`GET /is_sleeping`; the GPU share of a pod is its node (engines of a group that share a node's
time-sliced GPUs are fenced together: coarser than one GPU, so it fences more, never less). An
engine whose state cannot be read counts as awake (fail closed). Whether a pool is busy and how
long it has been idle come from its status (`autoscaling.lastRequestTime`, the activator's
`activation`); this pool's own engines also from the scrape.

Fallback: an engine without sleep mode (`/is_sleeping` absent, `/sleep` failing) is only ever
stopped and started (scaleToZeroAfter), and the pool says so in the condition SleepModeUnavailable.
An engine that fails to wake is deleted, so its Deployment replaces it; the held requests go to the
replacement.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from ampacity.api.meta import LABEL_PREFIX
from ampacity.api.servingpool import ServingPoolSpec, ServingPoolStatus, SleepStatus
from ampacity.serving import sharing, tiers
from controllers.reconciler import Context
from controllers.servingpool.children import ENGINE_PORT_LABEL, SLEEP_GROUP_LABEL

SLEEP_MODE_UNAVAILABLE = "SleepModeUnavailable"
HTTP_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Observed:
    """One engine pod of the group."""

    pod: str
    pool: str
    node: str
    url: str
    sleeping: bool | None
    """None: the engine has no sleep mode (or its state could not be read)."""
    readable: bool = True


def schedule(spec: ServingPoolSpec) -> tiers.TierSchedule:
    """The pool's tiers: awake until sleepAfter, asleep at its level until scaleToZeroAfter."""
    assert spec.sleep is not None
    stop = spec.autoscaling.scale_to_zero_after if spec.autoscaling else None
    stop_after = stop if stop is not None else math.inf
    if spec.sleep.level == 1:
        return tiers.TierSchedule(spec.sleep.sleep_after, stop_after, stop_after)
    return tiers.TierSchedule(spec.sleep.sleep_after, spec.sleep.sleep_after, stop_after)


def waiting(status: ServingPoolStatus) -> int:
    """Requests the activator holds for the pool and the operator has not yet answered."""
    activation = status.activation
    if activation is None or activation.wake_requested_at is None or not activation.held_requests:
        return 0
    last = status.autoscaling.last_request_time if status.autoscaling else None
    return activation.held_requests if last is None or activation.wake_requested_at >= last else 0


def idle_seconds(status: ServingPoolStatus, now: datetime) -> float:
    last = status.autoscaling.last_request_time if status.autoscaling else None
    return math.inf if last is None else max(0.0, (now - last).total_seconds())


def group_engines(
    observed: list[Observed],
    pools: dict[str, tuple[ServingPoolSpec, ServingPoolStatus]],
    own: str,
    own_busy: bool,
    now: datetime,
) -> list[sharing.Engine]:
    """The group as `plan_group` takes it: one entry per engine pod (its id is the pod's name)."""
    engines = []
    for engine in observed:
        if engine.pool not in pools:
            continue
        spec, status = pools[engine.pool]
        assert spec.sleep is not None
        idle = idle_seconds(status, now)
        busy = own_busy if engine.pool == own else idle < spec.sleep.sleep_after
        asleep = tiers.ASLEEP if spec.sleep.level == 1 else tiers.DEEP_ASLEEP
        engines.append(
            sharing.Engine(
                pool=engine.pod,
                gpu=engine.node,
                # Unreadable or without sleep mode: counted awake, so nothing wakes beside it.
                state=asleep if engine.sleeping else tiers.AWAKE,
                busy=busy,
                waiting=waiting(status),
                idle_seconds=0.0 if busy else idle,
                schedule=schedule(spec),
                sleep_levels=(spec.sleep.level,) if engine.sleeping is not None else (),
            )
        )
    return engines


def own_actions(plan: sharing.GroupPlan, own: list[Observed]) -> list[tuple[Observed, str, str]]:
    """This pool's sleeps and wakes (stops and starts are the autoscaler's: scaleToZeroAfter)."""
    by_pod = {e.pod: e for e in own}
    return [
        (by_pod[a.pool], a.action, a.reason)
        for a in plan.actions
        if a.pool in by_pod and a.action in (sharing.WAKE, sharing.SLEEP, sharing.DEEP_SLEEP)
    ]


# --- I/O: the thin part ----------------------------------------------------------------------------


def _ready_url(pod: dict[str, Any], port: int) -> str | None:
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
    if not ready or not status.get("podIP") or pod["metadata"].get("deletionTimestamp"):
        return None
    return f"http://{status['podIP']}:{port}"


async def _is_sleeping(client: httpx.AsyncClient, url: str) -> tuple[bool | None, bool]:
    """(sleeping, readable): 404 is an engine without sleep mode (vLLM without dev mode)."""
    try:
        response = await client.get(f"{url}/is_sleeping")
    except httpx.HTTPError:
        return None, False
    if response.status_code == 404:
        return None, True
    if response.status_code != 200:
        return None, False
    return bool(response.json().get("is_sleeping")), True


async def _observe(ctx: Context, client: httpx.AsyncClient, group: str) -> list[Observed]:
    pods = await ctx.cache.pods(ctx.namespace, f"{SLEEP_GROUP_LABEL}={group}")
    found = []
    for pod in pods:
        labels = pod["metadata"].get("labels", {})
        port = int(labels.get(ENGINE_PORT_LABEL, "8000"))
        url = _ready_url(pod, port)
        if url is not None:
            found.append((pod, labels.get(f"{LABEL_PREFIX}/servingpool", ""), url))
    states = await asyncio.gather(*(_is_sleeping(client, url) for _, _, url in found))
    return [
        Observed(
            pod["metadata"]["name"], pool, pod.get("spec", {}).get("nodeName", ""), url, sleeping, readable
        )
        for (pod, pool, url), (sleeping, readable) in zip(found, states, strict=True)
    ]


async def _peers(ctx: Context, group: str) -> dict[str, tuple[ServingPoolSpec, ServingPoolStatus]]:
    pools: dict[str, tuple[ServingPoolSpec, ServingPoolStatus]] = {ctx.name: (ctx.spec, ctx.status)}
    for obj in await ctx.kube.list_objects("ServingPool", ctx.namespace):
        name = obj["metadata"]["name"]
        if name == ctx.name:
            continue
        try:
            spec = ServingPoolSpec.model_validate(obj.get("spec") or {})
            status = ServingPoolStatus.model_validate(obj.get("status") or {})
        except ValueError:
            continue  # its own reconciler reports what is wrong with it
        if spec.sleep is not None and spec.sleep.group == group:
            pools[name] = (spec, status)
    return pools


async def reconcile_sleep(ctx: Context, own_busy: bool, now: datetime) -> SleepStatus:
    """Observe, decide, act on this pool's engines; the pool's sleep status."""
    spec: ServingPoolSpec = ctx.spec
    assert spec.sleep is not None
    previous = ctx.status.sleep or SleepStatus()
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS) as client:
        observed = await _observe(ctx, client, spec.sleep.group)
        own = [e for e in observed if e.pool == ctx.name]
        plan = sharing.plan_group(
            group_engines(observed, await _peers(ctx, spec.sleep.group), ctx.name, own_busy, now)
        )
        wakes, sleeps, problems = previous.wakes, previous.sleeps, []
        for engine, action, reason in own_actions(plan, own):
            path = (
                "/wake_up"
                if action == sharing.WAKE
                else f"/sleep?level={2 if action == sharing.DEEP_SLEEP else 1}&mode=wait"
            )
            try:
                response = await client.post(engine.url + path, timeout=HTTP_TIMEOUT_SECONDS * 12)
                ok, answer = response.status_code == 200, f"answered {response.status_code}"
            except httpx.HTTPError as error:
                ok, answer = False, f"failed ({type(error).__name__})"
            if ok:
                wakes, sleeps = wakes + (action == sharing.WAKE), sleeps + (action != sharing.WAKE)
                ctx.event("Woke" if action == sharing.WAKE else "Slept", f"engine {engine.pod}: {reason}")
            elif action == sharing.WAKE:
                # A wake that fails: replace the engine; the Deployment starts a new one.
                problems.append(f"engine {engine.pod} did not wake (POST /wake_up {answer}): replaced")
                await ctx.kube.delete("Pod", ctx.namespace, engine.pod)
            else:
                problems.append(f"engine {engine.pod} cannot sleep (POST /sleep {answer})")
    without = [e.pod for e in own if e.sleeping is None and e.readable]
    if without:
        problems.append(f"engine {', '.join(without)} has no sleep mode (GET /is_sleeping is 404)")
    if problems:
        ctx.status.set_condition(
            SLEEP_MODE_UNAVAILABLE,
            "True",
            "SleepFailed",
            "; ".join(problems) + "; idle engines are stopped and started instead (scaleToZeroAfter)",
            ctx.generation,
        )
    else:
        ctx.status.set_condition(
            SLEEP_MODE_UNAVAILABLE, "False", "SleepModeWorks", "every engine sleeps and wakes", ctx.generation
        )
    blocked = "; ".join(v for k, v in plan.blocked.items() if any(e.pod == k for e in own))
    return SleepStatus(
        awake=sum(1 for e in own if not e.sleeping),
        asleep=sum(1 for e in own if e.sleeping),
        wakes=wakes,
        sleeps=sleeps,
        blocked=blocked,
    )
