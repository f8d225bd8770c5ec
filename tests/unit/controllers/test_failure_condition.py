"""A failed reconcile's Ready condition says in words what went wrong."""

from __future__ import annotations

from ampacity.kube import ApiUnavailable, Forbidden
from controllers.reconciler import failure_condition


def test_a_write_into_a_namespace_being_deleted_is_not_called_an_rbac_problem() -> None:
    refused = Forbidden(
        403,
        'PATCH deployments ns/pool-prefill: deployments.apps "pool-prefill" is forbidden: unable to create '
        "new content in namespace ns because it is being terminated",
    )
    reason, message = failure_condition("ServingPool", refused, 15)
    assert reason == "NamespaceTerminating"
    assert message == "the namespace is being deleted: nothing new can be created in it; retrying in 15 s"
    rbac = Forbidden(403, 'deployments.apps is forbidden: User "ampacity" cannot patch resource')
    assert failure_condition("ServingPool", rbac, 30)[0] == "ApiForbidden"


def test_an_unexpected_error_names_its_type_not_its_text() -> None:
    reason, message = failure_condition("TrainingJob", KeyError("spec"), 60)
    assert reason == "ReconcileError" and "KeyError" in message and "'spec'" not in message
    assert failure_condition("TrainingJob", ApiUnavailable(0, ""), 15)[1] == (
        "the API server did not answer; retrying in 15 s"
    )
