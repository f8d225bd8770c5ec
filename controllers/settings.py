"""Operator start-up and shutdown: kopf settings, the shared client and read cache, metrics, report and
power telemetry endpoints, probes. Everything operator-wide is built here, kept in kopf's memo and
closed at cleanup."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf
from prometheus_client import start_http_server

from ampacity import kubeconfig
from ampacity.api.meta import GROUP
from ampacity.kube import Kube
from controllers import endpoint_tls
from controllers.cache import ClusterCache
from controllers.powerbudget import endpoint as power_endpoint
from controllers.powerbudget.controller import POWER_MEMO
from controllers.powerbudget.runtime import PowerRuntime
from controllers.reconciler import CACHE_MEMO, LOOPS_MEMO, ReconcileLoops
from controllers.servingpool.controller import PLAN_MEMO, PLANNING_LOCK_MEMO
from controllers.servingpool.plan import PlanMemo
from controllers.trainingjob import reports
from controllers.trainingjob.admission import ADMISSION_MEMO, GangAdmission
from controllers.trainingjob.controller import REPORTS_MEMO, wake_on_node_loss
from controllers.trainingjob.history import HISTORY_MEMO, ClusterFailureHistory
from controllers.wakeups import WAKEUPS_MEMO, Wakeups

#: Port of the Prometheus /metrics endpoint (probes are served by kopf's --liveness endpoint).
METRICS_PORT = int(os.environ.get("AMPACITY_METRICS_PORT", "8080"))


class _WithoutEventHandlerRuns(logging.Filter):
    """kopf logs every run of an event handler at INFO; the reconcile's runs on every watch event
    of every object and only feeds its loop, so its lines would drown the operator's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Handler 'reconcile' succeeded."


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping under our own prefix, in annotations: the status
    # schema belongs to the API and has no room for kopf's progress records.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Events are for what users must notice (condition changes), not for every log line.
    settings.posting.level = logging.WARNING
    # One line per API request drowns the operator's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    objects_log = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _WithoutEventHandlerRuns) for f in objects_log.filters):
        objects_log.addFilter(_WithoutEventHandlerRuns())
    settings.networking.error_backoffs = [1, 2, 5, 10, 30]
    settings.watching.server_timeout = 300
    memo["kube"] = Kube()
    # Each object's reconcile loop (`controllers.reconciler.controller`), stopped at cleanup.
    memo[LOOPS_MEMO] = ReconcileLoops()
    # One list+watch per kind the reconcilers read, instead of a LIST per reconcile.
    cache = memo[CACHE_MEMO] = ClusterCache(memo["kube"])
    # A child's change wakes its owner's reconcile (instead of a short timer per object).
    wakeups = memo[WAKEUPS_MEMO] = Wakeups()
    cache.on_child_change(wakeups.child_changed)
    wake_on_node_loss(cache, wakeups)
    await cache.start()
    start_http_server(METRICS_PORT)
    memo[REPORTS_MEMO] = await reports.start(memo["kube"], reports.REPORT_PORT)
    # ServingPools plan one at a time (`controllers.servingpool.controller._plan`).
    memo[PLANNING_LOCK_MEMO] = asyncio.Lock()
    # ... and a pool whose inputs were planned before takes that plan at once.
    memo[PLAN_MEMO] = PlanMemo()
    # Gang admission decides across jobs: one waiting queue and one set of reservations.
    memo[ADMISSION_MEMO] = GangAdmission()
    # The failures the operator sees on every job move the failure-rate prior of each.
    memo[HISTORY_MEMO] = ClusterFailureHistory()
    # PowerBudget rounds, fed by the cache's NodePower watch.
    memo[POWER_MEMO] = PowerRuntime(memo["kube"], cache.node_power_informer)
    # The agents' fast way to that runtime: telemetry in, assignments out, never through etcd.
    memo["power_endpoint"] = await power_endpoint.start(
        memo[POWER_MEMO], power_endpoint.POWER_PORT, ssl_context=endpoint_tls.serving_context("power")
    )


@kopf.on.login(id="ampacity-credentials")
async def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's own connection uses the same settings and refreshed credentials as our client
    (`ampacity.kubeconfig`: exec plugins, rotated token files); kopf calls this again after a 401."""
    connection = kubeconfig.load()
    token, expires = await connection.bearer_token()
    cert, key = connection.client_cert or (None, None)
    return kopf.ConnectionInfo(
        server=connection.server,
        ca_data=connection.ca_data,
        insecure=connection.insecure or None,
        token=token,
        certificate_data=cert,
        private_key_data=key,
        expiration=expires,
    )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    if LOOPS_MEMO in memo:
        await memo[LOOPS_MEMO].close()
    if REPORTS_MEMO in memo:
        await reports.stop(memo[REPORTS_MEMO])
    if "power_endpoint" in memo:
        await memo["power_endpoint"].close()
    if POWER_MEMO in memo:
        await memo[POWER_MEMO].close()
    if CACHE_MEMO in memo:
        await memo[CACHE_MEMO].close()
    await memo["kube"].close()


@kopf.on.probe(id="apiserver")
async def apiserver_reachable(memo: kopf.Memo, **_: Any) -> bool:
    """Readiness: the operator can still list nodes through its client."""
    await memo["kube"].list_objects("Node", None, label_selector="ampacity.dev/probe=none")
    return True
