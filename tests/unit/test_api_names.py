"""The name limits in the API are the ones the children need.

Each kind's `name_limit` is derived from the child names its controller uses. Here the
controllers' own builders make the children of an object whose name is exactly at the limit,
and every name Kubernetes holds to a DNS label (Services, pod hostnames, label values) must
fit: a controller that starts naming a child `<name>-something-longer` fails this test until
the limit follows.
"""

from __future__ import annotations

import re
from typing import Any

import kopf
import pytest

from ampacity.api import FEDERATED_ROUND, SERVING_POOL, TRAINING_JOB, Resource
from ampacity.api.meta import DNS_LABEL, DNS_LABEL_1035, LABEL_MAX
from ampacity.api.trainingjob import MAX_WORKERS
from controllers.federatedround import controller as federatedround
from controllers.reconciler import Context, _reconcile_once
from controllers.servingpool import children as servingpool
from controllers.trainingjob import controller as trainingjob
from tests.unit.test_api_constraints import BASES


def context(resource: Resource, name: str) -> Context:
    spec = BASES[resource.singular][0]
    body = kopf.Body(
        {
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": {"name": name, "namespace": "ns", "uid": "0000-1111", "generation": 1},
            "spec": spec,
        }
    )
    return Context(resource, body, resource.spec.model_validate(spec), resource.status(), None, None)  # type: ignore[arg-type]


def longest_name(resource: Resource) -> str:
    assert resource.name_limit is not None
    return "a" * resource.name_limit.max_length


def children(resource: Resource, name: str) -> list[dict[str, Any]]:
    ctx = context(resource, name)
    if resource is SERVING_POOL:
        deployments = [
            servingpool.engine_deployment(ctx, ctx.spec, role, 1, 1, [])
            for role in ("engine", "prefill", "decode")
        ]
        router = servingpool.router_deployment(ctx, ctx.spec, "router:1", disaggregated=True)
        # The pool's one endpoint is a Service under the pool's own name.
        return [*deployments, router, servingpool.pool_service(ctx, ctx.spec), *servingpool.router_rbac(ctx)]
    if resource is TRAINING_JOB:
        last_rank = MAX_WORKERS - 1
        return [
            trainingjob.worker_pod(ctx, ctx.spec, rank, MAX_WORKERS, gang=0) for rank in (0, last_rank)
        ] + [trainingjob.rendezvous_service(ctx), trainingjob.token_secret(ctx, "t")]
    if resource is FEDERATED_ROUND:
        return [
            federatedround.aggregator_deployment(ctx, ctx.spec),
            federatedround.aggregator_service(ctx, ctx.spec),
            federatedround.admin_secret(ctx, "t"),
            federatedround.enrolment_secret(ctx, "t", None),
        ]
    raise AssertionError(resource.kind)


def label_limited_names(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) for every name of `obj` that must be a DNS label."""
    found = [(f"label {k}", v) for k, v in obj["metadata"].get("labels", {}).items()]
    if obj["kind"] == "Service":
        found.append(("Service name", obj["metadata"]["name"]))
    if obj["kind"] == "Pod":
        found += [("hostname", obj["spec"]["hostname"]), ("subdomain", obj["spec"]["subdomain"])]
    return found


@pytest.mark.parametrize("resource", [SERVING_POOL, TRAINING_JOB, FEDERATED_ROUND], ids=lambda r: r.kind)
def test_children_of_the_longest_allowed_name_fit(resource: Resource) -> None:
    for child in children(resource, longest_name(resource)):
        for what, value in label_limited_names(child):
            assert len(value) <= LABEL_MAX, f"{child['kind']} {what} {value!r} is longer than {LABEL_MAX}"
            pattern = DNS_LABEL_1035 if what.startswith(("Service", "subdomain")) else DNS_LABEL
            if not what.startswith("label"):
                assert re.fullmatch(pattern, value), f"{child['kind']} {what} {value!r}"


@pytest.mark.parametrize("resource", [SERVING_POOL, TRAINING_JOB, FEDERATED_ROUND], ids=lambda r: r.kind)
def test_the_limit_is_tight(resource: Resource) -> None:
    # One more character and some child no longer fits: the limit gives away nothing.
    longer = longest_name(resource) + "a"
    too_long = [
        value
        for child in children(resource, longer)
        for _, value in label_limited_names(child)
        if len(value) > LABEL_MAX
    ]
    assert too_long


async def test_a_name_admitted_before_the_limit_ends_in_invalid_spec() -> None:
    body = kopf.Body(
        {
            "apiVersion": SERVING_POOL.api_version,
            "kind": SERVING_POOL.kind,
            "metadata": {"name": "p" * 64, "namespace": "ns", "generation": 2},
            "spec": BASES["servingpool"][0],
        }
    )

    async def never(_: Context) -> None:
        pytest.fail("reconcile ran for a name whose children cannot be created")

    ctx = await _reconcile_once(SERVING_POOL, never, body, kube=None, logger=None)  # type: ignore[arg-type]
    ready = ctx.status.condition("Ready")
    assert ready is not None and ready.reason == "InvalidSpec"
    assert ready.message.startswith("metadata.name must be at most 63 characters")
